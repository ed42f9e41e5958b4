"""herd.text: the Llama model family, tokenizers, chat format, checkpoints and generation."""

from herd.text.args import PRESET_NAMES, ModelArgs, RopeScaling, get_preset
from herd.text.kv_cache import KVCache
from herd.text.model import Llama, build_llama

__all__ = ["PRESET_NAMES", "KVCache", "Llama", "ModelArgs", "RopeScaling", "build_llama", "get_preset"]
