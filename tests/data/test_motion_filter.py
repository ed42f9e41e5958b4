"""Motion-score filter (herd.data.curation.motion, `herd data filter-videos`): the score's arithmetic on
known frames, static ≈ 0 and moving above the threshold on generated clips, bad files counted by reason,
and the command end to end (kept / removed lists, report, histogram PNG, one-line errors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("av")

from herd.cli import main  # noqa: E402
from herd.data.curation.motion import filter_videos, motion_score, read_scores, video_motion  # noqa: E402
from herd.data.synthetic.videos import truncate, write_video  # noqa: E402
from herd.vision.video import VideoFrames  # noqa: E402

THRESHOLD = 0.01
SIZE = dict(fps=10, width=32, height=24)


def frames_of(pictures: list[torch.Tensor], mask: list[bool]) -> VideoFrames:
    n = len(pictures)
    return VideoFrames(
        frames=torch.stack(pictures), mask=torch.tensor(mask), timestamps=torch.zeros(n, dtype=torch.float64),
        indices=torch.arange(n), num_video_frames=n, duration=1.0, rotation=0, reader="test", path="x",
    )  # fmt: skip


def test_score_is_the_mean_absolute_grayscale_difference() -> None:
    black, white = torch.zeros(4, 6, 3, dtype=torch.uint8), torch.full((4, 6, 3), 255, dtype=torch.uint8)
    half = black.clone()
    half[:, :3] = 255  # half the pixels change from black to white
    assert motion_score(frames_of([black, white, black], [True] * 3)) == pytest.approx(1.0)
    assert motion_score(frames_of([black, half], [True, True])) == pytest.approx(0.5)
    red = black.clone()
    red[..., 0] = 255  # grayscale is luma: a pure-red change moves Y by 0.299
    assert motion_score(frames_of([black, red], [True, True])) == pytest.approx(0.299, abs=1e-6)
    # a repeat of a short video (mask False) is left out: pairs (black→half) only, not (half→half)
    assert motion_score(frames_of([black, half, half], [True, True, False])) == pytest.approx(0.5)
    assert motion_score(frames_of([white], [True])) == 0.0  # one distinct frame: no motion


def test_static_scores_zero_and_moving_scores_above_the_threshold(tmp_path: Path) -> None:
    still = write_video(tmp_path / "still.mp4", 20, still=True, **SIZE)
    moving = write_video(tmp_path / "moving.mp4", 20, **SIZE)
    vp9 = write_video(tmp_path / "moving.webm", 20, codec="libvpx-vp9", container_format="webm", **SIZE)
    assert video_motion(still, 16) < 0.002  # measured: 0.0 (identical frames encode identically)
    for path in (moving, vp9):  # measured: 0.024 (H.264) and 0.025 (VP9) at 16 frames
        assert 0.02 < video_motion(path, 16) < 0.03
    # more frames in the sample → nearer neighbours → a smaller step; 4 frames: 0.039
    assert video_motion(moving, 4) > video_motion(moving, 16) > THRESHOLD


def _corpus(root: Path) -> Path:
    for i in range(3):
        write_video(root / f"moving{i}.mp4", 12 + 4 * i, **SIZE)
    write_video(root / "still.mp4", 15, still=True, **SIZE)
    truncate(write_video(root / "src.mp4", 20, **SIZE), root / "broken.mp4", 0.5)
    (root / "src.mp4").unlink()
    lines = [{"video": f"moving{i}.mp4", "caption": f"m{i}"} for i in range(3)]
    lines += [{"video": "still.mp4", "caption": "s"}, {"video": "broken.mp4"}, {"video": "gone.mp4"}]
    manifest = root / "videos.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"video": \n{"caption": "x"}\n')
    return manifest


def test_filter_keeps_moving_removes_static_and_counts_bad_files(tmp_path: Path) -> None:
    manifest = _corpus(tmp_path / "v")
    report = filter_videos(tmp_path / "out", THRESHOLD, manifest=manifest, num_frames=8)
    assert report["videos"] == 6 and report["kept"] == 3
    assert report["removed"] == {"low_motion": 1, "corrupt": 1, "missing": 1}
    assert report["bad_files"] == {"corrupt": 1, "missing": 1}
    assert report["bad_records"] == {"bad_json": 1, "no_video_field": 1}
    kept = [json.loads(ln) for ln in (tmp_path / "out/kept.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in kept] == ["m0", "m1", "m2"] and all(r["motion_score"] > 0.02 for r in kept)
    removed = [json.loads(ln) for ln in (tmp_path / "out/removed.jsonl").read_text().splitlines()]
    assert [(r["video"], r["reason"]) for r in removed] == [
        ("still.mp4", "low_motion"),
        ("broken.mp4", "corrupt"),
        ("gone.mp4", "missing"),
    ]
    assert removed[0]["motion_score"] < 0.002 and "broken.mp4" in removed[1]["error"]
    assert sum(report["histogram"]["counts"]) == 4 and report["score"]["min"] == removed[0]["motion_score"]
    assert report["histogram"]["counts"][0] == 1  # the static clip, alone in the lowest bin
    # a folder instead of a manifest: its video files, sorted, the same scores
    again = filter_videos(tmp_path / "out2", THRESHOLD, videos=[tmp_path / "v"], num_frames=8)
    assert again["videos"] == 5 and again["kept"] == 3 and again["bad_files"] == {"corrupt": 1}
    by_name = {Path(k).name: v for k, v in read_scores(tmp_path / "out2/kept.jsonl").items()}
    assert by_name == {r["video"]: r["motion_score"] for r in kept}


def test_command_end_to_end(tmp_path: Path, capsys) -> None:
    manifest = _corpus(tmp_path / "v")
    out = tmp_path / "out"
    argv = ["data", "filter-videos", "--manifest", str(manifest), "--threshold", str(THRESHOLD)]
    assert main([*argv, "--out", str(out), "--num-frames", "8", "--bins", "10"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["videos"], summary["kept"], summary["bad_files"]) == (6, 3, {"corrupt": 1, "missing": 1})
    report = json.loads((out / "report.json").read_text())
    assert len(report["histogram"]["counts"]) == 10 and report["threshold"] == THRESHOLD
    png = Image.open(out / "motion_hist.png")
    assert png.size == (640, 360)
    colours = {c for _, c in png.convert("RGB").getcolors(1 << 16)}
    assert (60, 160, 80) in colours and (200, 70, 60) in colours  # kept (green) and removed (red) bars
    assert len((out / "kept.jsonl").read_text().splitlines()) == 3
    # bad input: one line on stderr naming the file, exit status 2
    assert main(["data", "filter-videos", "--manifest", str(tmp_path / "nope.jsonl"), "--threshold", "0.1",
                 "--out", str(out)]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.jsonl" in err[0] and err[0].startswith("herd data filter-videos: error:")
    assert main([*argv[:-1], "1.5", "--out", str(out)]) == 2
    assert "threshold" in capsys.readouterr().err
