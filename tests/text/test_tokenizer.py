"""The Llama 3 tiktoken tokenizer against Meta's reference (`llama_models.llama3.tokenizer`), and load_tokenizer."""

from __future__ import annotations

import base64
import random
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

from herd.text.sp_tokenizer import SentencePieceTokenizer
from herd.text.tokenizer import (
    Tokenizer,
    _split_long_runs,
    default_tokenizer_path,
    detect_tokenizer_format,
    load_tokenizer,
)


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def meta() -> MetaTokenizer:
    return MetaTokenizer.get_instance()


CORPUS = [
    "",
    "This is a test sentence.",
    "Hello, World! It's 2024; we'RE testing CONTRACTIONS: I'll, you'd, they've, she's, 'S.",
    "数据科学是一门跨学科的领域。机器学习让计算机从数据中学习。",
    "日本語のテキスト、カタカナとひらがな。",
    "안녕하세요, 세계! 한국어 토큰화 테스트입니다.",
    "emoji 😀🦙👩‍👩‍👧‍👦🏳️‍🌈 flags 🇫🇷🇯🇵 skin 👍🏽",
    "combining: e\u0301 a\u0308 n\u0303 \u1e9b\u0323 Zalgo: Z\u0351\u0357\u0352a\u036al\u0353g\u0355o",
    "RTL: مرحبا بالعالم  שלום עולם",
    "def f(x: int) -> int:\n\tif x > 0:\n\t\treturn x ** 2  # square\n\treturn -x\n\n\nprint(f(3))\r\n",
    "numbers 1234567890 3.14159 1e-10 0xDEADBEEF 1,000,000",
    "   leading and trailing   ",
    "\n\n\n\t \t\r\n  \u00a0\u2003\u3000\u2028 mixed whitespace \u200b\u200d",
    "a" + " " * 30_000 + "b" + "\n" * 26_000 + "c",
    "x" * 60_001,
    "lone surrogate \ud800 here",
    "special strings as text: <|begin_of_text|> <|eot_id|><|python_tag|> <|reserved_special_token_7|>",
]


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_ids_equal_meta(ours: Tokenizer, meta: MetaTokenizer, text: str) -> None:
    for bos, eos in [(False, False), (True, True)]:
        assert ours.encode(text, bos=bos, eos=eos) == meta.encode(text, bos=bos, eos=eos)


@pytest.mark.parametrize("text", [t for t in CORPUS if "\ud800" not in t])
def test_round_trip(ours: Tokenizer, text: str) -> None:
    assert ours.decode(ours.encode(text)) == text


def test_known_ids(ours: Tokenizer) -> None:
    # Numbers from Meta's own tokenizer test.
    assert ours.encode("This is a test sentence.", bos=True, eos=True) == [
        128000, 2028, 374, 264, 1296, 11914, 13, 128001,
    ]  # fmt: skip
    assert ours.decode([128000, 2028, 374, 264, 1296, 11914, 13, 128001]) == (
        "<|begin_of_text|>This is a test sentence.<|end_of_text|>"
    )
    assert ours.token_to_id("hello") == 15339
    assert ours.token_to_id(" world") == 1917
    assert ours.token_to_id("<|eot_id|>") == 128009
    with pytest.raises(ValueError, match=r"ids \[128256, -1\] are outside the vocabulary"):
        ours.decode([5, 128256, -1])
    with pytest.raises(KeyError, match="not a single token"):
        ours.token_to_id("hello world")


def test_one_million_chars(ours: Tokenizer, meta: MetaTokenizer) -> None:
    rng = random.Random(0)
    pieces = [
        "hello ",
        "世界",
        "  \n\n",
        "😀",
        "e\u0301",
        "x" * 30_000,
        " " * 30_000,
        "def f(x):\n\treturn x\n",
    ]
    text = "".join(rng.choice(pieces) for _ in range(400))
    text = (text * 3)[:1_000_000]
    assert len(text) == 1_000_000
    ids = ours.encode(text, bos=True)
    assert ids == meta.encode(text, bos=True, eos=False)
    assert ours.decode(ids[1:]) == text
    # A single 1M-character run, cut at 400k chunks and 25k pieces.
    run = "ab" * 500_000
    assert ours.encode(run) == meta.encode(run, bos=False, eos=False)


