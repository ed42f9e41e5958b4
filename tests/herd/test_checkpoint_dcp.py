"""DCP training checkpoints: bit-exact resume, resharding across meshes, atomicity, keep-last, async, export."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)

from herd.checkpoint import Checkpointer, list_checkpoints, load_dcp_model, read_checkpoint_meta
from herd.cli import main as convert_main
from herd.config import CheckpointConfig, OptimizerConfig, ScheduleConfig
from herd.data.training.packed_text import PackedBatches, TokenStream
from herd.optim import build_optimizer, build_scheduler
from herd.parallel.launch import spawn_ranks
from herd.text import build_llama, get_preset, load_model
from herd.text.checkpoint_meta import load_meta_checkpoint

ARGS = get_preset(
    "tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=64
)
GLOBAL_BATCH = 4


# --- a tiny run: model, AdamW, warmup/cosine LambdaLR, packed batches; everything the checkpoint holds ---
def make_loader(rank: int = 0, world: int = 1) -> PackedBatches:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, ARGS.vocab_size, 6000).astype(np.int32)
    stream = TokenStream(tokens, (np.arange(6000) // 150).astype(np.int32))
    return PackedBatches(stream, seq_len=16, batch_size=GLOBAL_BATCH, rank=rank, world_size=world, seed=0)


def make_run(seed: int, model: nn.Module | None = None, foreach: bool = True, rank: int = 0, world: int = 1):
    torch.manual_seed(seed)
    model = model if model is not None else build_llama(ARGS)
    opt = build_optimizer(model.named_parameters(), OptimizerConfig(lr=1e-2))
    if not foreach:  # plain + DTensor parameters mixed (TP of the matmuls only): no multi-tensor kernels
        opt.defaults["foreach"] = False
        for group in opt.param_groups:
            group["foreach"] = False
    sched = build_scheduler(opt, 20, ScheduleConfig(warmup_steps=3))
    return model, opt, sched, make_loader(rank, world)


def train_step(model, opt, sched, loader, rng: bool = True) -> torch.Tensor:
    """One step. With `rng`, the loss is scaled by draws from all three RNGs, so an unrestored stream
    shows. Normalised by the rows (not the valid targets) so that FSDP's mean over ranks of per-rank
    losses equals one process's loss over the global batch."""
    batch = next(loader)
    logits = model(batch["tokens"], document_ids=batch["document_ids"])
    labels = batch["labels"].flatten()
    loss = F.cross_entropy(logits.flatten(0, 1), labels, ignore_index=-100, reduction="sum") / labels.numel()
    scale = 1 + 0.1 * (random.random() + float(np.random.rand()) + float(torch.rand(()))) if rng else 1.0
    (loss * scale).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    return loss.detach()


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"differ: {bad}"


