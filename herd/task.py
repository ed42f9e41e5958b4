"""The task contract: everything a modality or objective hands the one training loop, and the registry.

A *task* is the only thing a modality (text, vision, ...) or an objective (SFT, reward model, DPO, PPO)
contributes to training. The loop (`herd.trainer`), the runtime (`herd.runtime`) and the pipeline never
look inside a model: they ask the task.

    task = build_task("text", cfg)          # `herd train text`; checks the contract at once
    model = task.build_model()              # on the meta device; the runtime parallelises it with
                                            #   task.plan, materialises it, then task.init_weights(model)
    args, kwargs = task.inputs(batch)       # what model(*args, **kwargs) takes
    out = task.loss_from_output(model(*args, **kwargs), batch)   # a LossOutput
    task.export(full_state_dict, out_dir, "meta")                # the trained model, loadable

`loss(model, batch)` is the composition of the last two lines and is what the loop runs on one device and
under FSDP, TP and CP; under pipeline parallelism the first stage takes `args`, every stage the
`kwargs`, and the last stage hands its output to `loss_from_output`: the same computation, cut in stages.

Data contract: a task's datasets check every record for the fields the objective needs, skip and count
what they cannot use (`herd.data.records.SkipCounter`, by reason), and refuse at start-up when nothing
usable is left; `skip_counts()` returns the counters, which the loop logs.

This module is a leaf: it imports no model, no data loader, no parallel code.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from herd.task_registry import TASKS, register_task

# The parallel dimensions a task may support (`ParallelDims` degrees > 1): FSDP (dp_shard), HSDP
# (dp_replicate), tensor, context and pipeline parallelism.
LAYOUT_DIMS = ("fsdp", "hsdp", "tp", "cp", "pp")
LAYOUT_NAMES = {"fsdp": "FSDP (parallel.dp_shard)", "hsdp": "HSDP (parallel.dp_replicate)",
                "tp": "tensor parallelism (parallel.tp)", "cp": "context parallelism (parallel.cp)",
                "pp": "pipeline parallelism (parallel.pp)"}  # fmt: skip


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # scalar: sum of per-target losses in the micro-batch
    num_targets: int  # how many targets the sum covers
    # summed auxiliary metrics (e.g. correctly ranked pairs); the loop sums them over ranks and a logging
    # window and logs each divided by the window's targets (correct pairs / pairs = ranking accuracy), or by
    # the sum of a companion `<key>_count` entry when there is one (PPO: reward sum / replies)
    extra: dict[str, float] = field(default_factory=dict)


class ArchitectureArgs(Protocol):
    """What the loop reads of a model's architecture arguments (`herd.text.ModelArgs` is one)."""

    def num_params(self, include_embedding: bool = True) -> int: ...

    def to_dict(self) -> dict[str, Any]: ...


