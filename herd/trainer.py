"""The one training loop of herd.

Text pretraining and every adapter (and every post-training objective) run through `train()`; what
differs is a `Task` (`herd.task`): it builds the model, yields batches and computes a loss. Nothing
here knows about tokens, images or audio.

The loop is three separate pieces: `train_step` (one optimizer step: the task's per-step hook, forward
and backward of the step's micro-batches, clipping, the update), `MetricsWindow` (sums between log
steps: loss, targets, the task's extra metrics, throughput, MFU, skipped records) and the checkpoint
cadence (`Checkpointer.due`).

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from herd.config import JobConfig, grad_accum_at
from herd.metrics import MetricsLogger
from herd.optim import OptimizerGroup, describe_multipliers, multiplier_matches
from herd.runtime import Runtime
from herd.task import LossOutput, Task, check_task

__all__ = [
    "LossOutput",
    "NonFiniteLossError",
    "TrainResult",
    "evaluate",
    "train",
    "train_and_export",
    "train_step",
]


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
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)  # dataset → reason → records


@dataclass
class StepResult:
    loss: float  # mean over the global batch's targets
    targets: int
    grad_norm: float
    lr: float
    extra: dict[str, float]  # the task's summed auxiliary metrics


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


def train_step(
    runtime: Runtime,
    task: Task,
    optim: OptimizerGroup,
    micro: list[dict[str, Any]],
    params: list[nn.Parameter],
    grad_clip: float,
) -> StepResult:
    """One optimizer step over `micro` (this rank's micro-batches, on the device): the task's per-step
    hook (PPO samples its rollouts there), forward + backward on the layout, clipping, the update."""
    task.before_step(runtime.parts[0], micro)
    loss, targets = runtime.forward_backward(micro)
    if not math.isfinite(loss):
        raise NonFiniteLossError(f"loss became {loss}")
    grad_norm = runtime.clip_grad_norm(params, grad_clip)
    lr = optim.lr()
    optim.step()
    return StepResult(loss, targets, grad_norm, lr, dict(runtime.last_extra))


def skip_table(task: Task) -> dict[str, dict[str, int]]:
    """{dataset: {reason: records}} of what the task's datasets skipped so far."""
    return {name: dict(counter.counts) for name, counter in task.skip_counts().items() if counter.total}


class MetricsWindow:
    """Sums between two log steps; `record()` turns them into one metrics record and starts over."""

    def __init__(self, flops_per_target: float | None, peak_tflops: float | None, world: int) -> None:
        self.flops_per_target, self.peak_tflops, self.world = flops_per_target, peak_tflops, world
        self._reset()

    def _reset(self) -> None:
        self.loss, self.targets, self.extra, self.start = 0.0, 0, {}, time.perf_counter()

    def add(self, step: StepResult) -> None:
        self.loss += step.loss * step.targets
        self.targets += step.targets
        for key, value in step.extra.items():
            self.extra[key] = self.extra.get(key, 0.0) + value

    def record(self, last: StepResult, device: torch.device, skipped: dict[str, dict[str, int]]) -> dict:
        elapsed = time.perf_counter() - self.start
        targets = max(self.targets, 1)
        out: dict[str, Any] = {
            "loss": self.loss / targets,
            "grad_norm": last.grad_norm,
            "lr": last.lr,
            "targets_per_s": self.targets / max(elapsed, 1e-9),
        }
        for key, value in self.extra.items():  # the task's sums: per target, or per their own `<key>_count`
            if not key.endswith("_count"):
                out[key] = value / max(self.extra.get(f"{key}_count", targets), 1e-12)
        if self.flops_per_target and self.peak_tflops:
            achieved = self.flops_per_target * out["targets_per_s"] / self.world
            out["mfu"] = achieved / (self.peak_tflops * 1e12)
        out["peak_mem_gib"] = peak_memory_gib(device)
        for name, reasons in skipped.items():  # bad records: never a silent drop
            out[f"skipped/{name}"] = float(sum(reasons.values()))
            out.update({f"skipped/{name}/{reason}": float(n) for reason, n in sorted(reasons.items())})
        self._reset()
        return out


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
    check_task(task)
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
    batches: Iterator[dict[str, Any]] = task.train_batches(rank=runtime.dp_rank, world_size=runtime.dims.dp)
    window = MetricsWindow(task.flops_per_target(), cfg.metrics.peak_tflops, runtime.world)

    checkpointer = _checkpointer(cfg, run_dir)
    start_step = 0
    if checkpointer is not None:
        loaded = checkpointer.load(runtime.parts, optim.optimizers, optim.scheduler, batches)
        if loaded is not None:
            start_step = loaded
            logger.console.print(f"resumed from step {loaded} ({checkpointer.latest()})")

    history: list[dict[str, Any]] = []
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
            try:
                result = train_step(runtime, task, optim, micro, params, cfg.optimizer.grad_clip)
            except NonFiniteLossError as e:
                last_good = checkpointer.latest() if checkpointer is not None else None
                logger.close()
                raise NonFiniteLossError(
                    f"{e} at step {step} (run dir {run_dir}); last good checkpoint: {last_good or 'none written'}"
                ) from None
            last_loss = result.loss
            window.add(result)
            progress.update(bar, advance=1, loss=f"{result.loss:.3f}")
            if step % cfg.metrics.log_every == 0 or step == cfg.train.steps:
                record = window.record(result, device, skip_table(task))
                logger.log(step, record)
                history.append({"step": step, **record})
            if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
                val = evaluate(runtime, task, cfg)
                if val is not None:
                    val_loss = val["loss"]
                    logger.log(step, val, prefix="val")
                    history.append({"step": step, "split": "val", **val})
            if checkpointer is not None and checkpointer.due(step, cfg.train.steps):
                checkpointer.save(
                    step, runtime.parts, optim.optimizers, optim.scheduler, batches, task.model_args
                )
    if checkpointer is not None:
        checkpointer.close()
    seconds = time.perf_counter() - start
    skipped = skip_table(task)
    if runtime.is_logging_rank:
        summary = "; ".join(
            f"{name}: {sum(r.values())} ({', '.join(f'{k} {v}' for k, v in sorted(r.items()))})"
            for name, r in skipped.items()
        )
        logger.console.print(
            f"[yellow]skipped records: {summary}" if skipped else "no record skipped", highlight=False
        )
    logger.close()
    return TrainResult(
        runtime.parts[0], last_loss, val_loss, cfg.train.steps, seconds, history, runtime, skipped
    )


def train_and_export(
    task_name: str, config: str | Path | None = None, overrides: list[str] | None = None
) -> tuple[TrainResult, Path | None]:
    """`herd train TASK --config CONFIG [--section.key=value ...]` as a function: load the job config, join
    the torchrun process group (if any), build the task from the registry, refuse at once an export it
    could not write, train, and write the final model to `<run_dir>/model` on rank 0.

    Returns (the loop's result, the export folder on rank 0, else None). Every rank must call it:
    gathering the full state dict is a collective."""
    from herd.config import load_config
    from herd.parallel.launch import init_distributed
    from herd.task import build_task

    cfg = load_config(config, overrides or [])
    rank, _, _ = init_distributed()
    task = build_task(task_name, cfg)
    out_dir = Path(cfg.train.run_dir) / "model"
    task.check_export(out_dir, cfg.checkpoint.export_format)
    result = train(cfg, task)
    state = result.runtime.full_state_dict()  # collective: every rank takes part, rank 0 gets it
    if rank != 0:
        return result, None
    return result, task.export(state, out_dir, cfg.checkpoint.export_format)


def _checkpointer(cfg: JobConfig, run_dir: Path):
    """The DCP checkpointer, unless the job neither saves nor resumes."""
    ck = cfg.checkpoint
    if not ck.interval and not ck.save_final and ck.resume == "none":
        return None
    from herd.checkpoint import Checkpointer

    return Checkpointer(ck, run_dir)
