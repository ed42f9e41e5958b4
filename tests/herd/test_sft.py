"""SFT: the loss is on trained assistant tokens only, packing changes nothing, the data resumes and splits
across ranks, and `herd train sft` learns the same on one process, FSDP and TP."""

import json

import numpy as np
import pytest
import torch

from herd.config import load_config
from herd.data.records import IGNORE_INDEX, SkipCounter
from herd.data.training.dialogs import (
    DialogBatches,
    collate_rows,
    encode_sft_example,
    read_dialogs,
    sequential_dialog_batches,
)
from herd.losses import causal_lm_loss
from herd.parallel.launch import spawn_ranks
from herd.tasks.sft import SFTTask
from herd.text import build_llama, get_preset
from herd.text.chat_format import ChatFormat, Message
from herd.text.loading import load_pretrained, save_text_model
from herd.text.tokenizer import Tokenizer
from herd.text.vocab_subset import SubsetTokenizer
from herd.trainer import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COLORS = {"sky": "blue", "grass": "green", "sun": "yellow", "snow": "white", "coal": "black", "blood": "red",
          "sea": "blue", "milk": "white"}  # fmt: skip
SYSTEM = "You are a helpful assistant."


def color_dialog(a: str, b: str) -> list[dict]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"What color is the {a}?"},
        {"role": "assistant", "content": f"The {a} is {COLORS[a]}."},
        {"role": "user", "content": f"And the {b}?"},
        {"role": "assistant", "content": f"The {b} is {COLORS[b]}."},
    ]


