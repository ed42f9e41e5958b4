"""Resumable, streaming runner for text curation stages.

A pass reads records (jsonl / parquet, several files as one stream) in *chunks* of `chunk_size`
input records; every chunk goes through the pass's stages and produces one output part
(`part-XXXXX.jsonl|parquet`), one rejects part and a checkpoint `ckpt-XXXXX.json` holding the input
position after the chunk, the record ordinal and the chunk's counts. Stage state that spans chunks
(the MinHash LSH index) is pickled to `state-XXXXX.pkl` before the checkpoint is written.

Why chunks + checkpoints rather than independent input shards: near-duplicate removal is global
(a document is compared with every earlier one), so shards cannot be processed independently; the
LSH state has to travel with the position. All files are written atomically and the checkpoint is
written last, so after a kill the run resumes after the last finished chunk: the input is re-opened
at the recorded byte offset / row and nothing already written is redone.

A *two-pass* stage (line dedup) sees each chunk twice — `observe` on every record, then `process` —
by re-reading the chunk from its start position, so a bucket never has to fit in memory.
"""

from __future__ import annotations

import pickle
import time
from collections import Counter
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

from herd.data.records import (
    Item,
    Position,
    RecordReader,
    atomic_write,
    atomic_write_json,
    dumps,
    is_parquet,
    pyarrow_modules,
    read_jsonl,
)

Verdict = tuple[dict[str, Any] | None, str | None, dict[str, Any] | None]  # (record|None, reason, detail)


class Stage(Protocol):
    name: str
    two_pass: bool
    counters: Counter  # stage-specific tallies (lines removed, …) for the report

    def begin_chunk(self) -> None: ...
    def observe(self, rec: dict[str, Any]) -> None: ...
    def process(self, rec: dict[str, Any], ordinal: int) -> Verdict: ...
    def state(self) -> Any: ...
    def load_state(self, state: Any) -> None: ...


class BaseStage:
    """Defaults: one pass, no state across chunks."""

    name = "stage"
    two_pass = False

    def __init__(self) -> None:
        self.counters: Counter = Counter()

    def begin_chunk(self) -> None:
        pass

    def observe(self, rec: dict[str, Any]) -> None:
        pass

    def state(self) -> Any:
        return None

    def load_state(self, state: Any) -> None:
        pass


def validate(item: Item, text_field: str) -> tuple[dict[str, Any] | None, str | None]:
    """The input contract shared by every pass (and the URL pre-pass, whose ordinals must agree)."""
    if item.record is None:
        return None, item.bad
    if not isinstance(item.record.get(text_field), str):
        return None, "missing_text"
    return item.record, None


class _PartSink:
    """Streams one output part: jsonl line by line, parquet in row batches; atomic on close."""

    def __init__(self, path: Path, batch: int = 8192):
        self.path, self.batch, self.n = path, batch, 0
        self._buf: list[dict[str, Any]] = []
        self._parquet = is_parquet(path)
        self._cm = atomic_write(path, "wb" if self._parquet else "w")
        self._f = self._cm.__enter__()
        self._writer = None

    def write(self, rec: dict[str, Any]) -> None:
        self.n += 1
        if not self._parquet:
            self._f.write(dumps(rec) + "\n")
            return
        self._buf.append(rec)
        if len(self._buf) >= self.batch:
            self._flush()

    def _flush(self) -> None:
        pa, pq = pyarrow_modules()
        if not self._buf:
            return
        if self._writer is None:
            table = pa.Table.from_pylist(self._buf)
            self._writer = pq.ParquetWriter(self._f, table.schema)
        else:
            # Later batches are cast to the first batch's schema (missing fields → null).
            table = pa.Table.from_pylist(self._buf, schema=self._writer.schema)
        self._writer.write_table(table)
        self._buf = []

    def close(self) -> None:
        if self._parquet:
            self._flush()
            if self._writer is not None:
                self._writer.close()
        self._cm.__exit__(None, None, None)  # an empty parquet part is 0 bytes; the caller deletes it


def _merge(into: dict[str, Any], add: dict[str, Any]) -> None:
    for k, v in add.items():
        if isinstance(v, dict):
            _merge(into.setdefault(k, {}), v)
        else:
            into[k] = into.get(k, 0) + v


