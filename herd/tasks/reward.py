"""Reward modelling (`herd train rm`): Bradley–Terry on human preferences (Llama 2 §3.2.2, Llama 3 §4.1.2).

The reward model is a Llama trunk initialised from the policy checkpoint (`model.init_from`, its LM head
dropped) with a fresh scalar head on the final `<|eot_id|>` of prompt + response. Each preference gives
pairs (better, worse); the loss of a pair is the binary ranking loss

    L = −log σ(r_better − r_worse − m(r))

with m(r) = 0 (Llama 3, `rm.margin = "none"`) or Llama 2's discrete margin by the annotated strength
(Table 27: "small" = 1, 2/3, 1/3, 0 and "large" = 3, 2, 1, 0 for significantly better, better, slightly
better, negligibly better / unsure). A record with an edited response has Llama 3's three-way ranking
edited > chosen > rejected, so all three ordered pairs enter the loss; m(edited, chosen) = 0 and
m(edited, rejected) = m(chosen, rejected) (the strength was annotated for chosen vs rejected only).

Unlike Llama 3, which concatenates the prompt and all responses into one row (an approximation), each
prompt + response is its own row here: exact, and the causal mask makes right-padding harmless.
Helpfulness and safety reward models (Llama 2 trains two) are two runs on two datasets.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from herd.config import DataConfig, ModelConfig, ParallelConfig, RewardModelConfig
from herd.data.training.preferences import (
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
from herd.plans.reward import REWARD_PLAN
from herd.task import LayoutNotSupported, LossOutput, TaskBase
from herd.text.chat_format import ChatFormat
from herd.text.reward_model import RewardModel, write_reward_model

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
        raise ValueError(f"rm.margin must be one of {', '.join(MARGINS)}, got {name!r}")
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


class RewardModelTask(PreferenceBatching, TaskBase):
    """Config sections: `[model]` (init_from: the policy to start from), `[data]` (seq_len, batch size,
    seed), `[rm]` (preference data, margin). Layouts: FSDP/HSDP, TP (with sequence parallelism) and PP."""

    name = "rm"
    layouts = frozenset({"fsdp", "hsdp", "tp", "pp"})
    plan = REWARD_PLAN

    sections = ("model", "data", "rm", "parallel")

    def __init__(
        self,
        model: ModelConfig,
        data: DataConfig,
        rm: RewardModelConfig,
        parallel: ParallelConfig | None = None,
        tokenizer: Any | None = None,
    ) -> None:
        if not model.init_from:
            raise ValueError(
                "herd train rm: model.init_from (the policy checkpoint to start from) is required"
            )
        from herd.text.loading import load_checkpoint
        from herd.text.tokenizer import load_tokenizer

        self.model_cfg, self.data, self.rm = model, data, rm
        self.sequence_parallel = parallel.sequence_parallel if parallel is not None else True
        self.margins = margin_table(rm.margin)
        self.model_args, self._init_state = load_checkpoint(model.init_from)
        self.tokenizer = tokenizer or load_tokenizer(model.init_from, vocab_size=self.model_args.vocab_size)
        self.chat = ChatFormat(self.tokenizer)
        self.pad_id = max(getattr(self.tokenizer, "pad_id", 0), 0)
        self.seq_len = min(data.seq_len, self.model_args.max_seq_len)
        self.train_records, self.val_records, self.skipped = load_preference_splits(
            rm, self.chat, self.seq_len, seed=data.seed, section="rm"
        )

    def check_layout(self, degrees: dict[str, int]) -> None:
        super().check_layout(degrees)
        if degrees.get("tp", 1) > 1 and not self.sequence_parallel:
            raise LayoutNotSupported(
                "herd train rm with tensor parallelism needs parallel.sequence_parallel = true: the score "
                "head's bias must be a DTensor like the (sequence-parallel) norms it shares an optimizer group with"
            )

    # --- model ----------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        with torch.device("meta"):
            return RewardModel(self.model_args)

    def init_weights(self, model: nn.Module) -> None:
        """The trunk from the policy checkpoint (its `output.weight` is not used), a fresh score head
        (on the last pipeline stage when the model is cut into stages)."""
        if model.score is not None:
            model.reset_score_head()  # seeded by the loop
        trunk = model.trunk.state_dict().keys()
        model.trunk.load_state_dict({k: v for k, v in self._init_state.items() if k in trunk}, strict=True)

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

    def inputs(self, batch: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Every response of every record is a row: tokens (B·N, T), scored at last_index (B·N,)."""
        B, N, T = batch["tokens"].shape
        return (batch["tokens"].reshape(B * N, T),), {"last_index": batch["last_index"].reshape(B * N)}

    def loss_from_output(self, rewards: torch.Tensor, batch: dict[str, Any]) -> LossOutput:
        B, N = batch["last_index"].shape
        rewards = rewards.reshape(B, N)
        better = rewards.gather(1, batch["pair_better"])  # (B, 3)
        worse = rewards.gather(1, batch["pair_worse"])  # (B, 3)
        valid = batch["pair_valid"]  # (B, 3)
        losses = bradley_terry_loss(better, worse, batch["pair_margin"])  # (B, 3)
        loss_sum = (losses * valid).sum()
        correct = ((better > worse) & valid).sum()
        return LossOutput(loss_sum, int(valid.sum()), {"correct_pairs": float(correct)})

    def check_export(self, out_dir: str | Path, fmt: str) -> None:
        if fmt not in ("meta", "none"):
            raise ValueError(
                f"{out_dir}: a reward model exports in the meta layout only, got checkpoint.export_format {fmt!r}"
            )

    def export(self, state: dict[str, torch.Tensor], out_dir: str | Path, fmt: str = "meta") -> Path | None:
        """The trunk as a Meta checkpoint, the score head as safetensors, and `reward_model.json`."""
        if fmt == "none":
            return None
        if fmt != "meta":
            raise ValueError(
                f"a reward model exports in the meta layout only, got checkpoint.export_format {fmt!r}"
            )
        return write_reward_model(state, self.model_args, self.tokenizer, out_dir)


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


__all__ = [
    "MARGINS",
    "RewardModelTask",
    "bradley_terry_loss",
    "evaluate_ranking",
]
