"""Pipeline parallelism (paper §3.3.2) on `torch.distributed.pipelining`, for any model with a plan.

A meta-device model is cut into `pp × V` stages of contiguous *units* (the plan's `PipelineSplit`: a
Llama's Transformer blocks; the image adapter's cross-attention layer with the self-attention layers
before it); rank r of the pipeline group holds stages r, r+pp, ... (loop style, interleaved schedules)
or r and 2pp-1-r (V style, ZBV). As in the paper, the number of microbatches is free (not tied to the
stage count) and the first and last stages hold one layer fewer, since they also carry the embedding /
the head and loss.

The loss is the task's: the first stage takes the model's positional inputs (`task.inputs(batch)`),
every stage its keyword inputs (split by microbatch along the rows, as torch's schedules do), and the
last stage hands its output to `task.loss_from_output(output, rows of the batch)`, the same function
`task.loss` applies on one device. The rows reach the loss through torch's `target` (the row indices
0..B-1, split like the inputs), so any batch layout works, not only (tokens, labels).

Design notes:
- Stage modules keep the model's FQNs ("layers.7.attention.wq.weight"), so FSDP/TP/AC apply unchanged
  and checkpoints load; the stage itself (not a wrapper) goes into `PipelineStage`, whose FSDP no-sync
  logic needs that.
- Keyword inputs (document masks, images) are passed on every rank of a pipeline group: all of them hold
  the same local batch (data is sharded over DP only), so no integer tensor travels between stages.
  (Sending them with the activations does not work: torch marks every received buffer
  `requires_grad`, which integer tensors refuse, and expects a gradient back for each.) Every keyword
  tensor is per row (B, ...); context parallelism's `positions` (T,), shared by the rows, is expanded
  to (B, T) so that torch can split it, and stages read its first row.
- Modules the plan replicates on every stage (the image encoder) get their gradients summed over the
  pipeline group by the runtime (`replicated_parameters`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
    ScheduleZBVZeroBubble,
)

from herd.config import ParallelConfig
from herd.parallel.plan import PipelineSplit

SINGLE_STAGE_SCHEDULES = {"GPipe": ScheduleGPipe, "1F1B": Schedule1F1B}
MULTI_STAGE_SCHEDULES = {
    "Interleaved1F1B": ScheduleInterleaved1F1B,
    "InterleavedZeroBubble": ScheduleInterleavedZeroBubble,
    "ZBVZeroBubble": ScheduleZBVZeroBubble,
}
V_SHAPED_SCHEDULES = ("ZBVZeroBubble",)  # two stages of one rank are adjacent: hang on gloo (measured)


# --- the layer split -------------------------------------------------------------------------------
def split_layers(n_layers: int, n_stages: int, fewer_on_ends: bool) -> list[list[int]]:
    """Contiguous layer ids per stage.

    Without `fewer_on_ends`: an even split, the first `n_layers % n_stages` stages get one more.
    With it, the embedding and the head+loss each count as one layer: `n_layers + 2` slots are split
    evenly, the first and last stage spend one slot each on them. So with (n_layers + 2) divisible by
    n_stages the ends hold exactly one layer fewer than the middle (405B: 126 layers, 16 stages →
    7, 8×14, 7). Leftover slots go to the middle stages first, then to the first stage (the last one
    also runs the output projection and loss, the heaviest end). An end stage may hold 0 layers (it
    still runs the embedding / head); a middle stage may not, it would only forward activations.
    """
    if n_stages < 1 or n_layers < 1:
        raise ValueError(f"need n_layers >= 1 and n_stages >= 1, got {n_layers} layers, {n_stages} stages")
    if not fewer_on_ends or n_stages == 1:
        base, extra = divmod(n_layers, n_stages)
        counts = [base + (s < extra) for s in range(n_stages)]
        if base == 0:
            raise ValueError(
                f"cannot split {n_layers} layers over {n_stages} pipeline stages (pp × virtual stages): "
                "some stages would hold no layer; use fewer stages"
            )
    else:
        base, extra = divmod(n_layers + 2, n_stages)
        counts = [base - 1] + [base] * (n_stages - 2) + [base - 1]
        for s in [*range(1, n_stages - 1), 0][:extra]:
            counts[s] += 1
        if min(counts) < 0 or min(counts[1:-1], default=1) == 0:
            raise ValueError(
                f"cannot split {n_layers} layers over {n_stages} pipeline stages (pp × virtual stages) "
                "with fewer layers on the ends: middle stages would hold no layer; use fewer stages"
            )
    bounds = [sum(counts[:s]) for s in range(n_stages + 1)]
    return [list(range(bounds[s], bounds[s + 1])) for s in range(n_stages)]


def split_units(unit_sizes: list[int], n_stages: int, fewer_on_ends: bool) -> list[list[int]]:
    """Contiguous unit ids per stage, units of `unit_sizes` layers each (the plan's split rule).

    All units of size 1 (a Llama's blocks): exactly `split_layers`. Otherwise each stage boundary goes to
    the unit boundary nearest the layer count `split_layers` would put there, so stages hold whole units
    (a cross-attention layer stays with the self-attention layers before it) and balance layers.
    """
    if all(size == 1 for size in unit_sizes):
        return split_layers(len(unit_sizes), n_stages, fewer_on_ends)
    n = len(unit_sizes)
    ideal = [len(stage) for stage in split_layers(sum(unit_sizes), n_stages, fewer_on_ends)]
    done = [sum(unit_sizes[:c]) for c in range(n + 1)]  # layers before unit c
    # cut[s] = the first unit of stage s + 1; ends may be empty with fewer_on_ends, middles may not
    cuts, target, prev = [], 0, 0
    for s in range(n_stages - 1):
        target += ideal[s]
        lo = prev + (0 if s == 0 and fewer_on_ends else 1)
        hi = n - (n_stages - 2 - s) - (0 if fewer_on_ends else 1)  # room for the later stages
        if lo > hi:
            raise ValueError(
                f"cannot split {n} pipeline units over {n_stages} stages: middle stages would be empty; "
                "use fewer stages"
            )
        cut = min(range(lo, hi + 1), key=lambda c: (abs(done[c] - target), c))
        cuts.append(cut)
        prev = cut
    bounds = [0, *cuts, n]
    return [list(range(bounds[s], bounds[s + 1])) for s in range(n_stages)]


def stage_ids_for_rank(pp_rank: int, pp: int, virtual: int, schedule: str) -> list[int]:
    """The global stage ids rank `pp_rank` holds: loop style r, r+pp, ... or V style r, 2pp-1-r."""
    if schedule in V_SHAPED_SCHEDULES:
        if virtual != 2:
            raise ValueError(f"{schedule} needs exactly 2 virtual stages per rank, got {virtual}")
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + v * pp for v in range(virtual)]


def validate_pipeline_config(schedule: str, pp: int, virtual: int, n_microbatches: int) -> None:
    """Reject layouts torch 2.11's schedules would refuse (or silently mis-run), with the reason."""
    known = [*SINGLE_STAGE_SCHEDULES, *MULTI_STAGE_SCHEDULES]
    if schedule not in known:
        raise ValueError(f"parallel.pp_schedule must be one of {known}, got {schedule!r}")
    if pp < 2:
        raise ValueError(f"pipeline parallelism needs parallel.pp >= 2, got {pp}")
    if n_microbatches < 1:
        raise ValueError(f"parallel.pp_microbatches must be >= 1, got {n_microbatches}")
    if schedule in SINGLE_STAGE_SCHEDULES and virtual != 1:
        raise ValueError(
            f"{schedule} runs one stage per rank: set parallel.pp_virtual_stages = 1 (got {virtual}) "
            "or use Interleaved1F1B / InterleavedZeroBubble"
        )
    if schedule == "1F1B" and n_microbatches < pp:
        raise ValueError(
            f"1F1B needs at least as many microbatches as stages: {n_microbatches} < pp = {pp} "
            "(torch's Schedule1F1B); use more microbatches or GPipe"
        )
    if schedule in ("Interleaved1F1B", "InterleavedZeroBubble"):
        if virtual < 2:
            raise ValueError(f"{schedule} needs parallel.pp_virtual_stages >= 2, got {virtual}")
        rounds = max(1, n_microbatches // pp)
        if n_microbatches % rounds:
            raise ValueError(
                f"{schedule} runs microbatches in rounds of max(1, n_microbatches // pp) = {rounds}: "
                f"n_microbatches = {n_microbatches} must be a multiple of it (any count <= pp, or a "
                f"multiple of pp = {pp}, works)"
            )
    if schedule == "ZBVZeroBubble" and virtual != 2:
        raise ValueError(f"ZBVZeroBubble needs parallel.pp_virtual_stages = 2, got {virtual}")


def default_materialize(device: torch.device) -> Callable[[nn.Module], None]:
    """`to_empty(device)` + `init_weights()` of a stage module, seeded per stage (see below)."""

    def materialize(module: nn.Module) -> None:
        module.to_empty(device=device)
        # Every pipeline rank runs this with the same RNG state: offset the seed by the stage id so
        # that layers of different stages do not start as copies of each other.
        stage_id = int(getattr(module, "stage_id", 0))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(torch.initial_seed() + 1_000_003 * (stage_id + 1))
            module.init_weights()  # type: ignore[operator]

    return materialize


# --- the runtime -----------------------------------------------------------------------------------
def rows_of(batch: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """The microbatch of `batch` at row indices `rows`: every per-row tensor (B, ...) sliced; shared
    entries (`positions`, non-tensors) kept."""
    B = batch_rows(batch)
    return {
        k: v.index_select(0, rows.to(v.device))
        if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == B and k != "positions"
        else v
        for k, v in batch.items()
    }


def batch_rows(batch: dict[str, Any]) -> int:
    """B of a batch: the leading dimension of its first per-row tensor."""
    for k, v in batch.items():
        if torch.is_tensor(v) and v.dim() >= 1 and k != "positions":
            return int(v.shape[0])
    raise ValueError(f"the batch holds no per-row tensor (keys: {sorted(batch)})")


class PipelineRuntime:
    """This rank's stage modules plus the schedules that run them; see `build_pipeline`.

    `task` is anything with `inputs(batch) -> (args, kwargs)` and `loss_from_output(output, batch)`
    returning an object with `loss_sum` and `extra` (a `herd.task.Task`)."""

    def __init__(
        self,
        modules: list[nn.Module],
        stage_ids: list[int],
        n_stages: int,
        group: dist.ProcessGroup,
        device: torch.device,
        schedule_name: str,
        n_microbatches: int,
        task: Any,
        sync_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.modules = modules
        self.sync_group = sync_group
        self.stage_ids = stage_ids
        self.n_stages = n_stages
        self.group = group
        self.device = device
        self.schedule_name = schedule_name
        self.n_microbatches = n_microbatches
        self.has_first_stage = 0 in stage_ids
        self.has_last_stage = n_stages - 1 in stage_ids
        self.task = task
        self._batch: dict[str, Any] | None = None  # the batch whose microbatches the loss slices
        self._loss_scale = 1.0
        self._mb_losses: list[torch.Tensor] = []
        self._mb_extra: dict[str, float] = {}
        # Stages fix their p2p buffer shapes at the first run; a batch of another shape (e.g. eval)
        # gets its own stages + schedule over the same modules, built on first use.
        self._schedules: dict[tuple, tuple[list[PipelineStage], Any]] = {}

    def _build(self, n_microbatches: int, forward_only: bool) -> tuple[list[PipelineStage], Any]:
        stages = [
            PipelineStage(m, sid, self.n_stages, self.device, group=self.group)
            for m, sid in zip(self.modules, self.stage_ids)
        ]
        # scale_grads=False: the loss is already a sum times the caller's 1/total_targets.
        kwargs: dict[str, Any] = dict(n_microbatches=n_microbatches, loss_fn=self._loss, scale_grads=False)
        if forward_only:  # evaluation: any microbatch count, no backward
            if len(stages) == 1:
                return stages, ScheduleGPipe(stages[0], **kwargs)
            return stages, ScheduleLoopedBFS(stages, **kwargs)
        if self.schedule_name in SINGLE_STAGE_SCHEDULES:
            return stages, SINGLE_STAGE_SCHEDULES[self.schedule_name](stages[0], **kwargs)
        return stages, MULTI_STAGE_SCHEDULES[self.schedule_name](stages, **kwargs)

    def _loss(self, output: Any, rows: torch.Tensor) -> torch.Tensor:
        """torch's loss_fn on the last stage: the task's loss of this microbatch's rows."""
        assert self._batch is not None
        out = self.task.loss_from_output(output, rows_of(self._batch, rows))
        self._mb_losses.append(out.loss_sum.detach())
        for key, value in out.extra.items():
            self._mb_extra[key] = self._mb_extra.get(key, 0.0) + float(value)
        return out.loss_sum * self._loss_scale

    def _schedule_for(
        self, shapes: tuple, n_microbatches: int, forward_only: bool
    ) -> tuple[list[PipelineStage], Any]:
        rows = shapes[0]
        if rows % n_microbatches:
            raise ValueError(
                f"{n_microbatches} pipeline microbatches do not divide the local batch of {rows} "
                "sequences; set parallel.pp_microbatches to a divisor of it"
            )
        key = (shapes, n_microbatches, forward_only)
        new = key not in self._schedules
        if self.sync_group is not None:
            # torch's shape inference runs a forward of every stage when a schedule is built; under FSDP that
            # forward all-gathers the stage's units, so the data-parallel ranks of a stage (whose batches may
            # differ in length) must build schedules at the same steps, or their collectives fall out of step
            flag = torch.tensor([float(new)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.sync_group)
            new = bool(flag.item())
        if new:
            self._schedules[key] = self._build(n_microbatches, forward_only)
        return self._schedules[key]

    def _inputs(self, batch: dict[str, Any]) -> tuple[tuple, dict[str, Any], torch.Tensor | None, tuple]:
        """(this rank's positional args, kwargs, target rows, the batch's shape key)."""
        batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        self._batch = batch
        rows = batch_rows(batch)
        args, kwargs = self.task.inputs(batch)
        kwargs = dict(kwargs)
        positions = kwargs.get("positions")
        if positions is not None and positions.dim() == 1:  # shared by the rows: expand so it splits
            kwargs["positions"] = positions.expand(rows, -1)
        # The shapes of *all* inputs key the schedules, on every stage alike: a later stage that keyed on its
        # keyword inputs alone could keep a schedule its first stage rebuilds (a new length, same rows).
        key = (
            rows,
            tuple(tuple(a.shape) for a in args if torch.is_tensor(a)),
            tuple((k, tuple(v.shape)) for k, v in sorted(kwargs.items()) if torch.is_tensor(v)),
        )
        # Positional args reach stage 0 only; kwargs reach every stage (split per microbatch).
        args = tuple(args) if self.has_first_stage else ()
        target = torch.arange(rows, device=self.device) if self.has_last_stage else None
        return args, kwargs, target, key

    def _collect(self, n_microbatches: int) -> tuple[torch.Tensor | None, dict[str, float]]:
        losses, self._mb_losses = self._mb_losses, []
        extra, self._mb_extra = self._mb_extra, {}
        self._batch = None
        if not self.has_last_stage:
            return None, {}
        if len(losses) != n_microbatches:
            raise RuntimeError(f"expected {n_microbatches} microbatch losses, got {len(losses)}")
        return torch.stack(losses).sum(), extra

    def step(self, batch: dict[str, Any], loss_scale: float) -> torch.Tensor | None:
        """Forward + backward of the local batch (every pipeline rank passes the same one); gradients
        of `sum of the task's loss × loss_scale` accumulate into the stage parameters. Returns the
        unscaled summed loss on ranks holding the last stage, else None (`last_extra`: the task's
        summed auxiliary metrics there)."""
        args, kwargs, target, key = self._inputs(batch)
        _, schedule = self._schedule_for(key, self.n_microbatches, forward_only=False)
        self._loss_scale = loss_scale
        schedule.step(*args, target=target, return_outputs=False, **kwargs)
        loss, self.last_extra = self._collect(self.n_microbatches)
        return loss

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, Any], n_microbatches: int | None = None) -> torch.Tensor | None:
        """Summed loss of the batch, forward only; None off the last stage. `n_microbatches` (default the
        training count) may be anything that divides the batch: ragged validation batches use fewer."""
        n_mb = n_microbatches or self.n_microbatches
        args, kwargs, target, key = self._inputs(batch)
        stages, schedule = self._schedule_for(key, n_mb, forward_only=True)
        self._loss_scale = 1.0
        # eval() forwards extra keywords to step(): return_outputs=False keeps no outputs around.
        schedule.eval(*args, target=target, return_outputs=False, **kwargs)
        for stage in stages:  # eval never pops the cached activations; the next step would
            stage.clear_runtime_states()
        return self._collect(n_mb)[0]


def eval_microbatches(configured: int, local_rows: list[int]) -> int:
    """A microbatch count every data-parallel rank's local rows divide (FSDP needs the same number of
    forward passes on each): the largest divisor of `configured` dividing every count."""
    g = configured
    for rows in local_rows:
        g = math.gcd(g, rows)
    return max(g, 1)


def replicated_parameters(modules: list[nn.Module], split: PipelineSplit) -> list[nn.Parameter]:
    """Trainable parameters of the modules every stage holds a copy of (their gradients are summed over
    the pipeline group)."""
    out = []
    for module in modules:
        for fqn in split.replicated(module):
            out += [p for p in module.get_submodule(fqn).parameters() if p.requires_grad]
    return out


def build_pipeline(
    model: nn.Module,
    split: PipelineSplit,
    pp_mesh: DeviceMesh | dist.ProcessGroup,
    cfg: ParallelConfig,
    device: torch.device,
    task: Any,
    n_microbatches: int | None = None,
    parallelize_fn: Callable[[nn.Module], nn.Module] | None = None,
    materialize_fn: Callable[[nn.Module], None] | None = None,
    sync_group: dist.ProcessGroup | None = None,
) -> PipelineRuntime:
    """This rank's stages of the meta-device `model` (cut by the plan's `split`) and their schedule.

    Per stage module: cut (`split.build_stage`), `parallelize_fn` (TP/FSDP/AC; may return a new
    module), then `materialize_fn` (default: `to_empty(device)` + `init_weights()`).
    `n_microbatches`: None → cfg.pp_microbatches, None → pp. `task`: see `PipelineRuntime`.
    `sync_group`: the data-parallel group of a stage under FSDP (see `PipelineRuntime._schedule_for`).
    """
    group = pp_mesh.get_group() if isinstance(pp_mesh, DeviceMesh) else pp_mesh
    pp, pp_rank = dist.get_world_size(group), dist.get_rank(group)
    if cfg.pp != pp:
        raise ValueError(f"parallel.pp = {cfg.pp} but the pipeline group has {pp} ranks")
    schedule, virtual = cfg.pp_schedule, cfg.pp_virtual_stages
    n_mb = n_microbatches or cfg.pp_microbatches or pp
    validate_pipeline_config(schedule, pp, virtual, n_mb)
    if schedule in V_SHAPED_SCHEDULES and (device.type == "cpu" or dist.get_backend(group) == "gloo"):
        raise NotImplementedError(
            f"{schedule} is GPU-only: its V-shaped schedule hands activations between two stages on one "
            "rank, which hangs on gloo/CPU. Use Interleaved1F1B or InterleavedZeroBubble there"
        )
    n_stages = pp * virtual
    units = split_units(split.unit_sizes(model), n_stages, cfg.pp_fewer_layers_on_ends)
    stage_ids = stage_ids_for_rank(pp_rank, pp, virtual, schedule)
    materialize = materialize_fn or default_materialize(device)
    modules: list[nn.Module] = []
    for sid in stage_ids:
        module = split.build_stage(model, sid, n_stages, units[sid])
        module.stage_id = sid  # type: ignore[assignment]  # per-stage seeds (default_materialize)
        if parallelize_fn is not None:
            module = parallelize_fn(module)
        materialize(module)
        modules.append(module)
    return PipelineRuntime(modules, stage_ids, n_stages, group, device, schedule, n_mb, task, sync_group)