def run_pass(
    reader: RecordReader,
    stages: list[Any],
    parts_dir: str | Path,
    state_dir: str | Path,
    *,
    text_field: str = "text",
    chunk_size: int = 100_000,
    out_format: str = "jsonl",
    write_rejects: bool = True,
    progress: bool = True,
    label: str = "",
) -> dict[str, Any]:
    """Run `stages` over `reader` chunk by chunk (resuming after the last checkpoint); returns the
    totals over all chunks, including those done by earlier runs."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    if any(s.two_pass for s in stages) and len(stages) != 1:
        raise ValueError("a two-pass stage must run alone in its pass")
    parts_dir, state_dir = Path(parts_dir), Path(state_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    ckpts = sorted(state_dir.glob("ckpt-*.json"))
    k, pos, ordinal = 0, (0, 0), 0
    if ckpts:
        last = read_json(ckpts[-1])
        k, pos, ordinal = last["chunk"] + 1, tuple(last["pos"]), last["ordinal"]
        saved = pickle.loads((state_dir / f"state-{last['chunk']:05d}.pkl").read_bytes())
        for st, s in zip(stages, saved["stages"]):
            st.load_state(s)
    t0, docs_this_run = time.perf_counter(), 0
    columns = (SpinnerColumn(), TextColumn(f"[bold]{label}[/] {{task.description}}"), TimeElapsedColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task(f"resuming at chunk {k}" if k else "", total=None)
        while True:
            n_items, pos_after, ordinal_after, counts = _run_chunk(
                reader, stages, pos, ordinal, k, parts_dir, state_dir, text_field, chunk_size, out_format,
                write_rejects,
            )  # fmt: skip
            if n_items == 0:
                break
            # State first, checkpoint last: the checkpoint's existence means the chunk is complete.
            # The previous chunk's state is deleted only after this checkpoint exists, so a kill at
            # any point leaves a matching (checkpoint, state) pair to resume from.
            blob = pickle.dumps(
                {"chunk": k, "stages": [st.state() for st in stages]}, pickle.HIGHEST_PROTOCOL
            )
            with atomic_write(state_dir / f"state-{k:05d}.pkl", "wb") as f:
                f.write(blob)
            atomic_write_json(
                state_dir / f"ckpt-{k:05d}.json",
                {"chunk": k, "pos": list(pos_after), "ordinal": ordinal_after, "counts": counts},
            )
            for old in state_dir.glob("state-*.pkl"):
                if old.name != f"state-{k:05d}.pkl":
                    old.unlink()
            docs_this_run += n_items
            rate = docs_this_run / max(time.perf_counter() - t0, 1e-9)
            bar.update(task, description=f"chunk {k}: {docs_this_run} docs this run, {rate:.0f} docs/s")
            pos, ordinal, k = pos_after, ordinal_after, k + 1
    seconds = time.perf_counter() - t0
    totals: dict[str, Any] = {}
    for c in sorted(state_dir.glob("ckpt-*.json")):
        _merge(totals, read_json(c)["counts"])
    totals["parts"] = [str(p) for p in sorted(parts_dir.glob(f"part-*.{out_format}"))]
    totals["rejects_parts"] = [str(p) for p in sorted(state_dir.glob("rejects-*.jsonl"))]
    totals["seconds_this_run"] = round(seconds, 3)
    totals["docs_per_s_this_run"] = round(docs_this_run / seconds, 1) if seconds > 0 else None
    return totals


def _chunk_items(reader: RecordReader, pos: Position, n: int) -> Iterator[Item]:
    return islice(reader.iter_from(pos), n)


def _run_chunk(
    reader: RecordReader,
    stages: list[Any],
    pos: Position,
    ordinal: int,
    k: int,
    parts_dir: Path,
    state_dir: Path,
    text_field: str,
    chunk_size: int,
    out_format: str,
    write_rejects: bool,
) -> tuple[int, Position, int, dict[str, Any]]:
    for st in stages:
        st.begin_chunk()
        st.counters = Counter()
    if stages and stages[0].two_pass:
        for it in _chunk_items(reader, pos, chunk_size):
            rec, _ = validate(it, text_field)
            if rec is not None:
                stages[0].observe(rec)
    removed: dict[str, Counter] = {st.name: Counter() for st in stages}
    bad: Counter = Counter()
    n_items, n_in, n_out, pos_after = 0, 0, 0, pos
    sink = _PartSink(parts_dir / f"part-{k:05d}.{out_format}")
    rej_cm = atomic_write(state_dir / f"rejects-{k:05d}.jsonl") if write_rejects else None
    rej = rej_cm.__enter__() if rej_cm is not None else None
    try:
        for it in _chunk_items(reader, pos, chunk_size):
            n_items += 1
            pos_after = it.pos
            rec, why = validate(it, text_field)
            if rec is None:
                bad[why or "bad"] += 1
                if rej is not None:
                    rej.write(dumps({"where": it.where, "reason": why, "stage": "input"}) + "\n")
                continue
            n_in += 1
            cur: dict[str, Any] | None = rec
            for st in stages:
                cur, reason, detail = st.process(cur, ordinal)
                if cur is None:
                    removed[st.name][reason or "removed"] += 1
                    if rej is not None:
                        line = {"id": rec.get("id"), "ordinal": ordinal, "stage": st.name, "reason": reason}
                        rej.write(dumps({**line, **(detail or {})}) + "\n")
                    break
            ordinal += 1
            if cur is not None:
                sink.write(cur)
                n_out += 1
    finally:
        sink.close()
        if rej_cm is not None:
            rej_cm.__exit__(None, None, None)
    if n_out == 0:  # nothing survived (or end of input): no empty part files downstream readers must skip
        (parts_dir / f"part-{k:05d}.{out_format}").unlink(missing_ok=True)
    if n_items == 0:
        (state_dir / f"rejects-{k:05d}.jsonl").unlink(missing_ok=True)
    counts = {
        "input_records": n_in, "output_records": n_out, "bad_records": dict(bad),
        "removed": {name: dict(c) for name, c in removed.items()},
        "stage_counters": {st.name: dict(st.counters) for st in stages},
    }  # fmt: skip
    return n_items, pos_after, ordinal, counts


def read_json(path: str | Path) -> Any:
    import json

    return json.loads(Path(path).read_text(encoding="utf-8"))


def concat_rejects(parts: list[str], dest: str | Path) -> int:
    """Concatenate rejects parts (all passes) into one rejects.jsonl; returns the line count."""
    n = 0
    with atomic_write(dest) as f:
        for p in parts:
            for rec in read_jsonl(p):
                f.write(dumps(rec) + "\n")
                n += 1
    return n