def write_jsonl(path, dialogs):
    path.write_text("".join(json.dumps({"messages": d}) + "\n" for d in dialogs))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random checkpoint with a trimmed vocabulary, and 56 two-turn dialogs."""
    root = tmp_path_factory.mktemp("sft")
    dialogs = [color_dialog(a, b) for a in COLORS for b in COLORS if a != b]
    # ChatFormat encodes role names and "\n\n" on their own: they must be in the trimmed vocabulary
    texts = ["system", "user", "assistant", "ipython", "\n\n"] + [m["content"] for d in dialogs for m in d]
    tok = SubsetTokenizer.from_texts(Tokenizer(), texts)
    torch.manual_seed(0)
    args = get_preset("tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16,
                      vocab_size=-(-tok.vocab_size // 64) * 64, max_seq_len=128)  # fmt: skip
    save_text_model(build_llama(args).state_dict(), args, tok, root / "base", "meta")
    write_jsonl(root / "train.jsonl", dialogs)
    return root


@pytest.fixture(scope="module")
def fmt(setup):
    _, tok = load_pretrained(setup / "base")
    return ChatFormat(tok)


def two_turn_messages() -> list[Message]:
    return [Message(m["role"], m["content"]) for m in color_dialog("sky", "snow")]


def test_labels_are_the_assistant_mask_shifted(fmt):
    messages = two_turn_messages()
    full, assistant_mask, _ = fmt.encode_dialog_with_mask(messages)
    tokens, labels = encode_sft_example(fmt, messages)
    assert tokens.tolist() == full[:-1] and len(labels) == len(full) - 1
    for i in range(len(labels)):  # position by position: the target of i is token i+1
        assert labels[i] == (full[i + 1] if assistant_mask[i + 1] else IGNORE_INDEX), i
    # the trained targets are exactly both answers' content and their closing <|eot_id|>
    answers = [fmt.tokenizer.encode(m.content) + [fmt.eot_id] for m in messages if m.role == "assistant"]
    assert labels[labels != IGNORE_INDEX].tolist() == answers[0] + answers[1]
    header = fmt.encode_header("assistant")
    first_answer = full.index(fmt.eot_id, full.index(fmt.eot_id) + 1) + 1 + len(header)  # after sys, user
    assert labels[first_answer - 1] == answers[0][0]  # "\n\n" of the header predicts the answer
    assert (labels[: first_answer - 1] == IGNORE_INDEX).all()  # bos, system, user, the header itself
    # train=false on the first answer: only the second answer carries loss
    _, labels_last = encode_sft_example(fmt, messages, [True, True, False, True, True])
    assert labels_last[labels_last != IGNORE_INDEX].tolist() == answers[1]


def test_masked_positions_get_exactly_zero_gradient(setup, fmt):
    model, _ = load_pretrained(setup / "base")
    tokens, labels = encode_sft_example(fmt, two_turn_messages())
    tokens, labels = torch.from_numpy(tokens)[None], torch.from_numpy(labels)[None]  # (1, T)
    logits = model(tokens).detach().requires_grad_(True)  # (1, T, V)
    loss_sum, n = causal_lm_loss(logits, labels)
    loss_sum.backward()
    grad_norm = logits.grad.abs().sum(-1)[0]  # (T,)
    masked = labels[0] == IGNORE_INDEX
    assert n == int((~masked).sum()) == 12  # "The sky is blue." + <|eot_id|>, twice
    assert (grad_norm[masked] == 0.0).all() and (grad_norm[~masked] > 1e-3).all()

    # the target id of a masked (user) position does not matter; an assistant one does
    full = torch.cat([tokens[0], torch.tensor([fmt.eot_id])])  # (T+1,) the dialog's tokens
    user_pos = int(torch.nonzero(masked)[3])
    answer_pos = int(torch.nonzero(~masked)[0])
    for pos, changes_loss in ((user_pos, False), (answer_pos, True)):
        edited = full.clone()
        edited[pos + 1] = (edited[pos + 1] + 1) % model.args.vocab_size
        relabeled = torch.where(masked, IGNORE_INDEX, edited[1:])[None]  # same mask, edited targets
        new_sum, _ = causal_lm_loss(logits.detach(), relabeled)
        assert (new_sum.item() != loss_sum.item()) == changes_loss


def test_packed_row_equals_each_dialog_alone(setup, fmt):
    model, _ = load_pretrained(setup / "base")
    dialogs = read_dialogs(setup / "train.jsonl", fmt, 128, SkipCounter())[:3]
    layout = [[0, 1], [2]]  # two dialogs of ~50 tokens packed, one alone with padding
    batch = collate_rows(dialogs, layout, 128, pad_id=0)
    with torch.no_grad():
        logits = model(batch["tokens"], document_ids=batch["document_ids"])  # (2, 128, V)
        per_token = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).view(2, 128)
        for row, members in enumerate(layout):
            for doc, i in enumerate(members):
                packed = per_token[row][batch["document_ids"][row] == doc].sum()
                alone_logits = model(torch.from_numpy(dialogs[i].tokens)[None])
                alone, _ = causal_lm_loss(alone_logits, torch.from_numpy(dialogs[i].labels)[None])
                assert abs(packed.item() - alone.item()) < 1e-5, (row, doc, packed.item(), alone.item())
        pad = batch["document_ids"][1] == 1
        assert pad.sum() == 128 - len(dialogs[2]) > 0
        assert (batch["labels"][1][pad] == IGNORE_INDEX).all()


def test_bad_records_are_skipped_and_counted(tmp_path, fmt):
    good = json.dumps({"messages": color_dialog("sky", "sun")})
    lines = [
        good,
        "{not json",
        json.dumps({"text": "no messages"}),
        json.dumps({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "train": False}]}),
        "",
        good,
        json.dumps({"messages": [{"role": "user", "content": "sky " * 200}, {"role": "assistant", "content": "a"}]}),
    ]  # fmt: skip
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    skipped = SkipCounter()
    dialogs = read_dialogs(path, fmt, 128, skipped)
    assert [d.where for d in dialogs] == [f"{path}:1", f"{path}:8"]
    assert skipped.count == 6
    reasons = ["not JSON", '"messages" list', "unknown role 'robot'", "no assistant message to train on",
               "no assistant message to train on"]  # fmt: skip
    assert len(skipped.examples) == 5  # SkipCounter keeps the first five
    for line, reason, example in zip((2, 3, 4, 5, 6), reasons, skipped.examples):
        assert example.startswith(f"{path}:{line}: ") and reason in example, example
    alone = SkipCounter()
    (tmp_path / "long.jsonl").write_text(lines[-1] + "\n")
    assert read_dialogs(tmp_path / "long.jsonl", fmt, 128, alone) == [] and alone.count == 1
    assert (
        alone.examples[0].startswith(f"{tmp_path / 'long.jsonl'}:1: 2")
        and "longer than data.seq_len 128" in alone.examples[0]
    )


def dialog_batches(setup, fmt, **kw):
    dialogs = read_dialogs(setup / "train.jsonl", fmt, 128, SkipCounter())
    return DialogBatches(dialogs, 128, 4, seed=3, pad_id=0, **kw)


def test_resume_gives_the_same_batches(setup, fmt):
    batches = dialog_batches(setup, fmt)
    per_epoch = len(batches.epoch_rows()) // 4
    assert per_epoch == 7  # 56 dialogs of ~50 tokens: two per row
    for _ in range(per_epoch - 2):
        next(batches)
    state = batches.state_dict()
    expected = [next(batches) for _ in range(4)]  # crosses into epoch 1
    assert batches.epoch == 1
    resumed = dialog_batches(setup, fmt)
    resumed.load_state_dict(state)
    for want, got in zip(expected, (next(resumed) for _ in range(4))):
        assert all(torch.equal(want[k], got[k]) for k in ("tokens", "labels", "document_ids"))
    # epochs are shuffled differently
    assert batches.epoch_rows() != dialog_batches(setup, fmt).epoch_rows()


def test_rank_split_is_disjoint(setup, fmt):
    whole = dialog_batches(setup, fmt)
    ranks = [dialog_batches(setup, fmt, rank=r, world_size=2) for r in range(2)]
    rows = whole.epoch_rows()
    for step in range(3):
        batch = next(whole)
        parts = [next(r) for r in ranks]
        assert parts[0]["tokens"].shape == (2, 128)
        assert torch.equal(torch.cat([p["tokens"] for p in parts]), batch["tokens"])
        assert torch.equal(torch.cat([p["labels"] for p in parts]), batch["labels"])
        mine = [{i for row in rows[step * 4 + 2 * r : step * 4 + 2 * r + 2] for i in row} for r in range(2)]
        assert mine[0].isdisjoint(mine[1]) and len(mine[0]) == len(mine[1]) == 4


def sft_config(setup, run_dir, *extra):
    return load_config(None, [
        f"--model.init_from={setup / 'base'}", f"--sft.train_data={setup / 'train.jsonl'}",
        f"--train.run_dir={run_dir}", "--data.seq_len=128", "--data.batch_size=4", "--metrics.log_every=1",
        "--train.eval_every=0", "--metrics.tensorboard=false", "--checkpoint.save_final=false",
        "--checkpoint.resume=none", "--train.device=cpu", "--optimizer.lr=3e-3", "--schedule.warmup_steps=2",
        "--sft.val_fraction=0", *extra,
    ])  # fmt: skip


def dialog_loss(model, task) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in sequential_dialog_batches(task.train_dialogs, 128, 8, pad_id=task.pad_id):
            out = task.loss(model, batch)
            total, count = total + out.loss_sum.item(), count + out.num_targets
    return total / count


def test_sft_lowers_the_assistant_loss(setup, tmp_path):
    with pytest.raises(ValueError, match="model.init_from"):
        SFTTask.from_config(load_config(None, [f"--sft.train_data={setup / 'train.jsonl'}"]))
    cfg = sft_config(setup, tmp_path, "--train.steps=8", "--optimizer.lr=1e-2")
    task = SFTTask.from_config(cfg)
    assert task.tokenizer.unknown_count == 0  # every dialog token is in the checkpoint's vocabulary
    before = dialog_loss(load_pretrained(setup / "base")[0], task)
    result = train(cfg, task, show_progress=False)
    after = dialog_loss(result.model, task)
    assert before > 6.0 and after < 0.5 * before, (before, after)  # measured: 6.54 → 1.49
    out = task.export(result.model.state_dict(), tmp_path / "export", "meta")
    reloaded, tok = load_pretrained(out)
    assert tok.keep_ids == task.tokenizer.keep_ids
    assert abs(dialog_loss(reloaded, task) - after) < 1e-5


def sft_losses(setup, run_dir, extra):
    cfg = sft_config(setup, run_dir, "--train.steps=3", *extra)
    return [h["loss"] for h in train(cfg, SFTTask.from_config(cfg), show_progress=False).history]


_SINGLE: dict[str, list[float]] = {}


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", [["--parallel.dp_shard=2"], ["--parallel.tp=2", "--parallel.dp_shard=1"]])
def test_layouts_match_single_process(setup, tmp_path, layout):
    if "single" not in _SINGLE:  # one reference run for both layouts
        _SINGLE["single"] = sft_losses(setup, tmp_path / "single", [])
    single = _SINGLE["single"]
    parallel = spawn_ranks(sft_losses, 2, setup, tmp_path / "parallel", layout)[0]
    assert len(single) == len(parallel) == 3
    assert max(abs(a - b) for a, b in zip(single, parallel)) < 1e-4, (single, parallel)
    assert np.isfinite(single).all()


def test_herd_train_sft_command_exports_a_loadable_model(setup, tmp_path):
    from pathlib import Path

    from herd.cli import main

    config = Path(__file__).resolve().parents[2] / "configs" / "post" / "sft_tiny.toml"
    main(["train", "sft", "--config", str(config), f"--model.init_from={setup / 'base'}",
          f"--sft.train_data={setup / 'train.jsonl'}", f"--train.run_dir={tmp_path}", "--train.steps=2",
          "--train.eval_every=0", "--data.batch_size=4"])  # fmt: skip
    model, tok = load_pretrained(tmp_path / "model")
    base, _ = load_pretrained(setup / "base")
    assert tok.keep_ids == load_pretrained(setup / "base")[1].keep_ids
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert moved  # two optimizer steps changed the exported weights
