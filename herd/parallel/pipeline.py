"""Pipeline parallelism (paper §3.3.2) on `torch.distributed.pipelining`.

A meta-device `Llama` is cut into `pp × V` stages of contiguous layers; rank r of the pipeline group
holds stages r, r+pp, ... (loop style, interleaved schedules) or r and 2pp-1-r (V style, ZBV). As in
the paper, the number of microbatches is free (not tied to the stage count) and the first and last
stages hold one Transformer layer fewer, since they also carry the embedding / the head and loss.

Design notes:
- Stage modules stay `Llama`s (class `LlamaStage`) with the other layers deleted from the `ModuleDict`,
  so their FQNs are the checkpoint's ("layers.7.attention.wq.weight") and FSDP/TP/AC apply unchanged;
  the stage itself (not a wrapper) goes into `PipelineStage`, whose FSDP no-sync logic needs that.
- Document masks: torch's schedules pass the `step()` kwargs to *every* local stage
  (`forward_one_chunk(i, args, kwargs)`), split by microbatch like the inputs; only positional args
  are stage-0-only. Every rank of a pipeline group holds the same local batch (data is sharded over
  DP only), so each rank passes `document_ids=` itself and no integer tensor travels between stages.
  (Sending them with the activations does not work: torch marks every received buffer
  `requires_grad`, which integer tensors refuse, and expects a gradient back for each.)
- Tied embeddings (Llama 3.2 1B/3B) are refused: the last stage would need a second copy of the
  embedding matrix with its gradient all-reduced against stage 0's; those models never need PP.
"""

from __future__ import annotations

import copy
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
    ScheduleZBVZeroBubble,
)

from herd.config import ParallelConfig
from herd.text.model import Llama

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


# --- stage modules ---------------------------------------------------------------------------------
class LlamaStage(Llama):
    """A `Llama` holding only some layers; `forward(x, document_ids)` runs this stage's share.

    x is the token ids (B, T) on the first stage, the previous stage's hidden states (B, T, D)
    elsewhere; returns hidden states, or logits (B, T, V) on the last stage.
    """

    stage_id: int  # set by build_stage_module

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        document_ids: torch.Tensor | None = None,  # (B, T) int
        positions: torch.Tensor | None = None,  # (B, T), rows equal: context parallelism's positions
    ) -> torch.Tensor:
        if self.tok_embeddings is not None:
            h = self.embed(x)
        else:
            h = x
            # The received buffer must be an autograd leaf that requires grad, or no gradient goes back
            # to the previous stage. torch marks it only if the first run of this shape had a backward.
            if torch.is_grad_enabled() and h.is_leaf and not h.requires_grad:
                h.requires_grad_(True)
        pos = positions[0] if positions is not None else None  # (B, T) so the schedule can split it
        # The length comes from the inputs, not from h: under sequence parallelism the activations
        # are split along the sequence (as in Llama.forward_hidden).
        if self.tok_embeddings is not None:
            length = x.shape[1]
        elif document_ids is not None:
            length = document_ids.shape[1]
        else:
            length = pos.shape[0] if pos is not None else h.shape[1]
        ctx = self.attention_context(length, 0, document_ids, pos, h.device)
        for layer in self.layers.values():
            h = layer(h, ctx)
        if self.output is None:  # not the last stage (tied embeddings are refused, see the module doc)
            return h
        return self.output(self.norm(h))

    @torch.no_grad()
    def init_weights(self) -> None:
        super().init_weights()
        # Llama.init_weights picks the embedding std from `self.output` (1.0 untied, 0.02 tied); stage 0
        # has no output projection, so it would take the tied model's std.
        if self.tok_embeddings is not None and not self.args.tie_embeddings:
            nn.init.normal_(self.tok_embeddings.weight, std=1.0)


