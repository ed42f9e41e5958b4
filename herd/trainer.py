"""The one training loop of herd.

Text pretraining and every adapter (and every post-training objective) run through `train()`; what
differs is a `Task`: it builds the model, yields batches and computes a loss. Nothing here knows
about tokens, images or audio.

Loss normalisation: a step's micro-batches are fetched first and their target counts summed, and each
micro-batch contributes `loss_sum / total_targets`; so gradient accumulation gives exactly the
gradient of the mean loss over the whole step, however targets are spread across micro-batches (the
bug torchtune #2307 had in one recipe copy and not another).
"""

from __future__ import annotations

import math
import random
import resource
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from herd.config import JobConfig, grad_accum_at
from herd.metrics import MetricsLogger
from herd.optim import OptimizerGroup, describe_multipliers, multiplier_matches
from herd.parallel.runtime import Runtime


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # scalar: sum of per-target losses in the micro-batch
    num_targets: int  # how many targets the sum covers
    # summed auxiliary metrics (e.g. correctly ranked pairs); the loop sums them over ranks and a logging
    # window and logs each divided by the window's targets (correct pairs / pairs = ranking accuracy)
    extra: dict[str, float] = field(default_factory=dict)


class Task(Protocol):
    """What a modality or objective plugs into the loop."""

    def build_model(self) -> nn.Module:
        """The model on the meta device (the loop parallelises, materialises, then calls init_weights)."""
        ...

    def init_weights(self, model: nn.Module) -> None:
        """Fill a materialised model: random init, pretrained weights, frozen towers..."""
        ...

    def train_batches(self, rank: int, world_size: int) -> Iterator[dict[str, Any]]:
        """Batches of data-parallel rank `rank` of `world_size`; stateful (state_dict) to resume."""
        ...

    def val_batches(self) -> Iterable[dict[str, Any]] | None:
        """Global validation batches (the loop splits them across ranks), or None."""
        ...

    def num_targets(self, batch: dict[str, Any]) -> int: ...

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput: ...

    def flops_per_target(self) -> float | None: ...


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainResult:
    model: nn.Module
    final_loss: float
    val_loss: float | None
    steps: int
    seconds: float
    history: list[dict[str, Any]]
    runtime: Any = None  # the Runtime (mesh, model parts) the run used


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this rank: allocated GPU memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def move_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(runtime: Runtime, task: Task, cfg: JobConfig) -> dict[str, float] | None:
    """Mean loss over at most `train.eval_batches` global validation batches, on every layout."""
    batches = task.val_batches()
    if batches is None:
        return None
    for part in runtime.parts:
        part.eval()
    total, count = 0.0, 0
    for i, batch in enumerate(batches):
        if i >= cfg.train.eval_batches:
            break
        loss_sum, targets = runtime.eval_sums(move_to(batch, runtime.device))
        total, count = total + loss_sum, count + targets
    for part in runtime.parts:
        part.train()
    return {"loss": total / count} if count else None


