"""Losses shared by several tasks: causal-LM cross-entropy and per-token log-probabilities.

A leaf module (torch only): tasks compute their loss with these, and so does the last pipeline stage,
through the task (`herd.task`). Objective-specific losses (Bradley–Terry, DPO, PPO) live with their task.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from herd.data.records import IGNORE_INDEX


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy in fp32 over targets != -100; logits (B, T, V), labels (B, T)."""
    loss_sum = F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, int((labels != IGNORE_INDEX).sum())


def token_logprobs(
    logits: torch.Tensor,  # (..., V)
    targets: torch.Tensor,  # (...) ids
    temperature: float = 1.0,
    vocab_limit: int | None = None,
) -> torch.Tensor:
    """log softmax(logits[..., :vocab_limit] / temperature) at `targets`, in fp32, shaped like `targets`.

    `vocab_limit` leaves out the model's padding rows beyond a trimmed tokenizer (they are never sampled);
    with a temperature it is the distribution a sampler at that temperature draws from (PPO)."""
    if vocab_limit is not None:
        logits = logits[..., :vocab_limit]
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, targets[..., None])[..., 0]


__all__ = ["causal_lm_loss", "token_logprobs"]
