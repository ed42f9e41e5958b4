"""Ghost Attention (GAtt) data: multi-turn dialogs that keep following a first-turn instruction (Llama 2 §3.3).

Llama 2-Chat forgot a system instruction ("Always answer as a pirate") after a few turns. GAtt builds
fine-tuning data that fixes it:

1. for a dialog [u1, a1, ..., un, an] draw an instruction `inst` and concatenate it to EVERY user message
   (`sampling_dialog`); re-sample each assistant turn with the latest chat model on that dialog, turn by
   turn, the new answers becoming the history of the next turn;
2. train on the dialog with `inst` only in the first user turn (or as a system message)
   (`training_dialog`), the loss zero on every token of the earlier turns — their assistant messages
   are marked `"train": false` for `herd.data.training.dialogs` — so only the last answer, which obeys an
   instruction given several turns before, is learned.

`build_gatt_dataset` runs both steps with any `sample_fn(messages) -> str` and writes SFT jsonl;
`gatt_from_files` (`herd post gatt`) samples with a checkpoint through `herd.text.generation.generate`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from herd.data.records import SkipCounter, atomic_write, json_lines

Dialog = list[dict[str, Any]]  # [{"role": ..., "content": ...}, ...], the SFT jsonl message format
SampleFn = Callable[[Dialog], str]


class SkipDialog(Exception):
    """Raised by a `sample_fn` that cannot answer (e.g. the prompt fills the context): the dialog is
    skipped and counted, the dataset goes on."""


def check_dialog(dialog: Sequence[dict[str, Any]]) -> None:
    """ValueError unless the dialog is [system?] u1, a1, ..., un, an with string contents."""
    turns = list(dialog[1:] if dialog and dialog[0].get("role") == "system" else dialog)
    if not turns:
        raise ValueError("no user / assistant turns")
    for i, message in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if not isinstance(message, dict) or message.get("role") != want:
            got = message.get("role") if isinstance(message, dict) else type(message).__name__
            raise ValueError(f"turn {i} should be a {want} message, got {got!r}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"turn {i} has no string content")
    if len(turns) % 2:
        raise ValueError("the dialog must end with an assistant message")


def with_instruction(content: str, instruction: str, separator: str = "\n") -> str:
    """The instruction first, then the message: "Always answer as a pirate\\nWhere is Paris?"."""
    return f"{instruction}{separator}{content}" if content else instruction


def sampling_dialog(dialog: Sequence[dict[str, Any]], instruction: str, separator: str = "\n") -> Dialog:
    """The dialog the chat model is sampled on: `instruction` concatenated to every user message."""
    return [
        {"role": m["role"], "content": with_instruction(m["content"], instruction, separator)}
        if m["role"] == "user"
        else {"role": m["role"], "content": m["content"]}
        for m in dialog
    ]


def training_dialog(
    dialog: Sequence[dict[str, Any]], instruction: str, placement: str = "user", separator: str = "\n"
) -> Dialog:
    """The dialog trained on: `instruction` only in the first user message (placement "user") or as the
    system message (placement "system", joined to an existing one), every assistant message but the last
    marked train=false, so only the last answer carries loss.

    `dialog` holds the plain user messages (no instruction) and the sampled answers.
    """
    if placement not in ("user", "system"):
        raise ValueError(f"placement must be 'user' or 'system', got {placement!r}")
    last_assistant = max(i for i, m in enumerate(dialog) if m["role"] == "assistant")
    first_user = min(i for i, m in enumerate(dialog) if m["role"] == "user")
    out: Dialog = []
    for i, m in enumerate(dialog):
        message = {"role": m["role"], "content": m["content"]}
        holds_instruction = m["role"] == placement and (placement == "system" or i == first_user)
        if holds_instruction:
            message["content"] = with_instruction(m["content"], instruction, separator)
        elif m["role"] == "assistant":
            message["train"] = i == last_assistant
        out.append(message)
    if placement == "system" and dialog[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": instruction})
    return out


def gatt_dialog(
    dialog: Sequence[dict[str, Any]],
    instruction: str,
    sample_fn: SampleFn,
    placement: str = "user",
    separator: str = "\n",
) -> Dialog:
    """Re-sample every assistant turn on the instruction-everywhere dialog, then `training_dialog`."""
    check_dialog(dialog)
    resampled: Dialog = []
    for m in dialog:
        if m["role"] == "assistant":
            answer = sample_fn(sampling_dialog(resampled, instruction, separator))
            resampled.append({"role": "assistant", "content": answer})
        else:
            resampled.append({"role": m["role"], "content": m["content"]})
    return training_dialog(resampled, instruction, placement, separator)


def build_gatt_dataset(
    dialogs: Iterable[Sequence[dict[str, Any]]],
    instructions: Sequence[str],
    sample_fn: SampleFn,
    seed: int,
    out_path: str | Path,
    placement: str = "user",
    skipped: SkipCounter | None = None,
) -> int:
    """For each dialog draw an instruction (seeded), build its GAtt training dialog, write the SFT jsonl
    (one `{"messages": [...], "instruction": ...}` per line, atomically); returns the dialogs written.
    Malformed dialogs and those `sample_fn` refuses (`SkipDialog`) go to `skipped` as "dialog N: why"."""
    if not instructions:
        raise ValueError("no system instructions to draw from")
    skipped = skipped if skipped is not None else SkipCounter()
    rng = random.Random(seed)
    written = 0
    with atomic_write(out_path) as out:
        for index, dialog in enumerate(dialogs):
            instruction = rng.choice(instructions)  # drawn for every dialog: the draws do not shift on a skip
            try:
                check_dialog(dialog)
            except ValueError as e:
                skipped.add("bad_dialog", f"dialog {index}", str(e))
                continue
            try:
                messages = gatt_dialog(dialog, instruction, sample_fn, placement)
            except SkipDialog as e:  # any other error of sample_fn is a bug and stops the run
                skipped.add("bad_dialog", f"dialog {index}", str(e))
                continue
            out.write(
                json.dumps({"messages": messages, "instruction": instruction}, ensure_ascii=False) + "\n"
            )
            written += 1
    return written


def read_instructions(path: str | Path) -> list[str]:
    """One instruction per line; blank lines and lines starting with # are ignored."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    found = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not found:
        raise ValueError(f"{path}: no instructions (one per line expected)")
    return found


