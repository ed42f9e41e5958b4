"""herd.speech: the speech encoder of paper §8.1 — audio reading, 80-dim log-mel features, the Conformer
encoder with rotary attention, BEST-RQ pretraining pieces, and the encoder's checkpoint.

`ConformerArgs` and the presets import without torchaudio; the modules load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from herd.speech.conformer_args import SPEECH_PRESET_NAMES, ConformerArgs, get_speech_preset

_LAZY = {
    "AudioError": "audio",
    "read_audio": "audio",
    "LogMel": "features",
    "log_mel_features": "features",
    "pad_features": "features",
    "ConformerEncoder": "conformer",
    "BestRQArgs": "bestrq",
    "BestRQModel": "bestrq",
    "RandomProjectionQuantizer": "bestrq",
    "load_speech_encoder": "encoder_io",
    "save_speech_encoder": "encoder_io",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"herd.speech.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'herd.speech' has no attribute {name!r}")


__all__ = ["SPEECH_PRESET_NAMES", "ConformerArgs", "get_speech_preset", *_LAZY]
