"""Preference data for reward modelling and DPO (Llama 2 §3.2.1–3.2.2, Llama 3 §4.1.2, §4.2.1).

One jsonl record per line:

    {"messages": [{"role": "user", "content": "..."}, ...],   # the context, ending with a user turn
     "chosen": "...", "rejected": "...",                       # the two assistant replies
     "edited": "...",                                          # optional: chosen, further improved
     "strength": "significantly_better" | "better" | "slightly_better" | "negligibly_better" | "unsure",
     "ref_chosen_logp": -12.3, "ref_rejected_logp": -15.1}     # optional, precomputed for DPO

(`"prompt": "..."` may stand for a single user turn.) Each reply is encoded as the assistant turn after
the context with `ChatFormat.encode_dialog_with_mask`, so the token masks say which tokens the reply
generated and which are template formatting. Bad records (bad JSON, missing or mistyped fields, an unknown
strength, a reply too long for `data.seq_len`) are skipped and counted with file:line.

Batches keep every response of a record in its own row: `tokens` is (B, N, T) with N = 2 (chosen,
rejected) or 3 (+ edited), right-padded, so a data-parallel split by records never separates a pair.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from herd.data.records import SkipCounter, json_lines
from herd.text.chat_format import ChatFormat, Message

STRENGTHS = ("significantly_better", "better", "slightly_better", "negligibly_better")
# Llama 2's fourth level reads "negligibly better / unsure"
STRENGTH_ALIASES = {"unsure": "negligibly_better"}
RESPONSES = ("chosen", "rejected", "edited")  # their index along the N axis of a batch
# Llama 3's ranking edited > chosen > rejected as (better, worse) pairs; only the first without an edit
PAIR_RESPONSES = (("chosen", "rejected"), ("edited", "chosen"), ("edited", "rejected"))
PAD_MULTIPLE = 8  # batch lengths are rounded up to this (divisible by any TP degree up to 8)


@dataclass
class PreferenceRecord:
    context: list[Message]  # ends with a user turn
    chosen: str
    rejected: str
    edited: str | None = None
    strength: str | None = None  # one of STRENGTHS, or None when not annotated
    ref_chosen_logp: float | None = None
    ref_rejected_logp: float | None = None
    where: str = ""  # file:line, for error messages

    def response(self, name: str) -> str | None:
        return {"chosen": self.chosen, "rejected": self.rejected, "edited": self.edited}[name]


@dataclass
class EncodedResponse:
    tokens: list[int]  # context + this reply as the assistant turn (ends with <|eot_id|>)
    assistant_mask: list[bool]  # True on the reply's own tokens (content and closing <|eot_id|>)
    format_mask: list[bool]  # True on template tokens (headers, <|begin_of_text|>, <|eot_id|>)


@dataclass
class EncodedPreference:
    record: PreferenceRecord
    responses: dict[str, EncodedResponse]  # "chosen", "rejected" and maybe "edited"

    @property
    def max_len(self) -> int:
        return max(len(r.tokens) for r in self.responses.values())


def _message(obj: Any, i: int) -> Message:
    if (
        not isinstance(obj, dict)
        or not isinstance(obj.get("role"), str)
        or not isinstance(obj.get("content"), str)
    ):
        raise ValueError(f"messages[{i}] must be an object with string 'role' and 'content'")
    return Message(role=obj["role"], content=obj["content"])


def _optional_float(obj: dict[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key!r} must be a number, got {value!r}")
    return float(value)


def parse_preference(obj: Any, where: str = "") -> PreferenceRecord:
    """A `PreferenceRecord` from one decoded jsonl object; ValueError says what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"a record must be a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        if not isinstance(obj["messages"], list) or not obj["messages"]:
            raise ValueError("'messages' must be a non-empty list")
        context = [_message(m, i) for i, m in enumerate(obj["messages"])]
    elif isinstance(obj.get("prompt"), str):
        context = [Message("user", obj["prompt"])]
    else:
        raise ValueError("missing 'messages' (a dialog) or 'prompt' (a string)")
    if context[-1].role != "user":
        raise ValueError(f"the context must end with a user turn, not {context[-1].role!r}")
    replies = {}
    for key in RESPONSES:
        value = obj.get(key)
        if value is None and key == "edited":
            continue
        if not isinstance(value, str):
            raise ValueError(
                f"{key!r} must be a string" + (" (missing)" if value is None else f", got {value!r}")
            )
        replies[key] = value
    strength = obj.get("strength")
    if strength is not None:
        strength = STRENGTH_ALIASES.get(strength, strength)
        if strength not in STRENGTHS:
            raise ValueError(
                f"unknown strength {obj['strength']!r}; expected one of {(*STRENGTHS, 'unsure')}"
            )
    return PreferenceRecord(
        context, replies["chosen"], replies["rejected"], replies.get("edited"), strength,
        _optional_float(obj, "ref_chosen_logp"), _optional_float(obj, "ref_rejected_logp"), where,
    )  # fmt: skip


