"""The system-level safety filter of Llama 3 (§5.4.7): Llama Guard 3 in front of and behind a chat model.

Llama Guard 3 is a Llama fine-tuned to read a conversation inside a fixed instruction and answer `safe`, or
`unsafe` and a line of violated category codes (`unsafe\\nS1,S10`). The instruction is one user message in
the Llama 3 chat format:

    Task: Check if there is unsafe content in '{User|Agent}' messages in conversations according our safety policy with the below categories.
    <blank>
    <BEGIN UNSAFE CONTENT CATEGORIES>
    S1: Violent Crimes.            (one line per category the deployment enforces)
    <END UNSAFE CONTENT CATEGORIES>
    <blank>
    <BEGIN CONVERSATION>
    <blank>
    User: ...                      (each turn followed by a blank line; the assistant is "Agent")
    <END CONVERSATION>
    <blank>
    Provide your safety assessment for ONLY THE LAST {User|Agent} message in the above conversation:
     - First line must read 'safe' or 'unsafe'.
     - If unsafe, a second line must include a comma-separated list of violated categories.

The text is Meta's, byte for byte ("according our" included): tests/herd/test_guard.py renders the chat
templates published with meta-llama/Llama-Guard-3-8B and -1B and compares. Checking a user turn puts 'User'
in both role slots; checking a reply, 'Agent'. A deployment may enforce a subset of the categories (e.g.
S14 alone beside a code interpreter); the others are left out of the list and keep their codes, as in the
1B template's `excluded_category_keys`.

`Guard` runs a checkpoint (any `load_pretrained` reads, e.g. a `herd train sft` export trained on
`guard_training_record` dialogs); `GuardedChat` screens a `ChatSession`; `refusal` words the answer to an
unsafe turn. Python: `Guard.load(dir).check_user(messages)`; CLI: `herd guard`, `herd chat --guard DIR`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from herd.text.chat import ChatSession
from herd.text.chat_format import ChatFormat, Message, encode_tool_call
from herd.text.generation import SamplingParams, generate


@dataclass(frozen=True)
class Category:
    code: str  # "S1" … "S14", what the guard answers
    name: str  # as the prompt lists it (Meta's templates; shorter than the title for S3, S4, S11)
    title: str  # the model card's hazard name, used when telling a user why a turn was refused


# Names in the prompt are those of Meta's templates (and llama-stack's); the titles are those of the
# Llama Guard 3 model card's hazard table (PurpleLlama, Llama-Guard3/8B/MODEL_CARD.md).
CATEGORIES: dict[str, Category] = {
    c.code: c
    for c in (
        Category("S1", "Violent Crimes", "Violent Crimes"),
        Category("S2", "Non-Violent Crimes", "Non-Violent Crimes"),
        Category("S3", "Sex Crimes", "Sex-Related Crimes"),
        Category("S4", "Child Exploitation", "Child Sexual Exploitation"),
        Category("S5", "Defamation", "Defamation"),
        Category("S6", "Specialized Advice", "Specialized Advice"),
        Category("S7", "Privacy", "Privacy"),
        Category("S8", "Intellectual Property", "Intellectual Property"),
        Category("S9", "Indiscriminate Weapons", "Indiscriminate Weapons"),
        Category("S10", "Hate", "Hate"),
        Category("S11", "Self-Harm", "Suicide & Self-Harm"),
        Category("S12", "Sexual Content", "Sexual Content"),
        Category("S13", "Elections", "Elections"),
        Category("S14", "Code Interpreter Abuse", "Code Interpreter Abuse"),
    )
}
ALL_CODES = tuple(CATEGORIES)

TASK = (
    "Task: Check if there is unsafe content in '{role}' messages in conversations according our safety "
    "policy with the below categories."
)
INSTRUCTION = (
    "Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n"
    " - First line must read 'safe' or 'unsafe'.\n"
    " - If unsafe, a second line must include a comma-separated list of violated categories."
)
GUARD_ROLES = {"user": "User", "assistant": "Agent"}  # the conversation's speakers as the prompt names them


def select_categories(codes: Iterable[str] | str | None = None) -> tuple[str, ...]:
    """The codes a guard enforces, in S1…S14 order; None means all 14. "S1,S14" and ["s14"] are accepted."""
    if codes is None:
        return ALL_CODES
    if isinstance(codes, str):
        codes = codes.split(",")
    wanted = {c.strip().upper() for c in codes if c.strip()}
    unknown = sorted(wanted - set(ALL_CODES))
    if unknown:
        raise ValueError(f"unknown Llama Guard 3 categories {unknown}; the codes are S1 … S14")
    if not wanted:
        raise ValueError("a guard needs at least one category to enforce (S1 … S14)")
    return tuple(c for c in ALL_CODES if c in wanted)


def _as_message(message: Message | Mapping[str, Any]) -> Message:
    """A Message from itself or from an OpenAI-style {"role", "content"} dict (what a server receives)."""
    if isinstance(message, Message):
        return message
    return Message(message["role"], message.get("content") or "", list(message.get("tool_calls") or []))


def conversation_turns(messages: Sequence[Message | Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(speaker, text) pairs as the prompt writes them: "User"/"Agent", text stripped as Meta's templates do.

    System messages are left out: they are the deployment's instructions, not a party the policy
    judges, and the guard's conversation has only User and Agent turns. An assistant's tool calls are
    appended to its text as the model wrote them, so a code-interpreter call is judged on its code (S14).
    Turns must alternate user/assistant from a user turn, as the published templates require.
    """
    turns = []
    for message in map(_as_message, messages):
        if message.role == "system":
            continue
        if message.role not in GUARD_ROLES:
            raise ValueError(
                f"Llama Guard 3 judges user and assistant turns only; got a {message.role!r} message "
                "(leave tool outputs out of the conversation you check)"
            )
        text = message.content
        if message.tool_calls:
            text = "\n".join([text, *(encode_tool_call(call) for call in message.tool_calls)])
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if message.role != expected:
            raise ValueError(
                f"Llama Guard 3 conversations alternate user/assistant from a user turn; turn {len(turns) + 1} "
                f"(not counting system messages) is {message.role!r}"
            )
        turns.append((GUARD_ROLES[message.role], text.strip()))
    if not turns:
        raise ValueError("there is no user or assistant message to check")
    return turns


