"""The image-adapter checkpoint: what `herd train vision` exports and `herd ask` loads.

A folder with `vision.json` (encoder args, cross-attention schedule, tiles per image, the frozen LLM's
checkpoint path) and `adapter.safetensors` (encoder, projector, cross-attention layers, image-token
embeddings). The frozen LLM is not copied: it never changed, and is loaded from its own checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from herd.adapters.multimodal import MultimodalLlama
from herd.text.loading import load_pretrained
from herd.vision.vision_args import VisionArgs

CONFIG_FILE, WEIGHTS_FILE = "vision.json", "adapter.safetensors"


def save_multimodal_state(
    state_dict: Mapping[str, torch.Tensor],
    vision_args: VisionArgs,
    cross_attention_layers: Sequence[int],
    llm_path: str | PathLike,
    max_tiles: int,
    out_dir: str | PathLike,
) -> Path:
    """Write a `MultimodalLlama` state dict's adapter part (everything but `llm.*`) and `vision.json`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adapter = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if not k.startswith("llm.")}
    save_file(adapter, str(out / WEIGHTS_FILE))
    config = {
        "llm": str(Path(llm_path).resolve()),
        "vision_args": dataclasses.asdict(vision_args),
        "cross_attention_layers": [int(i) for i in cross_attention_layers],
        "max_tiles": int(max_tiles),
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def save_multimodal_model(
    model: MultimodalLlama, llm_path: str | PathLike, max_tiles: int, out_dir: str | PathLike
) -> Path:
    """Write a single-device `MultimodalLlama` where `load_multimodal_model` reads it."""
    if model.vision is None:
        raise ValueError("a MultimodalLlama without a vision encoder cannot be saved as an image adapter")
    return save_multimodal_state(
        model.state_dict(), model.vision.args, model.cross_attention_layers, llm_path, max_tiles, out_dir
    )


def read_multimodal_config(path: str | PathLike) -> dict[str, Any]:
    root = Path(path)
    file = root / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{root}: not a vision checkpoint (no {CONFIG_FILE}); train one with `herd train vision` or "
            "`herd quickstart`"
        )
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    missing = [k for k in ("llm", "vision_args", "cross_attention_layers", "max_tiles") if k not in config]
    if missing:
        raise ValueError(f"{file}: missing {', '.join(missing)}")
    return config


def load_multimodal_model(
    path: str | PathLike, device: str | torch.device = "cpu"
) -> tuple[MultimodalLlama, Any, dict[str, Any]]:
    """(model in eval mode, the LLM's tokenizer, vision.json) of an image-adapter checkpoint."""
    from safetensors.torch import load_file

    from herd.vision.encoder import VisionEncoder

    root = Path(path)
    config = read_multimodal_config(root)
    llm, tokenizer = load_pretrained(config["llm"], device=device)
    args = dict(config["vision_args"])
    args["aspect_ratios"] = [tuple(r) for r in args.get("aspect_ratios") or []] or None
    model = MultimodalLlama(
        llm, VisionEncoder(VisionArgs(**args)), cross_attention_layers=config["cross_attention_layers"]
    )
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
    "load_multimodal_model",
    "read_multimodal_config",
    "save_multimodal_model",
    "save_multimodal_state",
]
