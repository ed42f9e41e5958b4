"""Each model family's parallel plan names its units (herd/plans); the generic code applies them. The image
adapter's encoder blocks and cross-attention blocks are units too: checkpointing them (full and selective)
and compiling them leave the loss and every gradient as they were."""

import pytest
import torch
from torch import nn

from herd.adapters.multimodal import MultimodalLlama
from herd.parallel.activation_checkpoint import apply_activation_checkpointing, apply_compile
from herd.plans.llama import LLAMA_PLAN
from herd.plans.multimodal import MULTIMODAL_PLAN
from herd.plans.preference import DPO_PLAN, PPO_PLAN
from herd.plans.reward import REWARD_PLAN
from herd.tasks.dpo import DPOModel
from herd.tasks.ppo import PPOModel
from herd.text import get_preset
from herd.text.model import Llama
from herd.text.reward_model import RewardModel
from herd.vision.encoder import VisionEncoder
from herd.vision.vision_args import get_vision_preset

ARGS = get_preset("tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, vocab_size=128,
                  max_seq_len=32)  # fmt: skip


def multimodal() -> MultimodalLlama:
    torch.manual_seed(0)
    vision = VisionEncoder(get_vision_preset("tiny", max_num_tiles=1, image_size=28, patch_size=7))
    model = MultimodalLlama(Llama(ARGS), vision, cross_attention_layers=(1, 2))
    model.llm.init_rope()
    for block in model.cross_attention.values():  # open the gates: every block takes part in the loss
        block.gate_attn.data.fill_(0.5)
        block.gate_ffwd.data.fill_(-0.4)
    return model


def test_every_family_names_its_blocks():
    with torch.device("meta"):
        llama, mm = Llama(ARGS), multimodal()
        rm, dpo, ppo = RewardModel(ARGS), DPOModel(ARGS, ARGS), PPOModel(ARGS, ARGS, ARGS, ARGS)
    assert LLAMA_PLAN.fsdp_units(llama) == ["layers.0", "layers.1"]
    units = MULTIMODAL_PLAN.fsdp_units(mm)
    n_local, n_global = len(mm.vision.transformer), len(mm.vision.global_transformer)
    assert units[: n_local + n_global] == [f"vision.transformer.{i}" for i in range(n_local)] + [
        f"vision.global_transformer.{i}" for i in range(n_global)
    ]
    # the decoder in forward order: cross-attention k runs right before LLM layer k (k = 2: after the last)
    assert units[n_local + n_global :] == [
        "llm.layers.0",
        "cross_attention.1",
        "llm.layers.1",
        "cross_attention.2",
    ]
    assert MULTIMODAL_PLAN.checkpoint_units(mm) == MULTIMODAL_PLAN.compile_units(mm) == units
    assert MULTIMODAL_PLAN.fsdp_forward_methods(mm) == [
        ("cross_attention.1", "image_kv"),
        ("cross_attention.2", "image_kv"),
    ]
    assert REWARD_PLAN.fsdp_units(rm) == ["trunk.layers.0", "trunk.layers.1"]
    assert DPO_PLAN.fsdp_units(dpo) == [
        "policy.layers.0",
        "policy.layers.1",
        "reference.layers.0",
        "reference.layers.1",
    ]
    assert len(PPO_PLAN.fsdp_units(ppo)) == 8 and PPO_PLAN.supported_dims() == {"fsdp", "hsdp"}
    assert MULTIMODAL_PLAN.supported_dims() == {"fsdp", "hsdp", "tp", "pp"}  # images are not cut along T
    assert LLAMA_PLAN.supported_dims() == {"fsdp", "hsdp", "tp", "cp", "pp"}


def loss_and_grads(model: nn.Module) -> tuple[float, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 128, (2, 11), generator=g)
    tokens[:, 1] = 128  # `<|image|>`
    pixels = torch.randn(2, 1, 1, 3, 28, 28, generator=g)
    xmask = torch.zeros(2, 11, 1, 1, dtype=torch.long)
    xmask[:, 1:] = 1
    logits = model(tokens, pixel_values=pixels, aspect_ratio_ids=torch.ones(2, 1, dtype=torch.long),
                   cross_attention_mask=xmask)  # fmt: skip
    loss = logits.float().pow(2).mean() + logits[..., 5].sum()
    loss.backward()
    grads = {n.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""): p.grad.clone()
             for n, p in model.named_parameters() if p.requires_grad}  # fmt: skip
    return float(loss), grads


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_the_image_adapters_units_keeps_loss_and_gradients(mode):
    ref_loss, ref = loss_and_grads(multimodal())
    model = multimodal()
    apply_activation_checkpointing(model, MULTIMODAL_PLAN.checkpoint_units(model), mode)
    wrapped = [n for n, m in model.named_modules() if type(m).__name__ == "CheckpointWrapper"]
    assert len(wrapped) == len(MULTIMODAL_PLAN.checkpoint_units(model)) and "cross_attention.1" in wrapped
    loss, grads = loss_and_grads(model)
    assert abs(loss - ref_loss) < 1e-6 * abs(ref_loss) and grads.keys() == ref.keys()
    assert "vision.transformer.0.attn.qkv.weight" in grads and "cross_attention.2.gate_ffwd" in grads
    for name, g in ref.items():
        assert torch.allclose(grads[name], g, rtol=1e-5, atol=1e-7), name


@pytest.mark.slow
def test_compiling_the_image_adapters_units_keeps_loss_and_gradients(monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "1")
    ref_loss, ref = loss_and_grads(multimodal())
    model = multimodal()
    units = MULTIMODAL_PLAN.compile_units(model)
    # one unit of each kind (every one compiles the same way; each is its own graph, so all would only
    # multiply the CPU compile time): the encoder's local and gated blocks, an LLM block, a cross-attention
    firsts = {}
    for fqn in units:
        firsts.setdefault(fqn.rsplit(".", 1)[0], fqn)
    apply_compile(model, list(firsts.values()))
    assert sorted(firsts) == [
        "cross_attention",
        "llm.layers",
        "vision.global_transformer",
        "vision.transformer",
    ]
    loss, grads = loss_and_grads(model)
    assert abs(loss - ref_loss) < 1e-4 * abs(ref_loss)
    for name, g in ref.items():
        assert torch.allclose(grads[name], g, rtol=1e-3, atol=1e-5), name
