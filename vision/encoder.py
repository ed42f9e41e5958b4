"""The image encoder (paper §7.2.1): ViT-H/14 on timm's ViT blocks, multi-layer features, gated layers.

Design (numerically equal to transformers' `MllamaVisionModel`, the released realisation of the paper's,
for the same weights — see `herd.adapters.hf_mllama`):

    pixels (B, M images, T tiles, 3, S, S)
      → 14×14 conv patches (no bias)                      (B·M·T, grid², D)
      → + pre-tile embedding (one vector per tile, by aspect ratio, tanh-gated)
      → class token prepended                             (B·M, T, N, D), N = grid² + 1
      → + gated positional embedding: (1 − tanh g)·pos + tanh g·tile_pos[aspect ratio]
      → layernorm_pre, padded to N' = ⌈N/8⌉·8 tokens per tile
      → local transformer (32 timm Blocks) over all T·N' tokens of an image; the hidden states
        entering layers `intermediate_layers` = 3, 7, 15, 23, 30 are kept (paper: the 4th, 8th, 16th,
        24th, 31st hidden states, the embeddings being the first; see `vision_args`)
      → layernorm_post, + post-tile embedding (gated)
      → global transformer: 8 timm Blocks whose LayerScale slots `ls1`/`ls2` hold `TanhGate`s,
        x + tanh(g_attn)·attn(norm1 x), x + tanh(g_ffn)·mlp(norm2 x)
      → padding removed; features = [global output, intermediates interleaved as Mllama stacks them]
                                                          (B, M, T, N, D·(k+1)) = (…, 1601, 7680)

Attention mask (Mllama's): a token is padding if its tile is masked out (`aspect_ratio_mask`) or it is
one of the N'−N pad tokens; only padding→padding pairs are masked, so real tokens also see pad keys.
Weights trained with this mask (Llama 3.2 Vision) expect it.

`load_vision_weights` fills the local transformer from an open_clip or timm ViT checkpoint (e.g.
MetaCLIP ViT-H-14 `open_clip_pytorch_model.bin`); it is a function, the module does no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from os import PathLike
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:
    from timm.layers import Mlp, QuickGELU, build_sincos2d_pos_embed, resample_abs_pos_embed
    from timm.models.vision_transformer import Block
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("herd.vision.encoder builds on timm's ViT blocks: pip install timm") from e

from herd.vision.vision_args import VisionArgs

_LN_EPS = 1e-5  # layernorm_pre / layernorm_post (nn.LayerNorm's default, as Mllama)


class TanhGate(nn.Module):
    """x · tanh(g) with one learned scalar g; stands in timm's LayerScale slots (`ls1`, `ls2`)."""

    def __init__(self, init: float = 0.0) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.full((1,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate.tanh()


class TilePositionEmbedding(nn.Module):
    """One learned vector per (aspect ratio, tile), added to every token of the tile, tanh-gated."""

    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.max_num_tiles, self.dim = args.max_num_tiles, args.dim
        self.embedding = nn.Embedding(args.max_aspect_ratio_id + 1, args.max_num_tiles * args.dim)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        # x: (B·M, T, n, D); aspect_ratio_ids: (B·M,)
        emb = self.embedding(aspect_ratio_ids).reshape(-1, self.max_num_tiles, 1, self.dim)
        return x + emb * self.gate.tanh()


class GatedPositionalEmbedding(nn.Module):
    """(1 − tanh g)·pos + tanh g·tile_pos[aspect ratio]: per-token positions blend into per-tile ones."""

    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.max_num_tiles, self.num_patches, self.dim = args.max_num_tiles, args.num_patches, args.dim
        self.gate = nn.Parameter(torch.zeros(1))
        if args.positional_init == "sincos":  # class token at row 0 gets no position (zeros)
            table = build_sincos2d_pos_embed([args.grid, args.grid], args.dim)  # (grid², D), row-major
            self.embedding = nn.Parameter(torch.cat([torch.zeros(1, args.dim), table]))  # (N, D)
        else:
            self.embedding = nn.Parameter(torch.randn(args.num_patches, args.dim) * args.dim**-0.5)  # (N, D)
        self.tile_embedding = nn.Embedding(
            args.max_aspect_ratio_id + 1, args.max_num_tiles * args.num_patches * args.dim
        )

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        # x: (B·M, T, N, D); aspect_ratio_ids: (B·M,)
        x = x + ((1 - self.gate.tanh()) * self.embedding).view(1, 1, self.num_patches, self.dim)
        tile = self.tile_embedding(aspect_ratio_ids)
        tile = tile.reshape(x.shape[0], self.max_num_tiles, self.num_patches, self.dim)
        return x + self.gate.tanh() * tile


def _mlp_layer(args: VisionArgs):
    """timm's Mlp with biases and the exact hidden width (timm's Block ties the MLP bias to proj_bias)."""

    def make(**kwargs: Any) -> Mlp:
        kwargs.update(hidden_features=args.mlp_dim, bias=True)
        return Mlp(**kwargs)

    return make


def vit_block(args: VisionArgs, gated: bool = False) -> Block:
    """One timm ViT Block; `gated` puts TanhGates (init π/4, Meta's) where LayerScale would be."""
    block = Block(
        dim=args.dim,
        num_heads=args.n_heads,
        mlp_ratio=args.mlp_dim / args.dim,
        qkv_bias=args.attn_bias,
        proj_bias=args.attn_bias,  # attention output projection; the MLP keeps its biases (_mlp_layer)
        act_layer=QuickGELU if args.act == "quick_gelu" else nn.GELU,
        norm_layer=partial(nn.LayerNorm, eps=args.norm_eps),
        mlp_layer=_mlp_layer(args),
    )
    if gated:
        block.ls1 = TanhGate(math.pi / 4)
        block.ls2 = TanhGate(math.pi / 4)
    return block


class VisionEncoder(nn.Module):
    """Tiled ViT with multi-layer features; `forward` returns (B, M, T, N, D·(k+1)) features."""

    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.args = args
        self.num_patches = args.num_patches  # tokens per tile the features carry (class token included)
        self.output_dim = args.output_dim
        d = args.dim
        self.patch_embedding = nn.Conv2d(
            args.num_channels, d, kernel_size=args.patch_size, stride=args.patch_size, bias=False
        )
        self.class_embedding = nn.Parameter(torch.randn(d) * d**-0.5)
        self.gated_positional_embedding = GatedPositionalEmbedding(args)
        self.pre_tile_positional_embedding = TilePositionEmbedding(args)
        self.post_tile_positional_embedding = TilePositionEmbedding(args)
        self.layernorm_pre = nn.LayerNorm(d, eps=_LN_EPS)
        self.transformer = nn.ModuleList([vit_block(args) for _ in range(args.n_layers)])
        self.layernorm_post = nn.LayerNorm(d, eps=_LN_EPS)
        self.global_transformer = nn.ModuleList(
            [vit_block(args, gated=True) for _ in range(args.n_global_layers)]
        )
        with torch.no_grad():  # new embeddings start small (Meta: randn / √width); their gates start at 0
            for emb in (self.pre_tile_positional_embedding, self.post_tile_positional_embedding):
                emb.embedding.weight.normal_(std=d**-0.5)
            self.gated_positional_embedding.tile_embedding.weight.normal_(std=d**-0.5)

    def aspect_ratio_mask(self, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """(B, M) ids → (B, M, T) mask of the tiles each arrangement uses (id 0, no image: first tile)."""
        tiles = [1] + [r * c for r, c in self.args.aspect_ratios or []]
        n = torch.tensor(tiles, device=aspect_ratio_ids.device)[aspect_ratio_ids]  # (B, M)
        return torch.arange(self.args.max_num_tiles, device=n.device) < n[..., None]

    def embed(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """(B, M, T, C, S, S) pixels → (B·M, T, N, D) tokens after layernorm_pre (before padding)."""
        B, M, T, C, H, W = pixel_values.shape
        a = self.args
        if pixel_values.shape[2] != a.max_num_tiles or pixel_values.shape[-2:] != (
            a.image_size,
            a.image_size,
        ):
            raise ValueError(
                f"pixel_values (B, M, T, C, H, W) = {tuple(pixel_values.shape)}: the encoder takes "
                f"T = max_num_tiles = {a.max_num_tiles} tiles (pad with zeros) of {a.image_size}×{a.image_size}"
            )
        ar = aspect_ratio_ids.reshape(B * M)
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.reshape(B * M * T, C, H, W).to(w.device, w.dtype))
        x = x.flatten(2).transpose(1, 2)  # (B·M·T, grid², D)
        x = self.pre_tile_positional_embedding(x.reshape(B * M, T, -1, a.dim), ar)
        x = x.reshape(B * M * T, -1, a.dim)
        cls = self.class_embedding.expand(B * M * T, 1, a.dim)
        x = torch.cat([cls, x], dim=1)  # (B·M·T, N, D)
        x = self.gated_positional_embedding(x.reshape(B * M, T, self.num_patches, a.dim), ar)
        return self.layernorm_pre(x)  # (B·M, T, N, D)

    def attention_mask(self, aspect_ratio_mask: torch.Tensor) -> torch.Tensor:
        """(B·M, T) tile mask → bool (B·M, 1, T·N', T·N'), True = may attend (Mllama's pad-pad mask)."""
        n, n_pad = self.num_patches, self.args.padded_patches
        valid = aspect_ratio_mask.bool()[:, :, None].expand(-1, -1, n_pad).clone()  # (B·M, T, N')
        valid[:, :, n:] = False
        pad = ~valid.flatten(1)  # (B·M, T·N')
        return ~(pad[:, :, None] & pad[:, None, :])[:, None]

    def forward(
        self,
        pixel_values: torch.Tensor,  # (B, M, T, C, S, S)
        aspect_ratio_ids: torch.Tensor,  # (B, M) int, 1-based index into args.aspect_ratios, 0 = none
        aspect_ratio_mask: torch.Tensor | None = None,  # (B, M, T), 1 = real tile; None → from the ids
    ) -> torch.Tensor:
        B, M, T = pixel_values.shape[:3]
        if aspect_ratio_mask is None:
            aspect_ratio_mask = self.aspect_ratio_mask(aspect_ratio_ids)
        n, n_pad, d = self.num_patches, self.args.padded_patches, self.args.dim
        ar = aspect_ratio_ids.reshape(B * M)
        x = self.embed(pixel_values, aspect_ratio_ids)
        x = F.pad(x, (0, 0, 0, n_pad - n)).reshape(B * M, T * n_pad, d)  # (B·M, T·N', D)
        mask = self.attention_mask(aspect_ratio_mask.reshape(B * M, T).to(x.device))
        keep = set(self.args.intermediate_layers)
        kept: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.transformer):
            if i in keep:
                kept[i] = x  # the hidden state entering layer i (Meta's `return_intermediate`)
            x = block(x, attn_mask=mask)
        kept[len(self.transformer)] = x
        x = self.layernorm_post(x)
        x = self.post_tile_positional_embedding(x.reshape(B * M, T, n_pad, d), ar).reshape(
            B * M, T * n_pad, d
        )
        for block in self.global_transformer:
            x = block(x, attn_mask=mask)
        x = x.reshape(B * M, T, n_pad, d)[:, :, :n]  # (B·M, T, N, D)
        # Mllama stacks the intermediates on a last axis: feature d·k + j is layer j's channel d
        inter = torch.stack([kept[i] for i in self.args.intermediate_layers], dim=-1)  # (B·M, T·N', D, k)
        inter = inter.reshape(B * M, T, n_pad, -1)[:, :, :n]  # (B·M, T, N, D·k)
        return torch.cat([x, inter], dim=-1).reshape(B, M, T, n, -1)  # (B, M, T, N, D·(k+1))


# --- loading an open_clip / timm ViT trunk ------------------------------------------------------------
@dataclass
class VisionLoadReport:
    loaded: list[str] = field(default_factory=list)  # encoder tensors filled from the checkpoint
    untouched: list[str] = field(default_factory=list)  # encoder tensors the checkpoint has no match for
    ignored: list[str] = field(default_factory=list)  # checkpoint keys not used (text tower, heads, ...)
    resampled_grid: tuple[int, int] | None = None  # (checkpoint grid, encoder grid) of the positions


# open_clip's native VisionTransformer names → timm's (applied after the "visual." prefix is removed)
_OPEN_CLIP_TOP = {
    "conv1.weight": "patch_embed.proj.weight",
    "class_embedding": "cls_token",
    "positional_embedding": "pos_embed",
    "ln_pre.weight": "norm_pre.weight",
    "ln_pre.bias": "norm_pre.bias",
    "ln_post.weight": "norm.weight",
    "ln_post.bias": "norm.bias",
}
_OPEN_CLIP_BLOCK = {
    "ln_1.": "norm1.",
    "ln_2.": "norm2.",
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.": "attn.proj.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
    "ls_1.": "ls1.",
    "ls_2.": "ls2.",
}


def read_state_dict(path: str | PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a `.safetensors` or torch pickle file (`{"state_dict": ...}` wrappers unwrapped)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such checkpoint file")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(file))
        else:
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{file}: could not be read as a checkpoint ({type(e).__name__}: {e})") from e
    while isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        # training checkpoints wrap the weights: {"epoch": ..., "state_dict": {...}, "optimizer": ...}
        inner = next(
            (obj[k] for k in ("state_dict", "model", "module") if isinstance(obj.get(k), dict)), None
        )
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{file}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def timm_vit_state_dict(sd: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The image trunk of an open_clip (native or timm-trunk) or timm ViT state dict, in timm's names."""
    if any(k.startswith("visual.trunk.") for k in sd):
        return {k.removeprefix("visual.trunk."): v for k, v in sd.items() if k.startswith("visual.trunk.")}
    if any(k.startswith("visual.transformer.resblocks.") for k in sd):
        out: dict[str, torch.Tensor] = {}
        for key, v in sd.items():
            if not key.startswith("visual."):
                continue  # text tower, logit scale
            k = key.removeprefix("visual.")
            if k in _OPEN_CLIP_TOP:
                k = _OPEN_CLIP_TOP[k]
            elif k.startswith("transformer.resblocks."):
                _, _, i, rest = k.split(".", 3)
                for old, new in _OPEN_CLIP_BLOCK.items():
                    if rest.startswith(old):
                        rest = new + rest[len(old) :]
                        break
                k = f"blocks.{i}.{rest}"
            out[k] = v
        return out
    if any(k.startswith("blocks.") for k in sd):
        return dict(sd)
    raise ValueError(
        f"{source}: neither an open_clip nor a timm ViT checkpoint (no visual.* or blocks.* keys)"
    )


def load_vision_weights(encoder: VisionEncoder, path: str | PathLike) -> VisionLoadReport:
    """Fill `encoder`'s patch/class/position embeddings, layernorm_pre/post and local transformer from an
    open_clip or timm ViT checkpoint (LayerScale folded into the projections, positions resampled to the
    encoder's grid). The gated layers, tile embeddings and gates keep their initialisation."""
    source = str(path)
    t = timm_vit_state_dict(read_state_dict(path), source)
    report = VisionLoadReport()
    out: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    n_blocks = 1 + max((int(k.split(".")[1]) for k in t if k.startswith("blocks.")), default=-1)
    if n_blocks != encoder.args.n_layers:
        raise ValueError(
            f"{source}: {n_blocks} transformer blocks, the encoder's local transformer has {encoder.args.n_layers}"
        )
    for k, v in t.items():
        if k == "patch_embed.proj.weight":
            out["patch_embedding.weight"] = v
        elif k == "patch_embed.proj.bias":
            if v.abs().max() > 0:
                raise ValueError(
                    f"{source}: the patch embedding has a bias; the encoder's (Mllama's) has none"
                )
            report.ignored.append(k)
        elif k == "cls_token":
            out["class_embedding"] = v.reshape(-1)
        elif k == "pos_embed":
            pos = v.reshape(1, -1, v.shape[-1])
            if pos.shape[1] != encoder.num_patches:
                old = math.isqrt(pos.shape[1] - 1)
                pos = resample_abs_pos_embed(pos.float(), [encoder.args.grid] * 2, num_prefix_tokens=1)
                report.resampled_grid = (old, encoder.args.grid)
            out["gated_positional_embedding.embedding"] = pos[0].to(v.dtype)
        elif k.startswith("norm_pre."):
            out["layernorm_pre." + k.removeprefix("norm_pre.")] = v
        elif k.startswith("norm."):  # the final norm (open_clip's ln_post) before the global layers
            out["layernorm_post." + k.removeprefix("norm.")] = v
        elif k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            if rest in ("ls1.gamma", "ls2.gamma"):
                scales[f"transformer.{i}.{'attn.proj' if rest == 'ls1.gamma' else 'mlp.fc2'}"] = v
            else:
                out[f"transformer.{i}.{rest}"] = v
        else:
            report.ignored.append(k)
    for prefix, gamma in scales.items():  # LayerScale: γ·(W x + b) = (γ W) x + γ b
        out[f"{prefix}.weight"] = out[f"{prefix}.weight"] * gamma[:, None]
        if f"{prefix}.bias" in out:
            out[f"{prefix}.bias"] = out[f"{prefix}.bias"] * gamma
    own = encoder.state_dict()
    unknown = sorted(set(out) - set(own))
    if unknown:
        hint = (
            " (build the encoder with VisionArgs(attn_bias=True))"
            if any(".bias" in k for k in unknown)
            else ""
        )
        raise ValueError(f"{source}: tensors the encoder has no place for: {', '.join(unknown[:6])}{hint}")
    lacking = sorted(k for k in own if k.startswith("transformer.") and k not in out)
    if lacking:
        hint = (
            " (build the encoder with VisionArgs(attn_bias=False))"
            if any(".bias" in k for k in lacking)
            else ""
        )
        raise ValueError(f"{source}: the checkpoint lacks {', '.join(lacking[:6])}{hint}")
    for k, v in out.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(
                f"{source}: {k} has shape {tuple(v.shape)}, the encoder's is {tuple(own[k].shape)}"
            )
    encoder.load_state_dict(out, strict=False)
    report.loaded = sorted(out)
    report.untouched = sorted(set(own) - set(out))
    return report


__all__ = [
    "GatedPositionalEmbedding",
    "TanhGate",
    "TilePositionEmbedding",
    "VisionEncoder",
    "VisionLoadReport",
    "load_vision_weights",
    "read_state_dict",
    "timm_vit_state_dict",
    "vit_block",
]
