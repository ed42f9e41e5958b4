"""PPO rollouts (Llama 2 §3.2.3): prompts from jsonl, their batches, and lock-step sampling of responses.

Prompts (`herd.data.training.prompts`, shared with rejection sampling): one jsonl record per line, either
`{"messages": [..., user turn]}` or `{"prompt": "..."}`. Each is encoded in the Llama 3.1 chat
format with the assistant header appended, so the policy writes the assistant's reply. Bad records are
skipped and counted with file:line (`SkipCounter`).

Batches: the prompts are shuffled per pass with seed (data.seed, pass) into one global stream; rollout r
is stream positions r·G .. (r+1)·G-1 (G = data.batch_size) and DP rank k takes its b = G/world slice.
PPO reuses a rollout for `ppo.epochs` optimizer steps, so the batches come in *rounds*: with A
micro-batches per step, rollouts r..r+A-1 are each yielded once per epoch, epoch-major, and every yield
carries its rollout id and epoch. The task generates a rollout at epoch 0 and reuses it afterwards.

Sampling: the one decode loop (`herd.text.generation.decode`) with PPO's hooks. Responses are drawn by
inverse-CDF sampling from uniforms that depend only on (train.seed, stream position of the prompt), never
on the batch around a row, so one process and N data-parallel ranks draw the same response for the same
prompt. Every rank runs exactly the same number of forward passes (the prompt-length range is agreed
across ranks here and passed to the loop, which runs in lock-step: no early exit), which keeps FSDP's
per-block all-gathers in lock-step; tokens after a row's first stop token are masked instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from herd.data.records import NoUsableRecords, SkipCounter
from herd.data.training.prompts import read_prompts as read_prompt_file
from herd.text.chat_format import ChatFormat
from herd.text.generation import StopRule, decode


# --- prompts --------------------------------------------------------------------------------------------
@dataclass
class Prompt:
    tokens: list[int]  # chat-format prompt ending with the assistant header
    where: str  # "file:line" of the record


def read_prompts(path: str | Path, fmt: ChatFormat, max_tokens: int, skipped: SkipCounter) -> list[Prompt]:
    """Every usable prompt of a jsonl file (`herd.data.training.prompts`), encoded with the assistant
    header appended; prompts longer than `max_tokens` are skipped and counted too."""
    prompts = []
    for where, messages in read_prompt_file(path, skipped):
        tokens = fmt.encode_dialog_prompt(messages, add_generation_prompt=True)
        if len(tokens) > max_tokens:
            skipped.add("too_long", where, f"{len(tokens)} prompt tokens, more than the {max_tokens} that "
                        "leave room for ppo.max_new_tokens in the models' max_seq_len")  # fmt: skip
            continue
        prompts.append(Prompt(tokens, where))
    if not prompts:
        raise NoUsableRecords(f"{path}: no usable prompt ({skipped.summary()})")
    return prompts


class PromptBatches:
    """Infinite rounds of rollout batches for one DP rank (see the module docstring); resumable."""

    def __init__(
        self,
        prompts: Sequence[Prompt],
        global_batch: int,
        ppo_epochs: int,
        accum_at: Callable[[int], int],  # micro-batches of optimizer step s (1-based)
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        pad_id: int = 0,
    ) -> None:
        if global_batch % world_size:
            raise ValueError(f"data.batch_size {global_batch} is not divisible by {world_size} DP ranks")
        self.prompts, self.global_batch, self.ppo_epochs = prompts, global_batch, ppo_epochs
        self.accum_at, self.rank, self.local = accum_at, rank, global_batch // world_size
        self.seed, self.pad_id = seed, pad_id
        self.step, self.micro, self.round_step, self.round_rollout = 1, 0, 1, 0
        self._perm: tuple[int, np.ndarray] | None = None

    def _order(self, data_pass: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != data_pass:
            rng = np.random.default_rng([self.seed, data_pass])
            self._perm = (data_pass, rng.permutation(len(self.prompts)))
        return self._perm[1]

    def batch(self, rollout: int, epoch: int) -> dict[str, Any]:
        """This rank's prompts of rollout `rollout`, right-padded: prompt_tokens (b, P), prompt_lens (b,)."""
        start = rollout * self.global_batch + self.rank * self.local
        positions = range(start, start + self.local)  # positions in the global prompt stream
        n = len(self.prompts)
        rows = [self.prompts[int(self._order(p // n)[p % n])].tokens for p in positions]
        tokens = torch.full((len(rows), max(map(len, rows))), self.pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = torch.tensor(row)
        lens = torch.tensor([len(r) for r in rows])
        return {"prompt_tokens": tokens, "prompt_lens": lens, "stream_index": torch.tensor(list(positions)),
                "rollout": rollout, "epoch": epoch}  # fmt: skip

    def __iter__(self) -> PromptBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        per_step = self.accum_at(self.round_step)  # the round's rollouts: one per micro-batch of a step
        out = self.batch(self.round_rollout + self.micro, self.step - self.round_step)
        self.micro += 1
        if self.micro == per_step:
            self.micro, self.step = 0, self.step + 1
            if self.step - self.round_step == self.ppo_epochs:
                self.round_step, self.round_rollout = self.step, self.round_rollout + per_step
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "micro": self.micro, "round_step": self.round_step,
                "round_rollout": self.round_rollout, "num_prompts": len(self.prompts)}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_prompts"] != len(self.prompts):
            raise ValueError(f"the checkpoint's prompt set had {state['num_prompts']} prompts, this one "
                             f"{len(self.prompts)}: resuming would replay a different stream")  # fmt: skip
        self.step, self.micro = int(state["step"]), int(state["micro"])
        self.round_step, self.round_rollout = int(state["round_step"]), int(state["round_rollout"])


# --- lock-step sampling ---------------------------------------------------------------------------------
def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce over every rank (PPO runs data-parallel only); a no-op in one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t


def row_uniforms(seed: int, stream_index: torch.Tensor, n: int) -> torch.Tensor:
    """(b, n) uniforms in [0, 1): row i's depend only on (seed, stream_index[i]), drawn on the CPU."""
    rows = []
    for index in stream_index.tolist():
        g = torch.Generator().manual_seed((seed * 1_000_003 + index) % 2**62)
        rows.append(torch.rand(n, generator=g, dtype=torch.float64))
    return torch.stack(rows)


def sample_from_uniforms(
    logits: torch.Tensor, u: torch.Tensor, temperature: float, vocab_limit: int
) -> torch.Tensor:
    """Inverse-CDF sample of softmax(logits[:, :vocab_limit] / temperature): logits (b, V), u (b,) → (b,).

    Ids at or above `vocab_limit` (the model's padding rows beyond the tokenizer) are never drawn."""
    probs = torch.softmax(logits[:, :vocab_limit].float() / temperature, dim=-1).double()  # (b, V')
    cdf = probs.cumsum(dim=-1)
    # right=True: the first id whose cumulative mass exceeds u, so zero-probability ids are never picked
    ids = torch.searchsorted(cdf, (u.to(cdf) * cdf[:, -1])[:, None], right=True)[:, 0]
    return ids.clamp(max=vocab_limit - 1)


@dataclass
class Responses:
    tokens: torch.Tensor  # (b, P_max + N) prompt, response, padding
    positions: torch.Tensor  # (b, N) position of each response token in `tokens`
    mask: torch.Tensor  # (b, N) bool: generated up to and including the first stop token
    last_index: torch.Tensor  # (b,) position of each row's last unmasked response token
    finished: torch.Tensor  # (b,) bool: the response ended with a stop token (not cut off at N)


class _StepModel:
    """PPO's (step, new_cache) callables as the decode loop's model: `model(tokens, kv_cache=, start_pos=)`
    and `model.new_kv_cache(rows, length)`. The step returns logits for every position, so the prefill
    keeps the last one (PPO's composed policy has no hidden-state-only path)."""

    def __init__(
        self, step: Callable[[torch.Tensor, Any, int], torch.Tensor], new_cache: Callable[[int, int], Any]
    ) -> None:
        self.step, self.new_kv_cache = step, new_cache

    def __call__(self, tokens: torch.Tensor, kv_cache: Any = None, start_pos: int = 0) -> torch.Tensor:
        return self.step(tokens, kv_cache, start_pos)  # (b, T, V)


@torch.no_grad()
def sample_responses(
    step: Callable[[torch.Tensor, Any, int], torch.Tensor],  # (tokens (b, T), cache, start) → (b, T, V)
    new_cache: Callable[[int, int], Any],  # (rows, length) → a KV cache
    prompt_tokens: torch.Tensor,  # (b, P) right-padded
    prompt_lens: torch.Tensor,  # (b,)
    uniforms: torch.Tensor,  # (b, N): the draw of each response position
    temperature: float,
    vocab_limit: int,
    stop_ids: Sequence[int] | frozenset[int],
    pad_id: int,
) -> Responses:
    """N = uniforms.shape[1] response tokens per prompt from `herd.text.generation.decode` (prompts
    left-aligned, decoding from the shortest prompt, rows inside their prompt take the prompt token).

    The shortest and longest prompt lengths are agreed across ranks (all-reduce) and passed to the loop
    as its start and buffer width, and the loop runs in lock-step (no early exit), so every rank makes
    exactly P_max + N - P_min forward passes whatever its own prompts."""
    b, N = uniforms.shape
    device = prompt_tokens.device
    lens = prompt_lens.to(device)
    span = torch.tensor([-int(lens.min()), int(lens.max())], device=device)
    neg_min, max_len = all_reduce_(span, "max").tolist()
    min_len, total = -neg_min, max_len + N
    tokens = torch.full((b, total), pad_id, dtype=torch.long, device=device)  # (b, total)
    tokens[:, : prompt_tokens.shape[1]] = prompt_tokens
    uniforms = uniforms.to(device)

    def sample(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # (b, V), (b,) → (b,)
        u = uniforms.gather(1, index.clamp(0, N - 1)[:, None])[:, 0]  # the draw of response position index
        return sample_from_uniforms(logits, u, temperature, vocab_limit)

    stop = StopRule(N, stop_ids, lock_step=True)
    decode(_StepModel(step, new_cache), tokens, lens, sample, stop, pad_id, start=min_len)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    positions = lens[:, None] + torch.arange(N, device=device)  # (b, N)
    response = tokens.gather(1, positions)
    is_stop = torch.isin(response, stops)
    mask = (is_stop.long().cumsum(1) - is_stop.long()) == 0  # nothing after the first stop token
    last_index = lens + mask.sum(1) - 1
    return Responses(tokens, positions, mask, last_index, is_stop.any(dim=1))
