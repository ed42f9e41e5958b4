"""The Llama 3.1 chat format: dialogs to token ids (with SFT/DPO loss masks) and generated tokens back to messages.

A dialog is encoded as

    <|begin_of_text|>
    <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>      (one block per message)
    <|start_header_id|>assistant<|end_header_id|>\\n\\n                      (generation prompt, optional)

with roles system, user, assistant and ipython (tool output). An assistant message that calls a built-in
tool is `<|python_tag|>brave_search.call(query="...")<|eom_id|>` (wolfram_alpha and photogen alike; the
code interpreter's body is the code itself): `<|eom_id|>` means "stop, run the tool, my turn goes on".
Custom tools are called with JSON `{"type": "function", "name": ..., "parameters": {...}}` (or the
`<function=name>{...}</function>` / `[name(k=v)]` formats) and end with `<|eot_id|>` unless the message says
otherwise.

Token ids equal Meta's `llama_models.llama3.chat_format.ChatFormat` (llama-models 0.3) with one deliberate
difference: Meta's encoder writes `<|python_tag|>` only before code-interpreter calls, while the Llama 3.1
prompt-format specification (llama_models/llama3_1/prompt_format.md) and the model itself put it before
every built-in tool call; we follow the specification. Content strings are always encoded with special
tokens as plain text, so a user cannot smuggle an `<|eot_id|>` into the prompt.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from herd.text.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "ipython")
STOP_REASONS = ("end_of_turn", "end_of_message", "out_of_tokens")
# Built-in tools called as `name.call(query="...")`; the code interpreter takes raw code instead.
QUERY_TOOLS = ("brave_search", "wolfram_alpha", "photogen")
CODE_TOOL = "code_interpreter"
BUILTIN_TOOLS = (*QUERY_TOOLS, CODE_TOOL)
ToolPromptFormat = Literal["json", "function_tag", "python_list"]

_BUILTIN_CALL_RE = re.compile(r'\b(?P<name>\w+)\.call\(query="(?P<query>[^"]*)"\)')
_FUNCTION_TAG_RE = re.compile(r"<function=(?P<name>[^>]+)>", re.DOTALL)
_FORMAT_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
)


@dataclass
class Message:
    """One chat message.

    Args:
        role: "system", "user", "assistant" or "ipython" (tool output; "tool" is accepted as an alias).
        content: the text. Special-token strings in it are encoded as plain text.
        tool_calls: assistant only; each a dict {"name": str, "arguments": dict}. Built-in tools are
            "brave_search"/"wolfram_alpha"/"photogen" (arguments {"query": str}) and "code_interpreter"
            (alias "python"; arguments {"code": str}); any other name is a custom tool.
        stop_reason: assistant only; "end_of_turn" (`<|eot_id|>`), "end_of_message" (`<|eom_id|>`) or, for
            decoded generations, "out_of_tokens". None when encoding means `<|eom_id|>` if the message calls a
            built-in tool and `<|eot_id|>` otherwise (Meta's encoder always defaults to `<|eot_id|>`).
    """

    role: str
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str | None = None

    def __post_init__(self) -> None:
        if self.role == "tool":
            self.role = "ipython"
        if self.role not in ROLES:
            raise ValueError(f"unknown message role {self.role!r}; expected one of {ROLES}")
        if not isinstance(self.content, str):
            raise TypeError(f"message content must be a str, got {type(self.content).__name__}")
        self.tool_calls = [_normalize_tool_call(call) for call in (self.tool_calls or [])]
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"only assistant messages carry tool calls, not {self.role!r}")
        if self.stop_reason is not None and self.stop_reason not in STOP_REASONS:
            raise ValueError(f"unknown stop_reason {self.stop_reason!r}; expected one of {STOP_REASONS}")


def _normalize_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise ValueError(f"a tool call is a dict {{'name': str, 'arguments': dict}}, got {call!r}")
    arguments = call.get("arguments", {})
    if not isinstance(arguments, dict):
        raise ValueError(f"tool call {call['name']!r}: arguments must be a dict, got {arguments!r}")
    name = CODE_TOOL if call["name"] == "python" else call["name"]
    required = "query" if name in QUERY_TOOLS else "code" if name == CODE_TOOL else None
    if required is not None and not isinstance(arguments.get(required), str):
        raise ValueError(f"built-in tool {name!r} needs a string argument {required!r}, got {arguments!r}")
    return {"name": name, "arguments": dict(arguments)}


def _python_literal(value: Any) -> str:
    """Meta's rendering of an argument in the python_list tool format (strings double-quoted, unescaped)."""
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_python_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_python_literal(v)}" for k, v in value.items()) + "}"
    if value is None or isinstance(value, int | float | bool):
        return str(value)
    raise ValueError(f"cannot render {type(value).__name__} argument {value!r} in the python_list format")


