"""`herd data curate-sft`: the paper's SFT data cleaning, scoring and semantic dedup (Llama 3 §4.2.3).

    dialogs (jsonl) → input check → rule-based cleaning → quality score → difficulty score → semantic dedup
                    → OUT/curated.jsonl + OUT/rejects.jsonl + OUT/report.json

Each step is a stage with its own counts in the report (`stages`): how many dialogs came in, how many it
kept, and what it removed by reason. Every dialog that does not reach `curated.jsonl` is a line of
`rejects.jsonl` with its stage, reason, input ordinal, "file@offset" and id (when the record has one),
plus the reason's detail (the rule and its count; the kept dialog a duplicate resembles and their
cosine). Kept dialogs carry their scores under `"curation"`. Scores are deterministic for a seed:
rule down-sampling hashes (seed, rule, ordinal); judges decode greedily unless a temperature is set,
and then with a seeded generator per batch; k-means is seeded.

Stages (details in their modules): `sft_rules` (patterns, emoji, exclamation marks; remove or
down-sample), `sft_scores` (reward model + optional judge rubric → quality; judge intents + 3-point
rating → difficulty), `sft_dedup` (mean-pooled embeddings, faiss k-means, greedy selection by
quality × difficulty). The dialogs are held in memory (SFT sets are millions of dialogs, not billions).
"""

from __future__ import annotations

import dataclasses
import time
import tomllib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from herd.data.curation.sft_rules import Rule, apply_rules, rules_from_config
from herd.data.curation.sft_scores import Scores, score_difficulty, score_quality
from herd.data.records import atomic_write, atomic_write_json, dumps, iter_jsonl


@dataclass
class JudgeConfig:
    model: str | None = None  # a herd chat checkpoint; None: no judge
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    batch_size: int = 8


@dataclass
class QualityConfig:
    reward_model: str | None = None  # a `herd train rm` export; None: no RM score
    keep_only_high_quality: bool = False  # remove dialogs neither the RM nor the judge marks high


@dataclass
class DifficultyConfig:
    enabled: bool = True  # needs the judge
    max_intents: int = 5


@dataclass
class DedupConfig:
    embedder: str | None = None  # a herd checkpoint, or a local Hugging Face encoder; None: no dedup
    embedder_type: str = "herd"  # "herd" or "hf"
    threshold: float = 0.9  # keep a dialog only if its cosine to every kept one in its cluster is below
    n_clusters: int = 0  # 0: ⌈√n⌉
    kmeans_iters: int = 20
    batch_size: int = 16


@dataclass
class CurationConfig:
    seed: int = 0
    device: str = "cpu"
    rules: list[Rule] = field(default_factory=lambda: rules_from_config(None))
    quality: QualityConfig = field(default_factory=QualityConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    difficulty: DifficultyConfig = field(default_factory=DifficultyConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    progress: bool = True


def _table(cls: type, raw: Any, name: str) -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"[{name}] must be a table")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"[{name}]: unknown key(s) {unknown}; expected some of {sorted(known)}")
    return cls(**raw)


