"""A tiny random transformers `MllamaForConditionalGeneration`, saved with `save_pretrained`, loads into
`MultimodalLlama` with the same logits (image + text, text only) and the same greedy generations."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")

from safetensors.torch import load_file, save_file  # noqa: E402

from herd.adapters import (  # noqa: E402
    cross_attention_mask_from_tokens,
    generate_with_images,
    hf_from_schedule,
    load_hf_mllama,
    schedule_from_hf,
)
from herd.text import SamplingParams  # noqa: E402
from herd.text.checkpoint_meta import CheckpointError  # noqa: E402

V = 256  # text vocabulary; <|image|> = 256
VISION = {
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_global_layers": 2,
    "attention_heads": 4,
    "intermediate_size": 64,
    "image_size": 28,
    "patch_size": 14,
    "max_num_tiles": 2,
    "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]],
    "intermediate_layers_indices": [0, 2],
    "vision_output_dim": 96,
}
TEXT = {
    "vocab_size": V,
    "hidden_size": 64,
    "num_hidden_layers": 6,  # 4 self-attention + 2 cross-attention, one of them after the last layer
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
    "cross_attention_layers": [1, 5],
    "max_position_embeddings": 128,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 500_000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.MllamaConfig(vision_config=VISION, text_config=TEXT, image_token_index=V)
    hf = transformers.MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():  # random everything: gates (HF starts them at 0), norms, positions
        for name, p in hf.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
            if "gate" in name:
                p.uniform_(-0.9, 0.9)
        hf.lm_head.weight.mul_(4.0)  # sharp logits: greedy decoding is not decided by float noise
    path = tmp_path_factory.mktemp("mllama")
    hf.save_pretrained(path)
    return hf, path


def inputs(image_first: bool):
    g = torch.Generator().manual_seed(3)
    B, T = 2, 9
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.zeros(B, T, 1, 2, dtype=torch.long)  # (B, T, images, tiles)
    at = (0, 0) if image_first else (0, 3)
    for b, pos in enumerate(at):
        ids[b, pos] = V  # <|image|>
    mask[0, :, 0, :] = 1  # image 0: 2 tiles, seen from the start
    mask[1, at[1] :, 0, 0] = 1  # image 1: 1 tile, seen from its <|image|> on
    return {
        "input_ids": ids,
        "pixel_values": torch.randn(B, 1, 2, 3, 28, 28, generator=g),
        "aspect_ratio_ids": torch.tensor([[2], [1]]),  # (1, 2) tiles; (1, 1)
        "aspect_ratio_mask": torch.tensor([[[1, 1]], [[1, 0]]]),
        "cross_attention_mask": mask,
    }


def ours(model, batch):
    kw = {k: v for k, v in batch.items() if k != "input_ids"}
    return model(batch["input_ids"], **kw)


def test_schedule_conversion():
    assert schedule_from_hf([3, 8, 13, 18, 23, 28, 33, 38]) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert hf_from_schedule(schedule_from_hf([1, 5])) == [1, 5]


def test_cross_attention_mask_rule_equals_the_mllama_processor():
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    img = V  # <|image|>
    rows = [
        [1, img, 5, 6, img, 7, 8, 9],
        [1, 2, 3, img, img, 4, 5, 0],
        [1, img, 2, img, img, 3, 4, 5],
        [1, 2, 3, 4, 5, 6, 7, 8],
    ]
    tiles = [[2, 1, 0], [1, 4, 0], [3, 1, 2], [0, 0, 0]]
    sparse = [get_cross_attention_token_mask(r, img) for r in rows]
    ref = convert_sparse_cross_attention_mask_to_dense(sparse, tiles, max_num_tiles=4, length=8)
    ours = cross_attention_mask_from_tokens(torch.tensor(rows), torch.tensor(tiles), img, max_num_tiles=4)
    assert ours.shape == (4, 8, 3, 4) and ours.tolist() == ref.tolist()


def test_logits_equal_transformers(checkpoint):
    hf, path = checkpoint
    model = load_hf_mllama(path, match_transformers=True).eval()
    assert model.cross_attention_layers == (1, 4) and model.args.n_layers == 4
    assert model.args.rope_scaling is not None and model.args.rope_scaling.factor == 8.0
    assert all(not p.requires_grad for p in model.llm.parameters())
    with torch.no_grad():
        for image_first in (True, False):  # False: text rows before their <|image|>
            batch = inputs(image_first)
            diff = (ours(model, batch) - hf(**batch).logits).abs().max().item()
            print(f"image+text (image first: {image_first}): max |herd - transformers| = {diff:.3g}")
            assert diff <= 1e-5
        # text only: the cross-attention layers are skipped on both sides
        text = batch["input_ids"].clamp(max=V - 1)
        diff = (model(text) - hf(input_ids=text).logits).abs().max().item()
        print(f"text only: max |herd - transformers| = {diff:.3g}")
        assert diff <= 1e-5


def test_meta_semantics_by_default(checkpoint):
    hf, path = checkpoint
    meta = load_hf_mllama(path).eval()
    compat = load_hf_mllama(path, match_transformers=True).eval()
    assert meta.vision.args.intermediate_layers == (0, 2)  # config.json's indices, read as Meta does
    assert compat.vision.args.intermediate_layers == (1, 3)
    batch = inputs(image_first=False)
    with torch.no_grad():
        text = batch["input_ids"].clamp(max=V - 1)
        assert torch.equal(meta(text), compat(text))  # the LLM path is the same
        ref = ours(compat, batch)
        meta.load_state_dict(compat.state_dict())
        meta.vision.args.intermediate_layers = (1, 3)  # same features: only the row masks differ now
        rows = ours(meta, batch)
    assert (rows[0] - ref[0]).abs().max() <= 1e-5  # sample 0 sees its image from the first token
    assert (rows[1, :3] - ref[1, :3]).abs().max() > 1e-4  # tokens before <|image|>: no image signal


def test_greedy_generation_equals_transformers(checkpoint):
    hf, path = checkpoint
    model = load_hf_mllama(path, match_transformers=True).eval()
    batch = inputs(image_first=True)
    prompts = [batch["input_ids"][0, :6].tolist(), batch["input_ids"][1].tolist()]
    cam = batch["cross_attention_mask"].clone()
    images = {k: batch[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    out = generate_with_images(
        model,
        prompts,
        **images,
        cross_attention_mask=cam,
        params=SamplingParams(max_new_tokens=5),
        stop_ids={2},
    )
    for b, (prompt, completion) in enumerate(zip(prompts, out)):
        row = {k: v[b : b + 1] for k, v in images.items()}
        ref = hf.generate(
            input_ids=torch.tensor([prompt]),
            cross_attention_mask=cam[b : b + 1, : len(prompt)],
            max_new_tokens=5,
            do_sample=False,
            **row,
        )[0, len(prompt) :].tolist()
        if 2 in ref:
            ref = ref[: ref.index(2)]
        assert completion.tokens == ref
    assert sum(len(c.tokens) for c in out) >= 6, out  # a real comparison, not two empty completions


def test_both_key_layouts_and_errors(checkpoint, tmp_path):
    hf, path = checkpoint
    tensors = load_file(path / "model.safetensors")
    # save_pretrained writes the Hub's (transformers 4.x) names; also accept the in-memory 5.x names
    renames = {
        "language_model.model.": "model.language_model.",
        "vision_model.": "model.vision_model.",
        "multi_modal_projector.": "model.multi_modal_projector.",
        "language_model.lm_head.": "lm_head.",
    }
    assert all(any(k.startswith(p) for p in renames) for k in tensors)
    old = {}
    for k, v in tensors.items():
        prefix = next(p for p in renames if k.startswith(p))
        old[renames[prefix] + k[len(prefix) :]] = v
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file(old, tmp_path / "model.safetensors", metadata={"format": "pt"})
    batch = inputs(image_first=True)
    with torch.no_grad():
        a, b = ours(load_hf_mllama(path).eval(), batch), ours(load_hf_mllama(tmp_path).eval(), batch)
    assert torch.equal(a, b)

    save_file({k: v for k, v in old.items() if "projector" not in k}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing.*projector"):
        load_hf_mllama(tmp_path)
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    with pytest.raises(CheckpointError, match="not 'mllama'"):
        load_hf_mllama(tmp_path)
