"""AdamW and the learning-rate schedule (linear warmup, then cosine/linear decay to a floor)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from herd.config import OptimizerConfig, ScheduleConfig


def multiplier_key(name: str, multipliers: dict[str, float] | None) -> str | None:
    """The `lr_multipliers` key that applies to parameter `name`: the first key it contains, or None."""
    return next((key for key in multipliers or {} if key in name), None)


def param_groups(
    params: Iterable[tuple[str, nn.Parameter]],
    weight_decay: float,
    lr: float,
    multipliers: dict[str, float] | None = None,
) -> list[dict]:
    """Decay matrices; leave norms, biases and gates (1-d tensors) undecayed, as is standard for Llama.
    A parameter whose name contains a key of `multipliers` trains at lr × that value."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in params:
        if not p.requires_grad:
            continue
        key = multiplier_key(name, multipliers)
        mult = multipliers[key] if key is not None else 1.0
        wd = weight_decay if p.dim() >= 2 else 0.0
        groups.setdefault((wd, mult), []).append(p)
    return [{"params": ps, "weight_decay": wd, "lr": lr * mult} for (wd, mult), ps in groups.items()]


def multiplier_matches(
    params: Iterable[tuple[str, nn.Parameter]], multipliers: dict[str, float] | None
) -> dict[str, list[str]]:
    """The trainable parameter names each `lr_multipliers` key reaches (substring match, the first key
    that matches wins, as in `param_groups`). Printed at the start of training because a substring can
    reach more than meant: "gate" also matches every parameter of a "gated_positional_embedding"."""
    found: dict[str, list[str]] = {key: [] for key in multipliers or {}}
    for name, p in params:
        key = multiplier_key(name, multipliers) if p.requires_grad else None
        if key is not None:
            found[key].append(name)
    return found


def describe_multipliers(
    found: dict[str, list[str]], multipliers: dict[str, float], shown: int = 3
) -> list[str]:
    """One line per key: `lr × 30 'gate_attn': 10 tensors (cross_attention.0.gate_attn, …)`."""
    lines = []
    for key, names in found.items():
        if not names:
            lines.append(f"lr × {multipliers[key]:g} {key!r}: matches no trainable parameter here")
            continue
        more = ", …" if len(names) > shown else ""
        lines.append(
            f"lr × {multipliers[key]:g} {key!r}: {len(names)} tensors ({', '.join(names[:shown])}{more})"
        )
    return lines


def build_optimizer(
    named_params: Iterable[tuple[str, nn.Parameter]], cfg: OptimizerConfig
) -> torch.optim.AdamW:
    groups = param_groups(named_params, cfg.weight_decay, cfg.lr, cfg.lr_multipliers)
    if not any(g["params"] for g in groups):
        raise ValueError("no trainable parameters: every parameter has requires_grad=False")
    # foreach=True: the multi-tensor path; fused=True would need every param on one CUDA device type.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=True)


def lr_multiplier(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based).

    Warmup: (step+1)/warmup, so the first update already moves. Decay: from 1 at the end of warmup to
    `min_lr_ratio` at the last step (`total_steps - 1`).
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return 1.0
    span = max(1, total_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    if cfg.decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif cfg.decay == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"schedule.decay must be cosine, linear or constant, got {cfg.decay!r}")
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, cfg: ScheduleConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, total_steps, cfg))


class OptimizerGroup:
    """One AdamW (and one LR schedule) per model part — a rank holding several pipeline stages has
    several — stepped together; checkpoints see one optimizer per part (torchtitan's container idea)."""

    def __init__(
        self, parts: list[nn.Module], opt_cfg: OptimizerConfig, sched_cfg: ScheduleConfig, steps: int
    ):
        self.optimizers = [build_optimizer(part.named_parameters(), opt_cfg) for part in parts]
        self.schedulers = [build_scheduler(o, steps, sched_cfg) for o in self.optimizers]
        self.scheduler = _SchedulerGroup(self.schedulers)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)
        self.scheduler.step()

    def lr(self) -> float:
        return self.schedulers[0].get_last_lr()[0]


class _SchedulerGroup:
    """Identical schedules of every part's optimizer, saved once and loaded into all."""

    def __init__(self, schedulers: list[torch.optim.lr_scheduler.LRScheduler]) -> None:
        self.schedulers = schedulers

    def step(self) -> None:
        for s in self.schedulers:
            s.step()

    def state_dict(self) -> dict:
        return self.schedulers[0].state_dict()

    def load_state_dict(self, state: dict) -> None:
        for s in self.schedulers:
            s.load_state_dict(state)
