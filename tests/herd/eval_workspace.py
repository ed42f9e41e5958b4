"""What the evaluation tests share: a tiny herd model trained (through `herd train text`'s function) on
successor facts ("what comes after 17? Answer: 18"), its export under the full Llama 3 vocabulary in the Hugging Face layout, and
local lm-eval tasks (multiple choice and generation) over the same facts."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from herd.data.synthetic.text import QAPair
from herd.text.loading import load_pretrained, save_text_model
from herd.text.tokenizer import Tokenizer

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "quickstart.toml"
CHOICES = 4  # multiple choice: the sum and three other numbers


def successor_facts(count: int = 50) -> list[QAPair]:
    """ "Question: what comes after 17? Answer: 18" for 0 … count-1: each answer hangs on one number, so a
    2-layer model learns them in a few hundred steps (single-digit additions, needing both operands,
    take it far longer)."""
    return [QAPair(f"Question: what comes after {n}? Answer:", f" {n + 1}") for n in range(count)]


def write_successor_corpus(path: Path, n_docs: int, seed: int = 0) -> Path:
    """jsonl of documents of 2-5 successor facts each, in the quickstart corpus's QA wording."""
    rng = random.Random(seed)
    facts = successor_facts()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(n_docs):
            doc = " ".join(f"{q.prompt}{q.answer}." for q in rng.sample(facts, k=rng.randint(2, 5)))
            f.write(json.dumps({"text": doc}) + "\n")
    return path


def train_successor_model(root: Path, steps: int = 300) -> Path:
    """`herd train text` on the successor facts: a 2-layer, 64-wide model, trimmed vocabulary, Meta layout."""
    from herd.trainer import train_and_export

    corpus = write_successor_corpus(root / "corpus.jsonl", 3000)
    overrides = [
        "--data.source=jsonl", f"--data.paths=['{corpus}']", "--data.seq_len=64", "--data.batch_size=16",
        f"--train.steps={steps}", f"--train.run_dir={root / 'run'}", "--train.eval_every=0",
        "--model.args={dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128}",
        "--schedule.warmup_steps=20", "--metrics.tensorboard=false", "--checkpoint.export_format=meta",
    ]  # fmt: skip
    _, out = train_and_export("text", CONFIG, overrides)
    assert out is not None
    return out


def export_full_vocabulary(src: Path, out: Path) -> Path:
    """The trimmed-vocabulary model `src` under the full 128,256-token Llama 3 vocabulary, Hugging Face
    layout with its tokenizer files: each kept token's embedding and output rows move to its Llama 3 id;
    the other rows are zero (their logit is 0, far below the trained answers'), so transformers reads it."""
    model, sub = load_pretrained(src)
    base = Tokenizer()
    args = model.args.__class__(**{**model.args.__dict__, "vocab_size": base.vocab_size})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    keep = torch.tensor(sub.keep_ids)  # subset id → Llama 3 id
    for name in ("tok_embeddings.weight", "output.weight"):
        full = torch.zeros(base.vocab_size, model.args.dim)
        full[keep] = state[name][: len(sub.keep_ids)]
        state[name] = full
    save_text_model(state, args, base, out, "hf")
    return out


def mc_records(facts: list, seed: int = 0) -> list[dict]:
    """One multiple-choice record per fact: the successor among CHOICES distinct numbers, in random order."""
    rng = random.Random(seed)
    out = []
    for q in facts:
        right = int(q.answer)
        wrong = rng.sample([n for n in range(1, 51) if n != right], CHOICES - 1)
        choices = [right, *wrong]
        rng.shuffle(choices)
        out.append(
            {"question": q.prompt, "choices": [str(c) for c in choices], "answer": choices.index(right)}
        )
    return out


def write_tasks(root: Path, n: int = 40) -> Path:
    """`root/tasks`: arith_mc (multiple choice, scored as " 7" after "Answer:") and arith_gen (greedy
    generation until "."), both over the first `n` facts, from local jsonl files."""
    folder = root / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    facts = successor_facts()[:n]
    mc = folder / "arith_mc.jsonl"
    mc.write_text("".join(json.dumps(r) + "\n" for r in mc_records(facts)))
    gen = folder / "arith_gen.jsonl"
    gen.write_text(
        "".join(json.dumps({"question": q.prompt, "answer": q.answer.strip()}) + "\n" for q in facts)
    )
    (folder / "arith_mc.yaml").write_text(
        "task: arith_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {mc}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: answer\n"
        "target_delimiter: ' '\n"
        "metric_list:\n  - metric: acc\n"
    )
    (folder / "arith_gen.yaml").write_text(
        "task: arith_gen\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {gen}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_target: answer\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 4\n  do_sample: false\n"
        "filter_list:\n  - name: strip\n    filter:\n      - function: regex\n"
        "        regex_pattern: '(\\d+)'\n      - function: take_first\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return folder


def evaluate_on_rank(model_dir: str, tasks: list[str], out: str) -> dict:
    """`run_lm_eval` inside one rank of `herd.parallel.launch.spawn_ranks` (the harness splits documents)."""
    from herd.evaluation.lm_harness import run_lm_eval

    report = run_lm_eval(model_dir, tasks, out)
    return {
        "rank": report.rank,
        "world": report.world_size,
        "metrics": report.metrics,
        "samples": report.samples,
    }
