"""Streaming document readers for pretraining text: jsonl, parquet and plain-text folders.

Every reader yields one `str` per document and holds at most one record batch in memory, so a corpus of
any size can be tokenised (`herd data tokenize`) or read straight into training. Bad *records* (an
unparseable jsonl line, a record without the text field, a null parquet cell) are skipped and counted in
a `SkipCounter`: one broken line must not kill a multi-hour run, and nothing is dropped silently.
Bad *files* (a missing path, a parquet file without the text column, a truncated gzip stream) raise an
error naming the file, because they mean the job was set up wrong.

Compressed inputs are recognised by suffix: `.gz` (stdlib) and `.zst` (needs the optional `zstandard`).
`tokenize_corpus` runs a corpus through `token_shards.write_token_shards` (`herd data tokenize`).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from herd.data.records import SkipCounter

SOURCES = ("jsonl", "parquet", "text")

# What a folder given as input contributes, per source (searched recursively, sorted).
SUFFIXES: dict[str, tuple[str, ...]] = {
    "jsonl": (".jsonl", ".jsonl.gz", ".jsonl.zst"),
    "parquet": (".parquet",),
    "text": (".txt", ".txt.gz", ".txt.zst"),
}

_GLOB_CHARS = ("*", "?", "[")


def expand_paths(source: str, paths: Iterable[str | Path]) -> list[Path]:
    """Files, folders and glob patterns → the input files, in a deterministic order.

    Each pattern's matches and each folder's files are sorted; the entries keep the order they were
    given in (so `a.jsonl b.jsonl` reads a first), and a file named twice is read once. A pattern
    matching nothing or a missing path is an error: a typo must not silently train on less data.
    """
    if source not in SUFFIXES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    suffixes = SUFFIXES[source]
    files: list[Path] = []
    for entry in map(str, paths):
        if any(c in entry for c in _GLOB_CHARS) and not Path(entry).exists():
            matches = sorted(glob.glob(entry, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no files match the pattern {entry!r}")
            candidates = [Path(m) for m in matches]
        else:
            candidates = [Path(entry)]
        for path in candidates:
            if path.is_dir():
                found = sorted(f for f in path.rglob("*") if f.is_file() and f.name.endswith(suffixes))
                if not found:
                    raise FileNotFoundError(f"{path} holds no {' / '.join(suffixes)} files")
                files += found
            elif path.is_file():
                files.append(path)
            else:
                raise FileNotFoundError(f"input path does not exist: {path}")
    return list(dict.fromkeys(files))  # drop repeats, keep the first position


def open_binary(path: str | Path) -> IO[bytes]:
    """`path` opened for reading bytes, decompressing `.gz` / `.zst` on the fly."""
    path = Path(path)
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise ImportError(f"{path}: reading .zst files needs `pip install zstandard`") from None
        raw = open(path, "rb")  # noqa: SIM115 - closed by the reader wrapping it
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def _reason(error: Exception) -> str:
    """The skip reason of a jsonl line: unparseable, not an object, or no text field."""
    if isinstance(error, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return "bad_json"
    if isinstance(error, KeyError):
        return "missing_field"
    return "bad_record"


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error)[:200]}"


def read_jsonl_documents(
    paths: Iterable[str | Path], text_field: str = "text", skipped: SkipCounter | None = None
) -> Iterator[str]:
    """The `text_field` string of every jsonl record; blank lines are ignored, bad lines counted.

    Lines are decoded one by one (not the whole file as UTF-8), so a line of invalid UTF-8 is one
    skipped record rather than an exception that ends the file.
    """
    skipped = skipped if skipped is not None else SkipCounter()
    for path in paths:
        try:
            with open_binary(path) as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                        if not isinstance(record, dict):
                            raise TypeError(f"record is a {type(record).__name__}, not an object")
                        text = record[text_field]
                        if not isinstance(text, str):
                            raise TypeError(f"field {text_field!r} is {type(text).__name__}, not a string")
                    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError, UnicodeDecodeError
                        skipped.add(_reason(e), f"{path}:{line_no}", _describe(e))
                        continue
                    yield text
        except (OSError, EOFError) as e:  # a truncated / corrupt compressed stream, an unreadable file
            raise OSError(f"{path}: cannot read past this point ({_describe(e)})") from e


def read_parquet_documents(
    paths: Iterable[str | Path],
    text_field: str = "text",
    skipped: SkipCounter | None = None,
    batch_rows: int = 1024,
) -> Iterator[str]:
    """The `text_field` column of parquet files, read `batch_rows` rows at a time; null cells counted."""
    import pyarrow as pa  # the `data` extra; imported here so jsonl/text work without it
    import pyarrow.parquet as pq

    skipped = skipped if skipped is not None else SkipCounter()
    for path in paths:
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path} is not a readable parquet file ({_describe(e)})") from e
        schema = pf.schema_arrow
        if text_field not in schema.names:
            raise ValueError(
                f"{path} has no column {text_field!r} (columns: {', '.join(schema.names)}); "
                f"pick the text column with --text-field / data.text_field"
            )
        kind = schema.field(text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise ValueError(f"{path}: column {text_field!r} holds {kind}, not strings")
        row = 0
        for batch in pf.iter_batches(batch_size=batch_rows, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if text is None:
                    skipped.add("null_text", f"{path}: row {row}", f"{text_field!r} is null")
                else:
                    yield text
                row += 1


def read_text_documents(paths: Iterable[str | Path]) -> Iterator[str]:
    """Each file is one document. Undecodable bytes become U+FFFD: a text file is never a bad record."""
    for path in paths:
        try:
            with open_binary(path) as f:
                data = f.read()
        except (OSError, EOFError) as e:
            raise OSError(f"{path}: cannot read ({_describe(e)})") from e
        yield data.decode("utf-8", errors="replace")


def iter_documents(
    source: str,
    paths: Iterable[str | Path],
    text_field: str = "text",
    skipped: SkipCounter | None = None,
) -> Iterator[str]:
    """Documents of `source` ∈ {jsonl, parquet, text} from files / folders / glob patterns, streamed.

    The paths are expanded *now* (not on the first `next`), so a typo fails before any work starts.
    Pass a `SkipCounter` to learn how many bad records were skipped.
    """
    files = expand_paths(source, paths)
    skipped = skipped if skipped is not None else SkipCounter()
    if source == "jsonl":
        return read_jsonl_documents(files, text_field, skipped)
    if source == "parquet":
        return read_parquet_documents(files, text_field, skipped)
    return read_text_documents(files)


def tokenize_corpus(
    source: str,
    inputs: Iterable[str | Path],
    out: str | Path,
    tokenizer: str | Path | None = None,
    text_field: str = "text",
    shard_tokens: int | None = None,
    dtype: str = "auto",
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """`herd data tokenize`: the documents of `inputs` (files, folders, globs) → token shards under `out`.

    A rerun after a kill resumes after the last complete shard. `tokenizer` is a tokenizer file or a
    checkpoint folder (default: Llama 3's). Returns the shard manifest (`write_token_shards`) plus
    `resumed_tokens` (already written before this call), `seconds` and `skipped_examples`.
    """
    import time

    from herd.data.training.token_shards import DEFAULT_SHARD_TOKENS, read_manifest, write_token_shards
    from herd.text.tokenizer import load_tokenizer

    files = expand_paths(source, inputs)  # a typo in a path fails before the tokenizer loads
    encoder = load_tokenizer(tokenizer)
    try:
        before = 0 if overwrite else sum(s["num_tokens"] for s in read_manifest(out)["shards"])
    except FileNotFoundError:  # a fresh output folder
        before = 0
    skipped = SkipCounter()
    described = {
        "source": source,
        "files": [str(f.resolve()) for f in files],
        "text_field": text_field if source != "text" else None,
    }
    start = time.perf_counter()
    manifest = write_token_shards(
        iter_documents(source, files, text_field, skipped),
        encoder,
        out,
        shard_tokens=shard_tokens or DEFAULT_SHARD_TOKENS,
        dtype=dtype,
        inputs=described,
        workers=workers,
        overwrite=overwrite,
        progress=progress,
        skipped=skipped,
    )
    return manifest | {
        "resumed_tokens": before,
        "seconds": time.perf_counter() - start,
        "skipped_examples": list(skipped.examples),
    }
