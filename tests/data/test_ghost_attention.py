"""Ghost Attention data (Llama 2 §3.3): the instruction in every user turn for sampling, in the first only
for training, and no loss on any token of the earlier turns."""

import json

import pytest
import torch

from herd.commands import build_parser
from herd.data.curation.ghost_attention import (
    SkipDialog,
    build_gatt_dataset,
    sampling_dialog,
    training_dialog,
)
from herd.data.records import IGNORE_INDEX, SkipCounter
from herd.data.training.dialogs import encode_sft_example, parse_dialog
from herd.text import build_llama, get_preset
from herd.text.chat_format import ChatFormat
from herd.text.loading import save_text_model
from herd.text.tokenizer import Tokenizer
from herd.text.vocab_subset import SubsetTokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


PIRATE = "Always answer as a pirate."
DIALOG = [
    {"role": "user", "content": "Where is Paris?"},
    {"role": "assistant", "content": "In France."},
    {"role": "user", "content": "And Rome?"},
    {"role": "assistant", "content": "In Italy."},
    {"role": "user", "content": "Which is bigger?"},
    {"role": "assistant", "content": "Paris."},
]


def test_sampling_dialog_has_the_instruction_in_every_user_turn():
    sampled = sampling_dialog(DIALOG, PIRATE)
    assert [m["content"] for m in sampled] == [
        f"{PIRATE}\nWhere is Paris?", "In France.", f"{PIRATE}\nAnd Rome?", "In Italy.",
        f"{PIRATE}\nWhich is bigger?", "Paris.",
    ]  # fmt: skip
    assert DIALOG[0]["content"] == "Where is Paris?"  # the input is not modified


@pytest.mark.parametrize("placement", ["user", "system"])
def test_training_dialog_trains_only_the_last_turn(placement):
    trained = training_dialog(DIALOG, PIRATE, placement)
    users = [m["content"] for m in trained if m["role"] == "user"]
    assert users == (
        [f"{PIRATE}\nWhere is Paris?", "And Rome?", "Which is bigger?"]
        if placement == "user"
        else ["Where is Paris?", "And Rome?", "Which is bigger?"]
    )
    assert [m["content"] for m in trained if m["role"] == "system"] == (
        [PIRATE] if placement == "system" else []
    )
    assert [m["train"] for m in trained if m["role"] == "assistant"] == [False, False, True]

    # through the SFT encoder: every target before the last answer is ignored
    fmt = ChatFormat(Tokenizer())
    messages, train = parse_dialog({"messages": trained})
    tokens, labels = encode_sft_example(fmt, messages, train)
    last_answer = fmt.tokenizer.encode("Paris.") + [fmt.eot_id]
    assert labels[labels != IGNORE_INDEX].tolist() == last_answer
    first_target = int((labels != IGNORE_INDEX).nonzero()[0][0])
    assert first_target == len(tokens) - len(last_answer)  # the last answer ends the dialog
    assert (labels[:first_target] == IGNORE_INDEX).all()


def test_existing_system_message_gets_the_instruction():
    dialog = [{"role": "system", "content": "Be brief."}, *DIALOG[:2]]
    assert training_dialog(dialog, PIRATE, "system")[0] == {
        "role": "system",
        "content": f"{PIRATE}\nBe brief.",
    }
    kept = training_dialog(dialog, PIRATE, "user")
    assert kept[0] == {"role": "system", "content": "Be brief."} and kept[1]["content"].startswith(PIRATE)


def fake_sampler(calls):
    """Answers with the turn number and the last user message: deterministic, records what it saw."""

    def sample(messages):
        calls.append([dict(m) for m in messages])
        if "refuse" in messages[-1]["content"]:
            raise SkipDialog("the fake model refuses")
        return f"answer {sum(m['role'] == 'assistant' for m in messages)} to {messages[-1]['content']!r}"

    return sample


