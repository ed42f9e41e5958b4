"""The image encoder: timm blocks with tanh gates, equal to transformers' MllamaVisionModel for the same
weights, and open_clip / timm ViT checkpoints loading into its local transformer (tiny random models)."""

from __future__ import annotations

import math

import pytest
import torch

timm = pytest.importorskip("timm")

from timm.models.vision_transformer import Block  # noqa: E402

from herd.vision import VisionArgs, VisionEncoder, get_vision_preset, load_vision_weights  # noqa: E402
from herd.vision.encoder import TanhGate  # noqa: E402


def tiny_clip_args(**kw) -> VisionArgs:
    """The tiny preset with a CLIP trunk's conventions (attention biases, QuickGELU), one tile."""
    return get_vision_preset("tiny", attn_bias=True, act="quick_gelu", max_num_tiles=1, **kw)


def test_presets_match_the_paper():
    h = get_vision_preset("vit_h14")
    assert (h.dim, h.n_layers, h.n_global_layers, h.n_heads, h.patch_size) == (1280, 32, 8, 16, 14)
    assert h.intermediate_layers == (3, 7, 15, 23, 30)  # hidden states entering these local layers
    assert h.output_dim == 7680 and h.num_patches == 1601 and h.padded_patches == 1608
    assert h.aspect_ratios == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]
    with torch.device("meta"):
        enc = VisionEncoder(h)
    total = sum(p.numel() for p in enc.parameters())
    local = sum(p.numel() for p in enc.transformer.parameters())
    assert total == h.num_params()
    assert round(local / 1e6) == 630  # ViT-H/14: 630M; with the gated layers and embeddings ~850M
    print(f"ViT-H/14 local transformer {local / 1e6:.1f}M, whole encoder {total / 1e6:.1f}M")
    tiny = VisionEncoder(get_vision_preset("tiny"))
    assert sum(p.numel() for p in tiny.parameters()) == tiny.args.num_params()


def test_blocks_are_timm_with_tanh_gates():
    enc = VisionEncoder(get_vision_preset("tiny"))
    assert all(isinstance(b, Block) for b in [*enc.transformer, *enc.global_transformer])
    local, gated = enc.transformer[0], enc.global_transformer[0]
    assert isinstance(local.ls1, torch.nn.Identity) and isinstance(gated.ls1, TanhGate)
    assert isinstance(gated.ls2, TanhGate) and math.isclose(
        float(gated.ls1.gate.detach()), math.pi / 4, rel_tol=1e-6
    )
    assert local.attn.qkv.bias is None and local.attn.proj.bias is None  # Mllama: no attention biases
    assert local.mlp.fc1.bias is not None and local.mlp.fc2.bias is not None
    # the gated block computes x + tanh(g)·attn(norm1 x) + ...: with both gates at 0 it is the identity
    with torch.no_grad():
        gated.ls1.gate.zero_()
        gated.ls2.gate.zero_()
    x = torch.randn(2, 8, 64)
    assert torch.equal(gated(x), x)


def test_feature_shapes_and_default_tile_mask():
    torch.manual_seed(0)
    enc = VisionEncoder(get_vision_preset("tiny")).eval()
    pix = torch.randn(2, 2, 4, 3, 56, 56)  # 2 rows × 2 images × 4 tiles
    ids = torch.tensor([[6, 2], [1, 0]])  # (2,2), (1,2) tiles; (1,1); no image
    with torch.no_grad():
        out = enc(pix, ids)
        explicit = enc(pix, ids, enc.aspect_ratio_mask(ids).long())
    assert out.shape == (2, 2, 4, 17, 64 * 3)
    assert torch.equal(out, explicit)
    assert enc.aspect_ratio_mask(ids).tolist() == [
        [[True] * 4, [True, True, False, False]],
        [[True, False, False, False], [True, False, False, False]],
    ]
    with pytest.raises(ValueError, match="max_num_tiles"):
        enc(torch.randn(1, 1, 2, 3, 56, 56), torch.tensor([[1]]))