def seed_rngs(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- single process ------------------------------------------------------------------------------------
def test_resume_is_bit_exact(tmp_path: Path) -> None:
    run = make_run(seed=0)
    ckpt = Checkpointer(CheckpointConfig(), tmp_path)
    assert ckpt.load([run[0]], [run[1]], run[2], run[3]) is None  # resume=auto, nothing there yet
    for _ in range(3):
        train_step(*run)
    seed_rngs(1234)
    path = ckpt.save(3, [run[0]], [run[1]], run[2], run[3], model_args=ARGS, extra={"tokens": 192})
    ref_loss, ref_params, ref_lr = train_step(*run), params(run[0]), run[2].get_last_lr()

    assert path == tmp_path / "checkpoints" / "step-00000003" and ckpt.latest() == path
    meta = read_checkpoint_meta(path)
    assert meta["step"] == 3 and meta["world_size"] == 1 and meta["mesh"] == []
    assert meta["model_args"]["dim"] == 64 and meta["extra"] == {"tokens": 192}

    fresh = make_run(seed=7)  # other weights, empty optimizer, scheduler and loader at 0
    seed_rngs(99)
    assert Checkpointer(CheckpointConfig(), tmp_path).load([fresh[0]], [fresh[1]], fresh[2], fresh[3]) == 3
    assert fresh[3].state_dict() == {"epoch": 0, "cursor": 3}
    loss = train_step(*fresh)
    assert torch.equal(loss, ref_loss)
    assert_same(params(fresh[0]), ref_params)
    assert fresh[2].get_last_lr() == ref_lr


def test_keep_last_and_due(tmp_path: Path) -> None:
    cfg = CheckpointConfig(interval=2, keep_last=2, dir=str(tmp_path / "ck"))
    ckpt = Checkpointer(cfg, tmp_path / "run")
    model, opt, sched, loader = make_run(seed=0)
    for step in (1, 2, 3, 4):
        ckpt.save(step, [model], [opt], sched, loader)
    assert [s for s, _ in list_checkpoints(tmp_path / "ck")] == [3, 4]
    assert [s for s in range(1, 8) if ckpt.due(s, last_step=7)] == [2, 4, 6, 7]
    assert not Checkpointer(CheckpointConfig(interval=0, save_final=False), tmp_path).due(7, 7)
    assert Checkpointer(CheckpointConfig(resume="none"), tmp_path).load([model], [opt], sched, loader) is None


def test_async_save_snapshots_the_state(tmp_path: Path, monkeypatch) -> None:
    run = make_run(seed=0)
    ckpt = Checkpointer(CheckpointConfig(async_save=True), tmp_path)
    train_step(*run)
    gate, original = threading.Event(), dcp.FileSystemWriter.write_data

    def gated_write(self, plan, planner):  # the background write starts only once training went on
        assert gate.wait(60)
        return original(self, plan, planner)

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", gated_write)
    path = ckpt.save(1, [run[0]], [run[1]], run[2], run[3])
    saved = params(run[0])
    train_step(*run)  # updates the parameters in place before the checkpoint is written
    assert not path.exists() and ckpt.latest() is None  # not published before it is complete
    gate.set()
    ckpt.close()
    assert ckpt.latest() == path and not path.with_name(path.name + ".partial").exists()
    fresh = make_run(seed=3)
    assert ckpt.load([fresh[0]], [fresh[1]], fresh[2], fresh[3]) == 1
    assert_same(params(fresh[0]), saved)


# --- a process killed in the middle of a save -------------------------------------------------------------
def _killed_saves(root: str) -> None:
    """Each rank (as an independent single process) saves step 1, then dies inside the save of step 2."""
    rank = dist.get_rank()
    dist.destroy_process_group()  # two independent single-process runs, one spawn
    import herd.checkpoint as hc

    where = Path(root) / f"rank{rank}"
    ckpt = Checkpointer(CheckpointConfig(), where)
    model, opt, sched, loader = make_run(seed=0)
    train_step(model, opt, sched, loader)
    ckpt.save(1, [model], [opt], sched, loader, model_args=ARGS)
    torch.save(params(model), where / "saved.pt")
    train_step(model, opt, sched, loader)
    if rank == 0:  # dies after writing its tensor data, before DCP's .metadata
        original = hc.dcp.FileSystemWriter.write_data

        def write_then_die(self, plan, planner):
            original(self, plan, planner).wait()
            os._exit(1)

        hc.dcp.FileSystemWriter.write_data = write_then_die
    else:  # dies with the checkpoint fully written, before it is published
        hc._publish = lambda partial, final: os._exit(1)
    ckpt.save(2, [model], [opt], sched, loader, model_args=ARGS)


@pytest.mark.multiprocess
def test_killed_save_leaves_previous_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="exited without reporting"):
        spawn_ranks(_killed_saves, 2, str(tmp_path), timeout_s=120)
    for rank, leftover in ((0, "__0_0.distcp"), (1, ".metadata")):
        root = tmp_path / f"rank{rank}" / "checkpoints"
        assert (root / "step-00000002.partial" / leftover).is_file()  # it did die mid-save
        ckpt = Checkpointer(CheckpointConfig(), tmp_path / f"rank{rank}")
        assert ckpt.latest() == root / "step-00000001"
        model, opt, sched, loader = make_run(seed=5)
        assert ckpt.load([model], [opt], sched, loader) == 1
        assert_same(params(model), torch.load(tmp_path / f"rank{rank}" / "saved.pt"))
        ckpt.save(3, [model], [opt], sched, loader)  # the next save clears the debris
        assert sorted(p.name for p in root.iterdir()) == ["step-00000001", "step-00000003"]


