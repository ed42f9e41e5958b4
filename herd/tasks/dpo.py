"""Direct Preference Optimization (`herd train dpo`, Llama 3 §4.1.4; Rafailov et al. 2023).

The policy (a Llama from `model.init_from`) is trained on preference pairs against a frozen reference
(`dpo.reference`, default the same checkpoint) with

    L = −log σ(β·[(log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))]) + λ·NLL(y_c|x)

where log π(y|x) sums the reply's token log-probs, NLL is the chosen reply's mean per-token negative
log-likelihood and λ = `dpo.nll_weight` (Llama 3: β = 0.1, λ = 0.2). With `dpo.mask_format_tokens`
(default, Llama 3) template tokens — headers and the closing `<|eot_id|>` — are left out of both
replies' log-probs: they are shared by chosen and rejected, and counting them pushes both down at once.

The reference lives inside the trained module (`DPOModel`), frozen (requires_grad False: no gradients,
no optimizer state) but sharded by FSDP and TP like the policy. When every record carries precomputed
`ref_chosen_logp` / `ref_rejected_logp` (`herd post dpo-reference`), no reference is built at all.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from herd.config import DataConfig, DPOConfig, ModelConfig
from herd.data.records import SkipCounter
from herd.data.training.preferences import (
    EncodedPreference,
    PreferenceBatching,
    collate_dpo,
    encode_all,
    encode_preference,
    load_preference_splits,
    parse_preference,
)
from herd.losses import token_logprobs
from herd.plans.preference import DPO_PLAN
from herd.task import LossOutput, TaskBase
from herd.tasks.text import CausalLMObjective
from herd.text.args import ModelArgs
from herd.text.chat_format import ChatFormat
from herd.text.loading import save_text_model
from herd.text.model import Llama


def dpo_loss(
    policy_chosen_logps: torch.Tensor,  # (B,) summed log-probs of the chosen reply under the policy
    policy_rejected_logps: torch.Tensor,  # (B,)
    ref_chosen_logps: torch.Tensor,  # (B,) the same under the frozen reference
    ref_rejected_logps: torch.Tensor,  # (B,)
    beta: float,
    chosen_nll: torch.Tensor | None = None,  # (B,) mean per-token NLL of the chosen reply (policy)
    nll_weight: float = 0.0,
) -> torch.Tensor:
    """Per-pair DPO loss (B,): −log σ(β·[(π_c − ref_c) − (π_r − ref_r)]) + nll_weight · chosen_nll.

    `chosen_nll` is the chosen reply's *mean* per-token negative log-likelihood under the policy (the
    same tokens as its log-prob, divided by their count), so λ weighs a per-token quantity whatever the
    reply's length. Sum the result over pairs and divide by the number of pairs for the batch mean.
    """
    logits = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    losses = -F.logsigmoid(beta * logits.float())
    if nll_weight and chosen_nll is not None:
        losses = losses + nll_weight * chosen_nll.float()
    return losses


class DPOModel(nn.Module):
    """The trainable policy and, unless reference log-probs are precomputed, the frozen reference."""

    def __init__(self, policy_args: ModelArgs, reference_args: ModelArgs | None) -> None:
        super().__init__()
        self.policy = Llama(policy_args)
        self.reference = Llama(reference_args) if reference_args is not None else None
        if self.reference is not None:
            self.reference.requires_grad_(False)  # before parallelisation: FSDP/TP keep the flag

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor,  # (R, T) each
    ) -> tuple[torch.Tensor, ...]:
        """Per-token log-probs of `targets` (R, T) under the policy, and under the reference when there
        is one: a tuple of one or two tensors (a pipeline stage of it returns the same)."""
        policy = token_logprobs(self.policy(tokens), targets)
        if self.reference is None:
            return (policy,)
        with torch.no_grad():
            reference = token_logprobs(self.reference(tokens), targets)
        return policy, reference


def dpo_inputs(batch: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Both replies of every pair are rows: tokens (B·2, T) and the targets each position predicts."""
    B, _, T = batch["tokens"].shape
    return (batch["tokens"].reshape(2 * B, T),), {"targets": batch["targets"].reshape(2 * B, T)}


