"""Preference data: parsing, bad-record accounting, encoding masks, batches and the synthetic generator."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from herd.config import RewardModelConfig
from herd.data.records import SkipCounter
from herd.data.synthetic.preferences import (
    arithmetic_strength,
    generate_preferences,
    is_heldout_sum,
    preference_texts,
    write_preference_splits,
)
from herd.data.synthetic.text import generate_corpus
from herd.data.training.preferences import (
    PAIR_RESPONSES,
    RESPONSES,
    PreferenceBatches,
    collate_dpo,
    collate_rm,
    encode_all,
    encode_preference,
    load_preference_splits,
    parse_preference,
    read_preferences,
    record_to_json,
    response_loss_mask,
    write_preferences,
)
from herd.text.chat_format import ChatFormat, Message
from herd.text.tokenizer import Tokenizer
from herd.text.vocab_subset import SubsetTokenizer

GOOD = {"prompt": "Question: what is 3 plus 4?", "chosen": "3 plus 4 is 7.", "rejected": "3 plus 4 is 9."}


@pytest.fixture(scope="module")
def chat():
    return ChatFormat(Tokenizer())


def test_parse_forms_and_strength_alias():
    r = parse_preference(
        {**GOOD, "strength": "unsure", "edited": "7.", "ref_chosen_logp": -3, "ref_rejected_logp": -4.5}
    )
    assert [(m.role, m.content) for m in r.context] == [("user", GOOD["prompt"])]
    assert (r.strength, r.edited, r.ref_chosen_logp, r.ref_rejected_logp) == (
        "negligibly_better",
        "7.",
        -3.0,
        -4.5,
    )
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r2 = parse_preference({"messages": dialog, "chosen": "a", "rejected": "b"})
    assert [m.role for m in r2.context] == ["system", "user"] and r2.strength is None and r2.edited is None
    assert parse_preference(record_to_json(r)) == parse_preference(record_to_json(r))  # round trip
    assert record_to_json(r)["strength"] == "negligibly_better"


def test_bad_records_are_skipped_and_counted_with_file_and_line(tmp_path, chat):
    path = tmp_path / "prefs.jsonl"
    lines = [
        json.dumps(GOOD),  # 1 ok
        "{not json",  # 2
        json.dumps({"prompt": "x", "chosen": "a"}),  # 3 rejected missing
        json.dumps({**GOOD, "strength": "much_better"}),  # 4 unknown strength
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                    "chosen": "a", "rejected": "b"}),  # 5 context ends with assistant
        json.dumps({**GOOD, "ref_chosen_logp": "low"}),  # 6 not a number
        "[1, 2]",  # 7 not an object
        "",  # blank lines are not records
        json.dumps({**GOOD, "chosen": "3 plus 4 is 7. " * 40}),  # 9 too long for seq_len 64
    ]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    skipped = SkipCounter()
    records = read_preferences(path, skipped)
    assert len(records) == 2 and skipped.count == 6
    assert [e.split(": ")[0] for e in skipped.examples] == [f"{path}:{i}" for i in (2, 3, 4, 5, 6)]
    assert "much_better" in skipped.examples[2] and "'rejected'" in skipped.examples[1]
    encoded = encode_all(records, chat, seq_len=64, skipped=skipped)
    assert len(encoded) == 1 and skipped.count == 7
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_preferences(tmp_path / "missing.jsonl", skipped)


def test_rm_batch_pairs_edited_ranking_and_margins(chat):
    recs = [
        parse_preference({**GOOD, "edited": "3 plus 4 is 7. Count: one", "strength": "better"}),
        parse_preference({**GOOD, "strength": "slightly_better"}),
    ]
    enc = [encode_preference(r, chat) for r in recs]
    margins = {"significantly_better": 3.0, "better": 2.0, "slightly_better": 1.0, "negligibly_better": 0.0}
    batch = collate_rm(enc, pad_id=0, seq_len=128, margins=margins)
    B, N, T = batch["tokens"].shape
    assert (B, N) == (2, 3) and T % 8 == 0 and enc[0].max_len <= T
    # every row holds context + its reply, right-padded; last_index is the closing <|eot_id|>
    for b, e in enumerate(enc):
        for name, r in e.responses.items():
            n = RESPONSES.index(name)
            assert batch["tokens"][b, n, : len(r.tokens)].tolist() == r.tokens
            assert batch["last_index"][b, n] == len(r.tokens) - 1 and r.tokens[-1] == chat.eot_id
    # record 0 has three ordered pairs edited > chosen > rejected, record 1 one pair
    names = [[(RESPONSES[int(hi)], RESPONSES[int(lo)]) for hi, lo in zip(batch["pair_better"][b], batch["pair_worse"][b])]
             for b in range(2)]  # fmt: skip
    assert (
        names[0]
        == list(PAIR_RESPONSES)
        == [("chosen", "rejected"), ("edited", "chosen"), ("edited", "rejected")]
    )
    assert batch["pair_valid"].tolist() == [[True, True, True], [True, False, False]]
    assert batch["pair_margin"].tolist() == [[2.0, 0.0, 2.0], [1.0, 0.0, 0.0]]
    assert collate_rm(enc[1:], 0, 128, margins)["tokens"].shape[1] == 2  # no edit in the batch: N = 2


def test_format_masking_changes_exactly_the_template_positions(chat):
    record = parse_preference(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Question: what is 3 plus 4?"},
            ],
            "chosen": "3 plus 4 is 7.",
            "rejected": "9.",
        }  # fmt: skip
    )
    enc = encode_preference(record, chat)
    masked, plain = collate_dpo([enc], 0, 128, True), collate_dpo([enc], 0, 128, False)
    for n, name in enumerate(("chosen", "rejected")):
        tokens, assistant, fmt = chat.encode_dialog_with_mask(
            [*record.context, Message("assistant", record.response(name))]
        )
        assert enc.responses[name].tokens == tokens
        L = len(tokens)
        # position t scores token t + 1: compare with ChatFormat's masks one position to the left
        want_masked = [assistant[t + 1] and not fmt[t + 1] for t in range(L - 1)]
        want_plain = [assistant[t + 1] for t in range(L - 1)]
        assert masked["loss_mask"][0, n, : L - 1].tolist() == want_masked
        assert plain["loss_mask"][0, n, : L - 1].tolist() == want_plain
        assert not masked["loss_mask"][0, n, L - 1 :].any() and not plain["loss_mask"][0, n, L - 1 :].any()
        assert masked["targets"][0, n, : L - 1].tolist() == tokens[1:]
        differ = (masked["loss_mask"][0, n] != plain["loss_mask"][0, n]).nonzero().flatten().tolist()
        assert differ == [L - 2] and tokens[L - 1] == chat.eot_id  # only the closing <|eot_id|> is masked
        assert response_loss_mask(enc.responses[name], False) == assistant
    assert "ref_logps" not in masked


def test_precomputed_reference_logps_reach_the_batch(chat):
    with_ref = parse_preference({**GOOD, "ref_chosen_logp": -1.5, "ref_rejected_logp": -2.5})
    without = parse_preference(GOOD)
    batch = collate_dpo([encode_preference(with_ref, chat)], 0, 64)
    assert batch["ref_logps"].tolist() == [[-1.5, -2.5]]
    mixed = collate_dpo([encode_preference(with_ref, chat), encode_preference(without, chat)], 0, 64)
    assert "ref_logps" not in mixed  # only when every record has them


def test_batches_split_ranks_shuffle_per_epoch_and_resume():
    items = list(range(10))
    collate = lambda chunk: {"ids": torch.tensor(chunk)}  # noqa: E731
    single = PreferenceBatches(items, 4, collate, seed=3)
    ranks = [PreferenceBatches(items, 4, collate, rank=r, world_size=2, seed=3) for r in range(2)]
    seen = []
    for _ in range(6):  # 24 records: two full epochs and a bit, batches straddle epoch ends
        whole = next(single)["ids"].tolist()
        assert sum((next(r)["ids"].tolist() for r in ranks), []) == whole
        seen += whole
    assert sorted(seen[:10]) == items and sorted(seen[10:20]) == items and seen[:10] != seen[10:20]
    resumed = PreferenceBatches(items, 4, collate, seed=3)
    resumed.load_state_dict(single.state_dict())
    assert next(resumed)["ids"].tolist() == next(single)["ids"].tolist()
    with pytest.raises(ValueError, match="not divisible"):
        PreferenceBatches(items, 3, collate, world_size=2)


def test_splits_hold_out_a_fraction(tmp_path, chat):
    path = write_preferences(tmp_path / "p.jsonl", [{**GOOD, "chosen": f"{i}."} for i in range(20)])
    post = RewardModelConfig(train_data=str(path), val_fraction=0.25)
    train, val, skipped = load_preference_splits(post, chat, seq_len=64, seed=0)
    assert (len(train), len(val), skipped.count) == (15, 5, 0)
    assert {e.record.chosen for e in train}.isdisjoint({e.record.chosen for e in val})
    with pytest.raises(ValueError, match="rm.train_data"):
        load_preference_splits(RewardModelConfig(), chat, 64)


def test_synthetic_preferences_ground_truth_and_vocabulary(tmp_path):
    assert [arithmetic_strength(e) for e in (1, -2, 3, 4, -5, 9)] == [
        "negligibly_better", "slightly_better", "better", "better", "significantly_better", "significantly_better",
    ]  # fmt: skip
    train, val = generate_preferences(600, seed=0), generate_preferences(200, seed=1, heldout=True)
    for r in train + val:
        if r["kind"] == "arithmetic":
            a, _, b = r["prompt"].removeprefix("Question: what is ").rstrip("?").split()
            right = int(a) + int(b)
            best = r.get("edited", r["chosen"])
            assert best.endswith(f"is {right}.") and r["rejected"] != best
            wrong = int(r["rejected"].rstrip(".").split()[-1])
            assert r["strength"].replace("unsure", "negligibly_better") == arithmetic_strength(wrong - right)
            assert is_heldout_sum(int(a), int(b)) == (r in val)
    assert {r["kind"] for r in train} == {"arithmetic", "scene", "garbled"}
    assert 0.15 < sum("edited" in r for r in train) / len(train) < 0.35
    # every word is in the quickstart corpus's vocabulary subset: no unknown tokens
    tok = SubsetTokenizer.from_texts(Tokenizer(), generate_corpus(3000, seed=0))
    for text in preference_texts(train + val):
        tok.encode(text)
    assert tok.unknown_count == 0
    paths = write_preference_splits(tmp_path, n_train=40, n_val=10)
    assert len(read_preferences(paths["val"], SkipCounter())) == 10


def test_the_example_runs_end_to_end(tmp_path):
    """examples/preference_tuning_tiny.py with a handful of steps: only to keep it from rotting (the
    measured numbers are in docs/preference_tuning.md)."""
    path = Path(__file__).resolve().parents[2] / "examples" / "preference_tuning_tiny.py"
    spec = importlib.util.spec_from_file_location("preference_tuning_tiny", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    threads = torch.get_num_threads()
    try:
        report = example.main(["--out", str(tmp_path), "--text-steps=2", "--rm-steps=2", "--dpo-steps=2",
                               "--n-train=32", "--n-val=16", "--threads=1"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    rm, dpo = report["reward_model"], report["dpo"]
    assert rm["before"]["pairs"] == rm["after"]["pairs"] >= 16 and 0 <= rm["after"]["accuracy"] <= 1
    assert dpo["before"]["reward_margin"] == 0.0 and dpo["after"]["pairs"] == 16
    assert (tmp_path / "reward_model" / "reward_model.json").is_file()
    assert (tmp_path / "dpo_model" / "params.json").is_file()
