"""Metrics: always JSON lines in `<run_dir>/metrics.jsonl`; TensorBoard and W&B when configured;
a compact line on the console (rich). Only rank 0 writes."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from herd.config import MetricsConfig


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        if key == "lr":
            return f"{key} {value:.2e}"
        if key == "mfu":
            return f"{key} {100 * value:.1f}%"
        if abs(value) >= 1000:
            return f"{key} {value:,.0f}"
        return f"{key} {value:.4f}"
    return f"{key} {value}"


class MetricsLogger:
    def __init__(
        self, run_dir: str | Path, cfg: MetricsConfig, enabled: bool = True, config: dict | None = None
    ):
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.run_dir = Path(run_dir)
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard is a dependency, but stay usable if a user removed it
                self.console.print("[yellow]tensorboard not installed; metrics go to metrics.jsonl only")
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ImportError(
                    "metrics.wandb_project is set but wandb is missing: pip install 'herd[wandb]'"
                ) from e
            self._wandb = wandb.init(project=cfg.wandb_project, dir=str(self.run_dir), config=config or {})

    def log(self, step: int, values: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        if prefix != "train":
            record["split"] = prefix
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    self._tb.add_scalar(f"{prefix}/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{k}": v for k, v in values.items()}, step=step)
        shown = "  ".join(_fmt(k, v) for k, v in values.items())
        self.console.print(f"[bold]{prefix}[/bold] step {step:>6}  {shown}", highlight=False, soft_wrap=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of `<run_dir>/metrics.jsonl`, for scripts that compare runs."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