def test_build_gatt_dataset_writes_the_expected_jsonl(tmp_path):
    dialogs = [DIALOG[:4], [{"role": "user", "content": "hello"}], DIALOG[:2], [*DIALOG[:1], {"role": "assistant", "content": "x"}, {"role": "user", "content": "refuse"}, {"role": "assistant", "content": "y"}]]  # fmt: skip
    calls, skipped = [], SkipCounter()
    out = tmp_path / "gatt.jsonl"
    written = build_gatt_dataset(dialogs, ["A", "B", "C"], fake_sampler(calls), 3, out, skipped=skipped)
    assert written == 2 and skipped.count == 2
    assert skipped.examples == ["dialog 1: the dialog must end with an assistant message",
                                "dialog 3: the fake model refuses"]  # fmt: skip
    records = [json.loads(line) for line in out.read_text().splitlines()]
    instructions = [r["instruction"] for r in records]
    assert instructions == ["A", "C"]  # random.Random(3) draws A, C, C, A: one per dialog, skipped or not
    assert records[0]["messages"] == [
        {"role": "user", "content": "A\nWhere is Paris?"},
        {"role": "assistant", "content": "answer 0 to 'A\\nWhere is Paris?'", "train": False},
        {"role": "user", "content": "And Rome?"},
        {"role": "assistant", "content": "answer 1 to 'A\\nAnd Rome?'", "train": True},
    ]
    # turn by turn: the second turn was sampled on the new first answer, the instruction in both user turns
    assert calls[1] == [
        {"role": "user", "content": "A\nWhere is Paris?"},
        {"role": "assistant", "content": "answer 0 to 'A\\nWhere is Paris?'"},
        {"role": "user", "content": "A\nAnd Rome?"},
    ]
    assert records[1]["messages"][1] == {"role": "assistant", "content": "answer 0 to 'C\\nWhere is Paris?'", "train": True}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("gatt")
    texts = ["system", "user", "assistant", "\n\n", PIRATE, *(m["content"] for m in DIALOG)]
    tok = SubsetTokenizer.from_texts(Tokenizer(), texts)
    torch.manual_seed(0)
    args = get_preset("tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16,
                      vocab_size=-(-tok.vocab_size // 64) * 64, max_seq_len=128)  # fmt: skip
    save_text_model(build_llama(args).state_dict(), args, tok, root / "ckpt", "meta")
    (root / "dialogs.jsonl").write_text(
        json.dumps({"messages": DIALOG}) + "\n" + json.dumps({"messages": DIALOG[:2]}) + "\nnot json\n"
    )
    (root / "instructions.txt").write_text(f"# one per line\n{PIRATE}\n\nAnswer in one sentence.\n")
    return root


def run_cli(root, out, seed):
    args = build_parser().parse_args([
        "post", "gatt", "--model", str(root / "ckpt"), "--dialogs", str(root / "dialogs.jsonl"), "--instructions",
        str(root / "instructions.txt"), "--out", str(out), "--max-new-tokens", "6", "--temperature", "1.0",
        "--seed", str(seed),
    ])  # fmt: skip
    return args.func(args)


def test_cli_runs_on_a_tiny_checkpoint(tiny_checkpoint, tmp_path, capsys):
    assert run_cli(tiny_checkpoint, tmp_path / "a.jsonl", seed=1) == 0
    printed = capsys.readouterr()
    assert "wrote 2 GAtt dialog(s)" in printed.out and "dialogs.jsonl:3" in printed.err  # the bad line
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [len(r["messages"]) for r in records] == [6, 2]
    for record in records:
        instruction = record["instruction"]
        assert instruction in (PIRATE, "Answer in one sentence.")
        users = [m["content"] for m in record["messages"] if m["role"] == "user"]
        assert users[0].startswith(instruction) and not any(instruction in u for u in users[1:])
        flags = [m["train"] for m in record["messages"] if m["role"] == "assistant"]
        assert flags == [False] * (len(flags) - 1) + [True]
    # the answers are the model's (not the originals) and reproducible from the seed
    assert records[0]["messages"][1]["content"] != "In France."
    run_cli(tiny_checkpoint, tmp_path / "b.jsonl", seed=1)
    assert (tmp_path / "b.jsonl").read_text() == (tmp_path / "a.jsonl").read_text()