def read_dialog_file(path: str | Path, skipped: SkipCounter) -> list[Dialog]:
    """The "messages" of every record of a jsonl file; bad lines go to `skipped` as "file:line: why"."""
    dialogs = []
    for where, record in json_lines(path, skipped, "dialog file"):
        try:
            dialog = record["messages"]
            check_dialog(dialog)
        except (TypeError, KeyError, ValueError) as e:
            skipped.add("bad_record", where, f"{type(e).__name__}: {e}")
            continue
        dialogs.append(dialog)
    return dialogs


def model_sample_fn(
    checkpoint: str | Path,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    seed: int = 0,
    device: str = "cpu",
) -> SampleFn:
    """A `sample_fn` that answers with a checkpoint in the Llama 3.1 chat format (one call, one turn)."""
    from herd.text.chat_format import ChatFormat, Message
    from herd.text.generation import SamplingParams, generate
    from herd.text.loading import load_pretrained

    model, tokenizer = load_pretrained(checkpoint, device=device)
    # a trimmed vocabulary padded to a multiple of 64: the padding rows have no token to decode to, so they
    # must never be sampled
    vocab_limit = tokenizer.vocab_size if model.args.vocab_size > tokenizer.vocab_size else None
    fmt = ChatFormat(tokenizer)
    pad = max(getattr(tokenizer, "pad_id", 0), 0)
    calls = [0]

    def sample(messages: Dialog) -> str:
        prompt = fmt.encode_dialog_prompt([Message(m["role"], m["content"]) for m in messages])
        room = model.args.max_seq_len - len(prompt)
        if room <= 0:
            raise SkipDialog(
                f"the prompt ({len(prompt)} tokens) fills the context of {model.args.max_seq_len}"
            )
        calls[0] += 1  # each call its own seed: reproducible, and no two turns share a random stream
        params = SamplingParams(min(max_new_tokens, room), temperature, seed=seed * 1_000_003 + calls[0])
        completion = generate(model, [prompt], params, tokenizer.stop_ids, pad, vocab_limit)[0]
        stop = [completion.stop_token] if completion.stop_token is not None else []
        return fmt.decode_assistant_message(completion.tokens + stop).content

    return sample


def gatt_from_files(
    model: str | Path,
    dialogs: str | Path,
    instructions: str | Path,
    out: str | Path,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    seed: int = 0,
    placement: str = "user",
    device: str = "cpu",
) -> tuple[int, SkipCounter]:
    """`herd post gatt`: GAtt SFT data from a dialogs jsonl and an instructions file, every assistant turn
    re-sampled by the chat checkpoint `model`; returns (dialogs written to `out`, the skipped ones).

    Both files are read before the model loads, so a typo in a path fails at once.
    """
    skipped = SkipCounter()
    records = read_dialog_file(dialogs, skipped)
    drawn_from = read_instructions(instructions)
    sample_fn = model_sample_fn(model, max_new_tokens, temperature, seed, device)
    written = build_gatt_dataset(records, drawn_from, sample_fn, seed, out, placement, skipped)
    return written, skipped
