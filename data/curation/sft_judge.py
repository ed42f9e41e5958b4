"""A herd chat model as judge of SFT dialogs (Llama 3 §4.2.3): the rubric, intent tags and difficulty.

The paper prompts a Llama 3 checkpoint to rate each dialog on a rubric — general data on accuracy,
instruction following and tone / presentation; code on bug identification and user intention — and,
for difficulty, to list the dialog's intentions (Instag: more intentions, a harder prompt) and to rate
its difficulty on a three-point scale. Here every criterion is 0/1, as the brief of issue 21 asks.

A judge's output is free text, often messy: markdown (`**Accuracy**: 1`), words instead of digits
("yes", "pass"), JSON, "1/1", numbered lists. The parsers below accept all of these and return None
when a reply cannot be read, so the caller counts it (`judge_unparsed`) instead of guessing a score.
The decoding goes through the one decode loop (`herd.text.generation.generate`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from herd.text.chat_format import ChatFormat, Message
from herd.text.generation import SamplingParams, generate

# criterion → spellings a judge uses for it (compared after lower-casing, "_"/"-" → " ")
RUBRICS: dict[str, dict[str, tuple[str, ...]]] = {
    "general": {
        "accuracy": ("accuracy", "correctness", "accurate"),
        "instruction_following": ("instruction following", "follows instructions", "instructions"),
        "tone": ("tone presentation", "tone and presentation", "tone", "presentation"),
    },
    "code": {
        "bug_identification": ("bug identification", "bug free", "bugs", "bug"),
        "user_intention": ("user intention", "user intent", "intention", "intent"),
    },
}
_CRITERION_TEXT = {
    "accuracy": "is the assistant's answer factually and logically correct?",
    "instruction_following": "does the answer do what the user asked, in the form asked?",
    "tone": "are the tone and presentation appropriate (clear, not preachy, well formatted)?",
    "bug_identification": "is the code free of bugs, or are the user's bugs correctly identified?",
    "user_intention": "does the answer address what the user intended?",
}
_TRUE = {"1", "yes", "true", "pass", "passed", "good", "y", "correct"}
_FALSE = {"0", "no", "false", "fail", "failed", "bad", "n", "incorrect"}
_VALUE = r"(1|0|yes|no|true|false|pass(?:ed)?|fail(?:ed)?|good|bad|y|n|correct|incorrect)\b"
_DIFFICULTY_WORDS = {"easy": 1, "simple": 1, "medium": 2, "moderate": 2, "intermediate": 2, "hard": 3,
                     "difficult": 3, "challenging": 3}  # fmt: skip


def _normalise(text: str) -> str:
    """Lower case, markdown emphasis and code marks dropped, "_" / "-" / "/" read as spaces."""
    text = re.sub(r"[*`#>]", "", text.lower())
    return re.sub(r"[_\-/]", " ", text)


def _json_objects(text: str) -> list[Any]:
    """Every JSON value that starts at a `{` or `[` of `text` and parses (judges wrap JSON in prose)."""
    decoder, found, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i] in "{[":
            try:
                value, end = decoder.raw_decode(text, i)
                found.append(value)
                i = end
                continue
            except json.JSONDecodeError:
                pass
        i += 1
    return found


def _as_flag(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float) and value in (0, 1):
        return int(value)
    word = str(value).strip().lower().split("/")[0].strip()
    return 1 if word in _TRUE else 0 if word in _FALSE else None


def parse_rubric(text: str, kind: str = "general") -> dict[str, int] | None:
    """{criterion: 0/1} for every criterion of `kind`'s rubric, or None if any is missing."""
    criteria = RUBRICS[kind]
    out: dict[str, int] = {}
    for obj in _json_objects(text):  # JSON first: {"accuracy": 1, "Instruction-Following": "yes", ...}
        if isinstance(obj, dict):
            keys = {_normalise(str(k)).strip(): v for k, v in obj.items()}
            for name, spellings in criteria.items():
                for s in spellings:
                    if s in keys and name not in out and (flag := _as_flag(keys[s])) is not None:
                        out[name] = flag
    norm = _normalise(text)
    for name, spellings in criteria.items():
        if name in out:
            continue
        # the longest spelling first, so "tone presentation" wins over "tone"; a value within a short
        # gap of separators (": ", " = ", " - ", " score: ", "(") after the name
        for s in sorted(spellings, key=len, reverse=True):
            m = re.search(
                rf"\b{re.escape(s)}\b[^a-z0-9\n]{{0,6}}(?:score|rating)?[^a-z0-9\n]{{0,4}}{_VALUE}", norm
            )
            if m:
                out[name] = _as_flag(m.group(1))  # type: ignore[assignment]
                break
    return out if len(out) == len(criteria) else None


