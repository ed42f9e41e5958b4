"""herd.text: the Llama model family, tokenizers, chat format, checkpoints and generation.

The names below are imported on first use (PEP 562), so that `herd.text.args` (presets, pure Python)
can be read without importing torch: the `herd` parser needs the preset names, not the model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "PRESET_NAMES": "args", "ModelArgs": "args", "RopeScaling": "args", "get_preset": "args",
    "ChatFormat": "chat_format", "Message": "chat_format",
    "SamplingParams": "generation", "generate": "generation", "generate_text": "generation",
    "KVCache": "kv_cache",
    "convert_checkpoint": "loading", "load_model": "loading", "load_pretrained": "loading",
    "Llama": "model", "build_llama": "model",
    "Tokenizer": "tokenizer", "load_tokenizer": "tokenizer",
}  # fmt: skip

if TYPE_CHECKING:
    from herd.text.args import PRESET_NAMES, ModelArgs, RopeScaling, get_preset
    from herd.text.chat_format import ChatFormat, Message
    from herd.text.generation import SamplingParams, generate, generate_text
    from herd.text.kv_cache import KVCache
    from herd.text.loading import convert_checkpoint, load_model, load_pretrained
    from herd.text.model import Llama, build_llama
    from herd.text.tokenizer import Tokenizer, load_tokenizer


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'herd.text' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"herd.text.{_WHERE[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = [
    "PRESET_NAMES",
    "ChatFormat",
    "KVCache",
    "Llama",
    "Message",
    "ModelArgs",
    "RopeScaling",
    "SamplingParams",
    "Tokenizer",
    "build_llama",
    "convert_checkpoint",
    "generate",
    "generate_text",
    "get_preset",
    "load_model",
    "load_pretrained",
    "load_tokenizer",
]
assert sorted(__all__) == sorted(_WHERE)