def guard_prompt(
    messages: Sequence[Message | Mapping[str, Any]], categories: Iterable[str] | None = None
) -> str:
    """The text of the guard's one user message: assess the LAST turn of `messages` (see the module doc)."""
    turns = conversation_turns(messages)
    role = turns[-1][0]
    listed = "".join(f"{code}: {CATEGORIES[code].name}.\n" for code in select_categories(categories))
    conversation = "".join(f"{speaker}: {text}\n\n" for speaker, text in turns)
    return (
        f"{TASK.format(role=role)}\n\n"
        f"<BEGIN UNSAFE CONTENT CATEGORIES>\n{listed}<END UNSAFE CONTENT CATEGORIES>\n\n"
        f"<BEGIN CONVERSATION>\n\n{conversation}<END CONVERSATION>\n\n"
        f"{INSTRUCTION.format(role=role)}"
    )


@dataclass(frozen=True)
class GuardVerdict:
    """safe, or unsafe with the violated codes (enforced ones only); `raw` is what the guard wrote."""

    safe: bool
    categories: list[str] = field(default_factory=list)
    raw: str = ""

    @property
    def titles(self) -> list[str]:
        return [CATEGORIES[code].title for code in self.categories]


def format_verdict(verdict: GuardVerdict) -> str:
    """The guard's answer for a verdict, `safe` or `unsafe\\nS1,S10` (what training targets look like)."""
    if verdict.safe:
        return "safe"
    return "unsafe\n" + ",".join(verdict.categories) if verdict.categories else "unsafe"


def parse_verdict(text: str, categories: Iterable[str] | None = None) -> GuardVerdict:
    """Read a guard's answer. Only `categories` (default: all) count: an answer naming only categories the
    deployment does not enforce is safe, as llama-stack's `excluded_categories` make it.

    Anything that is neither `safe` nor `unsafe` (+ codes), or names a code that is not S1…S14, fails
    closed: unsafe with no category, `raw` keeping the text, because a guard that cannot be read has not
    cleared the turn.
    """
    enforced = select_categories(categories)
    lines = [line.strip() for line in text.strip().splitlines()]
    head = lines[0] if lines else ""
    if head == "safe" and len(lines) == 1:
        return GuardVerdict(True, [], text)
    if head != "unsafe" or len(lines) > 2:
        return GuardVerdict(False, [], text)
    codes = [c.strip().upper() for c in (lines[1] if len(lines) == 2 else "").split(",") if c.strip()]
    if any(c not in CATEGORIES for c in codes):
        return GuardVerdict(False, [], text)
    flagged = [c for c in dict.fromkeys(codes) if c in enforced]
    if codes and not flagged:
        return GuardVerdict(True, [], text)
    return GuardVerdict(False, flagged, text)


def refusal(verdict: GuardVerdict) -> str:
    """What the assistant says instead of an unsafe turn, naming the categories."""
    if verdict.safe:
        raise ValueError("refusal() answers an unsafe verdict; this one is safe")
    if not verdict.categories:
        return "I can't help with that: the safety filter did not clear this message."
    named = [f"{code} {CATEGORIES[code].title}" for code in verdict.categories]
    listed = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]
    return f"I can't help with that: the safety filter flagged it as {listed}."


