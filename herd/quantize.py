"""Row-wise FP8 inference (paper §6.2) applied to a loaded model, and `herd quantize fp8 SRC DST`.

Which layers: the feed-forward projections (w1, w2, w3) of the LLM's Transformer layers except the
first and the last (`herd.text.fp8.is_fp8_layer`); attention, embeddings, the head and adapter layers
stay in high precision. Numerics: e4m3 weights with one scale per output row, activations quantized
per token row at run time with their amax capped at 1200.

Backends:
- "torchao" (an H100/H200): torchao's `Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(),
  activation_value_ub=1200)` applied with `quantize_` and a filter selecting those layers — real FP8
  matmuls (`torch._scaled_mm`);
- "emulate" (anywhere): `herd.text.fp8.Fp8RowwiseLinear`, the same rounding and scales in fp32 matmuls;
- "auto": torchao on a CUDA device of compute capability ≥ 8.9 when torchao is installed, else emulate.

A quantized copy (`quantize_checkpoint`) is the source directory copied as is plus `fp8.json` (the
recipe and the layers) and `fp8_weights.safetensors` (the e4m3 weights and their fp32 row scales);
`herd.fast_decode.load_for_decoding` sees `fp8.json` and runs the model in FP8.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from herd.text.fp8 import ACTIVATION_AMAX_CAP, Fp8RowwiseLinear, emulate_fp8, fp8_layer_names, is_fp8_layer

FP8_CONFIG = "fp8.json"
FP8_WEIGHTS = "fp8_weights.safetensors"


def torchao_fp8_available(device: torch.device) -> bool:
    """torchao's FP8 matmuls need torchao and an NVIDIA GPU of compute capability ≥ 8.9 (Ada/Hopper)."""
    import importlib.util

    if device.type != "cuda" or importlib.util.find_spec("torchao") is None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _n_layers(model: nn.Module) -> int:
    args = getattr(model, "args", None) or getattr(getattr(model, "llm", None), "args", None)
    if args is None:
        raise ValueError(
            f"{type(model).__name__} has no `args` (nor an `llm` with them): which layers are first/last?"
        )
    return int(args.n_layers)


def apply_fp8(
    model: nn.Module, backend: str = "auto", activation_cap: float | None = ACTIVATION_AMAX_CAP
) -> list[str]:
    """Quantize the paper's FFN layers of `model` in place (`backend`: auto | torchao | emulate); returns
    the names of the quantized layers. `activation_cap=None` drops the 1200 cap (the ablation)."""
    n_layers = _n_layers(model)
    device = next(model.parameters()).device
    if backend == "auto":
        backend = "torchao" if torchao_fp8_available(device) else "emulate"
    if backend == "emulate":
        return emulate_fp8(model, n_layers, activation_cap)
    if backend != "torchao":
        raise ValueError(f"fp8 backend must be auto, torchao or emulate, not {backend!r}")
    if not torchao_fp8_available(device):
        raise RuntimeError(
            "the torchao FP8 backend needs torchao and a CUDA GPU of compute capability >= 8.9"
        )
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    names = fp8_layer_names(model, n_layers)
    config = Float8DynamicActivationFloat8WeightConfig(
        granularity=PerRow(), activation_value_ub=activation_cap
    )
    quantize_(
        model, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and is_fp8_layer(fqn, n_layers)
    )
    return names


def load_fp8_weights(model: nn.Module, root: str | Path) -> list[str]:
    """Swap the layers `fp8.json` lists for `Fp8RowwiseLinear`s holding the stored e4m3 weights/scales."""
    from safetensors.torch import load_file

    root = Path(root)
    config = json.loads((root / FP8_CONFIG).read_text())
    device = next(model.parameters()).device
    tensors = load_file(str(root / FP8_WEIGHTS), device=str(device))
    for name in config["layers"]:
        parent_name, _, child = name.rpartition(".")
        layer = Fp8RowwiseLinear(
            tensors[f"{name}.weight_fp8"], tensors[f"{name}.weight_scale"], config["activation_cap"]
        )
        setattr(model.get_submodule(parent_name), child, layer)
    return list(config["layers"])


def quantize_checkpoint(
    src: str | Path, dst: str | Path, activation_cap: float | None = ACTIVATION_AMAX_CAP
) -> dict[str, Any]:
    """Copy the text checkpoint `src` to `dst` with its FP8 weights and recipe (see the module doc).
    Returns the recipe written to fp8.json."""
    from safetensors.torch import save_file

    from herd.text.loading import load_model

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such checkpoint directory")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst}: exists and is not empty")
    model = load_model(src)
    names = emulate_fp8(model, _n_layers(model), activation_cap)
    tensors = {}
    for name in names:
        layer = model.get_submodule(name)
        tensors[f"{name}.weight_fp8"] = layer.weight_fp8.contiguous()
        tensors[f"{name}.weight_scale"] = layer.weight_scale.contiguous()
    shutil.copytree(src, dst, dirs_exist_ok=True)
    save_file(tensors, str(dst / FP8_WEIGHTS))
    recipe = {"format": "rowwise-e4m3", "activation_cap": activation_cap, "n_layers": _n_layers(model),
              "layers": names}  # fmt: skip
    (dst / FP8_CONFIG).write_text(json.dumps(recipe, indent=2) + "\n")
    return recipe


def is_fp8_checkpoint(path: str | Path) -> bool:
    return (Path(path) / FP8_CONFIG).is_file()


__all__ = [
    "apply_fp8",
    "is_fp8_checkpoint",
    "load_fp8_weights",
    "quantize_checkpoint",
    "torchao_fp8_available",
]
