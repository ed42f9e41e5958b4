"""Pre-tokenised corpora on disk: `write_token_shards` writes them, `ShardedTokenStream` reads them.

Layout of a shard directory (all little-endian):

    manifest.json        what is there: shards, counts, dtype, tokenizer, herd version (written last)
    tokens-00000.bin     raw token ids, uint16 when the vocabulary fits (< 65536), else uint32
    docs-00000.npy       int64 start offset of every document inside tokens-00000.bin
    tokens-00001.bin …

Each document is stored as `[bos] + ids + [eos]`, exactly what `packed_text.tokenize_documents` builds
in memory, so training on shards and on in-memory text sees the same stream. A document never spans two
shards (a shard is closed before the document that would overflow `shard_tokens`), which keeps every
shard self-describing and makes "shards 0..k-1 are complete" equivalent to "the first n documents are
done": that is what resuming after a kill relies on.

Resumability: a shard is written to `*.partial`, fsynced and renamed, and only then listed in the
manifest (rewritten atomically after every shard). A rerun with the same inputs and settings re-reads
the input, skips (without tokenising) the documents the listed shards hold and continues, producing
byte-identical files to an uninterrupted run.

`ShardedTokenStream` memory-maps the shards: opening a corpus costs nothing but the offsets' metadata,
and windows are read on demand. Its document ids are *global* document indices (shard's first document
+ position in the shard's offsets), so the document mask never merges documents of different shards.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from herd import __version__
from herd.data.training.packed_text import TokenSource

MANIFEST = "manifest.json"
FORMAT = "herd-token-shards"
FORMAT_VERSION = 1
DEFAULT_SHARD_TOKENS = 2**27  # 256 MiB of uint16 / 512 MiB of uint32 per shard
_SHARD_FILE = re.compile(r"(tokens|docs)-(\d{5,})\.(bin|npy)(\.partial)?$")
# Encoding a fixed string pins the tokenizer more tightly than its vocabulary size when resuming.
_PROBE = "The Llama 3 Herd of Models, 2024: 405B parameters, ünïcödé and  spaces."


class Encoder(Protocol):
    bos_id: int
    eos_id: int
    vocab_size: int

    def encode(self, s: str, bos: bool = False, eos: bool = False) -> list[int]: ...


def shard_files(index: int) -> tuple[str, str]:
    return f"tokens-{index:05d}.bin", f"docs-{index:05d}.npy"


def choose_dtype(vocab_size: int, dtype: str = "auto") -> np.dtype:
    """uint16 halves disk and page-cache use whenever every id fits in it."""
    if dtype == "auto":
        dtype = "uint16" if vocab_size <= 2**16 else "uint32"
    if dtype not in ("uint16", "uint32"):
        raise ValueError(f"token dtype must be auto, uint16 or uint32, got {dtype!r}")
    dt = np.dtype(dtype).newbyteorder("<")
    if vocab_size > 2 ** (8 * dt.itemsize):
        raise ValueError(f"vocab_size {vocab_size} does not fit {dtype}")
    return dt


def tokenizer_info(tokenizer: Encoder) -> dict[str, Any]:
    path = getattr(tokenizer, "path", None)
    return {
        "path": str(path) if path is not None else None,
        "vocab_size": int(tokenizer.vocab_size),
        "bos_id": int(tokenizer.bos_id),
        "eos_id": int(tokenizer.eos_id),
        "probe": [int(t) for t in tokenizer.encode(_PROBE)],
    }


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a shard directory, checked for the keys readers rely on; errors name the file."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a token shard directory (see `herd data tokenize`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupt (not valid JSON: {e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {manifest.get('format_version')}, expected {FORMAT_VERSION}"
        )
    required = ("dtype", "shard_tokens", "tokenizer", "shards", "complete")
    missing = [k for k in required if k not in manifest]
    shard_keys = ("tokens", "docs", "num_tokens", "num_docs")
    if not missing and isinstance(manifest["shards"], list):
        for i, shard in enumerate(manifest["shards"]):
            missing += [
                f"shards[{i}].{k}" for k in shard_keys if not isinstance(shard, dict) or k not in shard
            ]
    if missing:
        raise ValueError(f"{path} is corrupt: missing {', '.join(missing)}")
    return manifest


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _encode_chunk(tokenizer: Encoder, docs: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(all tokens of the chunk concatenated, per-document lengths): one array each, cheap to pickle."""
    ids = [tokenizer.encode(d, bos=True, eos=True) for d in docs]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    # numpy raises OverflowError for an id that does not fit the dtype instead of wrapping it.
    flat = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


_worker_tokenizer: Encoder | None = None


