"""Where and how a training step runs: one device, or any 4D layout of a torch.distributed job.

`Runtime` owns the mesh, this rank's model parts (one module, or several pipeline stages), the data
shard it reads, and the collectives of a step: the target count of the global batch, the loss, the
gradient norm across pipeline stages, and the full state dict for export. The training loop calls it
and stays the same for every layout.

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
from herd.parallel.parallelize import parallelize
from herd.parallel.tensor_parallel import llama_modules


def _init_rope(module: nn.Module) -> None:
    for llama in llama_modules(module):
        llama.init_rope()


class Runtime:
    def __init__(self, cfg: JobConfig, task: Any, device: torch.device) -> None:
        self.cfg, self.task, self.device = cfg, task, device
        self.distributed = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size() if self.distributed else 1
        self.rank = dist.get_rank() if self.distributed else 0
        p = cfg.parallel
        self.dims = ParallelDims(p.dp_replicate, p.dp_shard, p.cp, p.pp, p.tp, world_size=self.world)
        self.mesh = self.dims.build_mesh(device.type) if self.world > 1 else None
        self.dp_rank = self.mesh["dp"].get_local_rank() if self.mesh is not None else 0
        self.cp_rank = self.mesh["cp"].get_local_rank() if self.mesh is not None else 0
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
                self.mesh["pp"],
                p,
                device,
                micro,
                parallelize_fn=self._parallelize,
                materialize_fn=self._materialize,
            )
            self.parts: list[nn.Module] = list(self.pipeline.modules)
        else:
            self._parallelize(model)
            self._materialize(model)
            self.parts = [model]
        for part in self.parts:
            part.train()

    # --- building ----------------------------------------------------------------------------------
    def _parallelize(self, module: nn.Module) -> nn.Module:
        return parallelize(module, self.dims, self.mesh, self.cfg.parallel, self.cfg.train.dtype)

    def _full_init(self) -> bool:
        mode = self.cfg.model.init
        if mode not in ("auto", "full", "sharded"):
            raise ValueError(f"model.init must be auto, full or sharded, got {mode!r}")
        if mode == "auto":
            args = getattr(self.task, "model_args", None)
            return args is None or args.num_params() < 2e9
        return mode == "full"

    def _reference_state(self) -> dict[str, torch.Tensor]:
        """The whole model initialised on CPU exactly as a single process would (same seed)."""
        if self._initial_state is None:
            torch.manual_seed(self.cfg.train.seed)
            ref = self.task.build_model()
            ref.to_empty(device="cpu")
            _init_rope(ref)
            self.task.init_weights(ref)
            self._initial_state = {k: v.detach() for k, v in ref.state_dict().items()}
        return self._initial_state

    def _materialize(self, module: nn.Module) -> None:
        module.to_empty(device=self.device)
        _init_rope(module)
        if not self.distributed:
            torch.manual_seed(self.cfg.train.seed)
            self.task.init_weights(module)
            return
        if not self._full_init():
            # each pipeline stage draws its own weights (identical seeds would copy layers across stages)
            torch.manual_seed(self.cfg.train.seed + 1000 * getattr(module, "stage_id", 0))
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
                    continue
                out = self.task.loss(self.parts[0], batch)
            (out.loss_sum * scale).backward()
            local_loss += float(out.loss_sum.detach())
            for key, value in out.extra.items():
                local_extra[key] = local_extra.get(key, 0.0) + float(value)
        total = self._sum(local_loss, ("dp_cp", "pp"))  # only last pipeline stages hold a loss
        self.last_extra = self._sum_dict(local_extra, ("dp_cp",))
        return total / global_targets, global_targets

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
        """(summed loss, target count) of one *global* validation batch, over all ranks."""
        rows = batch["tokens"].shape[0]
        if rows % self.dims.dp:
            return 0.0, 0
        b = rows // self.dims.dp
        local = {
            k: v[self.dp_rank * b : (self.dp_rank + 1) * b] if torch.is_tensor(v) else v
            for k, v in batch.items()
        }
        local = self.shard_batch(local)
        with self._autocast():
            if self.pipeline is not None:
                loss = self.pipeline.eval_loss(local)
                loss_sum = float(loss) if loss is not None else 0.0
            else:
                loss_sum = float(self.task.loss(self.parts[0], local).loss_sum)
        targets = self._sum(float(self.task.num_targets(local)), ("dp_cp",))
        return self._sum(loss_sum, ("dp_cp", "pp")), int(targets)

    def _autocast(self):
        if self.cfg.train.dtype == "bf16" and not self.dims.fsdp_enabled:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        if self.cfg.train.dtype not in ("fp32", "bf16"):
            raise ValueError(f"train.dtype must be fp32 or bf16, got {self.cfg.train.dtype!r}")
        return torch.autocast(device_type=self.device.type, enabled=False)

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        """Global L2 norm over every rank's gradients, then clip all of them by it.

        Computed from local shards: the squared sums of each DTensor gradient are all-reduced over the
        mesh dims where it is sharded (not where it is replicated), plain gradients are local, and
        pipeline stages add theirs up. (DTensor's own `full_tensor` route would try to flatten the
        (dp_shard_cp, tp) mesh, which torch 2.11 cannot do in the paper's mesh order.)"""
        grads = [p.grad for p in params if p.grad is not None]
        squares = torch.zeros((), dtype=torch.float32, device=self.device)
        by_layout: dict[tuple, list[torch.Tensor]] = {}
        for g in grads:
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
        """The whole model's state dict on rank 0 (CPU), None elsewhere. Collective."""
        if not self.distributed:
            return {k: v.detach().cpu() for k, v in self.parts[0].state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        mine: dict[str, torch.Tensor] = {}
        for part in self.parts:
            mine.update(get_model_state_dict(part, options=opts))
        if self.dims.pp > 1:  # stages live on different ranks: collect them on rank 0
            gathered: list[Any] = [None] * self.world if self.rank == 0 else None
            dp_tp_cp_leader = self.mesh["dp"].get_local_rank() == 0 and self.mesh["tp"].get_local_rank() == 0
            dist.gather_object(mine if dp_tp_cp_leader and self.cp_rank == 0 else {}, gathered, dst=0)
            if self.rank == 0:
                mine = {k: v for part in gathered for k, v in part.items()}
        return mine if self.rank == 0 else None


def _plain_keys(module: nn.Module) -> set[str]:
    """State-dict keys without activation-checkpoint / compile wrapper prefixes."""
    out = set()
    for key in module.state_dict():
        out.add(key.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""))
    return out