def test_intermediates_are_hidden_states_entering_the_layers():
    """Meta's `return_intermediate` (and transformers ≤ 4.53): index i = the input of local layer i."""
    torch.manual_seed(0)
    enc = VisionEncoder(get_vision_preset("tiny", intermediate_layers=(0, 4), max_num_tiles=1)).eval()
    pix, ids = torch.randn(2, 1, 1, 3, 56, 56), torch.ones(2, 1, dtype=torch.long)
    with torch.no_grad():
        out = enc(pix, ids)  # (B, M, T, N, 3·64): [global, interleaved (layer-0 input, layer-4 input)]
        inter = out[..., 64:].reshape(2, 1, 1, 17, 64, 2)
        assert torch.equal(inter[..., 0], enc.embed(pix, ids)[:, None])  # index 0: the embeddings
        h = torch.nn.functional.pad(enc.embed(pix, ids)[:, 0], (0, 0, 0, 7))  # (B, N', D)
        mask = enc.attention_mask(torch.ones(2, 1))
        for block in enc.transformer:
            h = block(h, attn_mask=mask)
        assert torch.allclose(inter[..., 1], h[:, None, None, :17], atol=1e-6)  # index 4: after all 4


def test_equals_transformers_mllama_vision_model():
    transformers = pytest.importorskip("transformers")
    from herd.adapters.hf_mllama import vision_state_dict_from_hf

    torch.manual_seed(0)
    config = transformers.MllamaVisionConfig(
        **get_vision_preset("tiny", intermediate_layers=(0, 2)).to_hf_config()
    )
    hf = transformers.MllamaVisionModel(config).eval()
    with torch.no_grad():  # random everything, gates included (HF initialises some to 0)
        for name, p in hf.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
            if "gate" in name:
                p.uniform_(-0.8, 0.8)
    # the installed transformers (5.x) reads index i as the *output* of layer i: herd's i + 1
    args = VisionArgs.from_hf_config(hf.config.to_dict(), transformers_layer_outputs=True)
    assert args.intermediate_layers == (1, 3)
    enc = VisionEncoder(args).eval()
    enc.load_state_dict(vision_state_dict_from_hf(hf.state_dict(), enc.args), strict=True)

    pix = torch.randn(2, 2, 4, 3, 56, 56)
    ids = torch.tensor([[6, 2], [1, 0]])
    tiles = torch.tensor([[[1, 1, 1, 1], [1, 1, 0, 0]], [[1, 0, 0, 0], [1, 0, 0, 0]]])
    with torch.no_grad():
        ref = hf(pixel_values=pix, aspect_ratio_ids=ids, aspect_ratio_mask=tiles).last_hidden_state
        out = enc(pix, ids, tiles)
    diff = (out - ref).abs().max().item()
    print(f"max |herd - MllamaVisionModel| = {diff:.3g}")
    assert out.shape == ref.shape == (2, 2, 4, 17, 192)
    assert diff <= 1e-5


def _tiny_open_clip(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg={
            "image_size": 56,
            "layers": 4,
            "width": 64,
            "head_width": 16,
            "patch_size": 14,
            "mlp_ratio": 2,
        },
        text_cfg={"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
        quick_gelu=True,
    ).eval()
    with torch.no_grad():  # non-trivial norms and positions
        for p in model.visual.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), path)
    return model, path


def test_open_clip_checkpoint_fills_the_local_transformer(tmp_path):
    clip, path = _tiny_open_clip(tmp_path)
    enc = VisionEncoder(tiny_clip_args()).eval()
    report = load_vision_weights(enc, path)
    assert "transformer.3.attn.qkv.bias" in report.loaded and "layernorm_post.weight" in report.loaded
    assert any(k.startswith("global_transformer.") for k in report.untouched)
    assert "visual.proj" in {f"visual.{k}" for k in report.ignored} and report.resampled_grid is None

    v = clip.visual
    img = torch.randn(3, 3, 56, 56)
    with torch.no_grad():  # open_clip's own pipeline up to the transformer input ...
        x = v.conv1(img).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.expand(3, 1, -1), x], dim=1) + v.positional_embedding
        ref = v.ln_pre(x)
        # ... equals herd's with the tile gates at 0 (their initial value)
        ours = enc.embed(img[:, None, None], torch.ones(3, 1, dtype=torch.long))[:, 0]
        assert (ours - ref).abs().max() <= 1e-6
        h = ref
        for ref_block, block in zip(v.transformer.resblocks, enc.transformer):
            ref, h = ref_block(ref), block(h)
            assert (h - ref).abs().max() <= 1e-5
        assert torch.allclose(enc.layernorm_post(h[:, 0]), v.ln_post(ref[:, 0]), atol=1e-5)


