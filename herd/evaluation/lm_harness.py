"""herd checkpoints under EleutherAI's lm-evaluation-harness: the `herd` model class and `run_lm_eval`.

`HerdLM` subclasses `lm_eval.api.model.LM` directly (not `HFLM`, which resolves names on the Hugging Face
hub) and is registered as `herd`, so `lm_eval --model herd --model_args pretrained=DIR` works too. It
loads any checkpoint `herd.text.loading.load_pretrained` reads (Meta or Hugging Face layout, a trimmed
vocabulary included) and answers the harness's three request types:

- `loglikelihood` / `loglikelihood_rolling`: `herd.evaluation.scoring` (batched forward passes, BOS
  first, the harness's context/continuation split);
- `generate_until`: `herd.text.generation.generate`, the one decode loop, greedy; each output is cut at
  the first of the request's `until` strings (a single token that decodes to one of them also stops
  the row early).

Under `torchrun` (`herd eval lm` started by `torchrun --nproc-per-node N -m herd eval lm ...`) the harness
gives each rank 1/N of every task's documents and gathers the scores on rank 0 through `HerdLM`'s
`all_gather` / `gather_object` / `barrier` (torch.distributed; gloo on CPU); rank 0 writes the report.

`run_lm_eval` runs `lm_eval.simple_evaluate` with every hub switch off (`OFFLINE_ENV`): tasks come from
local YAML files whose `dataset_path: json` points at local `data_files`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from herd.evaluation.scoring import encode_pair, score_token_pairs
from herd.text.generation import SamplingParams, generate

# Environment that keeps datasets / huggingface_hub / transformers / evaluate from any network access.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_EVALUATE_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


@contextmanager
def offline() -> Iterator[None]:
    """OFFLINE_ENV set for the block (and the huggingface_hub constants read at import refreshed)."""
    saved = {k: os.environ.get(k) for k in OFFLINE_ENV}
    os.environ.update(OFFLINE_ENV)
    try:
        import huggingface_hub.constants as hub_constants

        old_hub = hub_constants.HF_HUB_OFFLINE
        hub_constants.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover - datasets depends on huggingface_hub
        hub_constants = None
    try:
        import datasets.config as ds_config

        old_ds = ds_config.HF_DATASETS_OFFLINE
        ds_config.HF_DATASETS_OFFLINE = True
    except ImportError:  # pragma: no cover - lm_eval depends on datasets
        ds_config = None
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = old_hub
        if ds_config is not None:
            ds_config.HF_DATASETS_OFFLINE = old_ds


@register_model("herd")
class HerdLM(LM):
    """A herd text checkpoint as an lm-eval model. `pretrained`: checkpoint folder; or pass a built
    `model` and its `tokenizer`. batch_size: rows per forward pass / decode batch."""

    def __init__(
        self,
        pretrained: str | None = None,
        model: Any = None,
        tokenizer: Any = None,
        batch_size: int | str = 8,
        device: str = "cpu",
        dtype: str | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool = True,
        **unused: Any,
    ) -> None:
        super().__init__()
        if model is None:
            if pretrained is None:
                raise ValueError("HerdLM needs pretrained=DIR or a model and its tokenizer")
            from herd.text.loading import load_pretrained

            model, tokenizer = load_pretrained(pretrained, device=device, dtype=dtype)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token in (True, "True", "true", "1")
        self._device = next(model.parameters()).device  # LM.device reads it (the evaluator's tensors)
        if dist.is_available() and dist.is_initialized():  # torchrun: the harness splits the documents
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()
        vocab = getattr(tokenizer, "vocab_size", model.args.vocab_size)
        self.vocab_limit = vocab if vocab < model.args.vocab_size else None  # trimmed vocabulary
        self.pad_id = tokenizer.pad_id if getattr(tokenizer, "pad_id", -1) >= 0 else 0

    @property
    def max_length(self) -> int:
        return self.model.args.max_seq_len

    # --- data parallel (torchrun): the collectives the harness's evaluator calls ---------------------------
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """A scalar (or 1-D) tensor from every rank, concatenated in rank order."""
        if self.world_size == 1:
            return tensor
        t = tensor.reshape(-1)
        parts = [torch.zeros_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t)
        return torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    # --- the three request types ----------------------------------------------------------------------
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tokenizer, *req.args, bos=self.add_bos_token) for req in requests]
        scored = score_token_pairs(self.model, pairs, self.batch_size)
        out = []
        for req, s in zip(requests, scored):
            answer = (s.logprob, s.greedy)
            self.cache_hook.add_partial("loglikelihood", req.args, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Perplexity-style: the whole string in disjoint windows of max_seq_len tokens (the harness's
        own window helpers), each window's tokens predicted once, summed per request."""
        pairs, owner = [], []
        for i, req in enumerate(requests):
            tokens = self.tokenizer.encode(req.args[0], bos=False, eos=False)
            windows = get_rolling_token_windows(tokens, self.tokenizer.bos_id, self.max_length, 1)
            for window in map(make_disjoint_window, windows):
                pairs.append(window)
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, s in zip(owner, score_token_pairs(self.model, pairs, self.batch_size)):
            totals[i] += s.logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy completions through `herd.text.generation.generate`, batched by equal settings."""
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
        for i, req in enumerate(requests):
            kwargs = dict(req.args[1]) if len(req.args) > 1 else {}
            until = kwargs.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            key = (until, int(kwargs.get("max_gen_toks", self.max_gen_toks)))
            groups.setdefault(key, []).append(i)
        out: list[str] = [""] * len(requests)
        for (until, max_new), members in groups.items():
            stop_ids = set(self.tokenizer.stop_ids) | self._single_token_stops(until)
            keep = max(1, self.max_length - max_new)  # the context's last tokens, room for the answer
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                prompts = [
                    self.tokenizer.encode(requests[i].args[0], bos=self.add_bos_token, eos=False)[-keep:]
                    for i in batch
                ]
                completions = generate(self.model, prompts, SamplingParams(max_new_tokens=max_new),
                                       stop_ids=frozenset(stop_ids), pad_id=self.pad_id,
                                       vocab_limit=self.vocab_limit)  # fmt: skip
                for i, c in zip(batch, completions):
                    text = cut_at_first(self.tokenizer.decode(c.tokens), until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    out[i] = text
        return out

    def _single_token_stops(self, until: tuple[str, ...]) -> set[int]:
        """Ids whose text is exactly one of `until`: generating one ends the row (the cut is the same)."""
        ids = set()
        for s in until:
            enc = self.tokenizer.encode(s, bos=False, eos=False)
            if len(enc) == 1 and self.tokenizer.decode(enc) == s:
                ids.add(enc[0])
        return ids


def cut_at_first(text: str, until: tuple[str, ...] | list[str]) -> str:
    """`text` up to (without) the earliest occurrence of any of `until`."""
    cut = len(text)
    for s in until:
        if s and (at := text.find(s)) >= 0:
            cut = min(cut, at)
    return text[:cut]


# --- simple_evaluate ------------------------------------------------------------------------------------
@dataclass
class LMEvalReport:
    out_dir: Path
    metrics: dict[str, dict[str, float]]  # task → metric → value (empty on ranks other than 0)
    samples: dict[str, int] = field(default_factory=dict)  # task → evaluated documents
    rank: int = 0
    world_size: int = 1


def resolve_tasks(tasks: list[str], include_path: str | None) -> tuple[list[str], list[str]]:
    """Task names and the folders to search: a `.yaml` argument adds its folder and its `task:` name."""
    import yaml

    names, paths = [], [include_path] if include_path else []
    for entry in tasks:
        path = Path(entry)
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: task file does not exist")
            spec = yaml.safe_load(path.read_text()) or {}
            if "task" not in spec:
                raise ValueError(f"{path}: no `task:` name in the YAML")
            names.append(str(spec["task"]))
            paths.append(str(path.parent.resolve()))
        else:
            names.append(entry)
    return names, paths


def run_lm_eval(
    model_dir: str | Path,
    tasks: list[str],
    out_dir: str | Path,
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    lm: LM | None = None,
    seed: int = 1234,
) -> LMEvalReport:
    """`lm_eval.simple_evaluate` of a herd checkpoint (or a given `lm`) on local tasks, offline; writes
    `results.json` (the harness's metrics and config) and `samples_<task>.jsonl` (per-document
    requests, responses and scores) into `out_dir`."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from herd.parallel.launch import init_distributed

    names, paths = resolve_tasks(tasks, include_path)
    rank, world, _ = init_distributed()  # under torchrun each rank scores 1/world of the documents
    out = Path(out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    with offline():
        # Indexing the harness's own ~10,000 task YAMLs takes most of a small run: skip it when the
        # local folders define every task asked for.
        manager = TaskManager(include_path=paths or None, include_defaults=False) if paths else None
        if manager is None or any(n not in manager.all_tasks for n in names):
            manager = TaskManager(include_path=paths or None)
        unknown = [n for n in names if n not in manager.all_tasks]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; give a YAML file or --include-path")
        lm = lm if lm is not None else HerdLM(pretrained=str(model_dir), batch_size=batch_size, device=device)
        results = lm_eval.simple_evaluate(
            model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
            log_samples=True, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed, bootstrap_iters=0,
        )  # fmt: skip
    if results is None:  # a rank other than 0: rank 0 gathered this rank's scores
        return LMEvalReport(out, {}, {}, rank, world)
    samples = results.pop("samples", {})
    for task, docs in samples.items():
        with open(out / f"samples_{task}.jsonl", "w") as f:
            for doc in docs:
                f.write(json.dumps(doc, default=str) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    metrics = {
        task: {k: v for k, v in values.items() if isinstance(v, (int, float)) and k != "alias"}
        for task, values in results["results"].items()
    }
    return LMEvalReport(out, metrics, {task: len(docs) for task, docs in samples.items()}, rank, world)


__all__ = ["OFFLINE_ENV", "HerdLM", "LMEvalReport", "cut_at_first", "offline", "resolve_tasks", "run_lm_eval"]
