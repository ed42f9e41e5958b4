"""The image-adapter checkpoint: what `herd train vision` exports and `herd ask` loads.

A folder with `vision.json` (encoder args, cross-attention schedule, tiles per image, the frozen LLM's
checkpoint path) and `adapter.safetensors` (encoder, projector, cross-attention layers, image-token
embeddings). The frozen LLM is not copied: it never changed, and is loaded from its own checkpoint.

A model with a video adapter adds, beside them, a `"video"` entry in `vision.json` (the resampler's
`PerceiverArgs` and the video cross-attention schedule) and `video_adapter.safetensors` (the
`VideoAdapter`'s own state dict: resampler and video cross-attention layers). The image part is written
exactly as an image checkpoint, so an image-only reader still loads it, and `load_video_model_from_image`
(the `video.init_from` of a video run) starts a video model from any image checkpoint.
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
from herd.adapters.perceiver import PerceiverArgs
from herd.text.loading import load_pretrained
from herd.vision.vision_args import VisionArgs

CONFIG_FILE, WEIGHTS_FILE = "vision.json", "adapter.safetensors"
VIDEO_WEIGHTS_FILE = "video_adapter.safetensors"


def save_multimodal_state(
    state_dict: Mapping[str, torch.Tensor],
    vision_args: VisionArgs,
    cross_attention_layers: Sequence[int],
    llm_path: str | PathLike,
    max_tiles: int,
    out_dir: str | PathLike,
    video: Mapping[str, Any]
    | None = None,  # {"perceiver_args": PerceiverArgs, "cross_attention_layers": [...]}
) -> Path:
    """Write a `MultimodalLlama` state dict's adapter part (everything but `llm.*`) and `vision.json`;
    `video.*` tensors go to `video_adapter.safetensors`, described by `video`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if not k.startswith("llm.")}
    adapter = {k: v for k, v in tensors.items() if not k.startswith("video.")}
    video_state = {k.removeprefix("video."): v for k, v in tensors.items() if k.startswith("video.")}
    if bool(video_state) != (video is not None):
        raise ValueError("video weights and the video config go together (give both or neither)")
    save_file(adapter, str(out / WEIGHTS_FILE))
    config = {
        "llm": str(Path(llm_path).resolve()),
        "vision_args": dataclasses.asdict(vision_args),
        "cross_attention_layers": [int(i) for i in cross_attention_layers],
        "max_tiles": int(max_tiles),
    }
    if video is not None:
        save_file(video_state, str(out / VIDEO_WEIGHTS_FILE))
        perceiver = video["perceiver_args"]
        config["video"] = {
            "perceiver_args": perceiver.to_dict()
            if isinstance(perceiver, PerceiverArgs)
            else dict(perceiver),
            "cross_attention_layers": [int(i) for i in video["cross_attention_layers"]],
        }
        if video.get("num_frames"):  # what the model was trained with: `herd ask --video` samples as many
            config["video"]["num_frames"] = int(video["num_frames"])
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def save_multimodal_model(
    model: MultimodalLlama, llm_path: str | PathLike, max_tiles: int, out_dir: str | PathLike
) -> Path:
    """Write a single-device `MultimodalLlama` where `load_multimodal_model` reads it."""
    if model.vision is None:
        raise ValueError("a MultimodalLlama without a vision encoder cannot be saved as an image adapter")
    video = None
    if model.video is not None:
        video = {"perceiver_args": model.video.args, "cross_attention_layers": model.video.layers}
    return save_multimodal_state(
        model.state_dict(),
        model.vision.args,
        model.cross_attention_layers,
        llm_path,
        max_tiles,
        out_dir,
        video,
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
    video = config.get("video")
    if video is not None:
        lacking = [k for k in ("perceiver_args", "cross_attention_layers") if k not in (video or {})]
        if not isinstance(video, dict) or lacking:
            raise ValueError(
                f"{file}: video: missing {', '.join(lacking) or 'perceiver_args, cross_attention_layers'}"
            )
        try:
            video["perceiver_args"] = PerceiverArgs(**video["perceiver_args"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{file}: video.perceiver_args: {e}") from e
    return config


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as e:  # missing, truncated or not safetensors: name the file
        raise ValueError(f"{file}: could not be read ({type(e).__name__}: {e})") from e


def load_multimodal_model(
    path: str | PathLike, device: str | torch.device = "cpu"
) -> tuple[MultimodalLlama, Any, dict[str, Any]]:
    """(model in eval mode, the LLM's tokenizer, vision.json) of an image-adapter checkpoint, with its
    video adapter when it has one."""
    from herd.vision.encoder import VisionEncoder

    root = Path(path)
    config = read_multimodal_config(root)
    llm, tokenizer = load_pretrained(config["llm"], device=device)
    args = dict(config["vision_args"])
    args["aspect_ratios"] = [tuple(r) for r in args.get("aspect_ratios") or []] or None
    model = MultimodalLlama(
        llm, VisionEncoder(VisionArgs(**args)), cross_attention_layers=config["cross_attention_layers"]
    )
    missing, unexpected = model.load_state_dict(_read_weights(root / WEIGHTS_FILE), strict=False)
    bad_missing = [k for k in missing if not k.startswith(("llm.", "video."))]
    if bad_missing or unexpected:
        raise ValueError(f"{root / WEIGHTS_FILE}: missing {bad_missing[:5]}, unexpected {unexpected[:5]}")
    video = config.get("video")
    if video is not None:
        model.add_video(video["perceiver_args"], layers=video["cross_attention_layers"])
        assert model.video is not None
        file = root / VIDEO_WEIGHTS_FILE
        missing, unexpected = model.video.load_state_dict(_read_weights(file), strict=False)
        if missing or unexpected:
            raise ValueError(f"{file}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval(), tokenizer, config


def load_video_model_from_image(
    path: str | PathLike,
    perceiver: PerceiverArgs,
    video_every: int = 4,
    device: str | torch.device = "cpu",
) -> tuple[MultimodalLlama, Any, dict[str, Any]]:
    """`video.init_from`: an image-adapter checkpoint plus a fresh video adapter (gates at zero).

    Every image weight is the checkpoint's, and the video layers are skipped without a video and add 0
    with one, so the model's outputs on text and images are exactly the image model's. Returns (model in
    eval mode, tokenizer, vision.json).
    """
    model, tokenizer, config = load_multimodal_model(path, device)
    if model.video is not None:
        raise ValueError(
            f"{Path(path) / CONFIG_FILE}: already has a video adapter; load it with load_multimodal_model"
        )
    model.add_video(perceiver, video_every)
    return model.eval(), tokenizer, config


__all__ = [
    "CONFIG_FILE",
    "VIDEO_WEIGHTS_FILE",
    "WEIGHTS_FILE",
    "load_multimodal_model",
    "load_video_model_from_image",
    "read_multimodal_config",
    "save_multimodal_model",
    "save_multimodal_state",
]
