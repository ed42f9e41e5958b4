"""Record helpers every data job shares: the skip counter, the ignore index, webdataset names and
streaming jsonl / parquet I/O.

`SkipCounter` is the one way herd counts bad input: a reader or dataset that meets a record it cannot
use skips it and counts it by reason (`bad_json`, `missing_field`, `too_long`, `not_an_image`, ...),
keeping the first few locations, so a run that dropped data says so (the training loop logs every
task's counts in metrics.jsonl and on the console).

I/O streams: a corpus is never held in memory. Readers yield one `Item` per input record together
with a *resumable position* (file index, byte offset for jsonl / row index for parquet), so a pipeline
can checkpoint "where it was" and seek straight back after a kill. Bad records (unparseable JSON, a
line that is not an object) are yielded as items with a `bad` reason instead of raising, so callers
count them and move on.

Writes are atomic: data goes to a temporary file in the destination folder and is moved into place
with `os.replace`, so a file that exists is always complete. Resumable stages use "the file exists"
as their done-marker.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

IGNORE_INDEX = -100  # label of a position that is not a target (cross-entropy's ignore_index)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class SkipCounter:
    """Skipped records by reason, with the first few locations so a log line says where to look.

    `add("bad_json", "corpus.jsonl:12", "JSONDecodeError: ...")` counts one record under its reason and
    keeps "corpus.jsonl:12: JSONDecodeError: ..." (the reason itself when no detail is given) among
    the first `max_examples` examples. Bad records are skipped and counted, never a crash mid-run and
    never a silent drop.
    """

    counts: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 5

    def add(self, reason: str, where: str, detail: str | None = None) -> None:
        self.counts[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{where}: {detail if detail is not None else reason}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    count = total  # the number of records skipped (readers' older name)

    def merge(self, other: SkipCounter) -> SkipCounter:
        """Add `other`'s counts and examples to this counter (returns self)."""
        self.counts.update(other.counts)
        self.examples.extend(other.examples[: max(0, self.max_examples - len(self.examples))])
        return self

    def metrics(self, prefix: str = "data/skipped") -> dict[str, float]:
        """`{prefix: total, prefix/reason: count, ...}` for a metrics record."""
        out = {prefix: float(self.total)}
        out.update({f"{prefix}/{reason}": float(n) for reason, n in sorted(self.counts.items())})
        return out

    def summary(self) -> str:
        """One line: 'skipped 3 record(s) (bad_json 2, too_long 1), e.g. a.jsonl:4: ...'."""
        if not self.total:
            return "no record skipped"
        reasons = ", ".join(f"{reason} {n}" for reason, n in self.counts.most_common())
        example = f", e.g. {self.examples[0]}" if self.examples else ""
        return f"skipped {self.total} record(s) ({reasons}){example}"


class NoUsableRecords(ValueError, RuntimeError):
    """A dataset with nothing usable left after skipping: bad input (a ValueError, one line from the CLI),
    raised at start-up or at the first batch rather than mid-run."""


def split_key(name: str) -> tuple[str, str]:
    """webdataset convention: 'dir/abc.def.jpg' → key 'dir/abc', extension 'def.jpg'."""
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


Position = tuple[int, int]  # (index of the input file, byte offset (jsonl) or row index (parquet))


@contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file next to `path`; on success move it over `path` (all or nothing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A crash mid-write leaves no partial file under the real name.
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_write(path, "wb") as f:
        np.save(f, array)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Atomically write records as jsonl; returns the number written."""
    n = 0
    with atomic_write(path, "w") as f:
        for rec in records:
            f.write(dumps(rec) + "\n")
            n += 1
    return n


def dumps(rec: Any) -> str:
    return json.dumps(rec, ensure_ascii=False, default=_json_default)


def _json_default(obj: Any) -> Any:
    # numpy scalars/arrays show up in reports and records (scores, counts).
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@dataclass
class Item:
    """One input record, or the reason it could not be read (`record` is None then)."""

    record: dict[str, Any] | None
    bad: str | None
    pos: Position  # position *after* this record: resume here to continue with the next one
    where: str  # "file:line" / "file:row" for messages and rejects


def _open_text_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def is_parquet(path: str | Path) -> bool:
    return str(path).endswith(".parquet")


def pyarrow_modules():
    """(pyarrow, pyarrow.parquet), imported on first parquet use with an install hint."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("parquet input/output needs pyarrow: pip install 'herd[data]'") from e
    return pa, pq


def iter_jsonl(path: str | Path, file_index: int = 0, offset: int = 0) -> Iterator[Item]:
    """Yield records of one jsonl(.gz) file from byte `offset` (0 = start)."""
    path = Path(path)
    with _open_text_binary(path) as f:
        if offset:
            f.seek(offset)
        line_no = 0
        while True:
            raw = f.readline()
            if not raw:
                return
            line_no += 1
            pos = (file_index, f.tell())
            where = f"{path.name}@{pos[1] - len(raw)}"
            if not raw.strip():
                continue  # blank lines are not records (common at the end of files)
            try:
                rec = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                yield Item(None, "bad_json", pos, where)
                continue
            if not isinstance(rec, dict):
                yield Item(None, "not_an_object", pos, where)
                continue
            yield Item(rec, None, pos, where)


def numbered_json_lines(path: str | Path, skipped: SkipCounter) -> Iterator[tuple[str, Any]]:
    """(`path:line`, parsed value) of each non-blank line of a jsonl file that is read whole (evaluation
    sets); a line that is not JSON is counted in `skipped` as `bad_json` and not yielded. Callers check
    the value's shape (an object with their fields) and count what they refuse."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                skipped.add("bad_json", where, str(e))
                continue
            yield where, value


def iter_parquet(
    path: str | Path, file_index: int = 0, row: int = 0, batch_size: int = 4096
) -> Iterator[Item]:
    """Yield records of one parquet file from row `row`, reading one batch at a time (bounded memory)."""
    _, pq = pyarrow_modules()
    path = Path(path)
    pf = pq.ParquetFile(path)
    # Skip whole row groups using metadata so resuming deep into a file does not re-read it.
    first_group, skipped = 0, 0
    meta = pf.metadata
    while first_group < meta.num_row_groups and skipped + meta.row_group(first_group).num_rows <= row:
        skipped += meta.row_group(first_group).num_rows
        first_group += 1
    groups = list(range(first_group, meta.num_row_groups))
    if not groups:
        return
    current = skipped
    for batch in pf.iter_batches(batch_size=batch_size, row_groups=groups):
        for rec in batch.to_pylist():
            current += 1
            if current <= row:
                continue
            yield Item(rec, None, (file_index, current), f"{path.name}#{current - 1}")


class RecordReader:
    """Several jsonl / parquet files read as one stream with resumable positions."""

    def __init__(self, paths: Iterable[str | Path], batch_size: int = 4096):
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("no input files")
        for p in self.paths:
            if not p.exists():
                raise FileNotFoundError(p)
        self.batch_size = batch_size

    def iter_from(self, pos: Position = (0, 0)) -> Iterator[Item]:
        file_index, offset = pos
        for i in range(file_index, len(self.paths)):
            start = offset if i == file_index else 0
            p = self.paths[i]
            if is_parquet(p):
                yield from iter_parquet(p, i, start, self.batch_size)
            else:
                yield from iter_jsonl(p, i, start)
            offset = 0

    def __iter__(self) -> Iterator[Item]:
        return self.iter_from((0, 0))


def write_part(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Write one output part atomically: parquet if the name ends in .parquet, jsonl otherwise."""
    if is_parquet(path):
        pa, pq = pyarrow_modules()
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(records), buf)
        with atomic_write(path, "wb") as f:
            f.write(buf.getvalue())
    else:
        write_jsonl(path, records)


def json_lines(path: str | Path, skipped: SkipCounter, what: str = "jsonl file") -> Iterator[tuple[str, Any]]:
    """("file:line", parsed value) of every non-blank line of a jsonl file that parses; a line that is not
    JSON (or not UTF-8) is skipped and counted as `bad_json`. Lines are decoded one by one, so a bad byte
    costs one record, not the file. The value may be any JSON value: the caller checks its shape."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: {what} does not exist")
    with file.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue  # blank lines are not records
            where = f"{file}:{line_no}"
            try:
                yield where, json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                skipped.add("bad_json", where, f"not JSON ({type(e).__name__})")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Small-file convenience (reports, tests): all good records of a jsonl file."""
    return [it.record for it in iter_jsonl(path) if it.record is not None]


def read_parts(paths: Iterable[str | Path]) -> Iterator[dict[str, Any]]:
    """Stream the records of output parts in order (jsonl or parquet)."""
    paths = list(paths)
    if not paths:
        return
    for it in RecordReader(paths):
        if it.record is not None:
            yield it.record
