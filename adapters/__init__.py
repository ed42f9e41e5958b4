"""herd.adapters: what plugs an encoder into a frozen LLM (paper §7-8).

Image adapter: gated cross-attention layers (`cross_attention`), the composed `MultimodalLlama`
(`multimodal`), and the loader of Hugging Face Mllama (Llama 3.2 Vision) checkpoints (`hf_mllama`).
"""

from herd.adapters.cross_attention import CrossAttentionBlock, CrossAttentionMask, build_cross_attention_mask
from herd.adapters.hf_mllama import hf_from_schedule, load_hf_mllama, schedule_from_hf
from herd.adapters.multimodal import (
    MultimodalKVCache,
    MultimodalLlama,
    cross_attention_mask_from_tokens,
    fusion_schedule,
    generate_with_images,
)

__all__ = [
    "CrossAttentionBlock",
    "CrossAttentionMask",
    "MultimodalKVCache",
    "MultimodalLlama",
    "build_cross_attention_mask",
    "cross_attention_mask_from_tokens",
    "fusion_schedule",
    "generate_with_images",
    "hf_from_schedule",
    "load_hf_mllama",
    "schedule_from_hf",
]
