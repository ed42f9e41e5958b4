"""The perceiver resampler against lucidrains' flamingo-pytorch (the code open_flamingo's resampler was
copied from), its grouping of frames, its masks, and the paper-size parameter counts."""

import pytest
import torch
from flamingo_pytorch import PerceiverResampler as ReferenceResampler

from herd.adapters.perceiver import PerceiverResampler, get_perceiver_preset


def reference_from(ours: PerceiverResampler) -> ReferenceResampler:
    """flamingo-pytorch's resampler holding our weights (its media embeddings = our group embeddings)."""
    a = ours.args
    ref = ReferenceResampler(dim=a.dim, depth=a.n_layers, dim_head=a.head_dim, heads=a.n_heads,
                             num_latents=a.n_latents, num_media_embeds=a.max_groups, ff_mult=a.ffn_mult)  # fmt: skip
    state = {"latents": ours.latents, "media_pos_emb": ours.group_embeddings[:, None, :],
             "norm.weight": ours.norm.weight, "norm.bias": ours.norm.bias}  # fmt: skip
    for i, layer in enumerate(ours.layers):
        att, ff = layer.attention, layer.feed_forward
        for name in ("norm_media", "norm_latents"):
            for p in ("weight", "bias"):
                state[f"layers.{i}.0.{name}.{p}"] = getattr(getattr(att, name), p)
        for name in ("to_q", "to_kv", "to_out"):
            state[f"layers.{i}.0.{name}.weight"] = getattr(att, name).weight
        state.update({f"layers.{i}.1.0.weight": ff[0].weight, f"layers.{i}.1.0.bias": ff[0].bias,
                      f"layers.{i}.1.1.weight": ff[1].weight, f"layers.{i}.1.3.weight": ff[3].weight})  # fmt: skip
    ref.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    return ref


def with_frame_times(ours: PerceiverResampler, x: torch.Tensor) -> torch.Tensor:
    """(B, F, n, D) frames + our frame-time embeddings → (B, G, 32·n, D), what the reference's media are."""
    a = ours.args
    B, F, n, D = x.shape
    G = a.num_groups(F)
    x = x.view(B, G, a.frames_per_group, n, D) + ours.frame_embeddings[None, None, :, None, :]
    return x.reshape(B, G, a.frames_per_group * n, D)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return PerceiverResampler(get_perceiver_preset("tiny", frames_per_group=4, max_groups=2))


def test_matches_flamingo_pytorch(tiny):
    x = torch.randn(2, 8, 5, 64)  # 2 videos, 8 frames = 2 groups of 4, 5 tokens per frame
    ours, groups = tiny(x)
    ref = reference_from(tiny)(with_frame_times(tiny, x))  # (B, G, L, D)
    assert ours.shape == (2, 2, 8, 64) and groups.all()
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


def test_masked_frames_are_as_if_absent(tiny):
    """A masked (padded or repeated) frame's tokens are no keys: the result equals the reference run
    on the group without them."""
    x = torch.randn(1, 4, 5, 64)
    mask = torch.tensor([[True, False, True, True]])
    ours, _ = tiny(x, frame_mask=mask)
    timed = x + tiny.frame_embeddings[None, :, None, :]
    kept = timed[:, mask[0]].reshape(1, 1, 3 * 5, 64)
    torch.testing.assert_close(ours, reference_from(tiny)(kept), atol=2e-5, rtol=1e-5)


def test_grouping_order_and_empty_groups(tiny):
    x = torch.randn(1, 8, 5, 64)
    whole, _ = tiny(x)
    first, _ = tiny(x[:, :4])
    torch.testing.assert_close(whole[:, :1], first)  # a group sees only its own frames
    swapped = x[:, [1, 0, 2, 3, 4, 5, 6, 7]]
    assert (tiny(swapped)[0][:, 0] - whole[:, 0]).abs().max() > 1e-3  # frame order is visible
    mask = torch.tensor([[True] * 4 + [False] * 4])
    _, groups = tiny(x, frame_mask=mask)
    assert groups.tolist() == [[True, False]]
    assert tiny.args.num_groups(64) == 16 and get_perceiver_preset("tiny").num_groups(64) == 2
    with pytest.raises(ValueError, match="groups"):
        tiny(torch.randn(1, 12, 5, 64))  # 3 groups of 4, embeddings for 2


@pytest.mark.parametrize("name", ["llama3_8b", "llama3_70b", "tiny"])
def test_parameter_count_is_exact(name):
    args = get_perceiver_preset(name)
    with torch.device("meta"):
        model = PerceiverResampler(args)
    assert sum(p.numel() for p in model.parameters()) == args.num_params()


def test_paper_sizes():
    """Paper §7.2.3: aggregator + video cross-attention 0.6B beside 8B, 4.6B beside 70B."""
    from herd.adapters.video import VideoAdapter, video_schedule
    from herd.text import get_preset

    for llm, image_layers, expected in (
        ("llama3_8b", range(3, 32, 4), 0.6e9),
        ("llama3_70b", range(3, 80, 4), 4.6e9),
    ):
        args = get_preset(llm)
        with torch.device("meta"):
            adapter = VideoAdapter(args, get_perceiver_preset(llm), video_schedule(list(image_layers)))
        total = sum(p.numel() for p in adapter.parameters())
        assert abs(total - expected) / expected < 0.05, (llm, total)


def test_spatial_embeddings_are_added_per_token_place():
    """`spatial_tokens`: a learned embedding per token place in the frame, added like the frame-time one
    (the reference run on inputs with it added matches); the place of an object becomes visible."""
    torch.manual_seed(0)
    ours = PerceiverResampler(
        get_perceiver_preset("tiny", frames_per_group=4, max_groups=2, spatial_tokens=5)
    )
    x = torch.randn(2, 8, 5, 64)
    out, _ = ours(x)
    ref = reference_from(ours)(with_frame_times(ours, x + ours.spatial_embeddings))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    moved = x[:, :, [1, 0, 2, 3, 4]]  # two tokens trade places in every frame
    assert (ours(moved)[0] - out).abs().max() > 1e-3
    assert sum(p.numel() for p in ours.parameters()) == ours.args.num_params()
    with pytest.raises(ValueError, match="spatial"):
        ours(torch.randn(1, 4, 6, 64))


def test_time_scaled_values_start_as_the_plain_resampler():
    """`time_scaled_values`: zero-initialised per-frame value scales: at first the output is the plain
    resampler's (so the reference parity holds); the scales get a gradient and then change the output."""
    torch.manual_seed(0)
    args = get_perceiver_preset("tiny", frames_per_group=4, max_groups=2)
    plain = PerceiverResampler(args)
    scaled = PerceiverResampler(
        get_perceiver_preset("tiny", frames_per_group=4, max_groups=2, time_scaled_values=True)
    )
    missing, unexpected = scaled.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("value_time_scale" in k for k in missing) and len(missing) == args.n_layers
    x = torch.randn(2, 8, 5, 64)
    out = scaled(x)[0]
    torch.testing.assert_close(out, plain(x)[0], atol=0, rtol=0)
    out.square().sum().backward()
    grads = [layer.attention.value_time_scale.grad for layer in scaled.layers]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        scaled.layers[0].attention.value_time_scale[0] = -1.0  # frame 0 of each group: values zeroed
    assert (scaled(x)[0] - out).abs().max() > 1e-3
    assert sum(p.numel() for p in scaled.parameters()) == scaled.args.num_params()
