"""herd.text: the Llama model family, tokenizers, chat format, checkpoints and generation."""

from herd.text.args import PRESET_NAMES, ModelArgs, RopeScaling, get_preset
from herd.text.chat_format import ChatFormat, Message
from herd.text.generation import SamplingParams, generate, generate_text
from herd.text.kv_cache import KVCache
from herd.text.loading import convert_checkpoint, load_model, load_pretrained
from herd.text.model import Llama, build_llama
from herd.text.tokenizer import Tokenizer, load_tokenizer

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
