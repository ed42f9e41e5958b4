"""Token shards: round trip against the in-memory stream, resume after a kill, validation, the CLI."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from herd.cli import main as tokenize_main
from herd.data.records import SkipCounter
from herd.data.training.packed_text import PackedBatches, tokenize_documents
from herd.data.training.token_shards import (
    MANIFEST,
    ShardedTokenStream,
    TokenSlice,
    split_validation,
    write_token_shards,
)


class ByteTokenizer:
    """Cheap fake: UTF-8 bytes, bos 256, eos 257 (vocab 258 → uint16 shards)."""

    bos_id, eos_id, vocab_size = 256, 257, 258

    def encode(self, s: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + list(s.encode()) + [self.eos_id] * eos


class WideTokenizer(ByteTokenizer):
    """Same ids shifted past 65536, so shards must be uint32."""

    bos_id, eos_id, vocab_size = 70_256, 70_257, 70_258

    def encode(self, s: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + [70_000 + b for b in s.encode()] + [self.eos_id] * eos


class UpperTokenizer(ByteTokenizer):
    """Same vocabulary, different ids for the same text: only the stored probe encoding tells."""

    def encode(self, s: str, bos: bool = False, eos: bool = False) -> list[int]:
        return super().encode(s.upper(), bos, eos)


def corpus(n: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["llama", "herd", "ünïcode", "token", "shard", "", "405B", "\n"]
    return [" ".join(rng.choices(words, k=rng.randint(0, 12))) for _ in range(n)]


def files_of(directory: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(directory.iterdir())}


@pytest.mark.parametrize("tokenizer", [ByteTokenizer(), WideTokenizer()], ids=["uint16", "uint32"])
def test_round_trip_equals_in_memory_stream(tmp_path, tokenizer):
    docs = corpus()
    manifest = write_token_shards(docs, tokenizer, tmp_path, shard_tokens=150, progress=False)
    memory = tokenize_documents(docs, tokenizer)
    shards = ShardedTokenStream(tmp_path)
    assert manifest["dtype"] == ("uint16" if tokenizer.vocab_size < 65536 else "uint32")
    assert len(manifest["shards"]) > 5 and manifest["num_docs"] == len(docs) == shards.num_docs
    assert len(shards) == len(memory) == manifest["num_tokens"]
    # every window start and a few lengths, so windows cross every shard boundary; ids are global doc indices
    for length in (1, 7, 151, 400):
        for start in range(0, len(memory), 5):
            toks, ids = shards.window(start, length)
            ref_toks, ref_ids = memory.window(start, length)
            np.testing.assert_array_equal(toks, ref_toks)
            np.testing.assert_array_equal(ids, ref_ids)
    # no document spans two shards, and each shard ends at a document boundary
    for i, shard in enumerate(manifest["shards"]):
        first = shards.token_starts[i]
        assert shards.window(int(first), 1)[0][0] == tokenizer.bos_id
        assert shards.window(int(first + shard["num_tokens"] - 1), 1)[0][0] == tokenizer.eos_id
    assert [shards.doc_start(d) for d in (0, 10, len(docs))] == [
        0,
        int(np.flatnonzero(memory.doc_ids == 10)[0]),
        len(memory),
    ]
    # identical packed batches (shuffled, sharded over 2 DP ranks) from either source
    for rank in range(2):
        a = PackedBatches(shards, seq_len=16, batch_size=4, rank=rank, world_size=2, seed=5)
        b = PackedBatches(memory, seq_len=16, batch_size=4, rank=rank, world_size=2, seed=5)
        for _ in range(12):
            x, y = next(a), next(b)
            assert all(torch.equal(x[k], y[k]) for k in ("tokens", "labels", "document_ids"))
    # pickles without its memory maps (DataLoader workers) and reads the same afterwards
    clone = pickle.loads(pickle.dumps(shards))
    np.testing.assert_array_equal(clone.window(140, 30)[1], shards.window(140, 30)[1])


def test_oversized_document_gets_its_own_shard(tmp_path):
    docs = ["a" * 10, "b" * 100, "c" * 5]
    manifest = write_token_shards(docs, ByteTokenizer(), tmp_path, shard_tokens=20, progress=False)
    assert [s["num_tokens"] for s in manifest["shards"]] == [12, 102, 7]


def test_validation_split_falls_on_a_document_boundary(tmp_path):
    docs = corpus(50)
    write_token_shards(docs, ByteTokenizer(), tmp_path, shard_tokens=100, progress=False)
    stream = ShardedTokenStream(tmp_path)
    train, val = split_validation(stream, 0.1)
    memory_val = tokenize_documents(docs[:5], ByteTokenizer())
    assert isinstance(val, TokenSlice) and len(val) == len(memory_val)
    np.testing.assert_array_equal(val.window(0, len(val))[0], memory_val.tokens)
    assert len(train) + len(val) == len(stream) and train.window(0, 3)[1][0] == 5
    assert len(train.window(len(train) - 2, 10)[0]) == 2  # a slice never reads past its end
    assert split_validation(stream, 0.0) == (stream, None)
    stream.check_tokenizer(ByteTokenizer())
    with pytest.raises(ValueError, match="encodes differently"):
        stream.check_tokenizer(UpperTokenizer())


def killed_after(docs: list[str], n: int):
    for i, doc in enumerate(docs):
        if i == n:
            raise KeyboardInterrupt("simulated kill")
        yield doc


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    docs, tok = corpus(80, seed=1), ByteTokenizer()
    inputs = {"source": "test", "files": ["a"]}
    write_token_shards(docs, tok, tmp_path / "whole", shard_tokens=120, inputs=inputs, progress=False)
    reference = files_of(tmp_path / "whole")

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        write_token_shards(
            killed_after(docs, 50), tok, out, shard_tokens=120, inputs=inputs, progress=False, chunk_docs=4
        )
    partial = json.loads((out / MANIFEST).read_text())
    assert not partial["complete"] and len(partial["shards"]) >= 2
    assert any(f.name.endswith(".partial") for f in out.iterdir())
    with pytest.raises(ValueError, match="tokenization did not finish"):
        ShardedTokenStream(out)

    # a kill between a shard's rename and the manifest update: the file exists but is not listed
    partial["shards"] = partial["shards"][:-1]
    (out / MANIFEST).write_text(json.dumps(partial))
    (out / "tokens-00099.bin").write_bytes(b"stale")

    skipped = SkipCounter()
    write_token_shards(docs, tok, out, shard_tokens=120, inputs=inputs, progress=False, skipped=skipped)
    assert files_of(out) == reference
    # a complete directory is not re-read at all
    assert write_token_shards(killed_after(docs, 0), tok, out, 120, inputs=inputs)["complete"]


def test_rerun_with_other_settings_or_input_is_refused(tmp_path):
    docs, tok = corpus(20), ByteTokenizer()
    with pytest.raises(KeyboardInterrupt):
        write_token_shards(
            killed_after(docs, 15), tok, tmp_path, shard_tokens=40, progress=False, chunk_docs=2
        )
    with pytest.raises(ValueError, match=r"manifest\.json was written with a different shard_tokens"):
        write_token_shards(docs, tok, tmp_path, shard_tokens=41, progress=False)
    with pytest.raises(ValueError, match="different tokenizer"):
        write_token_shards(docs, UpperTokenizer(), tmp_path, shard_tokens=40, progress=False)
    with pytest.raises(ValueError, match="the input changed"):
        write_token_shards(docs[:3], tok, tmp_path, shard_tokens=40, progress=False)
    manifest = write_token_shards(docs, tok, tmp_path, shard_tokens=41, overwrite=True, progress=False)
    assert manifest["complete"] and manifest["shard_tokens"] == 41
    assert len(list(tmp_path.glob("tokens-*.bin"))) == len(manifest["shards"])
    with pytest.raises(ValueError, match="no documents"):
        write_token_shards([], tok, tmp_path / "empty", progress=False)


def test_corrupt_manifest_and_truncated_shards_name_the_file(tmp_path):
    write_token_shards(corpus(30), ByteTokenizer(), tmp_path, shard_tokens=60, progress=False)
    manifest_text = (tmp_path / MANIFEST).read_text()
    shard = tmp_path / "tokens-00001.bin"
    good = shard.read_bytes()
    shard.write_bytes(good[:-2])
    with pytest.raises(ValueError, match=r"tokens-00001\.bin is \d+ bytes.*truncated"):
        ShardedTokenStream(tmp_path)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"tokens-00001\.bin is missing"):
        ShardedTokenStream(tmp_path)
    shard.write_bytes(good)
    np.save(tmp_path / "docs-00002.npy", np.array([0, 5, 3]))
    with pytest.raises(ValueError, match=r"docs-00002\.npy holds"):
        ShardedTokenStream(tmp_path)
    (tmp_path / MANIFEST).write_text(manifest_text[:100])
    with pytest.raises(ValueError, match=r"manifest\.json is corrupt \(not valid JSON"):
        ShardedTokenStream(tmp_path)
    broken = json.loads(manifest_text)
    del broken["shards"][0]["num_tokens"]
    (tmp_path / MANIFEST).write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"missing shards\[0\]\.num_tokens"):
        ShardedTokenStream(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a token shard directory"):
        ShardedTokenStream(tmp_path / "nowhere")


def test_cli_with_the_real_tokenizer_and_two_workers(tmp_path, capsys):
    from herd.text.tokenizer import Tokenizer

    texts = ["The Llama 3 herd of models.", "Ünïcode — and numbers 12345.", "", "short"] * 8
    lines = [json.dumps({"text": t}) for t in texts] + ["{broken"]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "shards"
    argv = ["data", "tokenize", "--source", "jsonl", "--input", str(tmp_path / "*.jsonl"), "--out", str(out)]
    assert tokenize_main([*argv, "--shard-tokens", "64", "--workers", "2", "--no-progress"]) == 0
    summary = capsys.readouterr().err
    assert "32 docs" in summary and "skipped records: 1" in summary and "tokens/s" in summary
    tokenizer = Tokenizer()
    memory = tokenize_documents(texts, tokenizer)
    stream = ShardedTokenStream(out)
    assert stream.manifest["dtype"] == "uint32" and stream.vocab_size == 128_256
    tokens, ids = stream.window(0, len(stream))
    np.testing.assert_array_equal(tokens, memory.tokens)
    np.testing.assert_array_equal(ids, memory.doc_ids)
    # rerunning the finished command is a no-op that still reports; a bad input is one line, exit 2
    assert tokenize_main([*argv, "--shard-tokens", "64", "--no-progress"]) == 0
    assert "resumed" in capsys.readouterr().err
    assert tokenize_main(["data", "tokenize", "--source", "text", "--input", "nope/", "--out", str(out)]) == 2
    assert "herd data tokenize: error: input path does not exist" in capsys.readouterr().err
