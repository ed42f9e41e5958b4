"""Reward modelling (`herd train rm`): Bradley–Terry on human preferences (Llama 2 §3.2.2, Llama 3 §4.1.2).

The reward model is a Llama trunk initialised from the policy checkpoint (`model.init_from`, its LM head
dropped) with a fresh scalar head on the final `<|eot_id|>` of prompt + response. Each preference gives
pairs (better, worse); the loss of a pair is the binary ranking loss

    L = −log σ(r_better − r_worse − m(r))

with m(r) = 0 (Llama 3, `post.margin = "none"`) or Llama 2's discrete margin by the annotated strength
(Table 27: "small" = 1, 2/3, 1/3, 0 and "large" = 3, 2, 1, 0 for significantly better, better, slightly
better, negligibly better / unsure). A record with an edited response has Llama 3's three-way ranking
edited > chosen > rejected, so all three ordered pairs enter the loss; m(edited, chosen) = 0 and
m(edited, rejected) = m(chosen, rejected) (the strength was annotated for chosen vs rejected only).

Unlike Llama 3, which concatenates the prompt and all responses into one row (an approximation), each
prompt + response is its own row here: exact, and the causal mask makes right-padding harmless.
Helpfulness and safety reward models (Llama 2 trains two) are two runs on two datasets.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from herd.config import JobConfig
from herd.data.preferences import (
    PAIR_RESPONSES,
    STRENGTHS,
    EncodedPreference,
    PreferenceBatching,
    PreferenceRecord,
    collate_rm,
    encode_preference,
    load_preference_splits,
    parse_preference,
)
from herd.tasks.text import export_text_model
from herd.text.chat_format import ChatFormat
from herd.text.reward_model import RewardModel
from herd.trainer import LossOutput

REWARD_MODEL_FILE = "reward_model.json"
SCORE_HEAD_FILE = "score_head.safetensors"
# Llama 2 Table 27: margin m(r) by the annotated preference strength
MARGINS: dict[str, dict[str, float]] = {
    "none": dict.fromkeys(STRENGTHS, 0.0),
    "small": {
        "significantly_better": 1.0,
        "better": 2 / 3,
        "slightly_better": 1 / 3,
        "negligibly_better": 0.0,
    },
    "large": {"significantly_better": 3.0, "better": 2.0, "slightly_better": 1.0, "negligibly_better": 0.0},
}


def margin_table(name: str) -> dict[str, float]:
    if name not in MARGINS:
        raise ValueError(f"post.margin must be one of {', '.join(MARGINS)}, got {name!r}")
    return MARGINS[name]


def bradley_terry_loss(
    better: torch.Tensor,  # (P,) rewards of the preferred responses
    worse: torch.Tensor,  # (P,) rewards of the other responses
    margin: torch.Tensor | None = None,  # (P,) m(r), 0 without a margin
) -> torch.Tensor:
    """Per-pair ranking loss −log σ(r_better − r_worse − m(r)), shape (P,), in fp32."""
    diff = better.float() - worse.float()
    if margin is not None:
        diff = diff - margin.float()
    return -F.logsigmoid(diff)


def pair_rewards(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of each pair's better and worse response: two (B, 3) tensors (invalid pairs included)."""
    B, N, T = batch["tokens"].shape
    rewards = model(batch["tokens"].reshape(B * N, T), batch["last_index"].reshape(B * N)).reshape(B, N)
    better = rewards.gather(1, batch["pair_better"])  # (B, 3)
    worse = rewards.gather(1, batch["pair_worse"])  # (B, 3)
    return better, worse


