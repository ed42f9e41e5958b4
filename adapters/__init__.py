"""herd.adapters: what plugs an encoder into a frozen LLM (paper §7-8).

Image adapter: gated cross-attention layers (`cross_attention`), the composed `MultimodalLlama`
(`multimodal`), and the loader of Hugging Face Mllama (Llama 3.2 Vision) checkpoints (`hf_mllama`).
Video adapter: the perceiver resampler (`perceiver`) and the video cross-attention layers (`video`),
part of the same `MultimodalLlama` (`video=PerceiverArgs(...)` or `add_video`).
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
from herd.adapters.perceiver import (
    PERCEIVER_PRESET_NAMES,
    PerceiverArgs,
    PerceiverResampler,
    get_perceiver_preset,
)
from herd.adapters.video import VIDEO_INPUTS, VideoAdapter, video_schedule

__all__ = [
    "PERCEIVER_PRESET_NAMES",
    "VIDEO_INPUTS",
    "CrossAttentionBlock",
    "CrossAttentionMask",
    "MultimodalKVCache",
    "MultimodalLlama",
    "PerceiverArgs",
    "PerceiverResampler",
    "VideoAdapter",
    "build_cross_attention_mask",
    "cross_attention_mask_from_tokens",
    "fusion_schedule",
    "generate_with_images",
    "get_perceiver_preset",
    "hf_from_schedule",
    "load_hf_mllama",
    "schedule_from_hf",
    "video_schedule",
]