def output_logps(
    output: tuple[torch.Tensor, ...], batch: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(policy (B, 2), reference (B, 2) or None, token counts (B, 2)) summed over each reply's scored
    tokens, from the per-token log-probs `DPOModel` (or its last pipeline stage) returns."""
    B, _, T = batch["tokens"].shape
    policy_tok, ref_tok = output[0], (output[1] if len(output) > 1 else None)
    mask = batch["loss_mask"].reshape(2 * B, T).to(policy_tok.dtype)
    policy = (policy_tok * mask).sum(-1).view(B, 2)
    ref = (ref_tok * mask).sum(-1).view(B, 2) if ref_tok is not None else None
    return policy, ref, mask.sum(-1).view(B, 2)


def sequence_logps(
    model: nn.Module, batch: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(policy (B, 2), reference (B, 2) or None, token counts (B, 2)) summed over each reply's scored tokens."""
    args, kwargs = dpo_inputs(batch)
    return output_logps(model(*args, **kwargs), batch)


class DPOTask(PreferenceBatching, TaskBase):
    """Config sections: `[model]` (init_from: the policy to start from), `[data]` (seq_len, batch size,
    seed), `[dpo]` (preference data, beta, NLL weight, format masking, reference). Layouts: FSDP/HSDP,
    TP and PP (`herd.plans.preference`); not context parallelism."""

    name = "dpo"
    layouts = frozenset({"fsdp", "hsdp", "tp", "pp"})
    plan = DPO_PLAN
    sections = ("model", "data", "dpo")

    def __init__(
        self, model: ModelConfig, data: DataConfig, dpo: DPOConfig, tokenizer: Any | None = None
    ) -> None:
        if not model.init_from:
            raise ValueError(
                "herd train dpo: model.init_from (the policy checkpoint to start from) is required"
            )
        from herd.text.loading import load_checkpoint
        from herd.text.tokenizer import load_tokenizer

        self.model_cfg, self.data, self.dpo = model, data, dpo
        self.model_args, self._policy_state = load_checkpoint(model.init_from)
        self.tokenizer = tokenizer or load_tokenizer(model.init_from, vocab_size=self.model_args.vocab_size)
        self.chat = ChatFormat(self.tokenizer)
        self.pad_id = max(getattr(self.tokenizer, "pad_id", 0), 0)
        self.seq_len = min(data.seq_len, self.model_args.max_seq_len)
        self.train_records, self.val_records, self.skipped = load_preference_splits(
            dpo, self.chat, self.seq_len, data.seed, section="dpo"
        )
        records = [it.record for it in (*self.train_records, *self.val_records)]
        self.precomputed = all(
            r.ref_chosen_logp is not None and r.ref_rejected_logp is not None for r in records
        )
        self.reference_args: ModelArgs | None = None
        self._reference_state: dict[str, torch.Tensor] | None = None
        if not self.precomputed:
            ref_path = dpo.reference or model.init_from
            self.reference_args, self._reference_state = (
                (self.model_args, self._policy_state)
                if ref_path == model.init_from
                else load_checkpoint(ref_path)
            )
            if self.reference_args.vocab_size != self.model_args.vocab_size:
                raise ValueError(
                    f"dpo.reference {ref_path}: vocab_size {self.reference_args.vocab_size} differs from the "
                    f"policy's {self.model_args.vocab_size}; the reference must share the policy's tokenizer"
                )
            if self.reference_args.n_layers != self.model_args.n_layers:
                self.layouts = self.layouts - {"pp"}  # stages hold the same layers of both models

    # --- model ----------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        with torch.device("meta"):
            return DPOModel(self.model_args, self.reference_args)

    def init_weights(self, model: nn.Module) -> None:
        """Policy and reference from their checkpoints (a pipeline stage takes its layers of each)."""
        own = model.policy.state_dict().keys()
        model.policy.load_state_dict({k: v for k, v in self._policy_state.items() if k in own}, strict=True)
        if model.reference is not None:
            own = model.reference.state_dict().keys()
            state = {k: v for k, v in self._reference_state.items() if k in own}
            model.reference.load_state_dict(state, strict=True)

    # --- data -----------------------------------------------------------------------------------------
    def encode(self, item: Any) -> EncodedPreference:
        if isinstance(item, dict):
            item = parse_preference(item)
        return item if isinstance(item, EncodedPreference) else encode_preference(item, self.chat)

    def collate(self, items: list[Any]) -> dict[str, Any]:
        encoded = [self.encode(it) for it in items]
        return collate_dpo(encoded, self.pad_id, self.seq_len, self.dpo.mask_format_tokens)

    def num_targets(self, batch: dict[str, Any]) -> int:
        return int(batch["tokens"].shape[0])  # pairs

    def inputs(self, batch: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return dpo_inputs(batch)

    def loss_from_output(self, output: tuple[torch.Tensor, ...], batch: dict[str, Any]) -> LossOutput:
        p = self.dpo
        policy, ref, counts = output_logps(output, batch)
        if ref is None:
            if "ref_logps" not in batch:
                raise ValueError(
                    "no reference model and no precomputed ref_chosen_logp/ref_rejected_logp in the batch"
                )
            ref = batch["ref_logps"].to(policy.dtype)
        chosen_nll = -policy[:, 0] / counts[:, 0].clamp(min=1)  # (B,) mean per-token NLL of the chosen reply
        losses = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], p.beta, chosen_nll, p.nll_weight)
        margin = (
            p.beta * ((policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1])).detach()
        )  # (B,) implicit rewards
        extra = {"correct_pairs": float((margin > 0).sum()), "reward_margin_sum": float(margin.sum())}
        return LossOutput(losses.sum(), int(policy.shape[0]), extra)

    def check_export(self, out_dir: str | Path, fmt: str) -> None:
        CausalLMObjective.check_export(self, out_dir, fmt)  # type: ignore[arg-type]

    def export(self, state: dict[str, torch.Tensor], out_dir: str | Path, fmt: str = "meta") -> Path | None:
        """The policy alone, where `load_pretrained` reads it (the reference is not written)."""
        policy = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
        return save_text_model(policy, self.model_args, self.tokenizer, out_dir, fmt)  # type: ignore[arg-type]