def test_timm_checkpoint_with_layerscale_and_other_grid(tmp_path):
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=56, patch_size=14, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2, pre_norm=True,
        init_values=0.3, act_layer="quick_gelu", num_classes=0, norm_layer=torch.nn.LayerNorm,
    ).eval()  # fmt: skip
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, path)

    enc = VisionEncoder(tiny_clip_args()).eval()
    load_vision_weights(enc, path)
    x = torch.randn(2, 17, 64)
    with torch.no_grad():  # LayerScale γ is folded into attn.proj / mlp.fc2
        assert torch.allclose(torch.nn.Sequential(*enc.transformer)(x), vit.blocks(x), atol=1e-5)

    bigger = VisionEncoder(tiny_clip_args(image_size=84))
    report = load_vision_weights(bigger, path)
    assert report.resampled_grid == (4, 6)
    assert bigger.gated_positional_embedding.embedding.shape == (37, 64)


def test_load_errors_name_the_problem(tmp_path):
    clip, path = _tiny_open_clip(tmp_path)
    wrapped = tmp_path / "epoch_3.pt"  # an open_clip training checkpoint
    weights = {f"module.{k}": v for k, v in clip.state_dict().items()}
    torch.save({"epoch": 3, "name": "run", "state_dict": weights, "optimizer": {}}, wrapped)
    assert (
        "transformer.0.attn.qkv.weight"
        in load_vision_weights(VisionEncoder(tiny_clip_args()), wrapped).loaded
    )
    with pytest.raises(ValueError, match="attn_bias=True"):
        load_vision_weights(VisionEncoder(get_vision_preset("tiny", max_num_tiles=1)), path)
    with pytest.raises(ValueError, match="6 local|has 6"):
        load_vision_weights(VisionEncoder(tiny_clip_args(n_layers=6, intermediate_layers=(1,))), path)
    with pytest.raises(FileNotFoundError):
        load_vision_weights(VisionEncoder(tiny_clip_args()), tmp_path / "absent.bin")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.bin"):
        load_vision_weights(VisionEncoder(tiny_clip_args()), tmp_path / "junk.bin")


def test_sincos_positional_init_is_the_2d_sine_cosine_table():
    """`positional_init="sincos"`: patch (y, x) starts at the MAE table sin/cos(y·ω_k), sin/cos(x·ω_k),
    ω_k = 10000^(−k/(D/4)) (channel order is timm's; compared as sets per row), the class token at 0;
    nearer patches are more alike, so position is readable before any training."""
    args = get_vision_preset("tiny", max_num_tiles=1, patch_size=7, positional_init="sincos")
    emb = VisionEncoder(args).gated_positional_embedding.embedding.detach().double()  # (1 + 8·8, 64)
    g, q = args.grid, args.dim // 4
    omega = 10000.0 ** (-torch.arange(q, dtype=torch.float64) / q)
    assert torch.equal(emb[0], torch.zeros(args.dim))
    for y, x in [(0, 1), (3, 5), (7, 7), (6, 2)]:
        want = torch.cat([f(c * omega) for c in (y, x) for f in (torch.sin, torch.cos)])
        got = emb[1 + y * g + x]
        assert torch.allclose(got.sort().values, want.sort().values, atol=1e-6), (y, x)
        # the two axes are told apart: (y, x) and (x, y) differ unless on the diagonal
        assert (got - emb[1 + x * g + y]).abs().max() > 0.1 or x == y
    sim = emb[1:] @ emb[1:].T  # (64, 64)
    centre = 3 * g + 3
    assert sim[centre, centre + 1] > sim[centre, centre + 3] > sim[centre, 7 * g + 7]
    random_init = VisionEncoder(get_vision_preset("tiny", max_num_tiles=1, patch_size=7))
    assert not torch.allclose(random_init.gated_positional_embedding.embedding.detach().double(), emb)
    with pytest.raises(ValueError, match="positional_init"):
        get_vision_preset("tiny", positional_init="learned")