def test_split_matches_meta_cut_points() -> None:
    # With a tiny run limit the cut points are dense, so any off-by-one against Meta's loop shows up.
    rng = random.Random(1)
    for _ in range(300):
        text = "".join(
            rng.choice(["a", "b", " ", "\n", "\u3000", "é"]) * rng.randint(1, 12) for _ in range(20)
        )
        for limit in (1, 3, 5):
            expected = list(MetaTokenizer._split_whitespaces_or_nonwhitespaces(text, limit))
            assert list(_split_long_runs(text, limit)) == expected
            assert "".join(_split_long_runs(text, limit)) == text


def test_special_tokens_equal_meta(ours: Tokenizer, meta: MetaTokenizer) -> None:
    assert len(ours.special_tokens) == 256
    assert ours.special_tokens == meta.special_tokens
    assert sorted(ours.special_tokens.values()) == list(range(128000, 128256))
    expected = {
        "<|begin_of_text|>": 128000,
        "<|end_of_text|>": 128001,
        "<|reserved_special_token_0|>": 128002,
        "<|reserved_special_token_1|>": 128003,
        "<|finetune_right_pad_id|>": 128004,
        "<|step_id|>": 128005,
        "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007,
        "<|eom_id|>": 128008,
        "<|eot_id|>": 128009,
        "<|python_tag|>": 128010,
        "<|image|>": 128011,
        "<|reserved_special_token_2|>": 128012,
        "<|reserved_special_token_245|>": 128255,
    }
    for name, idx in expected.items():
        assert ours.special_tokens[name] == idx
        assert ours.token_to_id(name) == idx
        assert ours.decode([idx]) == name
    assert ours.vocab_size == 128256 == meta.n_words
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (128000, 128001, 128004)
    assert ours.pad_id == meta.pad_id
    assert ours.stop_ids == frozenset({128001, 128008, 128009}) == frozenset(meta.stop_tokens)


def test_special_token_strings(ours: Tokenizer, meta: MetaTokenizer) -> None:
    text = "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    plain = ours.encode(text)
    assert plain == meta.encode(text, bos=False, eos=False)
    assert not set(plain) & set(ours.special_tokens.values())  # default: special strings are plain text
    allowed = ours.encode(text, allowed_special="all")
    assert allowed == meta.encode(text, bos=False, eos=False, allowed_special="all")
    assert allowed == [128006, 882, 128007, 271, 6151, 128009]
    only_eot = ours.encode(text, allowed_special={"<|eot_id|>"})
    assert only_eot == meta.encode(text, bos=False, eos=False, allowed_special={"<|eot_id|>"})
    assert only_eot[-1] == 128009 and 128006 not in only_eot
    with pytest.raises(ValueError):
        ours.encode(text, disallowed_special="all")
    with pytest.raises(ValueError):
        meta.encode(text, bos=False, eos=False, disallowed_special="all")
    with pytest.raises(ValueError):
        ours.encode(text, disallowed_special={"<|eot_id|>"})
    assert ours.encode("no specials here", disallowed_special="all") == meta.encode(
        "no specials here", bos=False, eos=False
    )
    with pytest.raises(TypeError, match="expects a str"):
        ours.encode(b"bytes")  # type: ignore[arg-type]


# ----- small tiktoken files, file errors and load_tokenizer dispatch -----


def _write_bpe(path: Path, merges: list[bytes]) -> None:
    tokens = [bytes([b]) for b in range(256)] + merges
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))


def _train_sentencepiece(prefix: Path) -> Path:
    lines = [f"the llama herd number {i} eats grass" for i in range(300)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), model_type="bpe", vocab_size=300,
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1,
    )  # fmt: skip
    return prefix.with_suffix(".model")


