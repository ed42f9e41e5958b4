"""SentencePieceTokenizer on a tiny Llama-2-style BPE model trained here, against sentencepiece and transformers."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm

from herd.text.sp_tokenizer import SentencePieceTokenizer
from herd.text.tokenizer import load_tokenizer

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "llama",
    "herd",
    "model",
    "über",
    "naïve",
    "数据",
    "2024",
    "tokens",
    "\t",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(2000)]
    out = tmp_path_factory.mktemp("llama2_tok")
    # Llama 2's trainer settings: BPE, byte fallback, digits split, no normalization, whitespace kept.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(out / "tokenizer"),
        model_type="bpe",
        vocab_size=300,
        byte_fallback=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        minloglevel=2,
        num_threads=1,
    )
    return out


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(model_dir / "tokenizer.model")


@pytest.fixture(scope="module")
def raw(model_dir: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))


CORPUS = [
    "the quick brown fox",
    "über naïve 数据 llama herd",
    "Unseen words: zebra, QUOTA; 12345 digits",
    "emoji 🦙😀 and 한국어 fall back to bytes",
    "multiple   spaces\tand\nnewlines\n\n",
    "trailing space ",
    " leading space",
    "  ",
    "",
    "literal <s> and </s> and <unk> are text",
]


def test_properties(tok: SentencePieceTokenizer) -> None:
    assert tok.vocab_size == 300
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, -1)
    assert tok.stop_ids == frozenset({2})
    assert tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    assert tok.token_to_id("<unk>") == 0
    assert tok.token_to_id("<s>") == 1
    assert tok.token_to_id("<0x0A>") == 3 + 0x0A  # byte pieces follow the 3 control pieces
    assert tok.token_to_id("▁the") == tok.encode("the")[0]
    with pytest.raises(KeyError, match="not a piece"):
        tok.token_to_id("definitely-not-a-piece")


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_ids_equal_sentencepiece(
    tok: SentencePieceTokenizer, raw: spm.SentencePieceProcessor, text: str
) -> None:
    ids = tok.encode(text)
    assert ids == raw.encode(text)
    assert tok.encode(text, bos=True, eos=True) == [1, *ids, 2]
    assert tok.decode(ids) == text
    assert tok.decode([1, *ids, 2]) == text  # control pieces decode to nothing


def test_byte_fallback_and_long_input(tok: SentencePieceTokenizer, raw: spm.SentencePieceProcessor) -> None:
    ids = tok.encode("🦙")
    # "▁" then the four UTF-8 bytes F0 9F A6 99 as byte pieces (id = 3 + byte).
    assert ids[-4:] == [3 + 0xF0, 3 + 0x9F, 3 + 0xA6, 3 + 0x99]
    assert tok.decode(ids) == "🦙"
    rng = random.Random(1)
    text = " ".join(rng.choice([*WORDS, "🦙", "zzz", "\n"]) for _ in range(20_000))
    assert tok.encode(text) == raw.encode(text)
    assert tok.decode(tok.encode(text)) == text


def test_errors(tmp_path: Path, tok: SentencePieceTokenizer) -> None:
    with pytest.raises(FileNotFoundError, match="missing.model"):
        SentencePieceTokenizer(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x0a\x05hello, not a protobuf")
    with pytest.raises(ValueError, match="bad.model is not a readable SentencePiece model"):
        SentencePieceTokenizer(bad)
    with pytest.raises(ValueError, match=r"ids \[300\] are outside the vocabulary"):
        tok.decode([5, 300])
    with pytest.raises(TypeError, match="expects a str"):
        tok.encode(None)  # type: ignore[arg-type]


def test_load_tokenizer_finds_sentencepiece(
    tmp_path: Path, model_dir: Path, tok: SentencePieceTokenizer
) -> None:
    (tmp_path / "original").mkdir()
    shutil.copy(model_dir / "tokenizer.model", tmp_path / "original" / "tokenizer.model")
    loaded = load_tokenizer(tmp_path, vocab_size=32000)
    assert isinstance(loaded, SentencePieceTokenizer)
    assert loaded.encode("the quick fox", bos=True) == tok.encode("the quick fox", bos=True)


def test_ids_equal_transformers(model_dir: Path, tok: SentencePieceTokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    try:
        hf = transformers.LlamaTokenizer.from_pretrained(str(model_dir), legacy=True)
    except Exception as exc:  # only "cannot construct it from the local file" skips; mismatches fail below
        pytest.skip(f"transformers cannot build LlamaTokenizer from {model_dir}: {exc}")
    if len(hf) != tok.vocab_size:
        pytest.skip(
            f"transformers built a {len(hf)}-token LlamaTokenizer from a {tok.vocab_size}-piece model"
        )
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (1, 2, 0)
    # transformers' Metaspace pre-tokenizer skips the dummy prefix when the text already starts with a space,
    # and it parses "<s>" in text as a control token; Meta's Llama 2 code (plain sentencepiece) does neither.
    # Those inputs are left out; on everything else the ids must agree.
    texts = [t for t in CORPUS if t and not t[0].isspace() and "<s>" not in t]
    assert len(texts) == 6
    for text in texts:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), text
