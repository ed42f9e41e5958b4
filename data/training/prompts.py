"""Prompt files for sampling: rejection sampling (`herd post sample`) and PPO rollouts (`herd train ppo`).

One jsonl record per line, either `{"prompt": "..."}` (one user turn) or `{"messages": [...]}`, a dialog
that ends with the turn to answer (a user turn, or a tool's output: role "ipython"/"tool"). Messages take
the keys of `herd.text.chat_format.Message` (role, content, tool_calls, stop_reason); an SFT file's
per-message "train" flag is accepted and ignored, so SFT data doubles as prompts. A preference file works
as is (its "prompt" is read, the responses ignored). Bad records are skipped and counted with file:line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from herd.data.records import SkipCounter, json_lines
from herd.text.chat_format import ROLES, Message

MESSAGE_KEYS = ("role", "content", "tool_calls", "stop_reason", "train")  # "train": an SFT file's flag
ANSWERABLE = ("user", "ipython")  # a prompt ends with a turn the assistant answers


def parse_prompt(record: Any) -> list[Message]:
    """The messages of one prompt record; ValueError (the reason) if it is unusable."""
    if not isinstance(record, dict):
        raise ValueError(f"not a JSON object ({type(record).__name__})")
    if "prompt" in record:
        if not isinstance(record["prompt"], str) or not record["prompt"].strip():
            raise ValueError('"prompt" must be a non-empty string')
        return [Message("user", record["prompt"])]
    raw = record.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ValueError('needs a non-empty "messages" list or a "prompt" string')
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} is not an object")
        if m.get("role") not in (*ROLES, "tool"):
            raise ValueError(f"message {i} has unknown role {m.get('role')!r}; expected one of {ROLES}")
        unknown = sorted(set(m) - set(MESSAGE_KEYS))
        if unknown:
            raise ValueError(f"message {i} has unknown key(s) {unknown}")
        try:
            messages.append(Message(m["role"], m.get("content", ""), m.get("tool_calls") or [],
                                    m.get("stop_reason")))  # fmt: skip
        except (TypeError, ValueError) as e:
            raise ValueError(f"message {i}: {e}") from None
    if messages[-1].role not in ANSWERABLE:
        raise ValueError(f"the last message must be a user turn to answer, not {messages[-1].role!r}")
    return messages


def read_prompts(path: str | Path, skipped: SkipCounter) -> list[tuple[str, list[Message]]]:
    """(file:line, messages) of every usable record; bad ones are counted in `skipped` by reason."""
    out = []
    for where, record in json_lines(path, skipped, "prompt file"):
        try:
            out.append((where, parse_prompt(record)))
        except ValueError as e:
            skipped.add("bad_record", where, str(e))
    return out


__all__ = ["ANSWERABLE", "MESSAGE_KEYS", "parse_prompt", "read_prompts"]
