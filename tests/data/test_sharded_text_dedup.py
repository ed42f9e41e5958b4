"""Sharded text dedup (2 ranks, filesystem markers) equals the single-process run; resumes per stage."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from synthetic_inputs import write_jsonl

from herd.data.curation import sharded_text_dedup as std
from herd.data.curation.text_dedup import TextDedupConfig, dedup_text
from herd.data.records import read_jsonl, read_parts

pytest.importorskip("datasketch")

WORDS = [f"w{i}" for i in range(3000)]


def cfg(**kw) -> TextDedupConfig:
    return TextDedupConfig(
        **{"progress": False, "chunk_size": 7, "line_bucket": 9, "line_max_repeats": 2, **kw}
    )


def corpus(tmp_path: Path) -> list[Path]:
    """Three files: URL versions, near and exact duplicates, chains, boilerplate lines, bad records —
    each kind spread across file boundaries (and line buckets straddling files)."""
    rng = np.random.default_rng(3)
    text = lambda n=120: " ".join(rng.choice(WORDS, n))  # noqa: E731
    base = [text() for _ in range(12)]
    rows: list = []
    for i, t in enumerate(base):
        lines = [t, "cookie banner text"] + (["subscribe now"] if i % 3 == 0 else [])
        rows.append({"id": f"d{i}", "text": "\n".join(lines), "url": f"https://site/{i % 9}", "timestamp": i})
    for i in (1, 4, 7, 10, 11):  # near duplicates (one word changed) of documents in other files
        w = base[i].split()
        w[int(rng.integers(len(w)))] = "zz"
        rows.append({"id": f"near{i}", "text": " ".join(w)})
    rows.append({"id": "copy2", "text": base[2], "url": ""})
    w = base[5].split()
    rows.append({"id": "chain-a", "text": " ".join(w[:100] + ["q"] * 20)})  # a partial copy of d5
    rows.append({"id": "old-0", "text": text(), "url": "HTTPS://SITE/0#x", "timestamp": -5})
    rows.append({"id": "nots", "text": text(), "url": "https://site/3", "timestamp": "??"})
    rows.append({"id": "nowords", "text": "!!! ???"})
    rows.append({"id": "only-boiler", "text": "cookie banner text\nsubscribe now"})
    rows += ["{oops", {"id": "no-text"}, [1]]
    order = rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    thirds = np.array_split(np.arange(len(rows)), 3)
    return [write_jsonl(tmp_path / f"in{k}.jsonl", [rows[i] for i in t]) for k, t in enumerate(thirds)]


def run_ranks(inputs: list[Path], out: Path, c: TextDedupConfig, world: int, timeout: float = 60.0) -> dict:
    """Every rank in its own thread (the ranks share nothing but the filesystem)."""
    reports, errors = {}, {}

    def one(r: int) -> None:
        try:
            reports[r] = std.dedup_text_sharded(inputs, out, c, r, world, wait_timeout_s=timeout, poll_s=0.02)
        except BaseException as e:  # noqa: BLE001 - collected and re-raised below
            errors[r] = e

    threads = [threading.Thread(target=one, args=(r,)) for r in range(world)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    if errors:
        first = next(iter(errors.values()))  # the cause, not a rank that timed out waiting for it
        raise next((e for e in errors.values() if not isinstance(e, TimeoutError)), first)
    assert all(reports[r] is None for r in range(1, world))
    return reports[0]


@pytest.mark.parametrize("stages", [("url", "minhash", "lines"), ("minhash",), ("lines",)])
def test_two_ranks_equal_single_process(tmp_path: Path, stages: tuple[str, ...]) -> None:
    inputs = corpus(tmp_path)
    ref = dedup_text(inputs, tmp_path / "ref", cfg(stages=stages))
    got = run_ranks(inputs, tmp_path / "out", cfg(stages=stages), world=2)
    assert list(read_parts(got["output_parts"])) == list(read_parts(ref["output_parts"]))
    for k in ("input_records", "output_records", "bad_records", "removed"):
        assert got[k] == ref[k], k
    assert read_jsonl(tmp_path / "out" / "rejects.jsonl") == read_jsonl(tmp_path / "ref" / "rejects.jsonl")
    if stages[0] == "url":  # the corpus exercises every rule
        assert got["removed"]["url"]["older_url_version"] >= 3
        assert got["removed"]["minhash"]["near_duplicate"] >= 5
        assert got["removed"]["lines"]["empty_after_line_dedup"] == 1
        want = ref["passes"]["lines"]["stage_counters"]["lines"]
        assert got["line_dedup"] == want and want["lines_removed"] >= 5


def test_kill_a_rank_mid_stage_then_resume(tmp_path: Path, monkeypatch) -> None:
    inputs = corpus(tmp_path)
    ref = dedup_text(inputs, tmp_path / "ref", cfg())
    real = std.ShardedTextDedup._buckets
    crashed = threading.Event()

    def crash_on_rank_1(self):
        if self.rank == 1:
            crashed.set()
            raise RuntimeError("injected failure")
        return real(self)

    def wait(self, paths, what):  # rank 0 gives up on the partition stage once rank 1 is dead
        while not all(p.is_file() for p in paths):
            if crashed.is_set() and what == "stage partition":
                raise TimeoutError(what)
            time.sleep(0.02)

    monkeypatch.setattr(std.ShardedTextDedup, "_buckets", crash_on_rank_1)
    monkeypatch.setattr(std.ShardedTextDedup, "_wait", wait)
    with pytest.raises(RuntimeError, match="injected failure"):
        run_ranks(inputs, tmp_path / "out", cfg(), world=2)
    work = tmp_path / "out" / "_sharded"
    signed = {p: p.stat().st_mtime_ns for p in (work / "sign").glob("*.json")}
    assert len(signed) == 3 and not (work / "resolve.npz").exists()
    monkeypatch.undo()
    got = run_ranks(inputs, tmp_path / "out", cfg(), world=2)
    assert {p: p.stat().st_mtime_ns for p in signed} == signed  # signatures were not recomputed
    ranks = got["sharded"]["ranks"]
    assert [r["stages"]["sign"] for r in ranks] == ["skipped", "skipped"]
    assert [r["stages"]["partition"] for r in ranks] == ["skipped", "ran"]  # rank 0 had finished it
    assert list(read_parts(got["output_parts"])) == list(read_parts(ref["output_parts"]))
    assert got["removed"] == ref["removed"]
    with pytest.raises(ValueError, match="started with"):  # another world size on the same folder
        std.dedup_text_sharded(inputs, tmp_path / "out", cfg(), 0, 3)


def test_rank_from_launcher_environment(monkeypatch) -> None:
    for k in ("WORLD_SIZE", "RANK", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN",
              "SLURM_NTASKS", "SLURM_PROCID"):  # fmt: skip
        monkeypatch.delenv(k, raising=False)
    assert std.shard_env() == (0, 1)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "8")
    assert std.shard_env() == (4, 8)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert std.shard_env() == (1, 2)  # torchrun's variables win


def test_cli_sharded_mode(tmp_path: Path, capsys) -> None:
    from herd.commands import build_parser

    inputs = [str(p) for p in corpus(tmp_path)]
    common = [
        "data",
        "dedup-text",
        "--input",
        *inputs,
        "--line-bucket",
        "9",
        "--line-max-repeats",
        "2",
        "--no-progress",
    ]
    for name, extra in (("plain", []), ("sharded", ["--sharded", "--rank", "0", "--world", "1"])):
        args = build_parser().parse_args([*common, "--out", str(tmp_path / name), *extra])
        assert args.func(args) == 0
    plain = sorted((tmp_path / "plain").glob("part-*.jsonl"))
    sharded = sorted((tmp_path / "sharded").glob("part-*.jsonl"))
    assert list(read_parts(sharded)) == list(read_parts(plain)) and len(sharded) == 3
