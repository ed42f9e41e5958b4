"""herd.vision: the image encoder (ViT-H/14 on timm blocks, multi-layer features, gated layers) and
video frames (`herd.vision.video`: decord / PyAV readers, uniform sampling, frames → tiles).

`VisionArgs` and the presets import without timm; the encoder itself needs timm (`pip install timm`).
Reading videos needs PyAV (`pip install 'herd[video]'`); decord is used where it is installed.
"""

from __future__ import annotations

from typing import Any

from herd.vision.video import (
    VideoFrames,
    VideoReadError,
    collate_videos,
    read_frames,
    sample_frame_indices,
    video_tiles,
)
from herd.vision.vision_args import (
    VISION_PRESET_NAMES,
    VisionArgs,
    get_vision_preset,
    supported_aspect_ratios,
)

_ENCODER_NAMES = ("TanhGate", "VisionEncoder", "VisionLoadReport", "load_vision_weights", "vit_block")


def __getattr__(name: str) -> Any:  # the encoder imports timm: load it on first use
    if name in _ENCODER_NAMES:
        from herd.vision import encoder

        return getattr(encoder, name)
    raise AttributeError(f"module 'herd.vision' has no attribute {name!r}")


__all__ = [
    "VISION_PRESET_NAMES",
    "TanhGate",
    "VideoFrames",
    "VideoReadError",
    "VisionArgs",
    "VisionEncoder",
    "VisionLoadReport",
    "collate_videos",
    "get_vision_preset",
    "load_vision_weights",
    "read_frames",
    "sample_frame_indices",
    "supported_aspect_ratios",
    "video_tiles",
    "vit_block",
]