@torch.no_grad()
def evaluate_preferences(
    model: DPOModel, task: DPOTask, records: Iterable[Any], batch_size: int = 32
) -> dict[str, float]:
    """Held-out DPO metrics: the mean implicit reward margin β·[(π_c − ref_c) − (π_r − ref_r)], the
    fraction of pairs where it is positive, and the policy's own preference (log π(y_c) > log π(y_r))."""
    items = [task.encode(r) for r in records]
    was_training = model.training
    model.eval()
    margins, own = [], []
    device = next(model.parameters()).device
    for start in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in task.collate(items[start : start + batch_size]).items()}
        policy, ref, _ = sequence_logps(model, batch)
        ref = ref if ref is not None else batch["ref_logps"]
        margins.append(task.dpo.beta * ((policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1])))
        own.append(policy[:, 0] > policy[:, 1])
    model.train(was_training)
    m, o = torch.cat(margins).float(), torch.cat(own).float()
    return {"reward_margin": float(m.mean()), "reward_accuracy": float((m > 0).float().mean()),
            "policy_prefers_chosen": float(o.mean()), "pairs": len(items)}  # fmt: skip


# --- precomputed reference log-probs -------------------------------------------------------------------
@torch.no_grad()
def precompute_reference_logps(
    reference: str | Path,
    in_path: str | Path,
    out_path: str | Path,
    seq_len: int | None = None,
    mask_format_tokens: bool = True,
    batch_size: int = 16,
    device: str = "cpu",
) -> tuple[int, SkipCounter]:
    """Copy a preference jsonl, adding `ref_chosen_logp` / `ref_rejected_logp` from the `reference`
    checkpoint (use the same `mask_format_tokens` and reference as training). Returns (written, skipped)."""
    from herd.text.loading import load_pretrained

    model, tokenizer = load_pretrained(reference, device=device)
    chat, pad_id = ChatFormat(tokenizer), max(getattr(tokenizer, "pad_id", 0), 0)
    seq_len = seq_len or model.args.max_seq_len
    skipped, raw, records = SkipCounter(), [], []
    with Path(in_path).open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{in_path}:{line_no}"
            try:
                obj = json.loads(line)
                records.append(parse_preference(obj, where))
                raw.append(obj)
            except (json.JSONDecodeError, ValueError, TypeError) as e:
                skipped.add("bad_record", where, str(e))
    encoded = encode_all(records, chat, seq_len, skipped)
    kept = {id(e.record) for e in encoded}
    raw = [obj for obj, r in zip(raw, records) if id(r) in kept]
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for start in range(0, len(encoded), batch_size):
            batch = collate_dpo(encoded[start : start + batch_size], pad_id, seq_len, mask_format_tokens)
            B, _, T = batch["tokens"].shape
            tok = token_logprobs(
                model(batch["tokens"].view(2 * B, T).to(device)), batch["targets"].view(2 * B, T).to(device)
            )
            logps = (tok * batch["loss_mask"].view(2 * B, T).to(device)).sum(-1).view(B, 2).cpu()
            for obj, (c, r) in zip(raw[start : start + batch_size], logps.tolist()):
                f.write(json.dumps({**obj, "ref_chosen_logp": c, "ref_rejected_logp": r}) + "\n")
    return len(encoded), skipped


__all__ = [
    "DPOModel",
    "DPOTask",
    "dpo_loss",
    "evaluate_preferences",
    "precompute_reference_logps",
    "sequence_logps",
]
