"""The static KV cache path of the one decode loop (`STATIC_STEPS`: keys read whole, masked by position,
positions as tensors) gives the eager loop's tokens, for text-only and image models, batches 1..64."""

from __future__ import annotations

import pytest
import torch

from herd.text import SamplingParams, build_llama, generate, get_preset
from herd.text.generation import STATIC_STEPS
from herd.text.kv_cache import StaticKVCache

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_llama(seed: int = 0):
    args = get_preset("tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16,
                      vocab_size=128, max_seq_len=64)  # fmt: skip
    torch.manual_seed(seed)
    model = build_llama(args).eval()
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(3.0)  # sharper logits: no near-ties in greedy decoding
    return model


def prompts(batch: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 12, (batch,), generator=g).tolist()  # ragged: rows start at different steps
    return [torch.randint(0, 128, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("batch", [1, 8, 64])
def test_static_cache_tokens_equal_eager(batch):
    model = tiny_llama()
    ps = prompts(batch)
    params = SamplingParams(max_new_tokens=6)
    stops = frozenset({7, 11})
    eager = generate(model, ps, params, stops)
    static = generate(model, ps, params, stops, steps=STATIC_STEPS)
    assert [(c.tokens, c.stop_token) for c in static] == [(c.tokens, c.stop_token) for c in eager]
    assert sum(len(c.tokens) for c in eager) > batch  # something was decoded


def test_static_cache_logits_match_and_sampling_with_a_seed():
    model = tiny_llama()
    tokens = torch.randint(0, 128, (3, 10))
    with torch.no_grad():
        ref = model(tokens)  # (3, 10, V), no cache
        cache = model.new_kv_cache(3, 16, static=True)
        assert isinstance(cache, StaticKVCache)
        out = [model(tokens[:, :6], kv_cache=cache)]
        for t in range(6, 10):
            out.append(model(tokens[:, t : t + 1], kv_cache=cache, start_pos=torch.tensor(t)))
    torch.testing.assert_close(torch.cat(out, 1), ref, atol=1e-5, rtol=1e-5)
    params = SamplingParams(max_new_tokens=5, temperature=0.8, top_p=0.9, seed=5)
    ps = prompts(4)
    assert generate(model, ps, params, steps=STATIC_STEPS) == generate(model, ps, params)


def test_static_cache_overflow_is_an_error():
    model = tiny_llama()
    cache = model.new_kv_cache(1, 4, static=True)
    with torch.no_grad(), pytest.raises(ValueError, match="overflow"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)


def test_static_cache_with_images_equals_eager():
    pytest.importorskip("timm")
    from herd.adapters import MultimodalLlama, generate_with_images
    from herd.vision import VisionEncoder, get_vision_preset

    V = 256
    args = get_preset("tiny", vocab_size=V, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=16,
                      max_seq_len=64)  # fmt: skip
    torch.manual_seed(0)
    vision = VisionEncoder(get_vision_preset("tiny", max_num_tiles=2))
    model = MultimodalLlama(build_llama(args), vision, cross_attention_every=2).eval()
    with torch.no_grad():
        for block in model.cross_attention.values():  # open the gates: the images change the tokens
            block.gate_attn.fill_(3.0)
            block.gate_ffwd.fill_(3.0)
    g = torch.Generator().manual_seed(1)
    batch = {
        "pixel_values": torch.randn(2, 1, 2, 3, 56, 56, generator=g),
        "aspect_ratio_ids": torch.tensor([[2], [1]]),
        "aspect_ratio_mask": torch.tensor([[[1, 1]], [[1, 0]]]),
        "cross_attention_mask": torch.zeros(2, 7, 1, 2, dtype=torch.long),
    }
    batch["cross_attention_mask"][0, :, 0, :] = 1
    batch["cross_attention_mask"][1, 3:, 0, 0] = 1  # row 1 sees its image from token 3 on
    ps = [[V, 5, 9, 13, 17], [1, 7, 8, V, 10, 11, 12]]
    params = SamplingParams(max_new_tokens=6)
    eager = generate_with_images(model, ps, **batch, params=params)
    static = generate_with_images(model, ps, **batch, params=params, steps=STATIC_STEPS)
    assert static == eager
    text_only = generate(model, ps, params)  # no images bound: the image layers are skipped
    assert [c.tokens for c in eager] != [c.tokens for c in text_only]  # the images did matter


def test_static_cache_with_a_video_equals_eager():
    from herd.adapters import MultimodalLlama, generate_with_images
    from herd.adapters.perceiver import get_perceiver_preset

    args = get_preset("tiny", vocab_size=128, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=16,
                      max_seq_len=64)  # fmt: skip
    torch.manual_seed(0)
    video = get_perceiver_preset("tiny", frames_per_group=2, max_groups=2)
    model = MultimodalLlama(
        build_llama(args), None, cross_attention_every=2, vision_dim=32, video=video
    ).eval()
    with torch.no_grad():
        for block in model.video.cross_attention.values():  # open the video gates
            block.gate_attn.fill_(3.0)
            block.gate_ffwd.fill_(3.0)
        for name, lin in model.video.cross_attention.named_modules():  # a fresh block barely moves logits
            if name.endswith((".wo", ".w2")):
                lin.weight.mul_(30.0)
    g = torch.Generator().manual_seed(2)
    ps = [[1, 5, 9, 13, 17], [2, 7, 8, 4, 10, 11, 12]]
    rows = torch.zeros(2, 7, dtype=torch.long)  # (B, T): tokens that see the video
    rows[0] = 1
    rows[1, 3:] = 1  # row 1 sees it from token 3 on
    videos = {"video_features": torch.randn(2, 4, 1, 3, 32, generator=g),  # (B, F, K, N, Dv)
              "video_frame_mask": torch.tensor([[True] * 4, [True, True, True, False]]),
              "video_cross_attention_mask": rows}  # fmt: skip
    params = SamplingParams(max_new_tokens=6)
    eager = generate_with_images(model, ps, params=params, **videos)
    static = generate_with_images(model, ps, params=params, steps=STATIC_STEPS, **videos)
    assert static == eager
    assert [c.tokens for c in eager] != [c.tokens for c in generate(model, ps, params)]  # the video mattered