def _init_worker(tokenizer: Encoder) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_in_worker(docs: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    assert _worker_tokenizer is not None
    return _encode_chunk(_worker_tokenizer, docs, np.dtype(dtype))


def _encoded_chunks(
    chunks: Iterator[list[str]], tokenizer: Encoder, dtype: np.dtype, workers: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encoded chunks in input order. With workers > 1 a process pool encodes (a thread pool measured no
    faster than one thread: the Python side of `encode` holds the GIL); at most 2·workers chunks are in
    flight, because `Pool.imap` would read the whole streaming input ahead into memory."""
    if workers <= 1:
        for chunk in chunks:
            yield _encode_chunk(tokenizer, chunk, dtype)
        return
    import multiprocessing as mp

    # forkserver, not fork: the parent may hold threads (rich's refresh thread, torch's pools). Preloading
    # this module makes the server import torch etc. once instead of once per worker.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, type(tokenizer).__module__])
    with ctx.Pool(workers, _init_worker, (tokenizer,)) as pool:
        pending: deque[Any] = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (chunk, dtype.str)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _batched(it: Iterator[str], n: int) -> Iterator[list[str]]:
    while chunk := list(islice(it, n)):
        yield chunk


class _ShardWriter:
    """One shard being filled: tokens stream to `tokens-XXXXX.bin.partial`, offsets stay in memory."""

    def __init__(self, directory: Path, index: int) -> None:
        self.directory, self.index = directory, index
        self.tokens_name, self.docs_name = shard_files(index)
        self.file = open(directory / (self.tokens_name + ".partial"), "wb", buffering=1 << 20)  # noqa: SIM115
        self.offsets: list[int] = []
        self.num_tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        self.offsets.append(self.num_tokens)
        self.file.write(tokens.tobytes())
        self.num_tokens += len(tokens)

    def finish(self) -> dict[str, Any]:
        """fsync + rename: once listed in the manifest a shard survives a crash, not just a kill."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        docs_partial = self.directory / (self.docs_name + ".partial")
        with open(docs_partial, "wb") as f:
            np.save(f, np.asarray(self.offsets, dtype="<i8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(self.directory / (self.tokens_name + ".partial"), self.directory / self.tokens_name)
        os.replace(docs_partial, self.directory / self.docs_name)
        n = len(self.offsets)
        return dict(
            tokens=self.tokens_name, docs=self.docs_name, num_tokens=self.num_tokens, num_docs=n, input_docs=n
        )


def _clean(directory: Path, keep_shards: int) -> None:
    """Remove `.partial` leftovers and shard files the manifest does not list (a kill between rename and
    manifest update leaves one); they would be rewritten identically anyway."""
    for f in directory.iterdir():
        m = _SHARD_FILE.match(f.name)
        if m and (m.group(4) or int(m.group(2)) >= keep_shards):
            f.unlink()
    (directory / (MANIFEST + ".partial")).unlink(missing_ok=True)


def _resume_point(directory: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The existing manifest if it was written with the same settings (else an error), None if none."""
    if not (directory / MANIFEST).exists():
        return None
    manifest = read_manifest(directory)
    for key, value in settings.items():
        old = manifest.get(key)
        if key == "tokenizer":  # the file may have moved; its behaviour must not have changed
            old = {k: v for k, v in (old or {}).items() if k != "path"}
            value = {k: v for k, v in value.items() if k != "path"}
        if old != value:
            raise ValueError(
                f"{directory / MANIFEST} was written with a different {key} ({old!r}, this run: {value!r}); "
                f"use another output directory, or overwrite=True / --overwrite to start over"
            )
    for shard in manifest["shards"]:
        _check_shard(directory, shard, np.dtype(manifest["dtype"]).newbyteorder("<"))
    return manifest


def write_token_shards(
    docs: Iterable[str],
    tokenizer: Encoder,
    out_dir: str | Path,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    dtype: str = "auto",
    inputs: dict[str, Any] | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    skipped: Any | None = None,
    chunk_docs: int = 64,
) -> dict[str, Any]:
    """Tokenise `docs` into shards under `out_dir` and return the manifest (also in `manifest.json`).

    `inputs` describes where `docs` came from (source, files, text field); it is stored and must match
    on a rerun, because resuming skips the first documents by *count*. `skipped` (a `SkipCounter`
    the reader fills) has its final count recorded in the manifest.
    """
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np_dtype = choose_dtype(int(tokenizer.vocab_size), dtype)
    settings = {
        "dtype": np_dtype.name,
        "shard_tokens": int(shard_tokens),
        "tokenizer": tokenizer_info(tokenizer),
        "inputs": inputs or {},
    }
    settings = json.loads(json.dumps(settings))  # compare as stored: tuples become lists, keys strings
    if overwrite:
        (out / MANIFEST).unlink(missing_ok=True)
    previous = _resume_point(out, settings)
    if previous is not None and previous["complete"]:
        return previous
    shards: list[dict[str, Any]] = previous["shards"] if previous else []
    _clean(out, keep_shards=len(shards))
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "herd_version": __version__,
        **settings,
        "complete": False,
        "shards": shards,
    }
    # Written before any work, so a rerun after an early kill is checked against these settings too.
    _write_json_atomic(out / MANIFEST, manifest)

    doc_iter = iter(docs)
    done_docs = sum(s["input_docs"] for s in shards)
    passed = sum(1 for _ in islice(doc_iter, done_docs))  # re-read, not re-tokenised
    if passed < done_docs:
        raise ValueError(
            f"the input has {passed} documents but the shards in {out} already hold {done_docs}: "
            f"the input changed since they were written; use overwrite=True / --overwrite"
        )

    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
    )
    writer: _ShardWriter | None = None
    encoded = _encoded_chunks(_batched(doc_iter, chunk_docs), tokenizer, np_dtype, workers)
    # closing(): after a failure the worker pool stops now, not whenever the generator is collected.
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar, closing(encoded):
        task = bar.add_task(f"tokenizing → {out}", stats="", total=None)
        t0 = time.monotonic()
        n_docs = n_tokens = 0
        try:
            for flat, lengths in encoded:
                starts = np.concatenate([[0], np.cumsum(lengths)])
                for i, length in enumerate(lengths.tolist()):
                    if writer is not None and writer.num_tokens and writer.num_tokens + length > shard_tokens:
                        shards.append(writer.finish())
                        _write_json_atomic(out / MANIFEST, manifest)
                        writer = None
                    if writer is None:
                        writer = _ShardWriter(out, len(shards))
                    writer.add(flat[starts[i] : starts[i + 1]])
                n_docs += len(lengths)
                n_tokens += int(starts[-1])
                rate = max(time.monotonic() - t0, 1e-9)
                bar.update(
                    task,
                    stats=f"{n_docs:,} docs  {n_tokens:,} tokens  "
                    f"{n_docs / rate:,.0f} docs/s  {n_tokens / rate:,.0f} tokens/s",
                )
            if writer is not None:
                shards.append(writer.finish())
                writer = None
        finally:
            if writer is not None:  # killed or failed mid-shard: leave the .partial for the rerun to drop
                writer.file.close()
    if not shards:
        raise ValueError("no documents to tokenize")
    manifest.update(
        complete=True,
        num_tokens=sum(s["num_tokens"] for s in shards),
        num_docs=sum(s["num_docs"] for s in shards),
        skipped_records=getattr(skipped, "count", 0),
    )
    _write_json_atomic(out / MANIFEST, manifest)
    return manifest


def _check_shard(directory: Path, shard: dict[str, Any], dtype: np.dtype) -> np.ndarray:
    """Sizes and offsets of one shard against the manifest; returns the memory-mapped offsets."""
    tokens_path, docs_path = directory / shard["tokens"], directory / shard["docs"]
    n_tokens, n_docs = int(shard["num_tokens"]), int(shard["num_docs"])
    if not tokens_path.is_file():
        raise FileNotFoundError(f"{tokens_path} is missing (listed in {directory / MANIFEST})")
    size, expected = tokens_path.stat().st_size, n_tokens * dtype.itemsize
    if size != expected:
        raise ValueError(
            f"{tokens_path} is {size} bytes, but {MANIFEST} says {n_tokens} tokens × {dtype.itemsize} bytes "
            f"= {expected}: the shard is truncated or from another run"
        )
    try:
        offsets = np.load(docs_path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{docs_path} is missing or corrupt ({e})") from e
    if offsets.dtype != np.dtype("<i8") or offsets.shape != (n_docs,):
        raise ValueError(
            f"{docs_path} holds {offsets.dtype} {offsets.shape}, expected int64 ({n_docs},) per {MANIFEST}"
        )
    if n_docs == 0 or offsets[0] != 0 or offsets[-1] >= n_tokens:
        raise ValueError(f"{docs_path}: document offsets do not cover {tokens_path.name} ({n_tokens} tokens)")
    for lo in range(0, n_docs, 1 << 22):  # strictly increasing, checked in blocks to bound memory
        block = np.asarray(offsets[lo : lo + (1 << 22) + 1])
        if np.any(np.diff(block) <= 0):
            raise ValueError(f"{docs_path}: document offsets are not strictly increasing")
    return offsets


class ShardedTokenStream:
    """A `TokenSource` over memory-mapped token shards; windows may cross shard boundaries.

    Opening validates the manifest and every shard's size and offsets (errors name the file). The object
    pickles without its memory maps (workers re-open the files), so it can go to DataLoader workers.
    """

    def __init__(self, directory: str | Path, require_complete: bool = True) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        if require_complete and not self.manifest["complete"]:
            raise ValueError(
                f"{self.directory / MANIFEST}: tokenization did not finish; rerun `herd data tokenize` with "
                f"the same arguments to complete it"
            )
        if self.manifest["dtype"] not in ("uint16", "uint32"):
            raise ValueError(f"{self.directory / MANIFEST}: unsupported dtype {self.manifest['dtype']!r}")
        if not self.manifest["shards"]:
            raise ValueError(f"{self.directory / MANIFEST} lists no shards")
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        shards = self.manifest["shards"]
        for shard in shards:
            _check_shard(self.directory, shard, self.dtype)
        # token_starts[s] / doc_bases[s]: global position of shard s's first token / document.
        self.token_starts = np.cumsum([0] + [int(s["num_tokens"]) for s in shards])
        self.doc_bases = np.cumsum([0] + [int(s["num_docs"]) for s in shards])
        self._open()

    def _open(self) -> None:
        shards = self.manifest["shards"]
        self._tokens = [
            np.memmap(self.directory / s["tokens"], dtype=self.dtype, mode="r", shape=(int(s["num_tokens"]),))
            for s in shards
        ]
        self._offsets = [np.load(self.directory / s["docs"], mmap_mode="r") for s in shards]

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_tokens", "_offsets")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return int(self.token_starts[-1])

    @property
    def num_docs(self) -> int:
        return int(self.doc_bases[-1])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    def check_tokenizer(self, tokenizer: Encoder) -> None:
        """Raise unless `tokenizer` encodes like the one the shards were written with (ids would be garbage)."""
        stored = {k: v for k, v in self.manifest["tokenizer"].items() if k != "path"}
        current = {k: v for k, v in tokenizer_info(tokenizer).items() if k != "path"}
        if stored != current:
            raise ValueError(
                f"{self.directory / MANIFEST}: the shards were written with tokenizer "
                f"{self.manifest['tokenizer'].get('path')} (vocab {stored.get('vocab_size')}), which encodes "
                f"differently from {getattr(tokenizer, 'path', type(tokenizer).__name__)} "
                f"(vocab {current['vocab_size']})"
            )

    def doc_start(self, doc: int) -> int:
        """Global token position where document `doc` starts (`num_docs` → `len(self)`)."""
        if not 0 <= doc <= self.num_docs:
            raise IndexError(f"document {doc} out of range 0..{self.num_docs}")
        if doc == self.num_docs:
            return len(self)
        s = int(np.searchsorted(self.doc_bases, doc, side="right")) - 1
        return int(self.token_starts[s] + self._offsets[s][doc - self.doc_bases[s]])

    def window(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, global document ids) of positions start .. start+length-1 (shorter at the end)."""
        if start < 0 or length < 0:
            raise IndexError(f"window({start}, {length}) out of range")
        end = min(start + length, len(self))
        tokens, doc_ids = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
        pos = start
        shard = int(np.searchsorted(self.token_starts, start, side="right")) - 1
        while pos < end:
            base = int(self.token_starts[shard])
            lo, hi = pos - base, min(end, int(self.token_starts[shard + 1])) - base
            tokens.append(np.asarray(self._tokens[shard][lo:hi], dtype=np.int64))
            local = np.searchsorted(self._offsets[shard], np.arange(lo, hi), side="right") - 1
            doc_ids.append(local + int(self.doc_bases[shard]))
            pos, shard = base + hi, shard + 1
        return np.concatenate(tokens), np.concatenate(doc_ids)


@dataclass
class TokenSlice:
    """Positions start .. stop-1 of a source, as a source of its own (train / validation splits)."""

    source: TokenSource
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def window(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        length = max(0, min(length, len(self) - start))
        return self.source.window(self.start + start, length)


def split_validation(
    stream: ShardedTokenStream, val_fraction: float
) -> tuple[TokenSource, TokenSource | None]:
    """(train, validation) like `TextPretrainTask`'s in-memory split: the first ⌊n·fraction⌋ documents
    are held out, so the split falls on a document boundary."""
    n_val = int(stream.num_docs * val_fraction)
    if n_val == 0:
        return stream, None
    cut = stream.doc_start(n_val)
    return TokenSlice(stream, cut, len(stream)), TokenSlice(stream, 0, cut)
