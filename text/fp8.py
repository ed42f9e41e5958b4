"""Row-wise FP8 inference numerics (paper §6.2), as an exact emulation that runs anywhere.

The paper quantizes the feed-forward weights and activations of the Transformer layers to FP8 (e4m3)
with row-wise scales: one scale per output row of a weight, one per token row of an activation. The
attention layers stay in bf16, and so do the first and the last Transformer layer. Activation scales
are dynamic (computed per row at run time); their input, the row's absolute maximum, is capped at
1200 so that a few outlier tokens cannot blow a row's scale up and flush its other values to zero.

On a Hopper GPU the same recipe runs through torchao's float8 kernels (`herd.quantize.apply_fp8`);
`Fp8RowwiseLinear` reproduces its numerics without FP8 matmuls: quantize → dequantize with the same
scales and e4m3 rounding (`torch.float8_e4m3fn` casts), then a high-precision matmul. It is what CPU
tests and the reward-shift benchmark run, and what a GPU test compares torchao against.

    scale_row = min(amax_row, cap) / 448        (448: the largest e4m3 value; cap only for activations)
    q_row     = e4m3(clamp(x_row / scale_row, -448, 448))
    y         = (q_x · scale_x) @ (q_w · scale_w)ᵀ
"""

from __future__ import annotations

import re

import torch
from torch import nn

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
ACTIVATION_AMAX_CAP = 1200.0  # the paper's upper bound on the dynamic scale's input
_EPS = 1e-12  # an all-zero row gets a tiny scale instead of a division by zero
_FFN = re.compile(r"(?:^|\.)layers\.(\d+)\.feed_forward\.(w1|w2|w3)$")


def quantize_rowwise(x: torch.Tensor, cap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) → (e4m3 values (..., K), fp32 scales (..., 1)); a row's amax is clamped to `cap`
    (values beyond cap·... saturate at ±448 after scaling)."""
    # amax and scale in x's dtype, then fp32, as torchao's `_choose_scale_float8` (bf16 scales round)
    amax = x.detach().abs().amax(dim=-1, keepdim=True)  # (..., 1)
    if cap is not None:
        amax = amax.clamp(max=cap)
    scale = (amax / E4M3_MAX).float().clamp(min=_EPS)
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 values and their row scales → fp32."""
    return q.float() * scale


def fake_quantize_rowwise(x: torch.Tensor, cap: float | None = None) -> torch.Tensor:
    """x rounded through row-wise e4m3 and back, in fp32 (what an FP8 matmul's operand holds)."""
    return dequantize(*quantize_rowwise(x, cap))


class Fp8RowwiseLinear(nn.Module):
    """A bias-free linear layer with e4m3 weights (one scale per output row) and dynamically quantized
    activations (one scale per token row, amax capped at `activation_cap`). Output in the input's dtype."""

    def __init__(
        self, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, activation_cap: float | None
    ) -> None:
        super().__init__()
        self.register_buffer("weight_fp8", weight_fp8)  # (out, in) float8_e4m3fn
        self.register_buffer("weight_scale", weight_scale)  # (out, 1) fp32
        self.activation_cap = activation_cap
        self.in_features, self.out_features = weight_fp8.shape[1], weight_fp8.shape[0]

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, activation_cap: float | None = ACTIVATION_AMAX_CAP
    ) -> Fp8RowwiseLinear:
        if linear.bias is not None:
            raise ValueError("row-wise FP8 here covers bias-free linear layers (Llama's FFN)")
        q, scale = quantize_rowwise(linear.weight.detach())
        return cls(q, scale, activation_cap)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self.weight_fp8, self.weight_scale)  # (out, in) fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) → (..., out); fp32 accumulation as the FP8 tensor cores' scaled matmul
        xq = fake_quantize_rowwise(x, self.activation_cap)
        return (xq @ self.dequantized_weight().t()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, activation_cap={self.activation_cap}"


def fp8_layer_index(fqn: str) -> int | None:
    """The Transformer layer of a feed-forward projection's name (…layers.N.feed_forward.w1|w2|w3), else None."""
    m = _FFN.search(fqn)
    return int(m.group(1)) if m else None


def is_fp8_layer(fqn: str, n_layers: int) -> bool:
    """The paper's selection: feed-forward projections of the LLM's Transformer layers, not of the first
    or the last one; attention, embeddings, the head and adapter layers stay in high precision."""
    layer = fp8_layer_index(fqn)
    if layer is None or fqn.split(".layers.")[0].endswith(("cross_attention", "video")):
        return False
    return 0 < layer < n_layers - 1


def fp8_layer_names(model: nn.Module, n_layers: int) -> list[str]:
    """Names of the linear layers `is_fp8_layer` selects, in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and is_fp8_layer(n, n_layers)]


def emulate_fp8(
    model: nn.Module, n_layers: int, activation_cap: float | None = ACTIVATION_AMAX_CAP
) -> list[str]:
    """Swap the selected linear layers for `Fp8RowwiseLinear` in place; returns their names."""
    names = fp8_layer_names(model, n_layers)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Fp8RowwiseLinear.from_linear(getattr(parent, child), activation_cap))
    return names


__all__ = [
    "ACTIVATION_AMAX_CAP",
    "E4M3_MAX",
    "Fp8RowwiseLinear",
    "dequantize",
    "emulate_fp8",
    "fake_quantize_rowwise",
    "fp8_layer_names",
    "is_fp8_layer",
    "quantize_rowwise",
]
