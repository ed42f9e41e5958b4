"""Trimmed vocabularies: same text split as Llama 3, dense ids, saved and reloaded with a checkpoint."""

import pytest

from herd.text.tokenizer import Tokenizer, load_tokenizer
from herd.text.vocab_subset import SubsetTokenizer


@pytest.fixture(scope="module")
def base():
    return Tokenizer()


def test_subset_round_trips_and_keeps_specials(base, tmp_path):
    texts = ["Hello world!", "The red circle is left of the blue square."]
    sub = SubsetTokenizer.from_texts(base, texts)
    assert sub.vocab_size == len(
        {t for s in texts for t in base.encode(s)} | set(base.special_tokens.values())
    )
    for s in texts:
        ids = sub.encode(s, bos=True, eos=True)
        assert max(ids) < sub.vocab_size
        assert sub.to_base_ids(ids) == base.encode(s, bos=True, eos=True)
        assert sub.decode(ids[1:-1]) == s
    assert sub.decode([sub.bos_id]) == "<|begin_of_text|>" and sub.stop_ids == {
        sub.token_to_id(t) for t in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
    }
    # a padding row of the model (past the subset) decodes as unk instead of raising
    unk = "<|reserved_special_token_0|>"
    assert sub.decode([sub.vocab_size, sub.vocab_size + 5]) == unk * 2
    # text outside the subset becomes unk, and is counted
    assert sub.encode("Zebra") and sub.unknown_count > 0
    sub.save(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(base.path.read_bytes())
    loaded = load_tokenizer(tmp_path, vocab_size=sub.vocab_size)
    assert isinstance(loaded, SubsetTokenizer) and loaded.keep_ids == sub.keep_ids


def test_corrupt_subset_file_names_the_file(base, tmp_path):
    (tmp_path / "vocab_subset.json").write_text("{not json")
    with pytest.raises(ValueError, match="vocab_subset.json"):
        load_tokenizer(tmp_path)