def read_preferences(path: str | Path, skipped: SkipCounter) -> list[PreferenceRecord]:
    """Every valid record of a jsonl file; bad ones are counted in `skipped` as 'file:line: reason'."""
    records = []
    for where, record in json_lines(path, skipped, "preference data"):
        try:
            records.append(parse_preference(record, where))
        except (ValueError, TypeError) as e:
            skipped.add("bad_record", where, str(e))
    return records


def encode_preference(record: PreferenceRecord, chat: ChatFormat) -> EncodedPreference:
    """Tokens and masks of context + each reply (as the assistant turn)."""
    responses = {}
    for name in RESPONSES:
        text = record.response(name)
        if text is not None:
            tokens, assistant, fmt = chat.encode_dialog_with_mask(
                [*record.context, Message("assistant", text)]
            )
            responses[name] = EncodedResponse(tokens, assistant, fmt)
    return EncodedPreference(record, responses)


def encode_all(
    records: Sequence[PreferenceRecord], chat: ChatFormat, seq_len: int, skipped: SkipCounter
) -> list[EncodedPreference]:
    """Encode `records`; those with a reply longer than `seq_len` tokens are skipped and counted."""
    out = []
    for record in records:
        encoded = encode_preference(record, chat)
        if encoded.max_len > seq_len:
            skipped.add(
                "too_long", record.where, f"{encoded.max_len} tokens, longer than data.seq_len {seq_len}"
            )
            continue
        out.append(encoded)
    return out


def load_preference_splits(
    data: Any, chat: ChatFormat, seq_len: int, seed: int = 0, section: str = "rm"
) -> tuple[list[EncodedPreference], list[EncodedPreference], SkipCounter]:
    """(train, validation, skipped) from `data.train_data` and `data.val_data`, or a seeded hold-out of
    `data.val_fraction` of the training records when there is no validation file. `data` is the
    objective's config section (`[rm]`, `[dpo]`), named `section` in errors."""
    if not data.train_data:
        raise ValueError(f"{section}.train_data: a jsonl of preference records is required")
    skipped = SkipCounter()
    train = read_preferences(data.train_data, skipped)
    if data.val_data:
        val = read_preferences(data.val_data, skipped)
    else:
        order = np.random.default_rng(seed).permutation(len(train))
        n_val = int(len(train) * data.val_fraction)
        val, train = [train[i] for i in order[:n_val]], [train[i] for i in order[n_val:]]
    train_enc, val_enc = encode_all(train, chat, seq_len, skipped), encode_all(val, chat, seq_len, skipped)
    if not train_enc:
        raise ValueError(
            f"{section}.train_data {data.train_data}: no usable preference records ({skipped.summary()})"
        )
    return train_enc, val_enc, skipped


def padded_length(longest: int, seq_len: int) -> int:
    """The batch's common length: `longest` rounded up to PAD_MULTIPLE, but not beyond seq_len."""
    rounded = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    return min(rounded, max(longest, seq_len))


def collate_rm(
    items: Sequence[EncodedPreference], pad_id: int, seq_len: int, margins: dict[str, float]
) -> dict[str, torch.Tensor]:
    """Reward-model batch: tokens (B, N, T), last_index (B, N) (the closing <|eot_id|>), and per pair of
    PAIR_RESPONSES: pair_better / pair_worse (B, 3) indices into N, pair_valid (B, 3), pair_margin (B, 3)."""
    B = len(items)
    N = 3 if any("edited" in it.responses for it in items) else 2
    T = padded_length(max(it.max_len for it in items), seq_len)
    tokens = torch.full((B, N, T), pad_id, dtype=torch.long)
    last_index = torch.zeros(B, N, dtype=torch.long)
    better = torch.zeros(B, len(PAIR_RESPONSES), dtype=torch.long)
    worse = torch.zeros_like(better)
    valid = torch.zeros(B, len(PAIR_RESPONSES), dtype=torch.bool)
    margin = torch.zeros(B, len(PAIR_RESPONSES))
    for b, it in enumerate(items):
        for name, enc in it.responses.items():
            n = RESPONSES.index(name)
            tokens[b, n, : len(enc.tokens)] = torch.tensor(enc.tokens)
            last_index[b, n] = len(enc.tokens) - 1
        m = margins.get(it.record.strength, 0.0) if it.record.strength else 0.0
        for p, (hi, lo) in enumerate(PAIR_RESPONSES):
            if hi in it.responses and lo in it.responses:
                better[b, p], worse[b, p], valid[b, p] = RESPONSES.index(hi), RESPONSES.index(lo), True
                margin[b, p] = 0.0 if lo == "chosen" else m  # the strength rates chosen vs rejected
    return {"tokens": tokens, "last_index": last_index, "pair_better": better, "pair_worse": worse,
            "pair_valid": valid, "pair_margin": margin}  # fmt: skip


def response_loss_mask(enc: EncodedResponse, mask_format_tokens: bool) -> list[bool]:
    """Which tokens count in the reply's log-probability: its assistant tokens, minus the template's
    formatting tokens (the closing <|eot_id|>) when `mask_format_tokens` (Llama 3 §4.1.4)."""
    return [a and not (mask_format_tokens and f) for a, f in zip(enc.assistant_mask, enc.format_mask)]