@runtime_checkable
class Task(Protocol):
    """What a modality or objective plugs into the loop (see the module docstring)."""

    name: ClassVar[str]
    layouts: ClassVar[frozenset[str]]  # subset of LAYOUT_DIMS this task runs under
    model_args: ArchitectureArgs  # the (main) model's architecture: init-mode choice, checkpoint metadata
    plan: Any  # the model's `herd.parallel.plan.ParallelPlan`

    def build_model(self) -> nn.Module:
        """The model on the meta device (the runtime parallelises, materialises, then calls init_weights)."""
        ...

    def init_weights(self, model: nn.Module) -> None:
        """Fill a materialised model (or pipeline stage): random init, pretrained weights, frozen towers."""
        ...

    def train_batches(self, rank: int, world_size: int) -> Iterator[dict[str, Any]]:
        """Batches of data-parallel rank `rank` of `world_size`; stateful (state_dict) to resume."""
        ...

    def val_batches(self) -> Iterable[dict[str, Any]] | None:
        """Global validation batches (the runtime splits them across ranks), or None."""
        ...

    def num_targets(self, batch: dict[str, Any]) -> int: ...

    def inputs(self, batch: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """(args, kwargs) of the model's forward for `batch`."""
        ...

    def loss_from_output(self, output: Any, batch: dict[str, Any]) -> LossOutput:
        """The loss of `batch` from the model's output (the last pipeline stage runs this)."""
        ...

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput: ...

    def before_step(self, model: nn.Module, micro_batches: list[dict[str, Any]]) -> None:
        """Called once per optimizer step before its forward passes (PPO samples its rollouts here)."""
        ...

    def flops_per_target(self) -> float | None: ...

    def export(self, state_dict: dict[str, torch.Tensor], out_dir: str | Path, fmt: str) -> Path | None:
        """Write the trained model where its loader reads it; None when `fmt` is "none"."""
        ...

    def skip_counts(self) -> dict[str, Any]:
        """{dataset name: SkipCounter} of the records the task's datasets skipped so far."""
        ...

    def check_export(self, out_dir: str | Path, fmt: str) -> None:
        """Refuse at start-up an export `export` could not write at the end of the run."""
        ...


class TaskBase:
    """Defaults for the optional parts of the contract; a task overrides what it has."""

    name: ClassVar[str] = "task"
    layouts: ClassVar[frozenset[str]] = frozenset()
    # the job-config sections the task's constructor takes, in order (`from_config` passes only these)
    sections: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_config(cls, cfg: Any, **kwargs: Any) -> Any:
        """The task built from its config sections of `cfg` (a `herd.config.JobConfig`), with the layout
        of `cfg.parallel` checked at once: a layout the task cannot run is an error before any model."""
        task = cls(*(getattr(cfg, name) for name in cls.sections), **kwargs)
        task.check_layout(cfg.parallel.degrees())
        return task

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        args, kwargs = self.inputs(batch)  # type: ignore[attr-defined]
        return self.loss_from_output(model(*args, **kwargs), batch)  # type: ignore[attr-defined]

    def val_batches(self) -> Iterable[dict[str, Any]] | None:
        return None

    def before_step(self, model: nn.Module, micro_batches: list[dict[str, Any]]) -> None:
        return None

    def flops_per_target(self) -> float | None:
        return None

    def skip_counts(self) -> dict[str, Any]:
        return {}

    def check_export(self, out_dir: str | Path, fmt: str) -> None:
        return None

    def check_layout(self, degrees: dict[str, int]) -> None:
        """Refuse, before anything is built, a layout this task does not run under."""
        used = [dim for dim in LAYOUT_DIMS if degrees.get(dim, 1) > 1]
        missing = [dim for dim in used if dim not in self.layouts]
        if missing:
            supported = ", ".join(LAYOUT_NAMES[d] for d in LAYOUT_DIMS if d in self.layouts)
            raise LayoutNotSupported(
                f"herd train {self.name} does not support {' with '.join(LAYOUT_NAMES[d] for d in missing)} "
                f"(layout {describe_layout(degrees)}); it runs with {supported or 'one process only'}"
            )


class ResumableBatches:
    """Batches of `batch_size` samples from a resumable dataset, each through `encode`; the dataset's
    position is the state a checkpoint saves (what a task's `train_batches` returns for map-free data)."""

    def __init__(self, dataset: Any, batch_size: int, encode: Any) -> None:
        self.dataset, self.batch_size, self.encode = dataset, batch_size, encode
        self._it: Iterator[dict[str, Any]] | None = None

    def __iter__(self) -> ResumableBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            self._it = iter(self.dataset)
        return self.encode([next(self._it) for _ in range(self.batch_size)])

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)
        self._it = None


class LayoutNotSupported(ValueError):
    pass


def describe_layout(degrees: dict[str, int]) -> str:
    used = [f"{dim}={degrees[dim]}" for dim in LAYOUT_DIMS if degrees.get(dim, 1) > 1]
    return ", ".join(used) or "one process"


_REQUIRED = ("name", "layouts", "model_args", "plan", "build_model", "init_weights", "train_batches",
             "val_batches", "num_targets", "inputs", "loss_from_output", "loss", "before_step",
             "flops_per_target", "export", "skip_counts", "check_export", "check_layout")  # fmt: skip


def check_task(task: Any) -> Any:
    """Raise naming what is missing when `task` does not implement the whole contract; returns it."""
    missing = [name for name in _REQUIRED if not hasattr(task, name)]
    if missing:
        raise TypeError(f"{type(task).__name__} is not a complete herd task: missing {', '.join(missing)}")
    bad = sorted(set(task.layouts) - set(LAYOUT_DIMS))
    if bad:
        raise TypeError(f"{type(task).__name__}.layouts names unknown dimensions {bad}; known: {LAYOUT_DIMS}")
    return task


# --- the registry: `herd train NAME` (herd.task_registry, torch-free) -----------------------------------
def task_class(name: str) -> type:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_task(name: str, cfg: Any, **kwargs: Any) -> Any:
    """The task `herd train NAME` runs, built from the sections of job config `cfg` it needs."""
    return check_task(task_class(name).from_config(cfg, **kwargs))


__all__ = [
    "LAYOUT_DIMS",
    "TASKS",
    "ResumableBatches",
    "LayoutNotSupported",
    "LossOutput",
    "Task",
    "TaskBase",
    "build_task",
    "check_task",
    "describe_layout",
    "register_task",
    "task_class",
]
