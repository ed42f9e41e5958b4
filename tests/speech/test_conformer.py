"""The Conformer encoder: the paper's size, a block equal to torchaudio's ConformerLayer, rotary attention,
padding that changes no real output."""

import pytest
import torch
from torchaudio.models.conformer import ConformerLayer

from herd.speech.conformer import (
    ChannelLayerNorm,
    ConformerBlock,
    ConformerEncoder,
    RotarySelfAttention,
    rotary_tables,
    stack_frames,
)
from herd.speech.conformer_args import SPEECH_PRESET_NAMES, ConformerArgs, get_speech_preset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEECH_1B_PARAMS = (
    1_002_100_224  # ConformerEncoder(get_speech_preset("speech_1b")), counted on the meta device
)


def test_speech_1b_is_the_papers_encoder_and_its_count_is_exact():
    args = get_speech_preset("speech_1b")
    assert (args.n_layers, args.dim, args.ffn_dim, args.conv_kernel, args.n_heads) == (24, 1536, 4096, 7, 24)
    assert (args.n_mels, args.stack, args.stacked_dim) == (80, 4, 320)
    with torch.device("meta"):
        encoder = ConformerEncoder(args)
    built = sum(p.numel() for p in encoder.parameters())
    print(f"speech_1b Conformer encoder: {built:,} parameters")
    assert built == args.num_params() == SPEECH_1B_PARAMS
    assert args.num_params(include_embedding=False) == SPEECH_1B_PARAMS - (320 * 1536 + 1536)
    for name in SPEECH_PRESET_NAMES:
        with torch.device("meta"):
            model = ConformerEncoder(get_speech_preset(name))
        assert sum(p.numel() for p in model.parameters()) == get_speech_preset(name).num_params(), name


def test_bad_args_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        ConformerArgs(dim=100, n_heads=3)
    with pytest.raises(ValueError, match="odd"):
        ConformerArgs(conv_kernel=8)
    with pytest.raises(KeyError, match="speech_1b"):
        get_speech_preset("whisper")


def test_a_block_without_rotation_equals_torchaudio_conformer_layer():
    """torchaudio's layer with its BatchNorm swapped for our per-frame LayerNorm; our block with cos 1, sin 0
    (no rotation): every other piece and the order of the residuals are the same."""
    torch.manual_seed(0)
    args = get_speech_preset("tiny", dim=32, n_heads=4, ffn_dim=48)
    ours = ConformerBlock(args).eval()
    ref = ConformerLayer(32, 48, 4, depthwise_conv_kernel_size=7).eval()
    ref.conv_module.sequential[3] = ChannelLayerNorm(32)
    with torch.no_grad():  # give our block random norms too, so the copy is checked everywhere
        for p in ours.parameters():
            p.normal_(0, 0.3)
    s = ours.state_dict()
    ref.load_state_dict({
        **{k: v for k, v in s.items() if k.startswith(("ffn1.", "ffn2."))},
        "self_attn_layer_norm.weight": s["attn_norm.weight"], "self_attn_layer_norm.bias": s["attn_norm.bias"],
        "self_attn.in_proj_weight": s["attn.qkv.weight"], "self_attn.in_proj_bias": s["attn.qkv.bias"],
        "self_attn.out_proj.weight": s["attn.out.weight"], "self_attn.out_proj.bias": s["attn.out.bias"],
        "conv_module.layer_norm.weight": s["conv.layer_norm.weight"], "conv_module.layer_norm.bias": s["conv.layer_norm.bias"],
        "conv_module.sequential.0.weight": s["conv.pointwise_in.weight"], "conv_module.sequential.0.bias": s["conv.pointwise_in.bias"],
        "conv_module.sequential.2.weight": s["conv.depthwise.weight"], "conv_module.sequential.2.bias": s["conv.depthwise.bias"],
        "conv_module.sequential.3.weight": s["conv.norm.weight"], "conv_module.sequential.3.bias": s["conv.norm.bias"],
        "conv_module.sequential.5.weight": s["conv.pointwise_out.weight"], "conv_module.sequential.5.bias": s["conv.pointwise_out.bias"],
        "final_layer_norm.weight": s["final_norm.weight"], "final_layer_norm.bias": s["final_norm.bias"],
    })  # fmt: skip
    x = torch.randn(3, 21, 32)  # (B, T', D)
    identity = (torch.ones(21, args.head_dim // 2), torch.zeros(21, args.head_dim // 2))
    with torch.no_grad():
        got = ours(x, identity)
        want = ref(x.transpose(0, 1), None).transpose(0, 1)  # torchaudio: (T, B, D)
    diff = (got - want).abs().max().item()
    assert diff < 1e-5, diff
    with torch.no_grad():  # the rotation does change the output: the attention is position-aware
        assert (ours(x, rotary_tables(args, 21, x.device)) - want).abs().max() > 1e-2


def test_rotary_attention_depends_on_relative_positions_only():
    torch.manual_seed(1)
    args = get_speech_preset("tiny")
    attn = RotarySelfAttention(args).eval()
    x = torch.randn(2, 17, args.dim)
    cos, sin = rotary_tables(args, 17 + 40, x.device)
    with torch.no_grad():
        at_zero = attn(x, (cos[:17], sin[:17]), None)
        shifted = attn(x, (cos[40:], sin[40:]), None)  # the same frames at positions 40..56
        flipped = attn(x.flip(1), (cos[:17], sin[:17]), None).flip(1)
    assert (at_zero - shifted).abs().max() < 1e-5
    assert (at_zero - flipped).abs().max() > 1e-3  # but the order of the frames matters


def test_stacking_concatenates_four_frames_and_zeroes_padding():
    feats = torch.arange(2 * 10 * 3, dtype=torch.float32).reshape(2, 10, 3)
    out = stack_frames(feats, torch.tensor([10, 6]), 4)  # (2, 3, 12)
    assert out.shape == (2, 3, 12)
    assert torch.equal(out[0, 1], feats[0, 4:8].reshape(-1))
    assert torch.equal(out[1, 1, :6], feats[1, 4:6].reshape(-1)) and not out[1, 1, 6:].any()
    assert (
        not out[1, 2].any()
        and torch.equal(out[0, 2, :6], feats[0, 8:10].reshape(-1))
        and not out[0, 2, 6:].any()
    )


def test_padded_frames_change_no_real_output():
    torch.manual_seed(2)
    args = get_speech_preset("tiny", n_layers=3)
    encoder = ConformerEncoder(args).eval()
    lengths = torch.tensor([101, 57, 80])
    feats = torch.randn(3, 101, 80)
    with torch.no_grad():
        batched = encoder(feats, lengths)  # (3, 26, 64)
        garbage = feats.clone()
        for i, n in enumerate(lengths.tolist()):
            garbage[i, n:] = 1e3 * torch.randn(101 - n, 80)
        garbage[1, -1] = float("nan")  # even NaN
        with_garbage = encoder(garbage, lengths)
        out_lengths = encoder.output_lengths(lengths).tolist()
        assert batched.shape == (3, 26, 64) and out_lengths == [26, 15, 20]
        for i, (n, m) in enumerate(zip(lengths.tolist(), out_lengths)):
            alone = encoder(feats[i : i + 1, :n])[0]  # no padding at all
            assert alone.shape[0] == m
            assert (batched[i, :m] - alone).abs().max() < 1e-5
            assert torch.equal(batched[i, :m], with_garbage[i, :m])


def test_gradients_reach_every_parameter():
    encoder = ConformerEncoder(get_speech_preset("tiny"))
    encoder(torch.randn(2, 40, 80), torch.tensor([40, 23])).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())