def parse_intents(text: str) -> list[str] | None:
    """The intentions a judge listed: a JSON list, bullet / numbered lines, or one "intents: a, b" line.
    Case-insensitive duplicates are merged; None when no list can be found."""
    for obj in _json_objects(text):
        items = obj.get("intents", obj.get("intentions")) if isinstance(obj, dict) else obj
        if isinstance(items, list) and items and all(isinstance(x, str) for x in items):
            return _unique(items)
    lines = [ln.strip() for ln in text.splitlines()]
    bullets = [
        re.sub(r"^(?:[-*•]|\d+[.)])\s+", "", ln) for ln in lines if re.match(r"^(?:[-*•]|\d+[.)])\s+", ln)
    ]
    if bullets:
        return _unique(bullets)
    for ln in lines:
        m = re.match(r"^\W*(?:intents?|intentions?|tags?)\W*[:=]\s*(.+)$", ln, re.IGNORECASE)
        if m:
            return _unique(re.split(r"\s*[,;|]\s*", m.group(1)))
    return None


def _unique(items: Sequence[str]) -> list[str] | None:
    seen: dict[str, str] = {}
    for item in items:
        clean = re.sub(r"[*`]", "", item).strip().strip(".").strip()
        if clean and clean.lower() not in seen:
            seen[clean.lower()] = clean
    return list(seen.values()) or None


def parse_difficulty(text: str) -> int | None:
    """A 1–3 rating: "Difficulty: 2", "I rate it 3", "2/3", "2 out of 3", a bare "**2**", or the words
    easy / medium / hard. Digits inside other text ("3 plus 3 is 6") are not a rating: None."""
    norm = _normalise(text)
    m = re.search(r"\b(?:difficulty|rat(?:e|ed|ing)|score|level)\b[^0-9\n]{0,12}([1-3])\b", norm)
    if m:
        return int(m.group(1))
    m = re.search(r"(?<![\d.])([1-3])\s*(?:/|out of|of)\s*3\b", re.sub(r"[*`]", "", text.lower()))
    if m:
        return int(m.group(1))
    bare = re.sub(r"[^a-z0-9]", "", norm)
    if bare in ("1", "2", "3"):
        return int(bare)
    words = {v for w, v in _DIFFICULTY_WORDS.items() if re.search(rf"\b{w}\b", norm)}
    return words.pop() if len(words) == 1 else None


# --- prompts ---------------------------------------------------------------------------------------------
def transcript(messages: Sequence[Message], max_chars: int = 4000) -> str:
    """The dialog as plain text for a judge prompt; long dialogs keep their start and end."""
    text = "\n\n".join(f"[{m.role}]\n{m.content}" for m in messages)
    if len(text) > max_chars:
        half = max_chars // 2
        text = text[:half] + "\n[...]\n" + text[-half:]
    return text


def rubric_prompt(messages: Sequence[Message], kind: str = "general") -> list[Message]:
    lines = "\n".join(f"{name}: {_CRITERION_TEXT[name]}" for name in RUBRICS[kind])
    answer = "\n".join(f"{name}: 0 or 1" for name in RUBRICS[kind])
    return [Message("user", f"Rate the assistant in this dialog. For each criterion answer 1 (yes) or 0 (no).\n"
                            f"{lines}\n\nDialog:\n{transcript(messages)}\n\nReply exactly as:\n{answer}")]  # fmt: skip


def intents_prompt(messages: Sequence[Message]) -> list[Message]:
    return [Message("user", "List every distinct intention of the user in this dialog, one per line, each "
                            f"starting with '- '.\n\nDialog:\n{transcript(messages)}")]  # fmt: skip


def difficulty_prompt(messages: Sequence[Message]) -> list[Message]:
    return [Message("user", "How difficult is it to answer the user's requests in this dialog well? "
                            "Reply 'Difficulty: N' with N = 1 (easy), 2 (medium) or 3 (hard).\n\n"
                            f"Dialog:\n{transcript(messages)}")]  # fmt: skip


@dataclass
class ChatJudge:
    """A herd chat model answering judge prompts through the one decode loop (`generate`), in batches.
    Prompts longer than the model's context minus `max_new_tokens` keep their last tokens (the answer
    format is stated last) and are counted in `truncated`."""

    model: Any  # herd.text.Llama
    tokenizer: Any
    params: SamplingParams
    batch_size: int = 8
    truncated: int = 0
    on_batch: Callable[[int], None] | None = None  # called with each batch's size (a progress bar)

    def ask(self, prompts: Sequence[list[Message]]) -> list[str]:
        fmt = ChatFormat(self.tokenizer)
        budget = self.model.args.max_seq_len - self.params.max_new_tokens
        encoded = []
        for p in prompts:
            ids = fmt.encode_dialog_prompt(p, add_generation_prompt=True)
            if len(ids) > budget:
                self.truncated += 1
                ids = ids[-budget:]
            encoded.append(ids)
        pad = max(getattr(self.tokenizer, "pad_id", 0), 0)
        replies: list[str] = []
        for start in range(0, len(encoded), self.batch_size):
            chunk = encoded[start : start + self.batch_size]
            # a seed per batch keeps each batch's draws the same whatever ran before it
            seed = None if self.params.seed is None else self.params.seed + start
            params = SamplingParams(
                self.params.max_new_tokens, self.params.temperature, self.params.top_p, seed
            )
            done = generate(self.model, chunk, params, stop_ids=self.tokenizer.stop_ids, pad_id=pad)
            replies.extend(self.tokenizer.decode(c.tokens) for c in done)
            if self.on_batch is not None:
                self.on_batch(len(chunk))
        return replies
