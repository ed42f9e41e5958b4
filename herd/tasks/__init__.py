"""Tasks: what a modality or objective plugs into the one training loop (`herd.trainer.train`).

`herd train NAME` builds `TASKS[NAME]` from the job config; every task that trains a text model
(pretraining and the post-training objectives) also has `export(state_dict, out_dir, fmt)`.
"""

from __future__ import annotations

import importlib
from typing import Any

# name → (module, class); imported lazily so `herd --help` stays fast
TASKS: dict[str, tuple[str, str]] = {
    "text": ("herd.tasks.text", "TextPretrainTask"),
    "vision": ("herd.tasks.vision", "VisionTask"),
    "sft": ("herd.tasks.sft", "SFTTask"),
    "rm": ("herd.tasks.reward", "RewardModelTask"),
    "dpo": ("herd.tasks.dpo", "DPOTask"),
    "ppo": ("herd.tasks.ppo", "PPOTask"),
}


def build_task(name: str, cfg: Any) -> Any:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    module, cls = TASKS[name]
    return getattr(importlib.import_module(module), cls)(cfg)
