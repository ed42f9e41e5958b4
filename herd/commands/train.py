"""`herd quickstart` and `herd train TASK`: the jobs that run the one training loop.

    herd quickstart --out runs/quickstart --train.steps=100
    herd train text --config configs/text/tiny.toml --train.steps=50
    torchrun --standalone --nproc_per_node 8 -m herd train sft --config configs/post/sft_tiny.toml

Both take `--section.key=value` overrides of the job config (`herd.config.load_config`). The tasks
`herd train` offers are the registry `herd.task.TASKS` (text, vision, sft, rm, dpo, ppo, and whatever
`herd.task.register_task` added), so a new task never edits this file.
"""

from __future__ import annotations

import argparse
from typing import Any

from herd.commands.registry import add_command


def cmd_quickstart(args: argparse.Namespace) -> int:
    """`herd.quickstart.run_quickstart`: tiny text model, then a vision adapter on it, with a report."""
    if args.modality == "video":  # on the image quickstart's model (runs it first when missing)
        from herd.quickstart_video import run_video_quickstart

        run_video_quickstart(out=args.out, overrides=args.overrides, seed=args.seed)
        return 0
    if args.modality == "speech":  # on the text quickstart's frozen LLM (runs it first when missing)
        from herd.quickstart_speech import run_speech_quickstart

        run_speech_quickstart(
            out=args.out, overrides=args.overrides, seed=args.seed, pretrain_steps=args.pretrain_steps
        )
        return 0
    from herd.quickstart import run_quickstart

    vision = [f"--train.steps={args.vision_steps}"] if args.vision_steps else []
    run_quickstart(out=args.out, config=args.config, overrides=args.overrides, vision_overrides=vision)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """`herd.trainer.train_and_export`, then one line with the final loss and where the model went."""
    from herd.trainer import train_and_export

    result, out = train_and_export(task_name=args.task, config=args.config, overrides=args.overrides)
    if out is not None:
        print(f"final loss {result.final_loss:.4f}; model written to {out}")
    return 0


def register(sub: Any) -> None:
    """Add `quickstart` and `train` to the top-level subparsers."""
    from herd.task_registry import TASKS  # torch-free: the parser stays cheap

    p = add_command(
        sub,
        "quickstart",
        cmd_quickstart,
        help="train a tiny model on CPU end to end and show what it learned",
        takes_overrides=True,
    )
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--config", default=None, help="default: configs/quickstart.toml")
    p.add_argument("--vision-steps", type=int, default=None, help="default: configs/quickstart_vision.toml")
    p.add_argument(
        "--modality",
        choices=["image", "video", "speech"],
        default="image",
        help="image (default): text + image stages; video: a video adapter on the image stage's model "
        "(configs/quickstart_video.toml; overrides apply to the video stage); speech: BEST-RQ, then a speech "
        "adapter on the text stage's frozen LLM (configs/quickstart_speech*.toml; overrides apply to its SFT)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="video: the clips' and the training's seed; speech: the generated data's seed",
    )
    p.add_argument(
        "--pretrain-steps", type=int, default=None,
        help="speech: BEST-RQ steps (default: configs/quickstart_speech_encoder.toml; 0 skips pretraining)",
    )  # fmt: skip

    p = add_command(
        sub,
        "train",
        cmd_train,
        help="train with the one training loop; extra --section.key=value override the config",
        description="Train TASK (the registry herd.task.TASKS) with the one training loop, on one "
        "process or under torchrun; extra --section.key=value arguments override the config.",
        takes_overrides=True,
    )
    p.add_argument("task", choices=list(TASKS), help="what to train: " + ", ".join(TASKS))
    p.add_argument("--config", default=None, help="job TOML (configs/...); default: herd.config's defaults")
