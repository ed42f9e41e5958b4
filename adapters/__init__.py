"""herd.adapters: what plugs an encoder into a frozen LLM (paper §7-8).

Image adapter: gated cross-attention layers (`cross_attention`), the composed `MultimodalLlama`
(`multimodal`), and the loader of Hugging Face Mllama (Llama 3.2 Vision) checkpoints (`hf_mllama`).
Video adapter: the perceiver resampler (`perceiver`) and the video cross-attention layers (`video`),
part of the same `MultimodalLlama` (`video=PerceiverArgs(...)` or `add_video`).
Speech adapter (paper §8): `SpeechLlama` (`speech_llama`) composes a frozen LLM, a Conformer speech encoder
and the speech adapter (`speech`), whose outputs take the place of `<|audio|>` placeholders in the LLM's
input; `speech_io` saves and loads it.
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
from herd.adapters.speech import SpeechAdapter, SpeechAdapterArgs, get_speech_adapter_preset
from herd.adapters.speech_llama import SpeechLlama, generate_with_audio, place_audio
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
    "SpeechAdapter",
    "SpeechAdapterArgs",
    "SpeechLlama",
    "VideoAdapter",
    "build_cross_attention_mask",
    "cross_attention_mask_from_tokens",
    "fusion_schedule",
    "generate_with_audio",
    "generate_with_images",
    "get_speech_adapter_preset",
    "get_perceiver_preset",
    "hf_from_schedule",
    "load_hf_mllama",
    "place_audio",
    "schedule_from_hf",
    "video_schedule",
]
