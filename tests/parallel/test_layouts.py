"""Every parallel layout trains like one process: the losses of the first steps match (fp32, gloo)."""

import pytest

from herd.config import load_config
from herd.parallel.launch import spawn_ranks
from herd.tasks.text import TextPretrainTask
from herd.trainer import train

STEPS = 3
TOLERANCE = 1e-4  # fp32: reductions run in another order on each layout, and Adam amplifies
# the differences of near-zero gradients (step 1 is exact to ~1e-6; by step 3 TP differs by ~3e-5)

BASE = [
    "--model.vocab_subset=true", "--model.args.dim=64", "--model.args.n_layers=4", "--model.args.n_heads=4",
    "--model.args.n_kv_heads=2", "--model.args.multiple_of=16", "--data.synthetic_docs=300", "--data.seq_len=32",
    "--data.batch_size=4", f"--train.steps={STEPS}", "--metrics.log_every=1", "--metrics.tensorboard=false",
    "--train.device=cpu", "--train.eval_every=0", "--checkpoint.save_final=false", "--checkpoint.resume=none",
    "--optimizer.lr=3e-3", "--schedule.warmup_steps=1",
]  # fmt: skip


def run_losses(run_dir: str, overrides: list[str]) -> list[float]:
    cfg = load_config(None, [f"--train.run_dir={run_dir}", *BASE, *overrides])
    result = train(cfg, TextPretrainTask.from_config(cfg), show_progress=False)
    return [h["loss"] for h in result.history if "split" not in h]


_REFERENCES: dict[tuple[str, ...], list[float]] = {}


def reference_for(overrides: list[str], tmp_path_factory) -> list[float]:
    """The single-process run with the same data settings (batch size, accumulation) as a layout."""
    data = tuple(o for o in overrides if o.startswith(("--data.", "--train.")))
    if data not in _REFERENCES:
        _REFERENCES[data] = run_losses(str(tmp_path_factory.mktemp("single")), list(data))
    return _REFERENCES[data]


PP2 = ["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_microbatches=3", "--data.batch_size=6"]

LAYOUTS = {
    "fsdp2": (2, ["--parallel.dp_shard=2"]),
    "hsdp2x2": (4, ["--parallel.dp_replicate=2", "--parallel.dp_shard=2"]),
    "tp2_sp": (2, ["--parallel.tp=2", "--parallel.dp_shard=1"]),
    "tp2_no_sp": (2, ["--parallel.tp=2", "--parallel.dp_shard=1", "--parallel.sequence_parallel=false"]),
    "fsdp2_tp2": (4, ["--parallel.tp=2", "--parallel.dp_shard=2"]),
    "fsdp2_full_ac": (2, ["--parallel.dp_shard=2", "--parallel.activation_checkpoint=full"]),
    "tp2_selective_ac": (
        2,
        ["--parallel.tp=2", "--parallel.dp_shard=1", "--parallel.activation_checkpoint=selective"],
    ),
    "cp2": (2, ["--parallel.cp=2", "--parallel.dp_shard=1"]),
    "cp2_fsdp2": (4, ["--parallel.cp=2", "--parallel.dp_shard=2"]),
    "fsdp2_cp2_tp2": (8, ["--parallel.cp=2", "--parallel.dp_shard=2", "--parallel.tp=2"]),
    # pipelines: 3 micro-batches of 4 rows ≠ 2 stages (the paper frees the count from the stage count)
    "pp2_gpipe": (2, [*PP2, "--parallel.pp_schedule=GPipe"]),
    "pp2_1f1b": (2, [*PP2, "--parallel.pp_schedule=1F1B", "--parallel.pp_microbatches=6"]),
    "pp2_interleaved_v2": (
        2,
        [*PP2, "--parallel.pp_schedule=Interleaved1F1B", "--parallel.pp_virtual_stages=2"],
    ),
    "pp2_zero_bubble_v2": (
        2,
        [*PP2, "--parallel.pp_schedule=InterleavedZeroBubble", "--parallel.pp_virtual_stages=2"],
    ),
    "pp2_fsdp2": (4, ["--parallel.pp=2", "--parallel.dp_shard=2", "--parallel.pp_microbatches=2"]),
    "pp2_fsdp2_tp2": (
        8,
        ["--parallel.pp=2", "--parallel.dp_shard=2", "--parallel.tp=2", "--parallel.pp_microbatches=2"],
    ),
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, tmp_path, tmp_path_factory):
    world, overrides = LAYOUTS[name]
    reference = reference_for(overrides, tmp_path_factory)
    results = spawn_ranks(run_losses, world, str(tmp_path), overrides)
    for rank, losses in enumerate(results):
        diffs = [abs(a - b) for a, b in zip(losses, reference)]
        assert len(losses) == STEPS and max(diffs) < TOLERANCE, f"{name} rank {rank}: {losses} vs {reference}"
    assert reference[-1] < reference[0]  # the steps do train


def test_grad_accumulation_matches_on_a_mesh(tmp_path):
    """FSDP×2 with 2 micro-batches of 2 equals one process with batch 4 (same global batch)."""
    single = run_losses(str(tmp_path / "a"), [])
    accum = spawn_ranks(
        run_losses,
        2,
        str(tmp_path / "b"),
        ["--parallel.dp_shard=2", "--data.batch_size=2", "--train.grad_accum=2"],
    )[0]
    # not the same batches (a micro-batch of 2 reads windows 0-1, then 2-3): only the arithmetic is
    # shared, so compare against a single process with the same micro-batching instead
    single_accum = run_losses(str(tmp_path / "c"), ["--data.batch_size=2", "--train.grad_accum=2"])
    assert max(abs(a - b) for a, b in zip(accum, single_accum)) < TOLERANCE, (accum, single_accum)
    assert len(single) == STEPS


@pytest.mark.multiprocess
@pytest.mark.slow
def test_4d_layout_on_16_ranks(tmp_path, tmp_path_factory):
    """PP × DP × CP × TP = 2 × 2 × 2 × 2 on 16 gloo ranks, against one process."""
    overrides = ["--parallel.pp=2", "--parallel.dp_shard=2", "--parallel.cp=2", "--parallel.tp=2",
                 "--parallel.pp_microbatches=2"]  # fmt: skip
    reference = reference_for(overrides, tmp_path_factory)
    results = spawn_ranks(run_losses, 16, str(tmp_path), overrides, timeout_s=600)
    assert max(abs(a - b) for a, b in zip(results[0], reference)) < TOLERANCE, (results[0], reference)
