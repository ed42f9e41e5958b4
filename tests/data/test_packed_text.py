"""Packed text windows: document ids, boundary targets, sharding, resumable position, bad records."""

import json

import numpy as np
import pytest
import torch

from herd.data.training.packed_text import (
    IGNORE_INDEX,
    PackedBatches,
    TokenStream,
    sequential_batches,
    tokenize_documents,
)


class CharTokenizer:
    def encode(self, s, bos=False, eos=False):
        return [1] * bos + [ord(c) for c in s] + [2] * eos


def stream():
    return tokenize_documents(["abc", "defgh", "ij", "klmnopq" * 5], CharTokenizer())


def test_tokenize_documents_marks_document_ids():
    s = tokenize_documents(["ab", "c"], CharTokenizer())
    assert s.tokens.tolist() == [1, 97, 98, 2, 1, 99, 2]
    assert s.doc_ids.tolist() == [0, 0, 0, 0, 1, 1, 1]


def test_window_targets_across_documents_are_ignored():
    s = tokenize_documents(["ab", "c"], CharTokenizer())
    batch = next(sequential_batches(s, 6, 1))
    assert batch["tokens"].tolist() == [[1, 97, 98, 2, 1, 99]]
    assert batch["labels"].tolist() == [[97, 98, 2, IGNORE_INDEX, 99, 2]]
    assert batch["document_ids"].tolist() == [[0, 0, 0, 0, 1, 1]]


def test_ranks_split_the_global_batch_and_epochs_reshuffle():
    s = TokenStream(np.arange(401, dtype=np.int32), np.zeros(401, dtype=np.int32))
    whole = PackedBatches(s, seq_len=10, batch_size=8, seed=3)
    parts = [PackedBatches(s, seq_len=10, batch_size=8, rank=r, world_size=2, seed=3) for r in range(2)]
    for _ in range(7):  # crosses an epoch boundary (5 batches per epoch)
        full = next(whole)["tokens"]
        assert torch.equal(torch.cat([next(p)["tokens"] for p in parts]), full)
    it = PackedBatches(s, seq_len=10, batch_size=40, seed=3)
    first, second = next(it)["tokens"][:, 0].tolist(), next(it)["tokens"][:, 0].tolist()
    assert sorted(first) == sorted(second) and first != second
    with pytest.raises(ValueError, match="not divisible"):
        PackedBatches(s, seq_len=10, batch_size=5, world_size=2)


def test_state_dict_resumes_exactly():
    s = stream()
    a = PackedBatches(s, seq_len=4, batch_size=2, seed=1)
    for _ in range(5):
        next(a)
    b = PackedBatches(s, seq_len=4, batch_size=2, seed=1)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(7):
        x, y = next(a), next(b)
        assert all(torch.equal(x[k], y[k]) for k in x)
