"""`herd quickstart`: the main job on a fresh machine — train a tiny Llama on CPU, then generate.

Stage 1 (text): a tiny Llama with the real Llama 3 tokenizer (trimmed to the corpus's tokens) trains
through the one training loop on a generated corpus; the quickstart then measures what it learned
(greedy recall of the 100 single-digit additions) and samples a few completions. Results go to
`<out>/quickstart.json` and the model to `<out>/text_model`, which `herd generate` loads.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from herd.config import load_config
from herd.paths import config_path

SAMPLE_PROMPTS = ("The red circle is", "Count: three", "Question: what is 7 plus 8? Answer:")


def evaluate_text_model(model, tokenizer) -> dict[str, Any]:
    """Greedy recall of every arithmetic fact of the corpus, and a few sample completions."""
    from herd.data.synthetic_text import arithmetic_facts
    from herd.text.generation import SamplingParams, generate_text

    facts = arithmetic_facts()
    answers = generate_text(model, tokenizer, [f.prompt for f in facts], SamplingParams(max_new_tokens=4))
    correct = sum(a.startswith(f.answer + ".") for a, f in zip(answers, facts))
    samples = generate_text(model, tokenizer, list(SAMPLE_PROMPTS), SamplingParams(max_new_tokens=24))
    return {
        "arithmetic_accuracy": correct / len(facts),
        "arithmetic_chance": 1 / 19,  # answers range over 0..18
        "samples": dict(zip(SAMPLE_PROMPTS, samples)),
    }


def run_quickstart(
    out: str | Path = "runs/quickstart", config: str | Path | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    from herd.tasks.text import TextPretrainTask
    from herd.trainer import train

    console = Console(stderr=True)
    start = time.perf_counter()
    out = Path(out)
    cfg = load_config(
        config or config_path("quickstart.toml"), [f"--train.run_dir={out / 'text'}", *(overrides or [])]
    )
    console.rule("[bold]herd quickstart · stage 1: text")
    task = TextPretrainTask(cfg)
    console.print(
        f"corpus: {len(task.train_stream):,} training tokens, vocabulary subset of "
        f"{task.tokenizer.vocab_size} Llama 3 tokens; model {task.model_args.num_params():,} parameters"
    )
    result = train(cfg, task)
    model_dir = task.export(result.runtime.full_state_dict(), out / "text_model", "meta")
    text_eval = evaluate_text_model(result.model, task.tokenizer)
    report = {
        "text": {
            "final_train_loss": result.final_loss,
            "val_loss": result.val_loss,
            "train_seconds": result.seconds,
            "steps": result.steps,
            **text_eval,
            "model_dir": str(model_dir),
        },
        "seconds": time.perf_counter() - start,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "quickstart.json").write_text(json.dumps(report, indent=2) + "\n")

    table = Table(title="quickstart results")
    table.add_column("metric")
    table.add_column("value")
    table.add_row("text: train / val loss", f"{result.final_loss:.3f} / {result.val_loss:.3f}")
    table.add_row(
        "text: arithmetic recall (greedy)",
        f"{100 * text_eval['arithmetic_accuracy']:.0f}%  (chance {100 * text_eval['arithmetic_chance']:.0f}%)",
    )
    for prompt, completion in text_eval["samples"].items():
        table.add_row(f"sample: {prompt!r}", completion.strip())
    table.add_row("total time", f"{report['seconds']:.0f} s")
    Console().print(table)
    console.print(
        f"wrote {out / 'quickstart.json'}; try: herd generate --model {model_dir} --prompt 'Count: two'"
    )
    return report
