"""`herd quantize fp8 SRC DST`: a copy of a text checkpoint with row-wise FP8 feed-forward layers.

    herd quantize fp8 runs/x/model runs/x/model-fp8            # the paper's recipe (amax cap 1200)
    herd generate --model runs/x/model-fp8 --prompt "Hi"       # decodes in FP8 (torchao on H100/H200)

Python: `herd.quantize.quantize_checkpoint`, `herd.quantize.apply_fp8`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from herd.commands.registry import add_command, add_group


def cmd_fp8(args: argparse.Namespace) -> int:
    """`herd.quantize.quantize_checkpoint`; prints the recipe (cap, layer count) as JSON."""
    from herd.quantize import quantize_checkpoint

    recipe = quantize_checkpoint(args.src, args.dst, activation_cap=None if args.no_cap else args.cap)
    print(json.dumps({"dst": args.dst, "activation_cap": recipe["activation_cap"],
                      "fp8_layers": len(recipe["layers"]), "n_layers": recipe["n_layers"]}))  # fmt: skip
    return 0


def register(sub: Any) -> None:
    """Add the `quantize` family to the top-level subparsers."""
    group = add_group(sub, "quantize", "quantized copies of checkpoints for inference")
    p = add_command(group, "fp8", cmd_fp8, help="row-wise FP8 e4m3 FFN layers (paper §6.2), a saved copy")
    p.add_argument("src", help="text checkpoint directory (Meta or Hugging Face layout)")
    p.add_argument("dst", help="new directory: a copy of SRC plus fp8.json and fp8_weights.safetensors")
    p.add_argument(
        "--cap", type=float, default=1200.0, help="upper bound of the activation amax (paper: 1200)"
    )
    p.add_argument("--no-cap", action="store_true", help="no upper bound (the ablation)")
