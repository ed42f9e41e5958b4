"""Row-wise FP8 emulation (herd.text.fp8) against a brute-force e4m3 reference: rounding to the nearest
representable value, per-row scales, the 1200 activation cap, and the paper's layer selection."""

from __future__ import annotations

import pytest
import torch

from herd.text import build_llama, get_preset
from herd.text.fp8 import (
    E4M3_MAX,
    Fp8RowwiseLinear,
    fake_quantize_rowwise,
    fp8_layer_names,
    is_fp8_layer,
    quantize_rowwise,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def e4m3_grid() -> torch.Tensor:
    """Every finite e4m3 value, from its 256 bit patterns (independent of any rounding code)."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return values[torch.isfinite(values)].unique()  # (253,) incl. ±448 and 0


def brute_force_fake_quant(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Row scale min(amax, cap)/448; each scaled value → the nearest grid point (ties: either); × scale."""
    amax = x.abs().amax(-1, keepdim=True)
    if cap is not None:
        amax = amax.clamp(max=cap)
    scale = amax / 448.0
    scaled = (x / scale).clamp(-448.0, 448.0)
    grid = e4m3_grid()
    dist = (scaled[..., None] - grid).abs()  # (..., K, G)
    nearest = grid[dist.argmin(-1)]
    # a tie (exactly halfway) may round either way: accept the cast's choice when it is equally near
    ties = (dist.min(-1).values - (scaled - fake_quantize_rowwise(x, cap) / scale).abs()).abs() < 1e-6
    return torch.where(ties, fake_quantize_rowwise(x, cap), nearest * scale)


def test_rowwise_rounding_matches_the_brute_force_grid():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, generator=g) * torch.tensor([1e-3, 0.1, 1.0, 30.0, 500.0, 2000.0])[:, None]
    q, scale = quantize_rowwise(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (6, 1)
    torch.testing.assert_close(fake_quantize_rowwise(x), brute_force_fake_quant(x, None), rtol=0, atol=0)
    # the row maximum is represented exactly (it maps to ±448); the rest within e4m3's 2^-4 relative step
    deq = fake_quantize_rowwise(x)
    rows = torch.arange(6)
    top = x.abs().argmax(-1)
    torch.testing.assert_close(deq[rows, top], x[rows, top], rtol=1e-6, atol=0)
    normal = x.abs() / scale >= 2**-6  # e4m3's smallest normal
    assert ((deq - x).abs() <= x.abs() * 2**-4 + 1e-12)[normal].all()


def test_the_cap_bounds_the_scale_and_saturates_outliers():
    x = torch.tensor([[5000.0, 1.3, -0.7, 0.01, 2.2], [3.0, -1.0, 0.5, 0.25, 0.1]])
    capped, uncapped = fake_quantize_rowwise(x, 1200.0), fake_quantize_rowwise(x, None)
    assert (
        capped[0, 0].item() == 1200.0 and uncapped[0, 0].item() == 5000.0
    )  # the outlier saturates at the cap
    assert abs(uncapped[0, 3].item()) == 0.0  # uncapped: 0.01 falls below the scale's grid, flushed
    assert abs(capped[0, 3].item() - 0.01) < 0.01 * 2**-3  # capped: finer grid keeps it
    assert torch.equal(capped[1], uncapped[1])  # a row under the cap is unchanged by it
    torch.testing.assert_close(capped, brute_force_fake_quant(x, 1200.0), rtol=0, atol=0)
    assert _scale(x, 1200.0)[0].item() == pytest.approx(1200.0 / E4M3_MAX)


def _scale(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return quantize_rowwise(x, cap)[1]


def test_fp8_linear_equals_the_direct_computation():
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(32, 24, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, 32, generator=g))
    x = torch.randn(2, 5, 32, generator=g) * 50.0
    x[0, 0, 0] = 4000.0  # one outlier token: its row is capped
    fp8 = Fp8RowwiseLinear.from_linear(lin)
    ref = brute_force_fake_quant(x, 1200.0) @ brute_force_fake_quant(lin.weight.detach(), None).t()
    torch.testing.assert_close(fp8(x), ref, rtol=1e-6, atol=1e-4)
    y, y_ref = fp8(x)[1], lin(x)[1]  # batch row 1 has no outlier
    assert 1e-3 < (y - y_ref).norm() / y_ref.norm() < 0.1  # FP8 moves the output, a little
    assert (fp8(x)[0, 0] - lin(x)[0, 0]).norm() > 0.5 * lin(x)[0, 0].norm()  # the capped token, a lot


def test_layer_selection_is_ffn_without_first_and_last_layer():
    args = get_preset("tiny", dim=32, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=16, vocab_size=64)
    names = fp8_layer_names(build_llama(args), 4)
    assert names == [f"layers.{i}.feed_forward.{w}" for i in (1, 2) for w in ("w1", "w2", "w3")]
    assert is_fp8_layer("llm.layers.2.feed_forward.w2", 4)  # a composed model's LLM
    assert not is_fp8_layer("llm.layers.3.feed_forward.w2", 4)  # the last layer
    assert not is_fp8_layer("layers.1.attention.wq", 4) and not is_fp8_layer("output", 4)
    assert not is_fp8_layer("cross_attention.2.feed_forward.w1", 4)  # adapters stay high precision