def encode_tool_call(call: dict[str, Any], tool_prompt_format: ToolPromptFormat = "json") -> str:
    """The text of one (normalized) tool call as the assistant writes it."""
    name, args = call["name"], call["arguments"]
    if name in QUERY_TOOLS:
        return f'{name}.call(query="{args["query"]}")'
    if name == CODE_TOOL:
        return args["code"]
    if tool_prompt_format == "json":
        return json.dumps({"type": "function", "name": name, "parameters": args})
    if tool_prompt_format == "function_tag":
        return f"<function={name}>{json.dumps(args)}</function>"
    if tool_prompt_format == "python_list":
        return f"[{name}(" + ", ".join(f"{k}={_python_literal(v)}" for k, v in args.items()) + ")]"
    raise ValueError(f"unknown tool_prompt_format {tool_prompt_format!r}")


def _parse_json_object(text: str) -> tuple[dict[str, Any], str] | None:
    """A JSON object at the start of `text` and the text after it, or None."""
    for candidate in (text, text.replace("'", '"')):  # models sometimes emit Python-style quotes
        try:
            value, end = json.JSONDecoder().raw_decode(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value, candidate[end:]
    return None


def _parse_python_list(text: str) -> list[dict[str, Any]] | None:
    """`[f(a=1), g(b="x")]` → tool calls; None unless the text is exactly such a list of keyword calls."""
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: null bytes in the source
        return None
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return None
    calls = []
    for node in tree.body.elts:
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)) or node.args:
            return None
        try:
            arguments = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):  # non-literal arguments
            return None
        if None in arguments:  # **kwargs
            return None
        calls.append({"name": node.func.id, "arguments": arguments})
    return calls


def parse_tool_calls(body: str, python_tag: bool) -> list[dict[str, Any]]:
    """Tool calls in a generated assistant body (after `<|python_tag|>` if `python_tag`), [] if none.

    Tried in Meta's order: `<function=name>{json}</function>`, a JSON object with "name" (and
    "parameters"), a python list of calls, `tool.call(query="...")`, and finally, after `<|python_tag|>`,
    the whole body as code for the code interpreter. Unlike Meta's decoder, `x.call(query=...)` only counts
    when x is a built-in tool or the body followed `<|python_tag|>`, so prose that mentions such a call is
    not mistaken for one.
    """
    text = body.strip()
    calls: list[dict[str, Any]] = []
    tag = _FUNCTION_TAG_RE.search(text)
    tagged = _parse_json_object(text[tag.end() :]) if tag is not None else None
    obj = _parse_json_object(text)
    if tag is not None and tagged is not None and tagged[1].strip() in ("", "</function>"):
        calls = [{"name": tag.group("name"), "arguments": tagged[0]}]
    elif obj is not None and not obj[1].strip() and isinstance(obj[0].get("name"), str):
        name, params = obj[0]["name"], obj[0].get("parameters", obj[0].get("arguments", {}))
        if name in BUILTIN_TOOLS and isinstance(params, dict) and params:
            # The model sometimes calls a built-in tool in the custom-tool format; keep the built-in schema.
            params = {"code" if name == CODE_TOOL else "query": next(iter(params.values()))}
        calls = [{"name": name, "arguments": params}]
    elif (listed := _parse_python_list(text)) is not None:
        calls = listed
    elif (match := _BUILTIN_CALL_RE.search(text)) is not None and (
        python_tag or match.group("name") in QUERY_TOOLS
    ):
        calls = [{"name": match.group("name"), "arguments": {"query": match.group("query")}}]
    elif python_tag:
        calls = [{"name": CODE_TOOL, "arguments": {"code": body}}]
    try:
        return [_normalize_tool_call(call) for call in calls]
    except ValueError:  # e.g. brave_search called without a string query: not a usable call
        return []