def train(cfg: JobConfig, task: Task, show_progress: bool = True) -> TrainResult:
    """Run `cfg.train.steps` optimizer steps of `task` under `cfg.parallel`'s layout (one process or
    a torchrun job); returns the trained model parts and a summary."""
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    runtime = Runtime(cfg, task, device)
    run_dir = Path(cfg.train.run_dir)
    logger = MetricsLogger(run_dir, cfg.metrics, enabled=runtime.is_logging_rank, config=cfg.to_dict())
    named_params = runtime.named_trainable_parameters()
    params = [p for _, p in named_params]
    optim = OptimizerGroup(runtime.parts, cfg.optimizer, cfg.schedule, cfg.train.steps)
    if cfg.optimizer.lr_multipliers and runtime.is_logging_rank:  # what each name substring reached
        found = multiplier_matches(named_params, cfg.optimizer.lr_multipliers)
        for line in describe_multipliers(found, cfg.optimizer.lr_multipliers):
            logger.console.print(line, highlight=False, soft_wrap=True)
    batches = task.train_batches(rank=runtime.dp_rank, world_size=runtime.dims.dp)
    flops_per_target = task.flops_per_target()

    checkpointer = _checkpointer(cfg, run_dir)
    start_step = 0
    if checkpointer is not None:
        loaded = checkpointer.load(runtime.parts, optim.optimizers, optim.scheduler, batches)
        if loaded is not None:
            start_step = loaded
            logger.console.print(f"resumed from step {loaded} ({checkpointer.latest()})")

    history: list[dict[str, Any]] = []
    window_loss, window_targets, window_start = 0.0, 0, time.perf_counter()
    window_extra: dict[str, float] = {}
    start = time.perf_counter()
    last_loss, val_loss = float("nan"), None
    progress = Progress(
        TextColumn("[bold blue]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
        console=logger.console,
        disable=not (show_progress and runtime.is_logging_rank),
        transient=True,
    )
    with progress:
        bar = progress.add_task("train", total=cfg.train.steps, completed=start_step, loss="-")
        for step in range(start_step + 1, cfg.train.steps + 1):
            micro = [move_to(next(batches), device) for _ in range(grad_accum_at(cfg.train, step))]
            step_loss, step_targets = runtime.forward_backward(micro)
            if not math.isfinite(step_loss):
                last_good = checkpointer.latest() if checkpointer is not None else None
                logger.close()
                raise NonFiniteLossError(
                    f"loss became {step_loss} at step {step} (run dir {run_dir}); last good checkpoint: "
                    f"{last_good or 'none written'}"
                )
            grad_norm = runtime.clip_grad_norm(params, cfg.optimizer.grad_clip)
            lr = optim.lr()
            optim.step()

            last_loss = step_loss
            window_loss += step_loss * step_targets
            window_targets += step_targets
            for key, value in runtime.last_extra.items():
                window_extra[key] = window_extra.get(key, 0.0) + value
            progress.update(bar, advance=1, loss=f"{step_loss:.3f}")
            if step % cfg.metrics.log_every == 0 or step == cfg.train.steps:
                elapsed = time.perf_counter() - window_start
                record: dict[str, Any] = {
                    "loss": window_loss / max(window_targets, 1),
                    "grad_norm": grad_norm,
                    "lr": lr,
                    "targets_per_s": window_targets / max(elapsed, 1e-9),
                }
                record.update({k: v / max(window_targets, 1) for k, v in window_extra.items()})
                if flops_per_target and cfg.metrics.peak_tflops:
                    achieved = flops_per_target * record["targets_per_s"] / runtime.world
                    record["mfu"] = achieved / (cfg.metrics.peak_tflops * 1e12)
                record["peak_mem_gib"] = peak_memory_gib(device)
                logger.log(step, record)
                history.append({"step": step, **record})
                window_loss, window_targets, window_start = 0.0, 0, time.perf_counter()
                window_extra = {}
            if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
                val = evaluate(runtime, task, cfg)
                if val is not None:
                    val_loss = val["loss"]
                    logger.log(step, val, prefix="val")
                    history.append({"step": step, "split": "val", **val})
            if checkpointer is not None and checkpointer.due(step, cfg.train.steps):
                checkpointer.save(
                    step, runtime.parts, optim.optimizers, optim.scheduler, batches, _model_args(task)
                )
    if checkpointer is not None:
        checkpointer.close()
    seconds = time.perf_counter() - start
    logger.close()
    return TrainResult(runtime.parts[0], last_loss, val_loss, cfg.train.steps, seconds, history, runtime)


def _model_args(task: Task) -> dict[str, Any] | None:
    args = getattr(task, "model_args", None)
    return args.to_dict() if args is not None else None


def _checkpointer(cfg: JobConfig, run_dir: Path):
    """The DCP checkpointer, unless the job neither saves nor resumes."""
    ck = cfg.checkpoint
    if not ck.interval and not ck.save_final and ck.resume == "none":
        return None
    from herd.checkpoint import Checkpointer

    return Checkpointer(ck, run_dir)