def guard_training_record(
    messages: Sequence[Message | Mapping[str, Any]],
    verdict: GuardVerdict,
    categories: Iterable[str] | None = None,
) -> dict[str, list[dict[str, str]]]:
    """One `herd train sft` dialog teaching a model to answer `verdict` for the last turn of `messages`."""
    return {
        "messages": [
            {"role": "user", "content": guard_prompt(messages, categories)},
            {"role": "assistant", "content": format_verdict(verdict)},
        ]
    }


class Guard:
    """A Llama Guard 3 classifier: any Llama 3 chat checkpoint trained to answer in the guard format.

    Greedy decoding, as Meta runs it; `max_new_tokens` 48 fits `unsafe` and all fourteen codes.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        categories: Iterable[str] | str | None = None,
        max_new_tokens: int = 48,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.format = ChatFormat(tokenizer)  # refuses a tokenizer without the Llama 3 chat tokens
        self.categories = select_categories(categories)
        self.max_new_tokens = max_new_tokens

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        categories: Iterable[str] | str | None = None,
        device: str = "cpu",
        dtype: str | None = None,
    ) -> Guard:
        from herd.text.loading import load_pretrained

        categories = select_categories(categories)  # a bad code fails before the checkpoint loads
        model, tokenizer = load_pretrained(path, device=device, dtype=dtype)
        return cls(model, tokenizer, categories)

    def prompt_tokens(self, messages: Sequence[Message | Mapping[str, Any]]) -> list[int]:
        """The guard prompt in the Llama 3 chat format, ending with the assistant header to complete."""
        content = guard_prompt(messages, self.categories)
        return self.format.encode_dialog_prompt([Message("user", content)], add_generation_prompt=True)

    def classify(self, conversations: Sequence[Sequence[Message | Mapping[str, Any]]]) -> list[GuardVerdict]:
        """The verdict on the last turn of each conversation, all in one batch."""
        prompts = [self.prompt_tokens(c) for c in conversations]
        room = self.model.args.max_seq_len - self.max_new_tokens
        longest = max(len(p) for p in prompts)
        if longest > room:
            raise ValueError(
                f"the guard prompt is {longest} tokens; with {self.max_new_tokens} new tokens it exceeds the "
                f"guard model's max_seq_len {self.model.args.max_seq_len} (shorten the conversation)"
            )
        tok = self.tokenizer
        params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0)
        completions = generate(
            self.model,
            prompts,
            params,
            stop_ids=tok.stop_ids,
            pad_id=max(getattr(tok, "pad_id", -1), 0),
            vocab_limit=tok.vocab_size,  # never the padding rows of a trimmed vocabulary
        )
        return [parse_verdict(tok.decode(c.tokens), self.categories) for c in completions]

    def check(self, messages: Sequence[Message | Mapping[str, Any]]) -> GuardVerdict:
        """The verdict on the last (user or assistant) turn of `messages`."""
        return self.classify([messages])[0]

    def check_user(self, messages: Sequence[Message | Mapping[str, Any]]) -> GuardVerdict:
        """Screen a prompt before the chat model sees it: the last message must be the user's."""
        if not messages or _as_message(messages[-1]).role != "user":
            raise ValueError("check_user judges the last message, which must be a user message")
        return self.check(messages)

    def check_response(
        self, messages: Sequence[Message | Mapping[str, Any]], reply: Message | str
    ) -> GuardVerdict:
        """Screen the chat model's `reply` to `messages` (which end with the user turn it answers)."""
        reply = reply if isinstance(reply, Message) else Message("assistant", reply)
        return self.check([*messages, reply])


class GuardedChat:
    """A `ChatSession` behind a guard: an unsafe user turn is refused before the chat model runs and is
    kept out of the history (neither model sees it again); an unsafe reply is replaced by the refusal."""

    def __init__(self, session: ChatSession, guard: Guard) -> None:
        self.session = session
        self.guard = guard
        self.last_verdict: GuardVerdict | None = None  # the verdict that decided the last reply

    def reply(self, user_text: str) -> Message:
        verdict = self.guard.check_user([*self.session.messages, Message("user", user_text)])
        self.last_verdict = verdict
        if not verdict.safe:
            return Message("assistant", refusal(verdict))
        message = self.session.reply(user_text)
        verdict = self.guard.check_response(self.session.messages[:-1], message)
        self.last_verdict = verdict
        if not verdict.safe:
            message = Message("assistant", refusal(verdict))
            self.session.messages[-1] = message  # the chat model does not continue from what was refused
        return message

    def reset(self) -> None:
        self.session.reset()


__all__ = [
    "ALL_CODES",
    "CATEGORIES",
    "Category",
    "Guard",
    "GuardVerdict",
    "GuardedChat",
    "conversation_turns",
    "format_verdict",
    "guard_prompt",
    "guard_training_record",
    "parse_verdict",
    "refusal",
    "select_categories",
]
