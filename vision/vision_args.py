"""Architecture arguments of the image encoder (paper §7.2.1) and its named presets.

The encoder is the ViT-H/14 of the paper with the Llama 3.2 Vision design around it: images are cut
into up to `max_num_tiles` square tiles of `image_size` pixels; each tile is a `grid × grid` patch
sequence plus a class token; a 32-layer *local* transformer runs over the tiles of one image jointly,
the outputs of some of its layers are kept, and 8 *gated* self-attention layers (the *global*
transformer) follow. The feature of one patch is the global output concatenated with the kept local
outputs: `dim × (len(intermediate_layers) + 1)` = 1280 × 6 = 7680 for ViT-H.

Intermediate index i is the hidden state *entering* local layer i (after i layers; 0 = the embeddings,
n_layers = the last local output): Meta's reference (`return_intermediate`) and transformers ≤ 4.53
read `intermediate_layers_indices = [3, 7, 15, 23, 30]` this way, which is the paper's "4th, 8th, 16th,
24th and 31st" hidden states counting the embeddings as the first, and how Llama 3.2 Vision was trained.
transformers ≥ 4.57 (checked: 4.57.1, 5.23.0) take the *output* of layer i instead, one layer later;
`from_hf_config(..., transformers_layer_outputs=True)` reproduces that.

Shape legend: T tiles, N tokens per tile (grid² patches + 1 class token), D width.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


def supported_aspect_ratios(max_num_tiles: int) -> list[tuple[int, int]]:
    """Every (rows, cols) tile arrangement with rows·cols ≤ max_num_tiles, in Mllama's order.

    Aspect-ratio id k (1-based; 0 means "no image") is arrangement k-1 of this list; the encoder only
    needs rows·cols (how many tiles are real) and the id (which tile embeddings to add).
    """
    n = max_num_tiles
    return [(r, c) for r in range(1, n + 1) for c in range(1, n + 1) if r * c <= n]


@dataclass
class VisionArgs:
    dim: int = 1280
    n_layers: int = 32  # local transformer
    n_global_layers: int = 8  # gated self-attention layers on top (paper: 8, 40 blocks in all)
    n_heads: int = 16
    mlp_dim: int = 5120
    patch_size: int = 14
    image_size: int = 560  # pixels per tile side
    max_num_tiles: int = 4
    # hidden states entering these local layers are concatenated to the final output (see above)
    intermediate_layers: tuple[int, ...] = (3, 7, 15, 23, 30)
    norm_eps: float = 1e-5
    act: str = "gelu"  # "gelu" (Mllama) or "quick_gelu" (OpenAI/MetaCLIP ViT-H-14-quickgelu)
    # Bias on the attention q/k/v and output projections: Mllama has none; open_clip/timm CLIP ViTs do.
    attn_bias: bool = False
    num_channels: int = 3
    # (rows, cols) tile arrangements; None → every arrangement of up to max_num_tiles tiles
    aspect_ratios: list[tuple[int, int]] | None = field(default=None)
    # How a randomly initialised encoder starts its per-patch positional embedding: "random" (Meta's
    # randn/√D; a pretrained checkpoint replaces it anyway) or "sincos", the fixed 2D sine-cosine table
    # (MAE, timm) so that where a patch is is readable from step 0 (docs/vision.md: the quickstart's
    # position questions otherwise need a fast-moving embedding that costs colour and shape accuracy).
    positional_init: str = "random"

    def __post_init__(self) -> None:
        self.intermediate_layers = tuple(int(i) for i in self.intermediate_layers)
        if self.aspect_ratios is None:
            self.aspect_ratios = supported_aspect_ratios(self.max_num_tiles)
        self.aspect_ratios = [(int(w), int(h)) for w, h in self.aspect_ratios]
        if self.dim % self.n_heads:
            raise ValueError(f"vision dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        bad = [i for i in self.intermediate_layers if not 0 <= i <= self.n_layers]
        if bad:
            raise ValueError(
                f"intermediate_layers {bad} outside 0..{self.n_layers} (hidden states of the local layers)"
            )
        if self.act not in ("gelu", "quick_gelu"):
            raise ValueError(f"act must be 'gelu' or 'quick_gelu', not {self.act!r}")
        if self.positional_init not in ("random", "sincos"):
            raise ValueError(f"positional_init must be 'random' or 'sincos', not {self.positional_init!r}")
        if self.positional_init == "sincos" and self.dim % 4:
            raise ValueError(
                f"positional_init 'sincos' needs dim divisible by 4 (2 axes × sin/cos), got {self.dim}"
            )
        too_big = [r for r in self.aspect_ratios if r[0] * r[1] > self.max_num_tiles]
        if too_big:
            raise ValueError(
                f"aspect ratios {too_big} need more than max_num_tiles={self.max_num_tiles} tiles"
            )

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Tokens per tile: grid² patches + the class token (1601 for 560-px tiles of 14-px patches)."""
        return self.grid**2 + 1

    @property
    def padded_patches(self) -> int:
        """Tokens per tile after padding to a multiple of 8 (Mllama pads before the transformers)."""
        return math.ceil(self.num_patches / 8) * 8

    @property
    def output_dim(self) -> int:
        """Feature width per token: the final output and each intermediate layer's (7680 for ViT-H)."""
        return self.dim * (len(self.intermediate_layers) + 1)

    @property
    def max_aspect_ratio_id(self) -> int:
        return len(self.aspect_ratios)

    def num_params(self) -> int:
        """Exact parameter count of `VisionEncoder(self)`."""
        d, n, t, r = self.dim, self.num_patches, self.max_num_tiles, self.max_aspect_ratio_id + 1
        bias = 4 * d if self.attn_bias else 0
        block = 4 * d * d + bias + 2 * d * self.mlp_dim + self.mlp_dim + d + 4 * d
        embeddings = self.num_channels * self.patch_size**2 * d + d + (n * d + 1 + r * t * n * d)
        tiles = 2 * (r * t * d + 1)
        norms = 4 * d
        return self.n_layers * block + self.n_global_layers * (block + 2) + embeddings + tiles + norms

    # --- transformers MllamaVisionConfig ---------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: dict[str, Any], transformers_layer_outputs: bool = False) -> VisionArgs:
        """Args of a transformers `MllamaVisionConfig` dict (the `vision_config` of an Mllama config.json).

        `transformers_layer_outputs`: read `intermediate_layers_indices` as transformers ≥ 4.57 does (the
        output of layer i, i.e. index i + 1 here) instead of as Meta's reference does.
        """
        shift = 1 if transformers_layer_outputs else 0
        image_size = config.get("image_size", 448)
        patch_size = config.get("patch_size", 14)
        image_size = image_size[0] if isinstance(image_size, list | tuple) else image_size
        patch_size = patch_size[0] if isinstance(patch_size, list | tuple) else patch_size
        act = config.get("hidden_act", "gelu")
        if act not in ("gelu", "quick_gelu"):
            raise NotImplementedError(f"vision hidden_act {act!r} is not supported (gelu or quick_gelu)")
        args = cls(
            dim=int(config.get("hidden_size", 1280)),
            n_layers=int(config.get("num_hidden_layers", 32)),
            n_global_layers=int(config.get("num_global_layers", 8)),
            n_heads=int(config.get("attention_heads", config.get("num_attention_heads", 16))),
            mlp_dim=int(config.get("intermediate_size", 5120)),
            patch_size=int(patch_size),
            image_size=int(image_size),
            max_num_tiles=int(config.get("max_num_tiles", 4)),
            intermediate_layers=tuple(
                i + shift for i in config.get("intermediate_layers_indices") or (3, 7, 15, 23, 30)
            ),
            norm_eps=float(config.get("norm_eps", 1e-5)),
            act=act,
            num_channels=int(config.get("num_channels", 3)),
            aspect_ratios=[tuple(r) for r in config["supported_aspect_ratios"]]
            if config.get("supported_aspect_ratios")
            else None,
        )
        out = config.get("vision_output_dim")
        if out is not None and int(out) != args.output_dim:
            raise ValueError(
                f"vision_output_dim {out} != hidden_size × (len(intermediate_layers_indices) + 1) = {args.output_dim}"
            )
        return args

    def to_hf_config(self) -> dict[str, Any]:
        """A `MllamaVisionConfig` dict (intermediate indices in Meta's reading, as `from_hf_config`)."""
        return {
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_global_layers": self.n_global_layers,
            "attention_heads": self.n_heads,
            "intermediate_size": self.mlp_dim,
            "patch_size": self.patch_size,
            "image_size": self.image_size,
            "max_num_tiles": self.max_num_tiles,
            "intermediate_layers_indices": list(self.intermediate_layers),
            "norm_eps": self.norm_eps,
            "hidden_act": self.act,
            "num_channels": self.num_channels,
            "vision_output_dim": self.output_dim,
            "supported_aspect_ratios": [list(r) for r in self.aspect_ratios or []],
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_PRESETS: dict[str, Any] = {
    # Llama 3.2 Vision's encoder (the released realisation of the paper's): 560-px tiles, up to 4 of them.
    "vit_h14": lambda: VisionArgs(),
    # The paper's tiling: 336-px tiles (4 × 336² canvases such as 672×672 or 1344×336).
    "vit_h14_336": lambda: VisionArgs(image_size=336),
    # The MetaCLIP ViT-H-14 trunk as open_clip ships it (attention biases, QuickGELU) at 224 px, 1 tile:
    # `load_vision_weights` fills its local transformer from `open_clip_pytorch_model.bin`.
    "vit_h14_metaclip": lambda: VisionArgs(image_size=224, max_num_tiles=1, act="quick_gelu", attn_bias=True),
    # Small enough for CPU tests: 4 local + 2 gated layers, 4×4 patches per 56-px tile; features after
    # local layers 1 and 3 join the final output.
    "tiny": lambda: VisionArgs(
        dim=64,
        n_layers=4,
        n_global_layers=2,
        n_heads=4,
        mlp_dim=128,
        patch_size=14,
        image_size=56,
        max_num_tiles=4,
        intermediate_layers=(1, 3),
    ),
}

VISION_PRESET_NAMES: tuple[str, ...] = tuple(_PRESETS)


def get_vision_preset(name: str, **overrides: Any) -> VisionArgs:
    """A named encoder architecture, optionally with fields replaced (`get_vision_preset("tiny", dim=32)`)."""
    if name not in _PRESETS:
        raise KeyError(f"unknown vision preset {name!r}; known presets: {', '.join(VISION_PRESET_NAMES)}")
    args = _PRESETS[name]()
    if "max_num_tiles" in overrides and "aspect_ratios" not in overrides:
        overrides["aspect_ratios"] = None  # recomputed for the new tile count
    return dataclasses.replace(args, **overrides) if overrides else args


__all__ = ["VISION_PRESET_NAMES", "VisionArgs", "get_vision_preset", "supported_aspect_ratios"]