class RewardModelTask(PreferenceBatching):
    def __init__(self, cfg: JobConfig, tokenizer: Any | None = None) -> None:
        if not cfg.model.init_from:
            raise ValueError(
                "herd train rm: model.init_from (the policy checkpoint to start from) is required"
            )
        if cfg.parallel.pp > 1 or cfg.parallel.cp > 1:
            raise ValueError(
                "herd train rm supports data parallel (FSDP/HSDP) and tensor parallel layouts; "
                "pipeline and context parallelism are not implemented for the reward model"
            )
        if cfg.parallel.tp > 1 and not cfg.parallel.sequence_parallel:
            raise ValueError(
                "herd train rm with tensor parallelism needs parallel.sequence_parallel = true: the score "
                "head's bias must be a DTensor like the (sequence-parallel) norms it shares an optimizer group with"
            )
        from herd.text.loading import load_checkpoint
        from herd.text.tokenizer import load_tokenizer

        self.cfg = cfg
        self.margins = margin_table(cfg.post.margin)
        self.model_args, self._init_state = load_checkpoint(cfg.model.init_from)
        self.tokenizer = tokenizer or load_tokenizer(
            cfg.model.init_from, vocab_size=self.model_args.vocab_size
        )
        self.chat = ChatFormat(self.tokenizer)
        self.pad_id = max(getattr(self.tokenizer, "pad_id", 0), 0)
        self.seq_len = min(cfg.data.seq_len, self.model_args.max_seq_len)
        self.train_records, self.val_records, self.skipped = load_preference_splits(
            cfg.post, self.chat, self.seq_len, seed=cfg.data.seed
        )

    # --- model ----------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        with torch.device("meta"):
            model = RewardModel(self.model_args)
        if self.cfg.parallel.tp > 1:
            # the loop fills a tensor-parallel model through load_state_dict (or init_weights): replicate
            # the score head over the TP mesh right after, before the optimizer collects the parameters
            model.register_load_state_dict_post_hook(lambda module, _keys: replicate_score_head(module))
        return model

    def init_weights(self, model: nn.Module) -> None:
        """The trunk from the policy checkpoint (its `output.weight` is not used), a fresh score head."""
        model.reset_score_head()  # seeded by the loop
        trunk = model.trunk.state_dict().keys()
        model.trunk.load_state_dict({k: v for k, v in self._init_state.items() if k in trunk}, strict=True)
        replicate_score_head(model)

    # --- data -----------------------------------------------------------------------------------------
    def encode(self, item: EncodedPreference | PreferenceRecord | dict[str, Any]) -> EncodedPreference:
        """An encoded record from a jsonl dict, a parsed record or an already encoded one."""
        if isinstance(item, dict):
            item = parse_preference(item)
        return item if isinstance(item, EncodedPreference) else encode_preference(item, self.chat)

    def collate(self, items: list[Any]) -> dict[str, Any]:
        return collate_rm([self.encode(it) for it in items], self.pad_id, self.seq_len, self.margins)

    def num_targets(self, batch: dict[str, Any]) -> int:
        return int(batch["pair_valid"].sum())

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        probe = model.trunk.layers["0"].attention.wq.weight if isinstance(model, RewardModel) else None
        if probe is not None and _is_dtensor(probe) != _is_dtensor(model.score.weight):
            raise RuntimeError(
                "the reward model's score head was not distributed like its trunk (see replicate_score_head)"
            )
        better, worse = pair_rewards(model, batch)
        valid = batch["pair_valid"]  # (B, 3)
        losses = bradley_terry_loss(better, worse, batch["pair_margin"])  # (B, 3)
        loss_sum = (losses * valid).sum()
        correct = ((better > worse) & valid).sum()
        return LossOutput(loss_sum, int(valid.sum()), {"correct_pairs": float(correct)})

    def flops_per_target(self) -> float | None:
        return None

    def export(self, state: dict[str, torch.Tensor], out_dir: str | Path, fmt: str = "meta") -> Path | None:
        """The trunk as a Meta checkpoint, the score head as safetensors, and `reward_model.json`."""
        if fmt == "none":
            return None
        if fmt != "meta":
            raise ValueError(
                f"a reward model exports in the meta layout only, got checkpoint.export_format {fmt!r}"
            )
        return _write_reward_model(state, self.model_args, self.tokenizer, out_dir)


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "device_mesh")


def replicate_score_head(model: RewardModel) -> None:
    """Under tensor parallelism (without FSDP) make the score head's parameters replicated DTensors on the
    trunk's TP mesh. The loop shards only Llama modules, and AdamW's multi-tensor step cannot mix DTensor
    and plain parameters in one group. Every TP rank computes the head on the same gathered hidden states,
    so its gradient is already complete on each rank. A no-op on one device or when FSDP manages the head."""
    probe = model.trunk.layers["0"].attention.wq.weight
    if _is_dtensor(model.score.weight) or not _is_dtensor(probe):
        return
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    def to_dtensor(_module, inputs, mesh):
        return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False) for x in inputs)

    def to_local(_module, output, _mesh):
        return output.to_local()

    distribute_module(model.score, probe.device_mesh, input_fn=to_dtensor, output_fn=to_local)


