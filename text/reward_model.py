"""Reward model: a Llama trunk with a scalar head (Llama 2 §3.2.2, Llama 3 §4.1.2), and its checkpoint files.

The language-model head is replaced by a regression head: the reward of a sequence is a linear
function of the final-normed hidden state at its last token (the `<|eot_id|>` closing the assistant
turn). The trunk is a plain `herd.text.Llama` under `trunk.`, so a policy checkpoint initialises it
key for key (its `output.weight` is simply not used) and every parallel layout of the LLM applies.

On disk (`save_reward_model` / `load_reward_model`; `herd train rm` exports the same): the trunk as a Meta
checkpoint written as tied-embedding (it has no LM head), the head in `score_head.safetensors`, and
`reward_model.json` marking the folder as a reward model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import nn

from herd.text.args import ModelArgs
from herd.text.model import Llama

REWARD_MODEL_FILE = "reward_model.json"
SCORE_HEAD_FILE = "score_head.safetensors"


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

    def score_hidden(
        self, h: torch.Tensor, last_index: torch.Tensor, length: int | None = None
    ) -> torch.Tensor:
        """Rewards from the trunk's last hidden states h (B, T, D) (before the final norm) at `last_index`
        (B,) or (B, N): (B,) or (B, N) in fp32. `length`: the number of input tokens, checked."""
        # the norm is per token, so norming all T positions then picking equals picking then norming
        h = self.trunk.norm(h)  # (B, T, D)
        if hasattr(h, "full_tensor"):
            # tensor parallelism with sequence parallelism: the final norm returns a DTensor sharded
            # along T; gather it (differentiably) so every rank can pick any position
            h = h.full_tensor()
        if length is not None and h.shape[1] != length:
            raise ValueError(
                f"the trunk returned {h.shape[1]} positions for {length} tokens: its hidden states "
                "are split along the sequence (context parallelism?), which the reward model cannot score"
            )
        squeeze = last_index.dim() == 1
        index = last_index[:, None] if squeeze else last_index  # (B, N)
        picked = h.gather(1, index[..., None].expand(-1, -1, h.shape[-1]))  # (B, N, D)
        rewards = self.score(picked).squeeze(-1).float()  # (B, N)
        return rewards[:, 0] if squeeze else rewards

    def forward(
        self,
        tokens: torch.Tensor,  # (B, T)
        last_index: torch.Tensor,  # (B,) or (B, N): position of each scored sequence's last token
        document_ids: torch.Tensor | None = None,  # (B, T): several sequences packed in one row
    ) -> torch.Tensor:
        """Rewards (B,) or (B, N), one per `last_index` entry, in fp32."""
        h = self.trunk.forward_hidden(tokens, document_ids=document_ids)  # (B, T, D)
        return self.score_hidden(h, last_index, tokens.shape[1])


# --- checkpoint files -------------------------------------------------------------------------------------
def write_reward_model(
    state: dict[str, torch.Tensor], args: ModelArgs, tokenizer: Any, out_dir: str | PathLike
) -> Path:
    """Write a RewardModel state dict (keys `trunk.*`, `score.*`) with its tokenizer; returns the folder."""
    from safetensors.torch import save_file

    from herd.text.loading import save_text_model

    out = Path(out_dir)
    trunk = {k.removeprefix("trunk."): v.detach().cpu() for k, v in state.items() if k.startswith("trunk.")}
    # the trunk has no LM head; written as a tied-embedding checkpoint so no `output.weight` is expected
    save_text_model(trunk, dataclasses.replace(args, tie_embeddings=True), tokenizer, out, "meta")
    save_file(
        {k: state[f"score.{k}"].detach().cpu().contiguous() for k in ("weight", "bias")},
        out / SCORE_HEAD_FILE,
    )
    meta = {"kind": "reward_model", "format": 1, "trunk": "meta", "score_head": SCORE_HEAD_FILE,
            "tie_embeddings": bool(args.tie_embeddings)}  # fmt: skip
    (out / REWARD_MODEL_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def save_reward_model(model: RewardModel, tokenizer: Any, out_dir: str | PathLike) -> Path:
    """Write `model` (a single-device RewardModel) where `load_reward_model` reads it; returns the folder."""
    return write_reward_model(model.state_dict(), model.args, tokenizer, out_dir)


def is_reward_model(path: str | PathLike) -> bool:
    return (Path(path) / REWARD_MODEL_FILE).is_file()


def load_reward_model(path: str | PathLike, device: str | torch.device = "cpu") -> tuple[RewardModel, Any]:
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
    "REWARD_MODEL_FILE",
    "SCORE_HEAD_FILE",
    "RewardModel",
    "is_reward_model",
    "load_reward_model",
    "save_reward_model",
    "write_reward_model",
]