def build_stage_module(
    model: Llama, stage_id: int, n_stages: int, layer_split: list[list[int]]
) -> LlamaStage:
    """A copy of `model` (build it on the meta device: nothing is allocated) keeping only stage
    `stage_id`'s layers, the embedding on stage 0 and the final norm + output on the last stage."""
    if type(model) is not Llama:
        raise TypeError(f"pipeline stages are cut from a plain herd.text.Llama, got {type(model).__name__}")
    if model.args.tie_embeddings and n_stages > 1:
        raise ValueError(
            "tie_embeddings (Llama 3.2 1B/3B) is not supported with pipeline parallelism: the last stage "
            "would need the embedding matrix too. These models fit without PP; use FSDP/TP instead"
        )
    if len(layer_split) != n_stages or not 0 <= stage_id < n_stages:
        raise ValueError(
            f"stage {stage_id} of {n_stages} does not fit a split into {len(layer_split)} stages"
        )
    keep = {str(i) for i in layer_split[stage_id]}
    stage = copy.deepcopy(model)
    for name in list(stage.layers.keys()):
        if name not in keep:
            del stage.layers[name]  # the remaining keys keep their global ids: checkpoint FQNs
    if stage_id != 0:
        stage.tok_embeddings = None
    if stage_id != n_stages - 1:
        stage.norm = None
        stage.output = None
    stage.__class__ = LlamaStage  # same state, stage forward; still an instance of Llama
    stage.stage_id = stage_id
    return stage


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
class PipelineRuntime:
    """This rank's stage modules plus the schedule that runs them; see `build_pipeline`."""

    def __init__(
        self,
        modules: list[nn.Module],
        stage_ids: list[int],
        n_stages: int,
        group: dist.ProcessGroup,
        device: torch.device,
        schedule_name: str,
        n_microbatches: int,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> None:
        self.modules = modules
        self.stage_ids = stage_ids
        self.n_stages = n_stages
        self.group = group
        self.device = device
        self.schedule_name = schedule_name
        self.n_microbatches = n_microbatches
        self.has_first_stage = 0 in stage_ids
        self.has_last_stage = n_stages - 1 in stage_ids
        self._loss_fn = loss_fn
        self._loss_scale = 1.0
        self._mb_losses: list[torch.Tensor] = []
        # Stages fix their p2p buffer shapes at the first run; a batch of another shape (e.g. eval)
        # gets its own stages + schedule over the same modules, built on first use.
        self._by_shape: dict[tuple[int, ...], tuple[list[PipelineStage], Any]] = {}
        self._first_shape: tuple[int, ...] | None = None
        self.stages, self.schedule = self._build()  # used by the first batch shape

    def _build(self) -> tuple[list[PipelineStage], Any]:
        stages = [
            PipelineStage(m, sid, self.n_stages, self.device, group=self.group)
            for m, sid in zip(self.modules, self.stage_ids)
        ]
        kwargs: dict[str, Any] = dict(n_microbatches=self.n_microbatches, loss_fn=self._scaled_loss)
        # scale_grads=False: the loss is already a sum times the caller's 1/total_targets.
        if self.schedule_name in SINGLE_STAGE_SCHEDULES:
            schedule = SINGLE_STAGE_SCHEDULES[self.schedule_name](stages[0], scale_grads=False, **kwargs)
        else:
            schedule = MULTI_STAGE_SCHEDULES[self.schedule_name](stages, scale_grads=False, **kwargs)
        return stages, schedule

    def _scaled_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss_sum = self._loss_fn(logits, labels)
        self._mb_losses.append(loss_sum.detach())
        return loss_sum * self._loss_scale

    def _schedule_for(self, batch: dict[str, Any]) -> tuple[list[PipelineStage], Any]:
        ref = batch["document_ids"] if batch.get("document_ids") is not None else batch["tokens"]
        shape = tuple(ref.shape)
        if shape[0] % self.n_microbatches:
            raise ValueError(
                f"{self.n_microbatches} pipeline microbatches do not divide the local batch of {shape[0]} "
                "sequences; set parallel.pp_microbatches to a divisor of it"
            )
        if self._first_shape is None:
            self._first_shape = shape
        if shape == self._first_shape:
            return self.stages, self.schedule
        if shape not in self._by_shape:
            self._by_shape[shape] = self._build()
        return self._by_shape[shape]

    def _inputs(self, batch: dict[str, Any]) -> tuple[tuple, dict[str, torch.Tensor], torch.Tensor | None]:
        # Positional args reach stage 0 only; kwargs reach every stage (split per microbatch).
        args = (batch["tokens"].to(self.device),) if self.has_first_stage else ()
        kwargs: dict[str, torch.Tensor] = {}
        if batch.get("document_ids") is not None:
            kwargs["document_ids"] = batch["document_ids"].to(self.device)
        if batch.get("positions") is not None:  # (T,) shared by the rows: expanded so it splits by row
            B, T = batch["tokens"].shape
            kwargs["positions"] = batch["positions"].to(self.device).expand(B, T)
        target = batch["labels"].to(self.device) if self.has_last_stage else None
        return args, kwargs, target

    def _total(self) -> torch.Tensor | None:
        losses, self._mb_losses = self._mb_losses, []
        if not self.has_last_stage:
            return None
        if len(losses) != self.n_microbatches:
            raise RuntimeError(f"expected {self.n_microbatches} microbatch losses, got {len(losses)}")
        return torch.stack(losses).sum()

    def step(self, batch: dict[str, Any], loss_scale: float) -> torch.Tensor | None:
        """Forward + backward of the local batch (every pipeline rank passes the same one); gradients
        of `sum of CE × loss_scale` accumulate into the stage parameters. Returns the unscaled summed
        loss on ranks holding the last stage, else None."""
        _, schedule = self._schedule_for(batch)
        args, kwargs, target = self._inputs(batch)
        self._loss_scale = loss_scale
        self._mb_losses = []
        schedule.step(*args, target=target, return_outputs=False, **kwargs)
        return self._total()

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """Summed loss of the batch, forward only (torch's `schedule.eval`); None off the last stage."""
        stages, schedule = self._schedule_for(batch)
        args, kwargs, target = self._inputs(batch)
        self._mb_losses = []
        # eval() forwards extra keywords to step(): return_outputs=False keeps no logits around.
        schedule.eval(*args, target=target, return_outputs=False, **kwargs)
        for stage in stages:  # eval never pops the cached activations; the next step would
            stage.clear_runtime_states()
        return self._total()


def build_pipeline(
    model: nn.Module,
    pp_mesh: DeviceMesh | dist.ProcessGroup,
    cfg: ParallelConfig,
    device: torch.device,
    n_microbatches: int | None = None,
    parallelize_fn: Callable[[nn.Module], nn.Module] | None = None,
    materialize_fn: Callable[[nn.Module], None] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> PipelineRuntime:
    """This rank's stages of the meta-device `model` and their schedule.

    Per stage module: cut (`build_stage_module`), `parallelize_fn` (TP/FSDP/AC; may return a new
    module), then `materialize_fn` (default: `to_empty(device)` + `init_weights()`).
    `n_microbatches`: None → cfg.pp_microbatches, None → pp. `loss_fn(logits, labels)` → summed loss
    (default: `causal_lm_loss(...)[0]`).
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
    if loss_fn is None:
        from herd.tasks.text import causal_lm_loss  # lazy: herd.tasks imports the training loop

        def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return causal_lm_loss(logits, labels)[0]

    n_stages = pp * virtual
    split = split_layers(model.args.n_layers, n_stages, cfg.pp_fewer_layers_on_ends)  # type: ignore[union-attr]
    stage_ids = stage_ids_for_rank(pp_rank, pp, virtual, schedule)
    materialize = materialize_fn or default_materialize(device)
    modules: list[nn.Module] = []
    for sid in stage_ids:
        module: nn.Module = build_stage_module(model, sid, n_stages, split)  # type: ignore[arg-type]
        if parallelize_fn is not None:
            module = parallelize_fn(module)
        materialize(module)
        modules.append(module)
    return PipelineRuntime(modules, stage_ids, n_stages, group, device, schedule, n_mb, loss_fn)
