"""Packed text for causal-LM training: documents → one token stream → fixed-length windows.

Each document is `<|begin_of_text|> … <|end_of_text|>`; windows of `seq_len + 1` tokens are cut from
the concatenated stream (no padding), and each window carries the document id of every token so the
model can apply the document mask (paper §3.2: tokens attend only within their own document). A target
whose document differs from its input token's (the step from one document's end to the next's start)
is ignored (-100).

`PackedBatches` is a *stateful* iterator: `state_dict()` records the epoch and cursor, so a resumed run
sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from herd.data.records import IGNORE_INDEX


class _Encoder(Protocol):
    def encode(self, s: str, bos: bool = False, eos: bool = False) -> list[int]: ...


class TokenSource(Protocol):
    """Anything packed windows can be cut from: in-memory (`TokenStream`) or memmap shards."""

    def __len__(self) -> int: ...

    def window(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, document ids) of positions start .. start+length-1, each (length,)."""
        ...


@dataclass
class TokenStream:
    tokens: np.ndarray  # (N,) int32
    doc_ids: np.ndarray  # (N,) int32, non-decreasing

    def __len__(self) -> int:
        return len(self.tokens)

    def window(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        return self.tokens[start : start + length], self.doc_ids[start : start + length]


def tokenize_documents(docs: Iterable[str], tokenizer: _Encoder) -> TokenStream:
    chunks, ids = [], []
    for doc_index, text in enumerate(docs):
        toks = tokenizer.encode(text, bos=True, eos=True)
        chunks.append(np.asarray(toks, dtype=np.int32))
        ids.append(np.full(len(toks), doc_index, dtype=np.int32))
    if not chunks:
        raise ValueError("no documents to tokenize")
    return TokenStream(np.concatenate(chunks), np.concatenate(ids))


def _window(stream: TokenSource, start: int, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    toks, docs = stream.window(start, seq_len + 1)
    toks = np.asarray(toks, dtype=np.int64)
    docs = np.asarray(docs)
    labels = toks[1:].copy()
    labels[docs[1:] != docs[:-1]] = IGNORE_INDEX
    return toks[:-1], labels, docs[:-1].astype(np.int64)


def _collate(windows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    tokens, labels, docs = (torch.from_numpy(np.stack(x)) for x in zip(*windows))
    return {"tokens": tokens, "labels": labels, "document_ids": docs}  # each (B, T)


class PackedBatches:
    """Infinite, per-epoch shuffled batches of packed windows, sharded across data-parallel ranks.

    `batch_size` is the *global* micro-batch (sequences across all DP ranks); DP rank r takes rows
    r·b .. (r+1)·b-1 with b = batch_size / world_size. The state (epoch, cursor) is therefore the same on
    every rank, and a run resumed on a different layout (FSDP×2 → TP×2) sees the same global batches.
    """

    def __init__(
        self,
        stream: TokenSource,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(
                f"data.batch_size {batch_size} is not divisible by {world_size} data-parallel ranks"
            )
        self.stream, self.seq_len, self.batch_size = stream, seq_len, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.local_batch = batch_size // world_size
        self.n_windows = (len(stream) - 1) // seq_len
        if self.n_windows < batch_size:
            raise ValueError(
                f"corpus too small: {len(stream)} tokens make {self.n_windows} windows of {seq_len} tokens, "
                f"fewer than one batch of {batch_size}"
            )
        self.batches_per_epoch = self.n_windows // batch_size
        self.epoch, self.cursor = 0, 0
        self._order_epoch, self._order = -1, np.arange(0)

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order = np.arange(self.n_windows)
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.cursor >= self.batches_per_epoch:
            self.epoch, self.cursor = self.epoch + 1, 0
        first = self.cursor * self.batch_size + self.rank * self.local_batch
        windows = self._epoch_order()[first : first + self.local_batch]
        self.cursor += 1
        return _collate([_window(self.stream, int(w) * self.seq_len, self.seq_len) for w in windows])

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def sequential_batches(
    stream: TokenStream, seq_len: int, batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """One deterministic pass over all windows (validation)."""
    n_windows = (len(stream) - 1) // seq_len
    for first in range(0, n_windows - batch_size + 1, batch_size):
        yield _collate([_window(stream, (first + i) * seq_len, seq_len) for i in range(batch_size)])
