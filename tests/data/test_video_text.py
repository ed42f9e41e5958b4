"""Video-text datasets (herd.data.training.video_text) on tiny generated mp4 files: bad videos and bad
manifest lines are skipped and counted by reason, a manifest and its tar shards give the same samples in
the same order, resuming continues exactly, and two data-parallel ranks are disjoint and in lockstep."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest
import torch

pytest.importorskip("av")

from herd.data.synthetic.videos import truncate, write_audio_only, write_video  # noqa: E402
from herd.data.training.video_text import VideoTextDataset, write_video_tar_shards  # noqa: E402

N_GOOD = 10
# Bad files the manifest names, by the reason each is counted under.
BAD_FILES = {
    "gone.mp4": "missing",
    "empty.mp4": "empty",
    "speech.m4a": "audio_only",
    "cut.mp4": "corrupt",  # moov index at the end, cut away
    "cut_fast.mp4": "truncated",  # index kept, most frames gone
    "notes.mp4": "not_a_video",
}
INDEX_REASONS = {"bad_json": 1, "no_video_field": 1}  # manifest lines that never become records


def good_key(i: int) -> str:
    return f"clip{i:02d}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """N_GOOD 32×24 H.264 clips, clip i has 5 + i frames (so a sample's frame count names its clip),
    every BAD_FILES entry, and two manifest lines that are not records."""
    root = tmp_path_factory.mktemp("video_corpus")
    lines = []
    for i in range(N_GOOD):
        write_video(root / f"{good_key(i)}.mp4", 5 + i, fps=10, width=32, height=24)
        q = {"question": "which way does the red square move?", "question_type": "direction"}
        answer = {"answer": "right"} if i not in (3, 7) else {}  # clips 3 and 7 have no answer
        lines.append({"id": good_key(i), "video": f"{good_key(i)}.mp4", "frames": 5 + i, **q, **answer})
    ref = write_video(root / "ref.mp4", 30, fps=10, width=32, height=24)
    truncate(ref, root / "cut.mp4", 0.5)
    truncate(
        write_video(root / "fast.mp4", 30, fps=10, width=32, height=24, faststart=True),
        root / "cut_fast.mp4",
        0.6,
    )
    (root / "empty.mp4").write_bytes(b"")
    (root / "notes.mp4").write_text("not a video\n" * 20)
    write_audio_only(root / "speech.m4a", seconds=0.2)
    for name in BAD_FILES:
        lines.append({"id": name, "video": name, "caption": "bad"})
    manifest = root / "train.jsonl"
    with manifest.open("w") as f:
        for k, rec in enumerate(lines):
            f.write(json.dumps(rec) + "\n")
            if k == 4:
                f.write('{"video": "clip00.mp4", "caption": \n')  # cut mid-line
                f.write(json.dumps({"caption": "an orphan caption"}) + "\n")
    return manifest


def keys(samples: list[dict]) -> list[str]:
    return [s["key"] for s in samples]


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_bad_videos_are_skipped_and_counted_by_reason(corpus: Path, backend: str) -> None:
    ds = VideoTextDataset.from_jsonl(corpus, num_frames=8, backend=backend, seed=0, loop=False)
    assert len(ds.records) == N_GOOD + len(BAD_FILES) and ds.skipped.counts == INDEX_REASONS
    samples = list(ds)  # one sample per round: a bad record's round is served by a readable one
    assert len(samples) == len(ds) == N_GOOD + len(BAD_FILES)
    assert set(keys(samples)) == {good_key(i) for i in range(N_GOOD)}
    expected = dict(INDEX_REASONS)
    for reason in BAD_FILES.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(ds.skipped.counts) == expected  # each bad file counted once, under its own reason
    for s in samples:  # the video is the record's own: clip i has 5 + i frames; shorter than 8 → masked
        v = s["video"]
        assert v.num_video_frames == s["frames"] and v.frames.shape == (8, 24, 32, 3)
        assert int(v.mask.sum()) == min(8, s["frames"]) and v.path.endswith(f"{s['key']}.mp4")
        assert s["question_type"] == "direction" and set(s) >= {"key", "video", "question"}
    assert keys(list(ds)) != keys(samples)  # the next epoch: a new permutation


def test_check_skips_records_missing_a_field(corpus: Path, tmp_path: Path) -> None:
    def needs_answer(fields: dict) -> str | None:
        return None if fields.get("answer") or "caption" in fields else "missing_answer"

    shards = write_video_tar_shards(corpus, tmp_path / "shards", samples_per_shard=6)
    for ds in (
        VideoTextDataset.from_jsonl(corpus, check=needs_answer, num_frames=2, loop=False),
        VideoTextDataset.from_tar_shards(shards, check=needs_answer, num_frames=2, loop=False),
    ):
        assert ds.skipped.counts["missing_answer"] == 2
        assert {good_key(3), good_key(7)}.isdisjoint(keys(list(ds)))


def test_manifest_and_tar_shards_give_the_same_samples(corpus: Path, tmp_path: Path) -> None:
    # The missing file cannot be copied into a shard; drop it so both formats hold the same records.
    present = tmp_path / "present.jsonl"
    present.write_text(
        "".join(ln for ln in corpus.read_text().splitlines(keepends=True) if "gone.mp4" not in ln)
    )
    shards = write_video_tar_shards(present, tmp_path / "shards", samples_per_shard=4, root=corpus.parent)
    assert [p.name for p in shards] == [f"shard-{k:06d}.tar" for k in range(4)]  # 15 records → 4+4+4+3
    a = VideoTextDataset.from_jsonl(present, root=corpus.parent, num_frames=6, seed=7, loop=False)
    b = VideoTextDataset.from_tar_shards(tmp_path / "shards", num_frames=6, seed=7, loop=False)
    assert [r.key for r in a.records] == [r.key for r in b.records]
    sa, sb = list(a), list(b)
    assert len(sa) == len(sb) == N_GOOD + len(BAD_FILES) - 1 and keys(sa) == keys(sb)
    for x, y in zip(sa, sb):
        assert torch.equal(x["video"].frames, y["video"].frames) and torch.equal(
            x["video"].mask, y["video"].mask
        )
        assert {k: v for k, v in x.items() if k != "video"} == {k: v for k, v in y.items() if k != "video"}
    assert sb[0]["video"].path.startswith(str(tmp_path / "shards")) and "#" in sb[0]["video"].path
    decode_reasons = {k: v for k, v in a.skipped.counts.items() if k not in INDEX_REASONS}
    assert dict(b.skipped.counts) == decode_reasons == {
        "empty": 1, "audio_only": 1, "corrupt": 1, "truncated": 1, "not_a_video": 1
    }  # fmt: skip
    # A shard cut short: counted, and the samples before the cut are kept.
    truncate(shards[1], shards[1], 0.7)
    c = VideoTextDataset.from_tar_shards(tmp_path / "shards", num_frames=2, loop=False)
    assert c.skipped.counts["truncated_shard"] == 1 and 12 <= len(c.records) < 15


def test_resume_continues_exactly(corpus: Path) -> None:
    def fresh() -> VideoTextDataset:
        return VideoTextDataset.from_jsonl(corpus, num_frames=2, seed=3, backend="pyav")

    full = keys(list(islice(iter(fresh()), 26)))  # 16 rounds per epoch: crosses into epoch 1
    first = fresh()
    it = iter(first)
    head = keys(list(islice(it, 11)))
    state = first.state_dict()
    assert state == {"epoch": 0, "position": 11, "world_size": 1, "seed": 3, "n_records": 16}
    resumed = fresh()
    resumed.load_state_dict(state)
    assert head + keys(list(islice(iter(resumed), 15))) == full
    assert full[16:] != full[:10]  # epoch 1 is another permutation
    other = VideoTextDataset.from_jsonl(corpus, num_frames=2, seed=4)
    with pytest.raises(ValueError, match="seed 3"):
        other.load_state_dict(state)


def test_two_ranks_are_disjoint_and_in_lockstep(corpus: Path) -> None:
    ranks = [
        VideoTextDataset.from_jsonl(corpus, num_frames=2, rank=r, world_size=2, seed=5, loop=False)
        for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == (N_GOOD + len(BAD_FILES)) // 2
    got: list[list[str]] = [[], []]
    for s0, s1 in zip(*ranks, strict=True):  # one sample per round on both ranks, bad records or not
        got[0].append(s0["key"])
        got[1].append(s1["key"])
        assert ranks[0].state_dict() == ranks[1].state_dict()
    assert len(got[0]) == len(got[1]) == 8
    assert set(got[0]).isdisjoint(got[1])  # a rank only ever reads its own share
    assert set(got[0]) | set(got[1]) == {good_key(i) for i in range(N_GOOD)}
    bad_total = sum(r.skipped.total for r in ranks) - 2 * sum(INDEX_REASONS.values())
    assert bad_total == len(BAD_FILES)  # each bad file met by exactly one rank
    with pytest.raises(ValueError, match="num_frames"):
        VideoTextDataset(ranks[0].records, num_frames=0)