def load_curation_config(path: str | Path | None, **overrides: Any) -> CurationConfig:
    """A CurationConfig from TOML (`seed`, `device`, `[[rules]]`, `[quality]`, `[judge]`, `[difficulty]`,
    `[dedup]`); `overrides` ("dedup.threshold": 0.8, ...) win over the file; None values are ignored."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None
    for key, value in overrides.items():
        if value is not None:
            section, _, name = key.rpartition(".")
            (raw.setdefault(section, {}) if section else raw)[name] = value
    sections = {
        "quality": QualityConfig,
        "judge": JudgeConfig,
        "difficulty": DifficultyConfig,
        "dedup": DedupConfig,
    }
    unknown = sorted(set(raw) - {"seed", "device", "rules", "progress", *sections})
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}")
    cfg = CurationConfig(rules=rules_from_config(raw.get("rules")))
    for name, cls in sections.items():
        if name in raw:
            setattr(cfg, name, _table(cls, raw[name], name))
    for name in ("seed", "device", "progress"):
        if name in raw:
            setattr(cfg, name, raw[name])
    if cfg.dedup.embedder_type not in ("herd", "hf"):
        raise ValueError(f"dedup.embedder_type must be 'herd' or 'hf', got {cfg.dedup.embedder_type!r}")
    return cfg


@dataclass
class Example:
    ordinal: int  # position among the input records (bad ones included)
    where: str
    record: dict[str, Any]
    messages: list[Any]
    scores: Scores = field(default_factory=Scores)
    cluster: int | None = None
    priority: float | None = None  # quality × difficulty, the order of the semantic dedup walk


def read_examples(inputs: Sequence[str | Path]) -> tuple[list[Example], list[dict[str, Any]], int]:
    """(usable dialogs, rejects of unusable records, records read)."""
    from herd.data.training.dialogs import parse_dialog

    examples, rejects, ordinal = [], [], 0
    for file_index, path in enumerate(inputs):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: dialog file does not exist")
        for item in iter_jsonl(path, file_index):
            base = {"ordinal": ordinal, "where": item.where, "stage": "input"}
            ordinal += 1
            if item.record is None:
                rejects.append({**base, "reason": item.bad})
                continue
            base["id"] = item.record.get("id")
            try:
                messages, _ = parse_dialog(item.record)
            except ValueError as e:
                rejects.append({**base, "reason": "bad_record", "error": str(e)})
                continue
            if messages[-1].role != "assistant":
                rejects.append({**base, "reason": "last_message_not_assistant"})
                continue
            examples.append(Example(base["ordinal"], item.where, item.record, messages))
    return examples, rejects, ordinal


def _reject(ex: Example, stage: str, reason: str, detail: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"ordinal": ex.ordinal, "where": ex.where, "id": ex.record.get("id"), "stage": stage, "reason": reason,
            **(detail or {})}  # fmt: skip


def load_models(cfg: CurationConfig) -> dict[str, Any]:
    """The scorers `cfg` names, loaded once: reward_scorer, judge, embedder (absent ones are None)."""
    from herd.text.generation import SamplingParams

    out: dict[str, Any] = {"reward_scorer": None, "judge": None, "embedder": None}
    if cfg.quality.reward_model:
        from herd.sample import RewardModelScorer
        from herd.text.reward_model import load_reward_model

        rm, tok = load_reward_model(cfg.quality.reward_model, device=cfg.device)
        out["reward_scorer"] = RewardModelScorer(rm, tok)
    if cfg.judge.model:
        from herd.data.curation.sft_judge import ChatJudge
        from herd.text.loading import load_pretrained

        model, tok = load_pretrained(cfg.judge.model, device=cfg.device)
        j = cfg.judge
        params = SamplingParams(j.max_new_tokens, j.temperature, j.top_p, seed=cfg.seed)
        out["judge"] = ChatJudge(model, tok, params, j.batch_size)
    if cfg.dedup.embedder:
        from herd.data.curation.sft_dedup import HerdEmbedder, HFEmbedder

        if cfg.dedup.embedder_type == "hf":
            out["embedder"] = HFEmbedder(cfg.dedup.embedder, cfg.dedup.batch_size, device=cfg.device)
        else:
            from herd.text.loading import load_pretrained

            model, tok = load_pretrained(cfg.dedup.embedder, device=cfg.device)
            out["embedder"] = HerdEmbedder(model, tok, cfg.dedup.batch_size)
    return out


# --- the stages: (examples in, config, models) → (examples kept, their rejects, the stage's counts) -------------
StageResult = tuple[list[Example], list[dict[str, Any]], dict[str, Any]]


def rules_stage(examples: list[Example], cfg: CurationConfig, models: dict[str, Any]) -> StageResult:
    kept, removed, stats = apply_rules(examples, cfg.rules, cfg.seed)
    stats.pop("removed")  # the stage report counts reasons itself
    return kept, [_reject(ex, "rules", reason, detail) for ex, reason, detail in removed], {"rules": stats}


def quality_stage(examples: list[Example], cfg: CurationConfig, models: dict[str, Any]) -> StageResult:
    counts = score_quality([ex.record for ex in examples], [ex.messages for ex in examples],
                           [ex.scores for ex in examples], models["reward_scorer"], models["judge"])  # fmt: skip
    if not cfg.quality.keep_only_high_quality:
        return examples, [], {"counts": counts}
    rejects = [_reject(ex, "quality", "not_high_quality", {"scores": ex.scores.as_dict()})
               for ex in examples if not ex.scores.quality_high]  # fmt: skip
    return [ex for ex in examples if ex.scores.quality_high], rejects, {"counts": counts}


def difficulty_stage(examples: list[Example], cfg: CurationConfig, models: dict[str, Any]) -> StageResult:
    if models["judge"] is None or not cfg.difficulty.enabled:
        return (
            examples,
            [],
            {"counts": {"skipped": "no judge model" if cfg.difficulty.enabled else "disabled"}},
        )
    counts = score_difficulty([ex.messages for ex in examples], [ex.scores for ex in examples],
                              models["judge"], cfg.difficulty.max_intents)  # fmt: skip
    return examples, [], {"counts": counts}


def dedup_stage(examples: list[Example], cfg: CurationConfig, models: dict[str, Any]) -> StageResult:
    import numpy as np

    from herd.data.curation.sft_dedup import greedy_select, kmeans_clusters, normalise

    if models["embedder"] is None:
        return examples, [], {"counts": {"skipped": "no embedder"}}
    x = normalise(models["embedder"]([ex.messages for ex in examples]))  # (n, d)
    k = cfg.dedup.n_clusters or int(np.ceil(np.sqrt(len(examples))))
    clusters = kmeans_clusters(x, k, cfg.seed, cfg.dedup.kmeans_iters)  # (n,)
    priority = [ex.scores.quality_score * ex.scores.difficulty_score for ex in examples]
    keep, why = greedy_select(x, clusters, priority, cfg.dedup.threshold)
    rejects = []
    for i, ex in enumerate(examples):
        ex.cluster, ex.priority = int(clusters[i]), priority[i]
        if not keep[i]:
            twin, cos = why[i]
            rejects.append(_reject(ex, "semantic_dedup", "semantic_duplicate", {
                "similar_to": examples[twin].ordinal, "similar_to_id": examples[twin].record.get("id"),
                "cosine": round(cos, 4), "cluster": ex.cluster, "priority": priority[i],
                "similar_to_priority": priority[twin], "scores": ex.scores.as_dict()}))  # fmt: skip
    counts = {
        "clusters": int(len(np.unique(clusters))),
        "threshold": cfg.dedup.threshold,
        "dim": int(x.shape[1]),
    }
    return [ex for i, ex in enumerate(examples) if keep[i]], rejects, {"counts": counts}


STAGES = (("rules", rules_stage), ("quality", quality_stage), ("difficulty", difficulty_stage),
          ("semantic_dedup", dedup_stage))  # fmt: skip


def _model_calls(stage: str, cfg: CurationConfig, models: dict[str, Any]) -> int:
    """Model passes per dialog in a stage (the progress bar's total is this × dialogs)."""
    judge = models["judge"] is not None
    if stage == "quality":
        return int(models["reward_scorer"] is not None) + int(judge)
    if stage == "difficulty":
        return 2 * int(judge and cfg.difficulty.enabled)
    return int(stage == "semantic_dedup" and models["embedder"] is not None)


class _BlockScorer:
    """A reward scorer called on blocks of dialogs so that a progress bar can move between them."""

    def __init__(self, inner: Any, advance: Any, block: int = 256) -> None:
        self.inner, self.advance, self.block = inner, advance, block

    @property
    def truncated(self) -> int:
        return getattr(self.inner, "truncated", 0)

    def __call__(self, dialogs: Sequence[Any]) -> list[float]:
        out: list[float] = []
        for start in range(0, len(dialogs), self.block):
            part = dialogs[start : start + self.block]
            out.extend(self.inner(part))
            self.advance(len(part))
        return out


def _reporting(models: dict[str, Any], advance: Any) -> dict[str, Any]:
    """Point the judge's and embedder's `on_batch` at `advance` (None: detach); the models for a stage."""
    for key in ("judge", "embedder"):
        if models[key] is not None and hasattr(models[key], "on_batch"):
            models[key].on_batch = advance
    scorer = models["reward_scorer"]
    if advance is None or scorer is None:
        return models
    return {**models, "reward_scorer": _BlockScorer(scorer, advance)}


def curate_sft(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    cfg: CurationConfig,
    models: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every stage over the dialogs of `inputs`; writes curated.jsonl, rejects.jsonl, report.json and
    returns the report. `models` (reward_scorer, judge, embedder) default to `load_models(cfg)`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True, quiet=not cfg.progress)
    models = load_models(cfg) if models is None else models
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    examples, rejects, n_records = read_examples(inputs)
    stages: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    columns = (TextColumn("[bold]curate-sft[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console, disable=not cfg.progress) as bar:
        for name, stage in STAGES:
            t, n_in = time.perf_counter(), len(examples)
            total = _model_calls(name, cfg, models) * n_in or 1  # a stage without a model: one step
            task = bar.add_task(name, total=total)
            stage_models = _reporting(models, lambda n, task=task: bar.advance(task, n))
            if examples:
                examples, stage_rejects, extra = stage(examples, cfg, stage_models)
            else:
                stage_rejects, extra = [], {"counts": {"skipped": "no dialogs left"}}
            _reporting(models, None)
            stages[name] = {"input": n_in, "kept": len(examples),
                            "removed": dict(Counter(r["reason"] for r in stage_rejects)), **extra}  # fmt: skip
            rejects += stage_rejects
            seconds[name] = round(time.perf_counter() - t, 3)
            bar.update(
                task, completed=total, description=f"{name}: {len(examples)}/{n_in} kept ({seconds[name]} s)"
            )

    with atomic_write(out / "curated.jsonl") as f:
        for ex in examples:
            extra = ex.scores.as_dict()
            if ex.cluster is not None:
                extra |= {"cluster": ex.cluster, "priority": ex.priority}
            f.write(dumps({**ex.record, "curation": extra}) + "\n")
    rejects.sort(key=lambda r: r["ordinal"])
    with atomic_write(out / "rejects.jsonl") as f:
        for r in rejects:
            f.write(dumps(r) + "\n")
    report = {
        "inputs": [str(p) for p in inputs], "input_records": n_records, "output_records": len(examples),
        "bad_records": dict(Counter(r["reason"] for r in rejects if r["stage"] == "input")),
        "stages": stages, "rejects": len(rejects), "seconds": {**seconds, "total": round(time.perf_counter() - t0, 3)},
        "config": _config_summary(cfg),
    }  # fmt: skip
    atomic_write_json(out / "report.json", report)
    return report


def _config_summary(cfg: CurationConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["rules"] = [{k: v for k, v in dataclasses.asdict(r).items() if k != "_regex"} for r in cfg.rules]
    d.pop("progress")
    return d
