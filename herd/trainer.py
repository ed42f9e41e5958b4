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

import contextlib
import math
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from herd.config import JobConfig
from herd.metrics import MetricsLogger
from herd.optim import build_optimizer, build_scheduler


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # scalar: sum of per-target losses in the micro-batch
    num_targets: int  # how many targets the sum covers
    extra: dict[str, float] = field(default_factory=dict)  # summed auxiliary metrics (e.g. correct counts)


class Task(Protocol):
    """What a modality or objective plugs into the loop."""

    def build_model(self, device: torch.device) -> nn.Module: ...

    def train_batches(self, rank: int, world_size: int) -> Iterator[dict[str, Any]]: ...

    def val_batches(self) -> Iterable[dict[str, Any]] | None: ...

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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"train.dtype must be fp32 or bf16, got {dtype!r}")


def move_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, cfg: JobConfig, device: torch.device) -> dict[str, float] | None:
    """Mean loss over at most `train.eval_batches` validation batches (plus any summed extras)."""
    batches = task.val_batches()
    if batches is None:
        return None
    was_training = model.training
    model.eval()
    total, count, extras = 0.0, 0, {}
    for i, batch in enumerate(batches):
        if i >= cfg.train.eval_batches:
            break
        with _autocast(device, cfg.train.dtype):
            out = task.loss(model, move_to(batch, device))
        total += float(out.loss_sum)
        count += out.num_targets
        for k, v in out.extra.items():
            extras[k] = extras.get(k, 0.0) + v
    model.train(was_training)
    if count == 0:
        return None
    return {"loss": total / count, **{k: v / count for k, v in extras.items()}}


def train(
    cfg: JobConfig, task: Task, model: nn.Module | None = None, show_progress: bool = True
) -> TrainResult:
    """Run `cfg.train.steps` optimizer steps of `task`; returns the trained model and a summary."""
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    run_dir = Path(cfg.train.run_dir)
    logger = MetricsLogger(run_dir, cfg.metrics, config=cfg.to_dict())
    if model is None:
        model = task.build_model(device)
    model.train()
    named = trainable_named_parameters(model)
    optimizer = build_optimizer(named, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.train.steps, cfg.schedule)
    params = [p for _, p in named]
    batches = task.train_batches(rank=0, world_size=1)
    flops_per_target = task.flops_per_target()

    history: list[dict[str, Any]] = []
    window_loss, window_targets, window_start = 0.0, 0, time.perf_counter()
    start = time.perf_counter()
    last_loss, val_loss = float("nan"), None
    progress = Progress(
        TextColumn("[bold blue]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
        console=logger.console,
        disable=not show_progress,
        transient=True,
    )
    with progress:
        bar = progress.add_task("train", total=cfg.train.steps, loss="-")
        for step in range(1, cfg.train.steps + 1):
            micro = [move_to(next(batches), device) for _ in range(cfg.train.grad_accum)]
            total_targets = sum(task.num_targets(b) for b in micro)
            step_loss = 0.0
            if total_targets > 0:
                for batch in micro:
                    with _autocast(device, cfg.train.dtype):
                        out = task.loss(model, batch)
                    (out.loss_sum / total_targets).backward()
                    step_loss += float(out.loss_sum.detach())
                step_loss /= total_targets
            if not math.isfinite(step_loss):
                logger.close()
                raise NonFiniteLossError(
                    f"loss became {step_loss} at step {step} (run dir {run_dir}); no checkpoint was written"
                )
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.grad_clip, foreach=True))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()

            last_loss = step_loss
            window_loss += step_loss * total_targets
            window_targets += total_targets
            progress.update(bar, advance=1, loss=f"{step_loss:.3f}")
            if step % cfg.metrics.log_every == 0 or step == cfg.train.steps:
                elapsed = time.perf_counter() - window_start
                record: dict[str, Any] = {
                    "loss": window_loss / max(window_targets, 1),
                    "grad_norm": grad_norm,
                    "lr": lr,
                    "targets_per_s": window_targets / max(elapsed, 1e-9),
                }
                if flops_per_target and cfg.metrics.peak_tflops:
                    achieved = flops_per_target * record["targets_per_s"]
                    record["mfu"] = achieved / (cfg.metrics.peak_tflops * 1e12)
                if device.type == "cuda":
                    record["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                logger.log(step, record)
                history.append({"step": step, **record})
                window_loss, window_targets, window_start = 0.0, 0, time.perf_counter()
            if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
                val = evaluate(model, task, cfg, device)
                if val is not None:
                    val_loss = val["loss"]
                    logger.log(step, val, prefix="val")
                    history.append({"step": step, "split": "val", **val})
    seconds = time.perf_counter() - start
    logger.close()
    return TrainResult(model, last_loss, val_loss, cfg.train.steps, seconds, history)