class ChatFormat:
    """Encodes dialogs in the Llama 3.1 chat format and decodes generated assistant messages.

    Args:
        tokenizer: a Llama 3 `Tokenizer` (the format needs its header / eot / eom / python_tag tokens).
        tool_prompt_format: how custom tool calls are written: "json" (default, Meta's default),
            "function_tag" or "python_list".
    """

    def __init__(self, tokenizer: Tokenizer, tool_prompt_format: ToolPromptFormat = "json") -> None:
        missing = [t for t in _FORMAT_TOKENS if t not in getattr(tokenizer, "special_tokens", {})]
        if missing:
            raise ValueError(f"ChatFormat needs a Llama 3 tokenizer; {tokenizer!r} lacks {missing}")
        self.tokenizer = tokenizer
        self.tool_prompt_format = tool_prompt_format
        special = tokenizer.special_tokens
        self.bos_id = special["<|begin_of_text|>"]
        self.eos_id = special["<|end_of_text|>"]
        self.start_header_id = special["<|start_header_id|>"]
        self.end_header_id = special["<|end_header_id|>"]
        self.eot_id = special["<|eot_id|>"]
        self.eom_id = special["<|eom_id|>"]
        self.python_tag_id = special["<|python_tag|>"]

    def _text(self, s: str) -> list[int]:
        # Content never turns special-token strings into special ids.
        return self.tokenizer.encode(s, bos=False, eos=False)

    def encode_header(self, role: str) -> list[int]:
        """`<|start_header_id|>role<|end_header_id|>\\n\\n` (role text and "\\n\\n" encoded separately, as Meta)."""
        return [self.start_header_id, *self._text(role), self.end_header_id, *self._text("\n\n")]

    def _message_segments(self, message: Message) -> list[tuple[list[int], bool, bool]]:
        """(ids, is_assistant_output, is_formatting) pieces of one message, in order."""
        is_assistant = message.role == "assistant"
        segments = [(self.encode_header(message.role), False, True)]
        calls = message.tool_calls
        if is_assistant and calls and calls[0]["name"] in BUILTIN_TOOLS:
            segments.append(([self.python_tag_id], True, False))
        segments.append((self._text(message.content), is_assistant, False))
        for call in calls:
            # Each call is tokenized on its own, as Meta does; merging with the content could change BPE merges.
            segments.append((self._text(encode_tool_call(call, self.tool_prompt_format)), True, False))
        stop = message.stop_reason
        if stop is None:
            stop = "end_of_message" if any(c["name"] in BUILTIN_TOOLS for c in calls) else "end_of_turn"
        eom = is_assistant and stop == "end_of_message"
        segments.append(([self.eom_id if eom else self.eot_id], is_assistant, True))
        return segments

    def encode_message(self, message: Message) -> list[int]:
        """Header + body + `<|eot_id|>`/`<|eom_id|>` of one message (no `<|begin_of_text|>`)."""
        return [t for ids, _, _ in self._message_segments(message) for t in ids]

    def encode_dialog_with_mask(
        self, messages: list[Message], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool], list[bool]]:
        """Tokens of a dialog plus two per-token masks for SFT / DPO losses.

        Returns (tokens, assistant_mask, format_mask), all the same length; `tokens` equals
        `encode_dialog_prompt(messages, add_generation_prompt)`.

        assistant_mask[i] is True exactly on what the model generates in assistant messages: the
        `<|python_tag|>` of a built-in tool call, the content tokens, the tool-call tokens and the closing
        `<|eot_id|>`/`<|eom_id|>`. It is False on `<|begin_of_text|>`, on every header (including the
        assistant's own `<|start_header_id|>assistant<|end_header_id|>\\n\\n`, which is prompt) and on all
        system / user / ipython tokens.

        format_mask[i] is True exactly on the tokens the template adds around messages:
        `<|begin_of_text|>`, each header's `<|start_header_id|>`, role-name tokens, `<|end_header_id|>` and
        "\\n\\n" token, and each message's closing `<|eot_id|>`/`<|eom_id|>` (those closing tokens are thus in
        both masks for assistant messages). `<|python_tag|>` is not formatting: it is part of the assistant's
        tool call. Content and tool-call text are never formatting.
        """
        tokens, assistant_mask, format_mask = [self.bos_id], [False], [True]
        segments = [seg for m in messages for seg in self._message_segments(m)]
        if add_generation_prompt:
            segments.append((self.encode_header("assistant"), False, True))
        for ids, is_assistant, is_format in segments:
            tokens.extend(ids)
            assistant_mask.extend([is_assistant] * len(ids))
            format_mask.extend([is_format] * len(ids))
        return tokens, assistant_mask, format_mask

    def encode_dialog_prompt(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        """`<|begin_of_text|>` + every message + (if add_generation_prompt) the assistant header to complete."""
        tokens = [self.bos_id]
        for message in messages:
            tokens.extend(self.encode_message(message))
        if add_generation_prompt:
            tokens.extend(self.encode_header("assistant"))
        return tokens

    def decode_assistant_message(self, tokens: list[int], stop_reason: str | None = None) -> Message:
        """Parse generated tokens back into an assistant Message.

        A leading `<|start_header_id|>assistant<|end_header_id|>\\n\\n` is skipped; a leading
        `<|python_tag|>` marks a tool call. Everything from the first stop token on is dropped: `<|eot_id|>`
        or `<|end_of_text|>` → stop_reason "end_of_turn", `<|eom_id|>` → "end_of_message"; with no stop
        token the reason is `stop_reason` if given, else "out_of_tokens". When a tool call is recognised
        (see `parse_tool_calls`) the content is "" (as Meta does); otherwise the content is the decoded body,
        verbatim (Meta strips surrounding spaces; we keep them so that re-encoding gives the same tokens).
        """
        tokens = list(tokens)
        header = self.encode_header("assistant")
        if tokens[: len(header)] == header:
            tokens = tokens[len(header) :]
        python_tag = bool(tokens) and tokens[0] == self.python_tag_id
        if python_tag:
            tokens = tokens[1:]
        reason = stop_reason or "out_of_tokens"
        stops = {self.eot_id: "end_of_turn", self.eos_id: "end_of_turn", self.eom_id: "end_of_message"}
        for i, token in enumerate(tokens):
            if token in stops:
                reason = stops[token]
                tokens = tokens[:i]
                break
        body = self.tokenizer.decode(tokens)
        calls = parse_tool_calls(body, python_tag)
        return Message(role="assistant", content="" if calls else body, tool_calls=calls, stop_reason=reason)
