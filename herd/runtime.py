"""Where and how a training step runs: one device, or any 4D layout of a torch.distributed job.

`Runtime` owns the mesh, this rank's model parts (one module, or several pipeline stages), the data
shard it reads, and the collectives of a step: the target count of the global batch, the loss, the
gradient norm across pipeline stages, and the full state dict for export. It is where a task meets the
mesh: the task's model is built on the meta device, checked against the layout (`task.check_layout`),
parallelised with the task's plan (`herd.parallel.parallelize`), materialised and filled
(`task.init_weights`); every step runs the task's loss, on every layout (`herd.task`).

Gradient arithmetic: each rank back-propagates `loss_sum_local / global_targets`; the exact gradient
of the global mean is the *sum* of those over the ranks holding different tokens (DP and CP), but
FSDP averages what it reduces, so the local loss is also multiplied by the size of FSDP's mesh.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

from herd.config import JobConfig
from herd.parallel.dims import ParallelDims
from herd.parallel.fsdp import set_gradient_sync
from herd.parallel.parallelize import check_plan_supports, layout_degrees, parallelize
from herd.parallel.pipeline import batch_rows, eval_microbatches, replicated_parameters, rows_of
from herd.task import Task


class Runtime:
    def __init__(self, cfg: JobConfig, task: Task, device: torch.device) -> None:
        self.cfg, self.task, self.device = cfg, task, device
        self.plan = task.plan
        self.distributed = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size() if self.distributed else 1
        self.rank = dist.get_rank() if self.distributed else 0
        p = cfg.parallel
        self.dims = ParallelDims(p.dp_replicate, p.dp_shard, p.cp, p.pp, p.tp, world_size=self.world)
        task.check_layout(layout_degrees(self.dims))  # a clear error before anything is built
        check_plan_supports(self.plan, self.dims)
        self.mesh = self.dims.build_mesh(device.type) if self.world > 1 else None
        self.dp_rank = self.mesh["dp"].get_local_rank() if self.mesh is not None else 0
        self.cp_rank = self.mesh["cp"].get_local_rank() if self.mesh is not None else 0
        self.pp_rank = self.mesh["pp"].get_local_rank() if self.mesh is not None else 0
        self.is_logging_rank = self.rank == 0
        self._initial_state: dict[str, torch.Tensor] | None = None
        self.pipeline = None
        self.last_extra: dict[str, float] = {}  # the task's summed `LossOutput.extra` of the last step

        model = task.build_model()  # on the meta device
        if self.dims.pp > 1:
            from herd.parallel.pipeline import build_pipeline

            micro = p.pp_microbatches or self.dims.pp
            self.pipeline = build_pipeline(
                model,
                self.plan.pipeline,
                self.mesh["pp"],
                p,
                device,
                task,
                micro,
                parallelize_fn=self._parallelize,
                materialize_fn=self._materialize,
                sync_group=self.mesh["dp_cp"].get_group() if self.dims.fsdp_enabled else None,
            )
            self.parts: list[nn.Module] = list(self.pipeline.modules)
            # modules every stage holds a copy of (the image encoder): gradients summed over the pipeline
            self.replicated = replicated_parameters(self.parts, self.plan.pipeline)
        else:
            self._parallelize(model)
            self._materialize(model)
            self.parts = [model]
            self.replicated = []
        for part in self.parts:
            part.train()

    # --- building ----------------------------------------------------------------------------------
    def _parallelize(self, module: nn.Module) -> nn.Module:
        return parallelize(module, self.plan, self.dims, self.mesh, self.cfg.parallel, self.cfg.train.dtype)

    def _full_init(self) -> bool:
        mode = self.cfg.model.init
        if mode == "auto":
            return self.task.model_args.num_params() < 2e9
        return mode == "full"

    def _reference_state(self) -> dict[str, torch.Tensor]:
        """The whole model initialised on CPU exactly as a single process would (same seed)."""
        if self._initial_state is None:
            torch.manual_seed(self.cfg.train.seed)
            ref = self.task.build_model()
            ref.to_empty(device="cpu")
            self.plan.init_buffers(ref)
            self.task.init_weights(ref)
            self._initial_state = {k: v.detach() for k, v in ref.state_dict().items()}
        return self._initial_state

    def _materialize(self, module: nn.Module) -> None:
        module.to_empty(device=self.device)
        self.plan.init_buffers(module)
        if not self.distributed:
            torch.manual_seed(self.cfg.train.seed)
            self.task.init_weights(module)
            return
        if not self._full_init():
            # each pipeline stage draws its own weights (identical seeds would copy layers across stages),
            # except where the plan replicates modules on every stage: their copies must start equal
            split = self.plan.pipeline
            shared = split is not None and bool(split.replicated(module))
            stage = 0 if shared else getattr(module, "stage_id", 0)
            torch.manual_seed(self.cfg.train.seed + 1000 * stage)
            self.task.init_weights(module)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        full = self._reference_state()
        own = {k: v for k, v in full.items() if k in _plain_keys(module)}
        set_model_state_dict(module, own, options=StateDictOptions(full_state_dict=True, strict=True))

    # --- the step ----------------------------------------------------------------------------------
    def shard_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.dims.cp > 1:
            from herd.parallel.context_parallel import shard_batch_for_cp

            return shard_batch_for_cp(batch, self.cp_rank, self.dims.cp)
        return batch

    def _sum(self, value: float, group_names: tuple[str, ...]) -> float:
        if self.mesh is None:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        for name in group_names:
            if self.mesh[name].size() > 1:
                dist.all_reduce(t, group=self.mesh[name].get_group())
        return float(t)

    def forward_backward(self, micro: list[dict[str, Any]]) -> tuple[float, int]:
        """Forward + backward over one optimizer step's micro-batches (already on the device, DP-local).

        Returns (mean loss over the global batch, global target count)."""
        micro = [self.shard_batch(b) for b in micro]
        local_targets = sum(self.task.num_targets(b) for b in micro)
        global_targets = int(self._sum(float(local_targets), ("dp_cp",)))
        if global_targets == 0:
            return 0.0, 0
        grad_divisor = self.dims.dp * self.dims.cp if self.dims.fsdp_enabled else 1
        scale = grad_divisor / global_targets
        local_loss = 0.0
        local_extra: dict[str, float] = {}
        for i, batch in enumerate(micro):
            set_gradient_sync(self.parts, i == len(micro) - 1)
            with self._autocast():
                if self.pipeline is not None:
                    loss_sum = self.pipeline.step(batch, loss_scale=scale)
                    local_loss += float(loss_sum) if loss_sum is not None else 0.0
                    extra = self.pipeline.last_extra
                else:
                    out = self.task.loss(self.parts[0], batch)
                    (out.loss_sum * scale).backward()
                    local_loss += float(out.loss_sum.detach())
                    extra = out.extra
            for key, value in extra.items():
                local_extra[key] = local_extra.get(key, 0.0) + float(value)
        self._sum_replicated_gradients()
        total = self._sum(local_loss, ("dp_cp", "pp"))  # only last pipeline stages hold a loss
        self.last_extra = self._sum_dict(self._last_stage_extra(local_extra), ("dp_cp",))
        return total / global_targets, global_targets

    def _sum_replicated_gradients(self) -> None:
        """Modules every pipeline stage holds a copy of get each stage's share of the gradient: sum them
        over the pipeline group, so every copy takes the same optimizer step."""
        if not self.replicated:
            return
        group = self.mesh["pp"].get_group()
        for p in self.replicated:
            if p.grad is None:  # a stage that did not run the module: its share is zero
                p.grad = torch.zeros_like(p)
            grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            dist.all_reduce(grad, group=group)

    def _last_stage_extra(self, extra: dict[str, float]) -> dict[str, float]:
        """Under PP only the last stage computes the task's loss (and its extras): share them with the
        other stages of the pipeline group, so every rank logs the same numbers."""
        if self.pipeline is None:
            return extra
        box = [extra]
        last = dist.get_global_rank(self.mesh["pp"].get_group(), self.dims.pp - 1)
        dist.broadcast_object_list(box, src=last, group=self.mesh["pp"].get_group())
        return box[0]

    def _sum_dict(self, values: dict[str, float], group_names: tuple[str, ...]) -> dict[str, float]:
        """Sum a task's auxiliary metrics over ranks (every rank reports the same keys)."""
        if self.mesh is None or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        for name in group_names:
            if self.mesh[name].size() > 1:
                dist.all_reduce(t, group=self.mesh[name].get_group())
        return dict(zip(keys, t.tolist()))

    @torch.no_grad()
    def eval_sums(self, batch: dict[str, Any]) -> tuple[float, int]:
        """(summed loss, target count) of one *global* validation batch, over all ranks.

        The rows are split over the data-parallel ranks as evenly as they go (a ragged last batch gives
        some ranks a row fewer); a rank left without a row runs the first one to keep the collectives
        in step and counts nothing."""
        rows = batch_rows(batch)
        chunks = torch.arange(rows).tensor_split(self.dims.dp)
        mine = chunks[self.dp_rank]
        counted = len(mine) > 0
        local = rows_of(batch, mine if counted else torch.arange(1))
        local = self.shard_batch(local)
        with self._autocast():
            if self.pipeline is not None:
                configured = self.cfg.parallel.pp_microbatches or self.dims.pp
                n_mb = eval_microbatches(configured, [max(len(c), 1) for c in chunks])
                loss = self.pipeline.eval_loss(local, n_mb)
                loss_sum = float(loss) if loss is not None else 0.0
            else:
                loss_sum = float(self.task.loss(self.parts[0], local).loss_sum)
        local_targets = self.task.num_targets(local) if counted else 0
        targets = self._sum(float(local_targets), ("dp_cp",))
        return self._sum(loss_sum if counted else 0.0, ("dp_cp", "pp")), int(targets)

    def _autocast(self):
        if self.cfg.train.dtype == "bf16" and not self.dims.fsdp_enabled:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return torch.autocast(device_type=self.device.type, enabled=False)

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        """Global L2 norm over every rank's gradients, then clip all of them by it.

        Computed from local shards: the squared sums of each DTensor gradient are all-reduced over the
        mesh dims where it is sharded (not where it is replicated), plain gradients are local, and
        pipeline stages add theirs up (a module every stage holds a copy of counts once). (DTensor's own
        `full_tensor` route would try to flatten the (dp_shard_cp, tp) mesh, which torch 2.11 cannot do in
        the paper's mesh order.)"""
        grads = [p.grad for p in params if p.grad is not None]
        copies = {id(p.grad) for p in self.replicated if p.grad is not None} if self.pp_rank else set()
        squares = torch.zeros((), dtype=torch.float32, device=self.device)
        by_layout: dict[tuple, list[Any]] = {}
        for g in grads:
            if id(g) in copies:  # counted on the first pipeline rank
                continue
            if isinstance(g, DTensor):
                if any(pl.is_partial() for pl in g.placements):
                    g = g.redistribute(
                        placements=[Replicate() if pl.is_partial() else pl for pl in g.placements]
                    )
                key = (id(g.device_mesh), tuple(pl.is_replicate() for pl in g.placements))
                by_layout.setdefault(key, [g.device_mesh, g.placements, []])[2].append(g.to_local())
            else:
                squares = squares + g.detach().float().pow(2).sum()
        for mesh, placements, locals_ in by_layout.values():
            part = torch.stack([t.float().pow(2).sum() for t in locals_]).sum()
            for dim, placement in enumerate(placements):
                # any non-replicated placement is a shard (FSDP×TP uses _StridedShard, not a Shard)
                if not placement.is_replicate() and mesh.size(dim) > 1:
                    dist.all_reduce(part, group=mesh.get_group(dim))
            squares = squares + part
        if self.mesh is not None and self.dims.pp > 1:
            dist.all_reduce(squares, group=self.mesh["pp"].get_group())
        total = float(squares.sqrt())
        coef = min(1.0, max_norm / (total + 1e-6))
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
        return total

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for part in self.parts for n, p in part.named_parameters() if p.requires_grad]

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's state dict on rank 0 (CPU), None elsewhere. Collective.

        Without pipeline parallelism DCP gathers the (FSDP/TP-sharded) tensors onto rank 0 directly. With
        it, each stage's first rank (data, tensor and context rank 0) gathers its stage — torch's
        `cpu_offload` option would hand the gathered stage to the world's rank 0 only, so the stage is
        gathered in full on the stage's ranks and moved to CPU on its first rank — and rank 0 collects
        the stages."""
        if not self.distributed:
            return {k: v.detach().cpu() for k, v in self.parts[0].state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if self.dims.pp == 1:
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            mine = {k: v for part in self.parts for k, v in get_model_state_dict(part, options=opts).items()}
            return mine if self.rank == 0 else None
        leader = self.dp_rank == 0 and self.mesh["tp"].get_local_rank() == 0 and self.cp_rank == 0
        opts = StateDictOptions(full_state_dict=True)
        mine = {}
        for part in self.parts:
            for k, v in get_model_state_dict(part, options=opts).items():
                if leader:
                    mine[k] = v.detach().cpu()
        gathered: list[Any] = [None] * self.world if self.rank == 0 else None
        dist.gather_object(mine if leader else {}, gathered, dst=0)
        if self.rank != 0:
            return None
        return {k: v for stage in gathered for k, v in stage.items()}


def _plain_keys(module: nn.Module) -> set[str]:
    """State-dict keys without activation-checkpoint / compile wrapper prefixes."""
    out = set()
    for key in module.state_dict():
        out.add(key.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""))
    return out
