"""Compiled static-cache decoding (`herd.fast_decode.compiled_steps`) gives the eager loop's greedy tokens.

The default tests trace the steps with dynamo + AOTAutograd (`backend="eager"`: the graphs inductor
would compile, functionalised cache writes included) to stay within seconds on a shared CPU; the
inductor test (C++ codegen, ~2 min on 2 busy cores) runs with HERD_INDUCTOR_TESTS=1 or on a GPU."""

from __future__ import annotations

import os

import pytest
import torch

from herd.fast_decode import compiled_steps
from herd.text import SamplingParams, build_llama, generate, get_preset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_llama(device: str = "cpu"):
    args = get_preset("tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16,
                      vocab_size=128, max_seq_len=64)  # fmt: skip
    torch.manual_seed(0)
    model = build_llama(args, device=device).eval()
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(3.0)  # sharper logits: no near-ties in greedy decoding
    return model


def prompts(batch: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 10, (batch,), generator=g).tolist()
    return [torch.randint(0, 128, (n,), generator=g).tolist() for n in lengths]


def test_compiled_steps_equal_eager_and_reuse_the_cache():
    torch._dynamo.reset()
    model = tiny_llama()
    steps = compiled_steps(model, backend="eager", bucket=16)
    params = SamplingParams(max_new_tokens=5)
    for batch, seed in ((3, 1), (3, 2)):  # the second call reuses the (3, 16) cache and its graphs
        ps = prompts(batch, seed)
        assert generate(model, ps, params, steps=steps) == generate(model, ps, params)
    pooled = steps.new_cache(model, 3, 9)
    assert pooled is steps.new_cache(model, 3, 14) and pooled.max_seq_len == 16


def test_compiled_steps_with_images_equal_eager():
    pytest.importorskip("timm")
    from herd.adapters import MultimodalLlama, generate_with_images
    from herd.vision import VisionEncoder, get_vision_preset

    torch._dynamo.reset()
    V = 256
    args = get_preset("tiny", vocab_size=V, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=16,
                      max_seq_len=64)  # fmt: skip
    torch.manual_seed(0)
    vision = VisionEncoder(get_vision_preset("tiny", max_num_tiles=2))
    model = MultimodalLlama(build_llama(args), vision, cross_attention_every=2).eval()
    with torch.no_grad():
        for block in model.cross_attention.values():
            block.gate_attn.fill_(3.0)
            block.gate_ffwd.fill_(3.0)
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(2, 7, 1, 2, dtype=torch.long)
    mask[0, :, 0, :] = 1
    mask[1, 3:, 0, 0] = 1
    batch = {"pixel_values": torch.randn(2, 1, 2, 3, 56, 56, generator=g),
             "aspect_ratio_ids": torch.tensor([[2], [1]]), "aspect_ratio_mask": torch.tensor([[[1, 1]], [[1, 0]]]),
             "cross_attention_mask": mask}  # fmt: skip
    ps = [[V, 5, 9, 13, 17], [1, 7, 8, V, 10, 11, 12]]
    params = SamplingParams(max_new_tokens=4)
    steps = compiled_steps(model, backend="eager", bucket=16)
    assert generate_with_images(model, ps, **batch, params=params, steps=steps) == generate_with_images(
        model, ps, **batch, params=params
    )


def test_a_model_without_a_static_cache_is_refused():
    class NoStatic(torch.nn.Linear):
        def new_kv_cache(self, batch_size: int, max_seq_len: int | None = None) -> None: ...

    with pytest.raises(ValueError, match="no static cache"):
        compiled_steps(NoStatic(2, 2))


@pytest.mark.slow
@pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("HERD_INDUCTOR_TESTS")),
    reason="inductor codegen takes minutes on a shared CPU: HERD_INDUCTOR_TESTS=1 (or a GPU) runs it",
)
def test_inductor_compiled_steps_equal_eager():
    torch._dynamo.reset()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_llama(device)
    steps = compiled_steps(model, bucket=16)  # reduce-overhead (CUDA graphs) on a GPU, default on a CPU
    ps = prompts(2)
    params = SamplingParams(max_new_tokens=4)
    for _ in range(2):  # the second call replays the compiled graphs
        assert generate(model, ps, params, steps=steps) == generate(model, ps, params)