def test_small_bpe_file_and_stale_cache(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.model"
    _write_bpe(path, [b"he", b"ll"])
    tok = Tokenizer(path)
    assert tok.vocab_size == 258 + 256
    assert tok.bos_id == 258 and tok.special_tokens["<|eot_id|>"] == 258 + 9
    assert tok.encode("hell") == [256, 257]
    # tiktoken caches files by path; the same path with new content must not serve the old ranks.
    _write_bpe(path, [b"he", b"ll", b"hell"])
    tok2 = Tokenizer(path)
    assert tok2.vocab_size == 259 + 256
    assert tok2.encode("hell") == [258]


def test_malformed_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(missing)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\x00\x01not a tokenizer")
    with pytest.raises(ValueError, match="garbage.model is not a tiktoken BPE file"):
        Tokenizer(garbage)
    broken = tmp_path / "broken.model"
    _write_bpe(broken, [b"he"])
    broken.write_text(broken.read_text() + "@@not-base64@@ 257\n")
    with pytest.raises(ValueError, match="broken.model is a malformed tiktoken BPE file"):
        Tokenizer(broken)
    gap = tmp_path / "gap.model"
    gap.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b * 2}\n" for b in range(256)))
    with pytest.raises(ValueError, match="gap.model: BPE ranks are not the unique integers 0..255"):
        Tokenizer(gap)
    with pytest.raises(ValueError, match="garbage.model is neither a tiktoken BPE file nor a SentencePiece"):
        load_tokenizer(garbage)
    sp_file = _train_sentencepiece(tmp_path / "sp")
    with pytest.raises(ValueError, match="looks like a SentencePiece model"):
        Tokenizer(sp_file)


def test_load_tokenizer_dispatch(tmp_path: Path, ours: Tokenizer) -> None:
    default = default_tokenizer_path()
    assert default.name == "tokenizer.model" and default.parent.name == "llama3"

    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(default, flat / "tokenizer.model")
    tok = load_tokenizer(flat, vocab_size=128256)
    assert isinstance(tok, Tokenizer) and tok.path == flat / "tokenizer.model"
    assert tok.encode("dispatch test") == ours.encode("dispatch test") == [18777, 1296]

    hf = tmp_path / "hf"
    (hf / "original").mkdir(parents=True)
    _write_bpe(hf / "original" / "tokenizer.model", [b"ab"])
    tok = load_tokenizer(hf)
    assert isinstance(tok, Tokenizer) and tok.path == hf / "original" / "tokenizer.model"
    assert tok.vocab_size == 257 + 256
    assert load_tokenizer(hf / "original" / "tokenizer.model").vocab_size == 513

    empty = tmp_path / "empty"
    empty.mkdir()
    fallback = load_tokenizer(empty)
    assert isinstance(fallback, Tokenizer) and fallback.path == default and fallback.vocab_size == 128256
    assert load_tokenizer(None).path == default
    assert load_tokenizer(empty, vocab_size=128256).path == default
    with pytest.raises(
        FileNotFoundError, match=r"no tokenizer in .*empty.*tokenizer\.model.*vocab_size=32000"
    ):
        load_tokenizer(empty, vocab_size=32000)
    with pytest.raises(FileNotFoundError, match="vocab_size=32000"):
        load_tokenizer(None, vocab_size=32000)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "typo")
    with pytest.raises(ValueError, match="has 513 tokens, more than the model's vocab_size=500"):
        load_tokenizer(hf, vocab_size=500)

    sp_dir = tmp_path / "llama2"
    sp_dir.mkdir()
    shutil.copy(_train_sentencepiece(tmp_path / "sp"), sp_dir / "tokenizer.model")
    assert detect_tokenizer_format(sp_dir / "tokenizer.model") == "sentencepiece"
    assert detect_tokenizer_format(default) == "tiktoken"
    sp_tok = load_tokenizer(sp_dir, vocab_size=300)
    assert isinstance(sp_tok, SentencePieceTokenizer)
    assert (sp_tok.vocab_size, sp_tok.bos_id, sp_tok.eos_id) == (300, 1, 2)
