"""`herd data dedup-images|dedup-text|filter-text|filter-clip|resample` through the `herd` parser and main."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from synthetic_inputs import write_jsonl

from herd.cli import main
from herd.commands import build_parser
from herd.data.records import read_parts


def parser() -> argparse.ArgumentParser:
    return build_parser()


def run(*argv: str) -> int:
    args = parser().parse_args(list(argv))
    return args.func(args)


def test_commands_are_registered() -> None:
    ap = parser()
    for argv in (["data", "dedup-images", "--images", "d", "--threshold", "0.5", "--out", "o"],
                 ["data", "dedup-text", "--input", "a.jsonl", "--out", "o"],
                 ["data", "filter-text", "--input", "a.jsonl", "--out", "o"],
                 ["data", "filter-clip", "--manifest", "m", "--model", "ViT-B-32", "--threshold", "0.2", "--out", "o"],
                 ["data", "resample", "--captions", "c", "--vocab-texts", "v", "--threshold", "5", "--out", "o"]):  # fmt: skip
        assert callable(ap.parse_args(argv).func)
    with pytest.raises(SystemExit):
        ap.parse_args(
            ["data", "dedup-images", "--images", "d", "--manifest", "m", "--threshold", "1", "--out", "o"]
        )
    with pytest.raises(SystemExit):
        ap.parse_args(["data"])


def test_dedup_and_filter_text(tmp_path: Path, capsys) -> None:
    body = " ".join(f"word{i}" for i in range(60))
    rows = [
        {"id": "a", "text": body, "url": "http://x/1", "timestamp": 1},
        {"id": "b", "text": body + " extra", "url": "http://x/2", "timestamp": 1},  # near duplicate of a
        {"id": "c", "text": "an old page about owls", "url": "http://x/3", "timestamp": 1},
        {
            "id": "d",
            "text": "the new page about owls and " + "rivers " * 3,
            "url": "http://x/3",
            "timestamp": 2,
        },
        "{bad json",
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    assert (
        run(
            "data",
            "dedup-text",
            "--input",
            str(inp),
            "--out",
            str(tmp_path / "d"),
            "--no-progress",
            "--num-perm",
            "64",
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["input_records"] == 4 and summary["output_records"] == 2
    assert summary["removed"]["url"] == {"older_url_version": 1} and summary["removed"]["minhash"] == {
        "near_duplicate": 1
    }
    parts = sorted(str(p) for p in (tmp_path / "d").glob("part-*.jsonl"))
    assert [r["id"] for r in read_parts(parts)] == ["a", "d"]

    dirty = tmp_path / "dirty.txt"
    dirty.write_text("owls\n")
    assert run("data", "filter-text", "--input", *parts, "--out", str(tmp_path / "f"), "--dirty-words", str(dirty),
               "--dup-ngram", "", "--no-progress", "--format", "parquet") == 0  # fmt: skip
    rep = json.loads((tmp_path / "f" / "report.json").read_text())
    assert rep["removed"]["heuristics"] == {"dirty_words": 1} and rep["output_records"] == 1
    with pytest.raises(SystemExit, match="reference"):
        run("data", "filter-text", "--input", *parts, "--out", str(tmp_path / "g"), "--max-kl", "1")


def test_resample_command(tmp_path: Path, capsys) -> None:
    caps = write_jsonl(
        tmp_path / "caps.jsonl",
        [{"id": i, "caption": "a red car" if i < 50 else "an owl"} for i in range(60)],
    )
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("red car\nowl\n")
    assert main(["data", "resample", "--captions", str(caps), "--vocab-texts", str(vocab), "--threshold", "20",
                 "--out", str(tmp_path / "r"), "--max-n", "2"]) == 0  # fmt: skip
    rep = json.loads(capsys.readouterr().out)
    # 'owl' (10 captions) is rare: always kept; 'red'/'car'/'red car' (50 each): P = 1-(1-√(20/50))³.
    p = 1 - (1 - (20 / 50) ** 0.5) ** 3
    assert rep["captions"] == 60 and rep["expected_kept_fraction"] == pytest.approx((50 * p + 10) / 60)
    assert rep["kept"] >= 10
