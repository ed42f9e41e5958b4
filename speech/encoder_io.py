"""The speech-encoder checkpoint: what `herd train speech-encoder` exports and the speech adapter will load.

A folder with `speech_encoder.json` (the encoder's `ConformerArgs`, the feature settings it was trained
on, and the BEST-RQ settings of its pretraining, for the record) and `encoder.safetensors` (the
`ConformerEncoder` state dict). The BEST-RQ heads and the frozen quantizer are pretraining machinery and
are not exported: a run is resumed from its DCP checkpoint, and the quantizer is a function of its seed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from herd.speech.conformer import ConformerEncoder
from herd.speech.conformer_args import ConformerArgs
from herd.speech.features import HOP_LENGTH, N_MELS, SAMPLE_RATE, WIN_LENGTH

CONFIG_FILE, WEIGHTS_FILE = "speech_encoder.json", "encoder.safetensors"
FEATURES = {"sample_rate": SAMPLE_RATE, "n_mels": N_MELS, "win_length": WIN_LENGTH, "hop_length": HOP_LENGTH,
            "normalization": "per_utterance"}  # fmt: skip


def save_speech_encoder(
    state_dict: Mapping[str, torch.Tensor],
    args: ConformerArgs,
    out_dir: str | PathLike,
    prefix: str = "",
    pretraining: dict[str, Any] | None = None,
) -> Path:
    """Write the encoder's weights (the keys of `state_dict` under `prefix`, e.g. "encoder." of a
    `BestRQModel`) and `speech_encoder.json`; returns the folder."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {
        k[len(prefix) :]: v.detach().cpu().contiguous() for k, v in state_dict.items() if k.startswith(prefix)
    }
    if not weights:
        raise ValueError(f"no encoder weights under {prefix!r} in the state dict ({len(state_dict)} keys)")
    save_file(weights, str(out / WEIGHTS_FILE))
    config = {"encoder_args": args.to_dict(), "features": FEATURES, "pretraining": pretraining or {}}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_speech_encoder_config(path: str | PathLike) -> dict[str, Any]:
    root = Path(path)
    file = root / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{root}: not a speech-encoder checkpoint (no {CONFIG_FILE}); train one with `herd train speech-encoder`"
        )
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(config, dict) or not isinstance(config.get("encoder_args"), dict):
        raise ValueError(f"{file}: missing encoder_args")
    try:
        ConformerArgs(**config["encoder_args"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: bad encoder_args ({e})") from e
    return config


def load_speech_encoder(path: str | PathLike, device: str | torch.device = "cpu") -> ConformerEncoder:
    """The `ConformerEncoder` of a checkpoint folder, in eval mode."""
    from safetensors.torch import load_file

    root = Path(path)
    config = read_speech_encoder_config(root)
    encoder = ConformerEncoder(ConformerArgs(**config["encoder_args"]))
    try:
        weights = load_file(str(root / WEIGHTS_FILE))
    except Exception as e:  # missing, truncated or not safetensors: name the file
        raise ValueError(f"{root / WEIGHTS_FILE}: could not be read ({type(e).__name__}: {e})") from e
    missing, unexpected = encoder.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{root / WEIGHTS_FILE}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return encoder.to(device).eval()


__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "load_speech_encoder",
    "read_speech_encoder_config",
    "save_speech_encoder",
]
