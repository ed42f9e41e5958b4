"""The speech-model checkpoint: what `herd train speech` exports and `herd ask --audio` loads.

A folder with `speech.json` (the encoder's `ConformerArgs`, the adapter's `SpeechAdapterArgs`, the feature
settings, the frozen LLM's checkpoint path and the task prompt language) and `speech_adapter.safetensors`
(`encoder.*` and `adapter.*` of a `SpeechLlama`). The frozen LLM is not copied: it never changed, and is
loaded from its own checkpoint, like the image adapter's (`herd.adapters.multimodal_io`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from herd.adapters.speech import SpeechAdapterArgs
from herd.adapters.speech_llama import SpeechLlama
from herd.speech.conformer import ConformerEncoder
from herd.speech.conformer_args import ConformerArgs
from herd.speech.encoder_io import FEATURES
from herd.text.loading import load_pretrained

CONFIG_FILE, WEIGHTS_FILE = "speech.json", "speech_adapter.safetensors"


def save_speech_state(
    state_dict: Mapping[str, torch.Tensor],
    encoder_args: ConformerArgs,
    adapter_args: SpeechAdapterArgs,
    llm_path: str | PathLike,
    out_dir: str | PathLike,
    language: str = "English",
) -> Path:
    """Write a `SpeechLlama` state dict's trained part (everything but `llm.*`) and `speech.json`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if not k.startswith("llm.")}
    if not any(k.startswith("adapter.") for k in tensors):
        raise ValueError(f"no adapter.* weights in the state dict ({len(state_dict)} keys)")
    save_file(tensors, str(out / WEIGHTS_FILE))
    config = {
        "llm": str(Path(llm_path).resolve()),
        "encoder_args": encoder_args.to_dict(),
        "adapter_args": adapter_args.to_dict(),
        "features": FEATURES,
        "language": language,
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def save_speech_model(
    model: SpeechLlama, llm_path: str | PathLike, out_dir: str | PathLike, language: str = "English"
) -> Path:
    """Write a single-device `SpeechLlama` where `load_speech_model` reads it."""
    return save_speech_state(
        model.state_dict(), model.encoder.args, model.adapter.args, llm_path, out_dir, language
    )


def read_speech_config(path: str | PathLike) -> dict[str, Any]:
    root = Path(path)
    file = root / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{root}: not a speech checkpoint (no {CONFIG_FILE}); train one with `herd train speech` or "
            "`herd quickstart --modality speech`"
        )
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    missing = [k for k in ("llm", "encoder_args", "adapter_args") if k not in config]
    if missing:
        raise ValueError(f"{file}: missing {', '.join(missing)}")
    try:
        config["encoder_args"] = ConformerArgs(**config["encoder_args"])
        config["adapter_args"] = SpeechAdapterArgs(**config["adapter_args"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: bad encoder_args or adapter_args ({e})") from e
    return config


def load_speech_model(
    path: str | PathLike, device: str | torch.device = "cpu"
) -> tuple[SpeechLlama, Any, dict[str, Any]]:
    """(model in eval mode, the LLM's tokenizer, speech.json with the args parsed) of a speech checkpoint."""
    from safetensors.torch import load_file

    root = Path(path)
    config = read_speech_config(root)
    llm, tokenizer = load_pretrained(config["llm"], device=device)
    model = SpeechLlama(llm, ConformerEncoder(config["encoder_args"]), config["adapter_args"])
    try:
        weights = load_file(str(root / WEIGHTS_FILE))
    except Exception as e:  # missing, truncated or not safetensors: name the file
        raise ValueError(f"{root / WEIGHTS_FILE}: could not be read ({type(e).__name__}: {e})") from e
    missing, unexpected = model.load_state_dict(weights, strict=False)
    bad_missing = [k for k in missing if not k.startswith("llm.")]
    if bad_missing or unexpected:
        raise ValueError(f"{root / WEIGHTS_FILE}: missing {bad_missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval(), tokenizer, config


__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "load_speech_model",
    "read_speech_config",
    "save_speech_model",
    "save_speech_state",
]
