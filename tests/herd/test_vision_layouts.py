"""The image adapter under tensor parallelism (paper §7; herd/plans/multimodal.py): the frozen LLM
is sharded, the image encoder, projector and cross-attention layers are replicated across TP ranks.

Losses alone cannot catch a loss counted twice (Adam is blind to a constant gradient scale), so the
layouts are also held to one process's gradient norm, and a TP'd MultimodalLlama's gradients are
compared parameter by parameter on a sequence whose length the TP degree does not divide.
"""

import pytest
import torch
from tiny_workspaces import write_vision_workspace
from torch.distributed.tensor import DTensor

from herd.adapters.multimodal import MultimodalLlama
from herd.config import load_config
from herd.parallel.dims import ParallelDims, ParallelLayoutError
from herd.parallel.launch import spawn_ranks
from herd.parallel.parallelize import parallelize
from herd.plans.multimodal import MULTIMODAL_PLAN
from herd.tasks.vision import VisionTask
from herd.text import get_preset
from herd.text.loading import load_checkpoint
from herd.text.model import Llama
from herd.trainer import train

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_vision_workspace(tmp_path_factory.mktemp("vision_tp"), 32, 8)


def run_vision(root, run_dir, extra: list[str]) -> dict:
    """3 steps of `herd train vision`; rank 0 also reports how far the LLM moved from its checkpoint."""
    cfg = load_config(None, [
        f"--vision.llm={root / 'llm'}", f"--vision.train_manifest={root / 'shapes' / 'train.jsonl'}",
        "--vision.cross_attention_every=1", f"--train.run_dir={run_dir}", "--train.steps=3",
        "--data.batch_size=4", "--metrics.log_every=1", "--train.eval_every=0", "--metrics.tensorboard=false",
        "--checkpoint.save_final=false", "--checkpoint.resume=none", "--train.device=cpu",
        "--optimizer.lr=3e-3", "--schedule.warmup_steps=2", *extra,
    ])  # fmt: skip
    result = train(cfg, VisionTask.from_config(cfg), show_progress=False)
    full = result.runtime.full_state_dict()  # collective; the whole model on rank 0
    out = {"loss": [h["loss"] for h in result.history], "grad_norm": [h["grad_norm"] for h in result.history]}
    if full is not None:
        _, llm_state = load_checkpoint(root / "llm")
        assert {k for k in full if k.startswith("llm.")} == {f"llm.{k}" for k in llm_state}
        out["llm_moved"] = max(float((full[f"llm.{k}"] - v).abs().max()) for k, v in llm_state.items())
    return out


@pytest.fixture(scope="module")
def single(setup, tmp_path_factory):
    return run_vision(setup, tmp_path_factory.mktemp("single"), [])


# --- gradients of a TP'd MultimodalLlama, parameter by parameter -------------------------------------------
T_RAGGED = 19  # not a multiple of tp=2: sequence parallelism pads it and cuts the logits back


def tiny_multimodal(cross_attention_layers: tuple[int, ...]) -> MultimodalLlama:
    torch.manual_seed(0)
    args = get_preset("tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, vocab_size=128,
                      max_seq_len=32)  # fmt: skip
    model = MultimodalLlama(Llama(args), None, cross_attention_layers=cross_attention_layers, vision_dim=32)
    model.llm.init_rope()
    for block in model.cross_attention.values():  # open the gates so that every parameter gets a gradient
        block.gate_attn.data.fill_(0.5)
        block.gate_ffwd.data.fill_(-0.3)
    return model


def gradients(model: MultimodalLlama) -> tuple[float, dict]:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 128, (2, T_RAGGED), generator=g)
    tokens[:, 1] = 128  # `<|image|>`: a trainable image-token embedding
    features = torch.randn(2, 1, 2, 5, 32, generator=g)  # (B, M, tiles, N, Dv)
    xmask = torch.zeros(2, T_RAGGED, 1, 2, dtype=torch.long)
    xmask[:, 1:, :, 0] = 1  # the text from `<|image|>` on sees the first tile
    xmask[0, 1:, :, 1] = 1
    logits = model(tokens, image_features=features, cross_attention_mask=xmask)  # (B, T, V)
    assert logits.shape == (2, T_RAGGED, 128)
    loss = logits.pow(2).mean() + logits[..., 3].sum()
    loss.backward()
    return float(loss.detach()), {
        n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).numpy().copy()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


