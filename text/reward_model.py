"""Reward model: a Llama trunk with a scalar head (Llama 2 §3.2.2, Llama 3 §4.1.2).

The language-model head is replaced by a regression head: the reward of a sequence is a linear
function of the final-normed hidden state at its last token (the `<|eot_id|>` closing the assistant
turn). The trunk is a plain `herd.text.Llama` under `trunk.`, so a policy checkpoint initialises it
key for key (its `output.weight` is simply not used) and every parallel layout of the LLM applies.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from herd.text.args import ModelArgs
from herd.text.model import Llama


class RewardModel(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.trunk = Llama(args)
        self.trunk.output = None  # the 128K-row LM head is dead weight for a scalar score
        self.score = nn.Linear(args.dim, 1, bias=True)

    @torch.no_grad()
    def init_weights(self) -> None:
        self.trunk.init_weights()
        self.reset_score_head()

    @torch.no_grad()
    def reset_score_head(self) -> None:
        """A fresh head on a pretrained trunk: scores start at O(1) spread around 0."""
        nn.init.normal_(self.score.weight, std=1 / math.sqrt(self.args.dim))
        nn.init.zeros_(self.score.bias)

    def forward(
        self,
        tokens: torch.Tensor,  # (B, T)
        last_index: torch.Tensor,  # (B,) or (B, N): position of each scored sequence's last token
        document_ids: torch.Tensor | None = None,  # (B, T): several sequences packed in one row
    ) -> torch.Tensor:
        """Rewards (B,) or (B, N), one per `last_index` entry, in fp32."""
        # the norm is per token, so norming all T positions then picking equals picking then norming
        h = self.trunk.norm(self.trunk.forward_hidden(tokens, document_ids=document_ids))  # (B, T, D)
        if hasattr(h, "full_tensor"):
            # tensor parallelism with sequence parallelism: the final norm returns a DTensor sharded
            # along T; gather it (differentiably) so every rank can pick any position
            h = h.full_tensor()
        if h.shape[1] != tokens.shape[1]:
            raise ValueError(
                f"the trunk returned {h.shape[1]} positions for {tokens.shape[1]} tokens: its hidden states "
                "are split along the sequence (context parallelism?), which the reward model cannot score"
            )
        squeeze = last_index.dim() == 1
        index = last_index[:, None] if squeeze else last_index  # (B, N)
        picked = h.gather(1, index[..., None].expand(-1, -1, h.shape[-1]))  # (B, N, D)
        rewards = self.score(picked).squeeze(-1).float()  # (B, N)
        return rewards[:, 0] if squeeze else rewards


__all__ = ["RewardModel"]
