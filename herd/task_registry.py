"""The task registry: `herd train NAME` → "package.module:Class". Torch-free, so that building the
`herd` parser (and `herd --help`) imports no torch; `herd.task` re-exports both names."""

from __future__ import annotations

# name → "module:Class"; imported on first use so that `herd --help` stays fast
TASKS: dict[str, str] = {
    "text": "herd.tasks.text:TextPretrainTask",
    "vision": "herd.tasks.vision:VisionTask",
    "video": "herd.tasks.video:VideoTask",
    "sft": "herd.tasks.sft:SFTTask",
    "rm": "herd.tasks.reward:RewardModelTask",
    "dpo": "herd.tasks.dpo:DPOTask",
    "ppo": "herd.tasks.ppo:PPOTask",
    "speech-encoder": "herd.tasks.speech_encoder:SpeechEncoderTask",
    "speech": "herd.tasks.speech:SpeechTask",
}


def register_task(name: str, target: str) -> None:
    """Make `herd train NAME` build `target` ("package.module:Class", its `from_config(cfg)`)."""
    if ":" not in target:
        raise ValueError(f"task target {target!r} must look like 'package.module:Class'")
    TASKS[name] = target


__all__ = ["TASKS", "register_task"]