CASES = [((0, 1, 2), True), ((1,), True), ((0, 1, 2), False)]  # cross-attention first / LLM block first


def tp_gradients() -> list:
    from torch.distributed.device_mesh import init_device_mesh

    from herd.plans.multimodal import apply_multimodal_tensor_parallel

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    out = []
    for layers, sequence_parallel in CASES:
        model = tiny_multimodal(layers)
        apply_multimodal_tensor_parallel(model, mesh["tp"], sequence_parallel)
        assert not any(p.requires_grad for p in model.llm.parameters())  # SP's norms stay frozen
        assert not any(isinstance(p, DTensor) for p in model.trainable_parameters())  # replicated adapter
        out.append(gradients(model))
    return out


# --- the layouts: one spawn per world size (a rank spends most of its time importing herd) --------------
TP2 = {
    "tp2_sp": ["--parallel.tp=2", "--parallel.dp_shard=1"],
    "tp2_no_sp": ["--parallel.tp=2", "--parallel.dp_shard=1", "--parallel.sequence_parallel=false"],
}
FSDP2_TP2 = ["--parallel.tp=2", "--parallel.dp_shard=2"]  # sequence parallel (the default)


def two_ranks(root, run_dir) -> dict:
    out = {name: run_vision(root, run_dir / name, extra) for name, extra in TP2.items()}
    out["gradients"] = tp_gradients()
    return out


@pytest.fixture(scope="module")
def tp2(setup, tmp_path_factory):
    return spawn_ranks(two_ranks, 2, setup, tmp_path_factory.mktemp("tp2"))


def assert_matches(single: dict, ranks: list[dict]) -> None:
    assert single["llm_moved"] == 0.0 and ranks[0]["llm_moved"] == 0.0  # the LLM stays frozen
    for r in ranks:  # every rank logs the same global numbers
        assert max(abs(a - b) for a, b in zip(single["loss"], r["loss"])) < TOLERANCE, (single, r)
        # a loss counted once per TP rank would double the gradient (and its norm)
        ratios = [a / b for a, b in zip(r["grad_norm"], single["grad_norm"])]
        assert max(abs(x - 1) for x in ratios) < TOLERANCE, (single, r)


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", list(TP2))
def test_tp2_matches_single_process(name, single, tp2):
    assert_matches(single, [r[name] for r in tp2])


@pytest.mark.multiprocess
def test_fsdp2_tp2_matches_single_process(setup, single, tmp_path):
    assert_matches(single, spawn_ranks(run_vision, 4, setup, tmp_path, FSDP2_TP2))


@pytest.mark.multiprocess
def test_tensor_parallel_gradients_match_one_process(tp2):
    expected = [gradients(tiny_multimodal(layers)) for layers, _ in CASES]
    trained = set(expected[1][1])
    assert {"projector.weight", "image_token_embeddings.weight", "cross_attention.1.gate_attn"} <= trained
    for rank in tp2:
        for (loss, grads), (ref_loss, ref) in zip(rank["gradients"], expected):
            assert abs(loss - ref_loss) < 1e-4 * abs(ref_loss)
            assert grads.keys() == ref.keys()
            for name in ref:
                scale = max(float(abs(ref[name]).max()), 1e-6)
                assert float(abs(grads[name] - ref[name]).max()) < 1e-4 * scale, name


def test_context_parallel_is_refused_at_startup():
    with torch.device("meta"):
        model = tiny_multimodal((1,))
    cfg = load_config(None, ["--parallel.cp=2", "--parallel.dp_shard=1"])
    with pytest.raises(
        ParallelLayoutError, match="context parallelism is not supported for the image adapter"
    ):
        parallelize(model, MULTIMODAL_PLAN, ParallelDims(1, 1, 2, 1, 1, world_size=2), None, cfg.parallel)