@torch.no_grad()
def evaluate_ranking(
    model: nn.Module, task: RewardModelTask, records: Iterable[Any], batch_size: int = 32
) -> dict[str, Any]:
    """Held-out ranking accuracy (Llama 2 Table 8): the fraction of pairs the model orders correctly,
    overall and by the annotated strength of chosen vs rejected (pairs with an edited response: "edited")."""
    records = [task.encode(r) for r in records]
    was_training = model.training
    model.eval()
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        batch = task.collate(chunk)
        device = next(model.parameters()).device
        better, worse = pair_rewards(model, {k: v.to(device) for k, v in batch.items()})
        right = (better > worse).cpu()
        for i, record in enumerate(chunk):
            for p, (hi, lo) in enumerate(PAIR_RESPONSES):
                if bool(batch["pair_valid"][i, p]):
                    key = "edited" if "edited" in (hi, lo) else record.record.strength or "unlabeled"
                    hits.setdefault(key, []).append(bool(right[i, p]))
    model.train(was_training)
    flat = [h for v in hits.values() for h in v]
    return {
        "accuracy": sum(flat) / max(len(flat), 1),
        "by_strength": {k: sum(v) / len(v) for k, v in sorted(hits.items())},
        "pairs": len(flat),
    }


# --- export / load (also used by rejection sampling and PPO) -------------------------------------------
def _write_reward_model(
    state: dict[str, torch.Tensor], args: Any, tokenizer: Any, out_dir: str | Path
) -> Path:
    out = Path(out_dir)
    trunk = {k.removeprefix("trunk."): v.detach().cpu() for k, v in state.items() if k.startswith("trunk.")}
    # the trunk has no LM head; written as a tied-embedding checkpoint so no `output.weight` is expected
    export_text_model(trunk, dataclasses.replace(args, tie_embeddings=True), tokenizer, out, "meta")
    from safetensors.torch import save_file

    save_file(
        {k: state[f"score.{k}"].detach().cpu().contiguous() for k in ("weight", "bias")},
        out / SCORE_HEAD_FILE,
    )
    meta = {"kind": "reward_model", "format": 1, "trunk": "meta", "score_head": SCORE_HEAD_FILE,
            "tie_embeddings": bool(args.tie_embeddings)}  # fmt: skip
    (out / REWARD_MODEL_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def save_reward_model(model: RewardModel, tokenizer: Any, out_dir: str | Path) -> Path:
    """Write `model` (a single-device RewardModel) where `load_reward_model` reads it; returns the folder."""
    return _write_reward_model(model.state_dict(), model.args, tokenizer, out_dir)


def load_reward_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[RewardModel, Any]:
    """(RewardModel in eval mode, its tokenizer) from a `herd train rm` export or `save_reward_model`."""
    from safetensors.torch import load_file

    from herd.text.loading import load_checkpoint
    from herd.text.tokenizer import load_tokenizer

    root = Path(path)
    marker = root / REWARD_MODEL_FILE
    if not marker.is_file():
        raise FileNotFoundError(
            f"{root} is not a reward model: {REWARD_MODEL_FILE} is missing (a `herd train rm` export?)"
        )
    try:
        meta = json.loads(marker.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{marker}: not valid JSON ({e})") from e
    if meta.get("kind") != "reward_model":
        raise ValueError(f"{marker}: kind is {meta.get('kind')!r}, expected 'reward_model'")
    args, trunk_state = load_checkpoint(root)
    args = dataclasses.replace(args, tie_embeddings=bool(meta.get("tie_embeddings", False)))
    head = load_file(root / meta.get("score_head", SCORE_HEAD_FILE))
    with torch.device("meta"):
        model = RewardModel(args)
    state = {f"trunk.{k}": v for k, v in trunk_state.items()}
    state.update({f"score.{k}": v for k, v in head.items()})
    model.load_state_dict(state, strict=True, assign=True)
    model.trunk.init_rope()
    model = model.to(device).eval()
    return model, load_tokenizer(root, vocab_size=args.vocab_size)


__all__ = [
    "MARGINS",
    "RewardModelTask",
    "bradley_terry_loss",
    "evaluate_ranking",
    "load_reward_model",
    "save_reward_model",
]