# --- FSDP×2 → plain×2, TP×2 and one process -----------------------------------------------------------------
def _fsdp_save(root: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",))
    torch.manual_seed(0)
    model = build_llama(ARGS)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model, opt, sched, loader = make_run(seed=0, model=model, rank=rank, world=world)
    for _ in range(2):  # no RNG in these steps: TP ranks must compute the same thing
        train_step(model, opt, sched, loader, rng=False)
    ckpt = Checkpointer(CheckpointConfig(async_save=True), root)  # async: its own gloo group
    ckpt.save(2, [model], [opt], sched, loader, model_args=ARGS)
    ckpt.close()
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    ref_model = get_model_state_dict(model, options=full)
    # the step after the checkpoint, as the uninterrupted run takes it (global mean loss)
    loss = train_step(model, opt, sched, loader, rng=False)
    dist.all_reduce(loss)
    after = get_model_state_dict(model, options=full)
    if rank == 0:
        torch.save({"model": ref_model, "loss": loss / world, "after": after}, Path(root) / "ref.pt")


def _tp_plan() -> dict:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for i in range(ARGS.n_layers):
        for name in ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3"):
            plan[f"layers.{i}.{name}"] = ColwiseParallel()
        for name in ("attention.wo", "feed_forward.w2"):
            plan[f"layers.{i}.{name}"] = RowwiseParallel()
    return plan


def _load_other_meshes(root: str) -> tuple[bool, bool, float, float]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    ref = torch.load(Path(root) / "ref.pt")
    ckpt = Checkpointer(CheckpointConfig(), root)
    # plain, replicated on both ranks
    plain = make_run(seed=11, rank=dist.get_rank(), world=dist.get_world_size())
    assert ckpt.load([plain[0]], [plain[1]], plain[2], plain[3]) == 2
    plain_ok = all(torch.equal(v, ref["model"][k]) for k, v in plain[0].state_dict().items())
    # TP×2: the matmuls sharded, both ranks see the whole global batch (data rank 0 of 1)
    tp_mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    torch.manual_seed(12)
    model = parallelize_module(build_llama(ARGS), tp_mesh, _tp_plan())
    tp = make_run(seed=12, model=model, foreach=False)
    assert ckpt.load([tp[0]], [tp[1]], tp[2], tp[3]) == 2
    for group in tp[1].param_groups:  # the checkpoint's param groups came back with foreach=True
        group["foreach"] = False
    full = get_model_state_dict(tp[0], options=StateDictOptions(full_state_dict=True))
    tp_ok = all(torch.equal(v, ref["model"][k]) for k, v in full.items())
    # the next step from the resharded optimizer state matches the uninterrupted FSDP run's
    loss = train_step(*tp, rng=False)
    after = get_model_state_dict(tp[0], options=StateDictOptions(full_state_dict=True))
    param_err = max(float((v - ref["after"][k]).abs().max()) for k, v in after.items())
    return plain_ok, tp_ok, float((loss - ref["loss"]).abs()), param_err


@pytest.fixture(scope="module")
def fsdp_checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp")
    spawn_ranks(_fsdp_save, 2, str(root), timeout_s=120)
    return root


@pytest.mark.multiprocess
def test_fsdp_checkpoint_loads_on_other_meshes(fsdp_checkpoint: Path) -> None:
    results = spawn_ranks(_load_other_meshes, 2, str(fsdp_checkpoint), timeout_s=120)
    for plain_ok, tp_ok, loss_err, param_err in results:
        assert plain_ok and tp_ok
        # another mesh sums in another order: equal up to rounding, not bit for bit
        assert loss_err < 1e-5 and param_err < 1e-5, (loss_err, param_err)


@pytest.mark.multiprocess
def test_fsdp_checkpoint_loads_in_one_process(fsdp_checkpoint: Path) -> None:
    ref = torch.load(fsdp_checkpoint / "ref.pt")
    meta = read_checkpoint_meta(fsdp_checkpoint / "checkpoints" / "step-00000002")
    assert meta["world_size"] == 2 and meta["mesh"] == [{"dims": ["dp_shard"], "shape": [2]}]
    model, opt, sched, loader = make_run(seed=4)
    assert Checkpointer(CheckpointConfig(), fsdp_checkpoint).load([model], [opt], sched, loader) == 2
    assert_same(params(model), ref["model"])
    assert loader.state_dict() == {"epoch": 0, "cursor": 2}  # global: same on any number of ranks
    optim = get_optimizer_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
    assert int(optim["state.output.weight.step"]) == 2
    args, sd = load_dcp_model(fsdp_checkpoint / "checkpoints" / "step-00000002")
    assert args == ARGS.to_dict()
    assert_same(sd, ref["model"])


@pytest.mark.multiprocess
def test_convert_dcp_to_hf_and_meta(fsdp_checkpoint: Path, tmp_path: Path, capsys) -> None:
    ref = torch.load(fsdp_checkpoint / "ref.pt")["model"]
    src = fsdp_checkpoint / "checkpoints" / "step-00000002"
    assert convert_main(["convert", "--from", "dcp", "--to", "hf", str(src), str(tmp_path / "hf")]) == 0
    assert "dcp → hf" in capsys.readouterr().out
    assert_same(load_model(tmp_path / "hf").state_dict(), ref)
    # detected from the files; a run's checkpoint folder stands for its newest checkpoint
    assert (
        convert_main(["convert", "--to", "meta", str(fsdp_checkpoint / "checkpoints"), str(tmp_path / "m")])
        == 0
    )
    _, sd = load_meta_checkpoint(tmp_path / "m")
    assert_same(sd, ref)
