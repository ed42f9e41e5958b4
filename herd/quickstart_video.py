"""`herd quickstart --modality video`: a video adapter on the image quickstart's model, on CPU.

Starts from `<out>/vision_model` (the default quickstart's image model; both of its stages run first when
it is missing), writes real mp4 clips of moving coloured shapes (`herd.data.synthetic.video_qa`),
trains the perceiver resampler and video cross-attention layers through the one training loop with
everything else frozen (the paper's video recipe), and reports held-out accuracy per question type
beside chance. The proof that the aggregator models time: the same model, asked about the same clips
with each clip's frames shuffled, falls to chance on direction and order (their frame *sets* carry no
answer), while the static question keeps its accuracy. Results go to `<out>/quickstart_video.json`,
the model to `<out>/video_model` (`herd ask --video` loads it).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from herd.config import load_config
from herd.paths import config_path
from herd.quickstart import serve_hint

TIME_TYPES = ("direction", "order")  # the question types only frame order answers
# The training clips' question types, direction 2 : order 1 : shape 1 (held-out clips: one third each):
# direction, a difference of two positions, is the hardest to learn; shape is static and needs least.
TRAIN_MIX = {"direction": 2, "order": 1, "shape": 1}


def shuffled(video: Any, seed: int) -> Any:
    """The same frames in a random order; every frame counts (a repeat is no longer beside its original)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(video.frames.shape[0], generator=g)
    return dataclasses.replace(video, frames=video.frames[perm], mask=torch.ones_like(video.mask))


@torch.no_grad()
def evaluate_video_qa(
    model: Any,
    task: Any,
    samples: list[dict[str, Any]],
    batch_size: int = 32,
    shuffle_seed: int | None = None,
) -> dict[str, Any]:
    """Greedy answers per sample; accuracy per `question_type` (`answer_is_correct`). `shuffle_seed`:
    each clip's frames are shuffled first (a different permutation per clip)."""
    from herd.adapters.multimodal import generate_with_images
    from herd.tasks.vision import answer_is_correct, qa_prompt
    from herd.text.generation import SamplingParams

    model.eval()
    answers: list[str] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        videos = [s["video"] for s in chunk]
        if shuffle_seed is not None:
            videos = [shuffled(v, shuffle_seed * 100_003 + start + i) for i, v in enumerate(videos)]
        prompts = [task.prompt_tokens(qa_prompt(s["question"])) for s in chunk]
        done = generate_with_images(
            model, prompts, params=SamplingParams(max_new_tokens=8), stop_ids=task.tokenizer.stop_ids,
            pad_id=task.pad_id, **task.video_inputs(videos),
        )  # fmt: skip
        answers += [task.tokenizer.decode(c.tokens) for c in done]
    correct: dict[str, list[bool]] = {}
    for s, a in zip(samples, answers):
        correct.setdefault(s.get("question_type", "all"), []).append(answer_is_correct(s, a))
    return {"accuracy": {k: sum(v) / len(v) for k, v in sorted(correct.items())}, "answers": answers}


def run_video_quickstart(
    out: str | Path = "runs/quickstart",
    overrides: list[str] | None = None,
    n_train: int = 3000,
    n_val: int = 300,
    seed: int = 0,
) -> dict[str, Any]:
    from herd.adapters.multimodal_io import load_multimodal_model
    from herd.data.synthetic.video_qa import chance_accuracy, write_video_qa_dataset
    from herd.tasks.video import VideoTask
    from herd.trainer import train

    console = Console(stderr=True)
    start = time.perf_counter()
    out = Path(out)
    image_dir = out / "vision_model"
    if not (image_dir / "vision.json").is_file():
        from herd.quickstart import run_quickstart

        console.print(f"{image_dir} is missing: running the text and image stages first")
        run_quickstart(out=out)
    data = out / "videos"
    console.rule("[bold]herd quickstart · video: perceiver resampler + video cross-attention")
    t0 = time.perf_counter()
    write_video_qa_dataset(data, n_train=n_train, n_val=n_val, seed=seed, train_mix=TRAIN_MIX)
    console.print(f"{n_train} + {n_val} mp4 clips in {data} ({time.perf_counter() - t0:.0f} s)")
    cfg = load_config(
        config_path("quickstart_video.toml"),
        [f"--video.init_from={image_dir}", f"--video.train_manifest={data / 'train.jsonl'}",
         f"--train.run_dir={out / 'video'}", f"--train.seed={seed}", f"--data.seed={seed}", *(overrides or [])],
    )  # fmt: skip
    task = VideoTask.from_config(cfg)
    result = train(cfg, task)
    model = result.model.eval()
    # frozen parts unchanged: text-only logits equal the image model's, and so do image answers' logits
    image_model, _, _ = load_multimodal_model(image_dir)
    probe = torch.tensor([task.tokenizer.encode("The red circle is left of the", bos=True)])
    text_only_unchanged = bool(torch.equal(model(probe), image_model(probe)))
    cfg_val = dataclasses.replace(cfg.video, val_manifest=str(data / "val.jsonl"))
    task.video = cfg_val
    val = list(task.dataset("val", loop=False))
    report = evaluate_video_qa(model, task, val)
    blind = evaluate_video_qa(model, task, val, shuffle_seed=seed + 1)
    model_dir = task.export(model.state_dict(), out / "video_model")
    result_json = {
        "accuracy": report["accuracy"],
        "chance": chance_accuracy(data / "val.jsonl"),
        "shuffled_accuracy": blind["accuracy"],
        "text_only_unchanged": text_only_unchanged,
        "seconds": time.perf_counter() - start,
        "video": {
            "train_seconds": result.seconds,
            "final_train_loss": result.final_loss,
            "steps": result.steps,
            "num_frames": task.video.num_frames,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "model_dir": str(model_dir),
            "examples": [
                {"video": s["key"], "question": s["question"], "answer": a.strip(), "expected": s["response"]}
                for s, a in zip(val[:9], report["answers"][:9])
            ],
        },
    }
    (out / "quickstart_video.json").write_text(json.dumps(result_json, indent=2) + "\n")
    print_video_summary(result_json, console)
    return result_json


def print_video_summary(report: dict[str, Any], console: Console) -> None:
    table = Table(title="video quickstart results (held out)")
    for col in ("question type", "accuracy", "chance", "frames shuffled"):
        table.add_column(col)
    for kind, acc in report["accuracy"].items():
        table.add_row(
            kind,
            f"{100 * acc:.0f}%",
            f"{100 * report['chance'].get(kind, float('nan')):.0f}%",
            f"{100 * report['shuffled_accuracy'].get(kind, float('nan')):.0f}%",
        )
    table.add_row("frozen LLM's text-only logits unchanged", str(report["text_only_unchanged"]), "", "")
    table.add_row("total time", f"{report['seconds']:.0f} s", "", "")
    Console().print(table)
    console.print(f"wrote {report['video']['model_dir']}; try:")
    console.print(
        f"  herd ask --model {report['video']['model_dir']} --video <an .mp4> "
        "--question 'Is the red square going left or right?'"
    )
    console.print(serve_hint(report["video"]["model_dir"]))