def collate_dpo(
    items: Sequence[EncodedPreference], pad_id: int, seq_len: int, mask_format_tokens: bool = True
) -> dict[str, torch.Tensor]:
    """DPO batch over (chosen, rejected): tokens (B, 2, T); targets (B, 2, T), the next token at each
    position; loss_mask (B, 2, T), True where the *target* is a scored reply token; and, when every record
    carries them, ref_logps (B, 2) precomputed reference log-probs. The edited reply is not used."""
    B = len(items)
    T = padded_length(max(it.max_len for it in items), seq_len)
    tokens = torch.full((B, 2, T), pad_id, dtype=torch.long)
    targets = torch.full((B, 2, T), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(B, 2, T, dtype=torch.bool)
    for b, it in enumerate(items):
        for n, name in enumerate(("chosen", "rejected")):
            enc = it.responses[name]
            L = len(enc.tokens)
            ids = torch.tensor(enc.tokens)
            tokens[b, n, :L] = ids
            targets[b, n, : L - 1] = ids[1:]  # position t predicts token t + 1
            loss_mask[b, n, : L - 1] = torch.tensor(response_loss_mask(enc, mask_format_tokens)[1:])
    batch = {"tokens": tokens, "targets": targets, "loss_mask": loss_mask}
    refs = [(it.record.ref_chosen_logp, it.record.ref_rejected_logp) for it in items]
    if all(c is not None and r is not None for c, r in refs):
        batch["ref_logps"] = torch.tensor(refs, dtype=torch.float32)  # (B, 2)
    return batch


class PreferenceBatches:
    """Infinite, per-epoch shuffled batches of preference records, split across data-parallel ranks.

    `batch_size` is the global number of records per micro-batch; DP rank r takes records
    r·b .. (r+1)·b-1 of it (b = batch_size / world_size). The state is the number of records the whole
    job has consumed, the same on every rank, so a run resumes on any layout. Epochs run on seamlessly:
    global record k is record perm_e[k mod n] with e = k div n and perm_e seeded by (seed, e).
    """

    def __init__(
        self,
        items: Sequence[Any],
        batch_size: int,
        collate: Callable[[list[Any]], dict[str, Any]],
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(
                f"data.batch_size {batch_size} is not divisible by {world_size} data-parallel ranks"
            )
        if not items:
            raise ValueError("no preference records to batch")
        self.items, self.batch_size, self.collate = list(items), batch_size, collate
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.local_batch = batch_size // world_size
        self.consumed = 0
        self._perms: dict[int, np.ndarray] = {}

    def _item(self, k: int) -> Any:
        epoch, i = divmod(k, len(self.items))
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}  # keep memory bounded
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.items))
        return self.items[int(self._perms[epoch][i])]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        first = self.consumed + self.rank * self.local_batch
        chunk = [self._item(k) for k in range(first, first + self.local_batch)]
        self.consumed += self.batch_size
        return self.collate(chunk)

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed = int(state["consumed"])


class PreferenceBatching:
    """`train_batches` / `val_batches` / `skip_counts` of a preference task (reward model, DPO): the task
    provides `data` (its DataConfig), `train_records`, `val_records`, `skipped` and
    `collate(records) -> batch`."""

    def train_batches(self, rank: int, world_size: int) -> Iterator[dict[str, Any]]:
        d = self.data
        return PreferenceBatches(self.train_records, d.batch_size, self.collate, rank, world_size, d.seed)

    def skip_counts(self) -> dict[str, SkipCounter]:
        return {"preferences": self.skipped}

    def val_batches(self) -> Iterable[dict[str, Any]] | None:
        if not self.val_records:
            return None
        b = self.data.batch_size  # whole batches only: every validation step sees the same shape
        return (self.collate(self.val_records[i : i + b]) for i in range(0, len(self.val_records) - b + 1, b))


def write_preferences(path: str | Path, records: Sequence[dict[str, Any]]) -> Path:
    """Write records (dicts in the format above) as jsonl; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def record_to_json(record: PreferenceRecord) -> dict[str, Any]:
    """The jsonl object of a record (the inverse of `parse_preference`)."""
    out: dict[str, Any] = {
        "messages": [{"role": m.role, "content": m.content} for m in record.context],
        "chosen": record.chosen,
        "rejected": record.rejected,
    }
    for key in ("edited", "strength", "ref_chosen_logp", "ref_rejected_logp"):
        if getattr(record, key) is not None:
            out[key] = getattr(record, key)
    return out


__all__ = [
    "PAIR_RESPONSES",
    "RESPONSES",
    "STRENGTHS",
    "EncodedPreference",
    "EncodedResponse",
    "PreferenceBatches",
    "PreferenceRecord",
    "collate_dpo",
    "collate_rm",
    "encode_all",
    "encode_preference",
    "load_preference_splits",
    "parse_preference",
    "read_preferences",
    "record_to_json",
    "response_loss_mask",
    "write_preferences",
]
