"""MultimodalLlama: frozen LLM, cross-attention placement, exact text-only logits at init, row masks,
image-token embeddings, and generation with images through the KV cache (tiny random models)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("timm")

from herd.adapters import (  # noqa: E402
    CrossAttentionBlock,
    MultimodalLlama,
    build_cross_attention_mask,
    fusion_schedule,
    generate_with_images,
)
from herd.text import SamplingParams, build_llama, generate, get_preset  # noqa: E402
from herd.vision import VisionEncoder, get_vision_preset  # noqa: E402

V = 256


def tiny_llm():
    args = get_preset(
        "tiny", vocab_size=V, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=64
    )
    return build_llama(args)


def tiny_model(**kw) -> MultimodalLlama:
    torch.manual_seed(0)
    llm = tiny_llm()
    vision = VisionEncoder(get_vision_preset("tiny", max_num_tiles=2))
    return MultimodalLlama(llm, vision, cross_attention_every=2, **kw).eval()


def open_gates(model: MultimodalLlama) -> None:
    with torch.no_grad():
        for block in model.cross_attention.values():
            block.gate_attn.fill_(0.7)
            block.gate_ffwd.fill_(-0.5)


def images(B: int = 2, T: int = 7):
    g = torch.Generator().manual_seed(1)
    pix = torch.randn(B, 1, 2, 3, 56, 56, generator=g)
    ids = torch.tensor([[2], [1]])[:B]  # (1, 2) tiles; one tile
    tiles = torch.tensor([[[1, 1]], [[1, 0]]])[:B]
    mask = torch.zeros(B, T, 1, 2, dtype=torch.long)  # (B, T, M, tiles)
    mask[0, :, 0, :] = 1  # row 0 sees both tiles from the start
    mask[1, 3:, 0, 0] = 1  # row 1: tokens 0-2 come before its <|image|>
    return {
        "pixel_values": pix,
        "aspect_ratio_ids": ids,
        "aspect_ratio_mask": tiles,
        "cross_attention_mask": mask,
    }


def test_placement():
    assert fusion_schedule(32, 4) == [3, 7, 11, 15, 19, 23, 27, 31]  # Llama 3.2 Vision 11B
    assert len(fusion_schedule(80, 4)) == 20 and fusion_schedule(4, 4) == [3]
    llm = tiny_llm()
    assert MultimodalLlama(llm, vision_dim=32).cross_attention_layers == (3,)
    assert MultimodalLlama(llm, vision_dim=32, cross_attention_layers=[4, 0]).cross_attention_layers == (0, 4)
    with pytest.raises(ValueError, match="0..4"):
        MultimodalLlama(llm, vision_dim=32, cross_attention_layers=[5])
    with pytest.raises(ValueError, match="vision_dim"):
        MultimodalLlama(llm)


def test_llm_frozen_and_out_of_the_optimizer():
    model = tiny_model()
    llm_params = {id(p) for p in model.llm.parameters()}
    trainable = model.trainable_parameters()
    assert all(not p.requires_grad for p in model.llm.parameters())
    assert not llm_params & {id(p) for p in trainable}
    assert {id(p) for p in model.vision.parameters()} <= {id(p) for p in trainable}
    assert not any(k.startswith("llm.") for k in model.adapter_state_dict())
    model.train()
    open_gates(model)
    batch = images()
    tokens = torch.randint(0, V, (2, 7))
    loss = model(tokens, **batch).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is None for p in model.llm.parameters())
    assert model.cross_attention["1"].attention.wq.weight.grad is not None
    assert model.vision.transformer[0].attn.qkv.weight.grad is not None


def test_logits_at_init_are_the_frozen_llms_exactly():
    model = tiny_model()
    tokens = torch.randint(0, V, (2, 7))
    with torch.no_grad():
        ref = model.llm(tokens)
        assert torch.equal(model(tokens), ref)  # text only: cross-attention skipped
        assert torch.equal(model(tokens, **images()), ref)  # images: gates are 0
        cache, llm_cache = model.new_kv_cache(2, 16), model.llm.new_kv_cache(2, 16)
        first = model(tokens[:, :5], kv_cache=cache, **images(T=5))
        rest = model(tokens[:, 5:], kv_cache=cache, start_pos=5)
        ref_first = model.llm(tokens[:, :5], kv_cache=llm_cache)
        ref_rest = model.llm(tokens[:, 5:], kv_cache=llm_cache, start_pos=5)
        assert torch.equal(first, ref_first) and torch.equal(rest, ref_rest)


def test_cross_attention_block_rows_without_image():
    torch.manual_seed(0)
    args = get_preset("tiny", dim=64, n_heads=4, n_kv_heads=2, multiple_of=16)
    block = CrossAttentionBlock(args)
    h, img = torch.randn(2, 5, 64), torch.randn(2, 6, 64)
    token_mask = torch.ones(2, 5, 6, dtype=torch.bool)
    token_mask[1, :2] = False  # rows 0-1 of sample 1 see no image token
    mask = build_cross_attention_mask(token_mask)
    assert torch.equal(block(h, block.image_kv(img), mask), h)  # fresh block: gates 0 → identity
    with torch.no_grad():
        block.gate_attn.fill_(1.0)
        block.gate_ffwd.fill_(1.0)
    out = block(h, block.image_kv(img), mask)
    assert torch.equal(out[1, :2], h[1, :2])  # Meta's row mask: untouched
    assert not torch.allclose(out[1, 2:], h[1, 2:])
    block.attention.mask_rows = False  # transformers' Mllama: the attention output leaks in
    assert not torch.allclose(block(h, block.image_kv(img), mask)[1, :2], h[1, :2])


def test_image_token_embeddings_and_features_path():
    model = tiny_model()
    open_gates(model)
    tokens = torch.randint(0, V, (2, 7))
    tokens[:, 0] = V  # <|image|>
    batch = images()
    with torch.no_grad():
        emb = model.embed(tokens)
        assert torch.equal(emb[:, 0], model.image_token_embeddings.weight[0].expand(2, -1))
        assert torch.equal(emb[:, 1:], model.llm.embed(tokens[:, 1:]))
        with pytest.raises(ValueError, match="264"):
            model.embed(torch.tensor([[V + 8]]))
        full = model(tokens, **batch)
        feats = model.vision(batch["pixel_values"], batch["aspect_ratio_ids"], batch["aspect_ratio_mask"])
        assert feats.shape == (2, 1, 2, 17, 192)
        via_features = model(tokens, image_features=feats, cross_attention_mask=batch["cross_attention_mask"])
        assert torch.equal(full, via_features)
        # the same without an encoder inside the model: features computed elsewhere
        headless = MultimodalLlama(model.llm, None, cross_attention_every=2, vision_dim=192).eval()
        headless.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("vision.")})
        assert torch.equal(
            headless(tokens, image_features=feats, cross_attention_mask=batch["cross_attention_mask"]), full
        )
        assert not torch.allclose(full, model.llm(tokens.clamp(max=V - 1)))


def test_cached_decoding_equals_full_forward():
    model = tiny_model()
    open_gates(model)
    tokens = torch.randint(0, V, (2, 9))
    batch = images(T=9)
    with torch.no_grad():
        ref = model(tokens, **batch)
        cache = model.new_kv_cache(2, 16)
        prefill = dict(batch, cross_attention_mask=batch["cross_attention_mask"][:, :6])
        steps = [model(tokens[:, :6], kv_cache=cache, **prefill)]
        for t in range(6, 9):  # no images: their K/V and the last mask row come from the cache
            steps.append(model(tokens[:, t : t + 1], kv_cache=cache, start_pos=t))
    assert torch.allclose(torch.cat(steps, 1), ref, atol=1e-5)
    shared = cache.expand_rows(3, 9)  # e.g. K samples per prompt share the prefill and the images
    assert shared.batch_size == 6 and torch.equal(shared.image_kv["1"][0][3], cache.image_kv["1"][0][1])
    assert torch.equal(shared.token_mask[5], cache.token_mask[1])


def test_generate_with_images():
    model = tiny_model()
    open_gates(model)
    with torch.no_grad():
        model.llm.tok_embeddings.weight.mul_(3.0)  # sharper logits: no near-ties in greedy decoding
    prompts = [[V, 5, 9, 13, 17], [1, 7, 8, V, 10, 11, 12]]
    batch = images(T=7)
    params = SamplingParams(max_new_tokens=6)
    out = generate_with_images(model, prompts, **batch, params=params)
    with torch.no_grad():  # reference: no cache, the whole sequence every step
        feats = model.vision(batch["pixel_values"], batch["aspect_ratio_ids"], batch["aspect_ratio_mask"])
        for b, (prompt, completion) in enumerate(zip(prompts, out)):
            seq = list(prompt)
            base = batch["cross_attention_mask"][b : b + 1, : len(prompt)]
            for _ in range(6):
                extra = base[:, -1:].expand(-1, len(seq) - len(prompt), -1, -1)
                mask = torch.cat([base, extra], dim=1)
                logits = model(
                    torch.tensor([seq]), cross_attention_mask=mask, image_features=feats[b : b + 1]
                )
                seq.append(int(logits[0, -1].argmax()))
            assert completion.tokens == seq[len(prompt) :]
    assert model._bound is None  # unbound afterwards
    # without images the model generates exactly what the LLM does
    text_prompts = [[1, 5, 9], [2, 3]]
    assert generate(model, text_prompts, params) == generate(model.llm, text_prompts, params)
