"""Preference tuning end to end on 2 CPU cores: a reward model and DPO on a tiny Llama (Llama 3 §4.1.2, §4.1.4).

1. a tiny text model: pretrained with the quickstart's settings (configs/quickstart.toml, a few hundred
   steps on the generated corpus), or reused with --text-model (e.g. runs/quickstart/text_model);
2. synthetic preferences with known ground truth (herd.data.synthetic.preferences), held-out questions;
3. a reward model (configs/post/rm_tiny.toml) → held-out ranking accuracy before/after vs 50 % chance;
4. DPO (configs/post/dpo_tiny.toml) → held-out implicit-reward margin and preference accuracy before/after.

    python examples/preference_tuning_tiny.py --out runs/preference_tuning      # prints JSON

Every stage goes through `herd.trainer.train`, exactly as `herd train text|rm|dpo` runs it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from herd.config import load_config
from herd.data.synthetic.preferences import write_preference_splits
from herd.paths import config_path
from herd.tasks.dpo import DPOTask, evaluate_preferences
from herd.tasks.reward import RewardModelTask, evaluate_ranking
from herd.tasks.text import TextPretrainTask
from herd.trainer import train

QUIET = ["--metrics.tensorboard=false", "--checkpoint.save_final=false", "--checkpoint.resume=none"]


def pretrain_text_model(out: Path, steps: int) -> Path:
    cfg = load_config(config_path("quickstart.toml"), [f"--train.run_dir={out / 'text'}", f"--train.steps={steps}",
                                                      "--train.eval_every=0", *QUIET])  # fmt: skip
    task = TextPretrainTask.from_config(cfg)
    result = train(cfg, task)
    return task.export(result.runtime.full_state_dict(), out / "text_model", "meta")


def initial_model(task: Any, seed: int) -> torch.nn.Module:
    """The model as the loop starts it (same seed), to measure "before"."""
    model = task.build_model()
    model.to_empty(device="cpu")
    task.plan.init_buffers(model)
    torch.manual_seed(seed)
    task.init_weights(model)
    return model


def stage_overrides(out: Path, text_model: Path, prefs: dict[str, Path], name: str, steps: int) -> list[str]:
    return [f"--model.init_from={text_model}", f"--{name}.train_data={prefs['train']}",
            f"--{name}.val_data={prefs['val']}", f"--train.run_dir={out / name}", f"--train.steps={steps}", *QUIET]  # fmt: skip


def run_reward_model(out: Path, text_model: Path, prefs: dict[str, Path], steps: int) -> dict[str, Any]:
    cfg = load_config(config_path("post/rm_tiny.toml"), stage_overrides(out, text_model, prefs, "rm", steps))
    task = RewardModelTask.from_config(cfg)
    before = evaluate_ranking(initial_model(task, cfg.train.seed), task, task.val_records)
    result = train(cfg, task)
    after = evaluate_ranking(result.model, task, task.val_records)
    task.export(result.runtime.full_state_dict(), out / "reward_model", "meta")
    return {"chance": 0.5, "before": before, "after": after, "train_seconds": round(result.seconds, 1),
            "model_dir": str(out / "reward_model")}  # fmt: skip


def run_dpo(out: Path, text_model: Path, prefs: dict[str, Path], steps: int) -> dict[str, Any]:
    cfg = load_config(
        config_path("post/dpo_tiny.toml"), stage_overrides(out, text_model, prefs, "dpo", steps)
    )
    task = DPOTask.from_config(cfg)
    before = evaluate_preferences(initial_model(task, cfg.train.seed), task, task.val_records)
    result = train(cfg, task)
    after = evaluate_preferences(result.model, task, task.val_records)
    task.export(result.runtime.full_state_dict(), out / "dpo_model", "meta")
    return {"before": before, "after": after, "train_seconds": round(result.seconds, 1),
            "model_dir": str(out / "dpo_model")}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/preference_tuning")
    p.add_argument("--text-model", default=None, help="reuse a text model (default: pretrain one)")
    p.add_argument("--text-steps", type=int, default=300)
    p.add_argument("--rm-steps", type=int, default=300)
    p.add_argument("--dpo-steps", type=int, default=300)
    p.add_argument("--n-train", type=int, default=3000, help="synthetic training preference records")
    p.add_argument("--n-val", type=int, default=400, help="held-out records (questions never trained on)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out = Path(args.out)
    text_model = Path(args.text_model) if args.text_model else pretrain_text_model(out, args.text_steps)
    prefs = write_preference_splits(out / "preferences", n_train=args.n_train, n_val=args.n_val, seed=0)
    report = {
        "text_model": str(text_model),
        "reward_model": run_reward_model(out, text_model, prefs, args.rm_steps),
        "dpo": run_dpo(out, text_model, prefs, args.dpo_steps),
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
