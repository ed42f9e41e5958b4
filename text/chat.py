"""A multi-turn chat session over any Llama 3 checkpoint: the Python side of `herd chat`."""

from __future__ import annotations

from typing import Any

from torch import nn

from herd.text.chat_format import ChatFormat, Message
from herd.text.generation import EAGER_STEPS, DecodeSteps, SamplingParams, generate


class ChatSession:
    """Keeps the dialog; each `reply` encodes it in the Llama 3.1 chat format and generates one turn."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        system: str | None = None,
        params: SamplingParams | None = None,
        steps: DecodeSteps = EAGER_STEPS,  # compiled / static-cache decoding (herd.fast_decode)
    ) -> None:
        self.steps = steps
        self.model = model
        self.tokenizer = tokenizer
        self.format = ChatFormat(tokenizer)
        self.params = params or SamplingParams()
        self.system = system
        self.messages: list[Message] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [Message("system", self.system)] if self.system else []

    def prompt_tokens(self) -> list[int]:
        return self.format.encode_dialog_prompt(self.messages, add_generation_prompt=True)

    def reply(self, user_text: str) -> Message:
        self.messages.append(Message("user", user_text))
        prompt = self.prompt_tokens()
        room = self.model.args.max_seq_len - len(prompt)
        if room <= 0:
            raise ValueError(
                f"the dialog ({len(prompt)} tokens) fills the model's context; /reset to start over"
            )
        params = SamplingParams(
            min(self.params.max_new_tokens, room),
            self.params.temperature,
            self.params.top_p,
            self.params.seed,
        )
        pad = max(self.tokenizer.pad_id, 0)
        completion = generate(
            self.model, [prompt], params, stop_ids=self.tokenizer.stop_ids, pad_id=pad, steps=self.steps
        )[0]
        tokens = completion.tokens + ([completion.stop_token] if completion.stop_token is not None else [])
        message = self.format.decode_assistant_message(tokens)
        self.messages.append(message)
        return message
