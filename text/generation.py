"""Batched KV-cache generation: greedy, temperature and top-p sampling; prompts of different lengths.

Prompts are right-aligned to a common start: all rows share positions, decoding starts after the
shortest prompt, and a row still inside its prompt takes its prompt token instead of the sample
(Meta's reference scheme). That needs no padding mask, so every row computes exactly what it would
alone; the cost is that rows with longer prompts prefill one token per step after the shortest one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 → greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Completion:
    tokens: list[int]  # generated tokens, without the prompt and without the stop token
    stop_token: int | None  # the stop token that ended it, or None if max_new_tokens ran out


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """logits (B, V) → token ids (B,)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)  # renormalises implicitly
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prompt_lengths(
    model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int
) -> tuple[int, int]:
    """(shortest prompt, longest prompt + max_new_tokens); a clear error past the model's max_seq_len."""
    min_len = min(len(p) for p in prompts)
    max_len = max(len(p) for p in prompts)
    total_len = max_len + max_new_tokens
    if total_len > model.args.max_seq_len:
        raise ValueError(
            f"prompt ({max_len}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_seq_len {model.args.max_seq_len}"
        )
    return min_len, total_len


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    stop_ids: Sequence[int] | frozenset[int] = (),
    pad_id: int = 0,
) -> list[Completion]:
    """Complete each prompt; `model` is a `Llama` (anything with its forward/new_kv_cache API)."""
    params = params or SamplingParams()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    B = len(prompts)
    min_len, total_len = prompt_lengths(model, prompts, params.max_new_tokens)
    device = next(model.parameters()).device
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)

    tokens = torch.full((B, total_len), pad_id, dtype=torch.long, device=device)  # (B, total)
    in_prompt = torch.zeros((B, total_len), dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(list(p), dtype=torch.long, device=device)
        in_prompt[b, : len(p)] = True
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    # each row ends at its own length limit: prompt + max_new_tokens
    limit = torch.tensor([len(p) + params.max_new_tokens for p in prompts], device=device)

    was_training = model.training
    model.eval()
    cache = model.new_kv_cache(B, total_len)
    prev = 0
    for cur in range(min_len, total_len):
        logits = model(tokens[:, prev:cur], kv_cache=cache, start_pos=prev)  # (B, cur-prev, V)
        nxt = sample_next(logits[:, -1], params.temperature, params.top_p, generator)
        nxt = torch.where(in_prompt[:, cur], tokens[:, cur], nxt)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens[:, cur] = nxt
        generated = ~in_prompt[:, cur]
        done |= generated & torch.isin(nxt, stops)
        done |= (cur + 1) >= limit
        prev = cur
        if bool(done.all()):
            break
    model.train(was_training)

    return split_completions(tokens, prompts, limit, stop_ids)


def split_completions(
    tokens: torch.Tensor,  # (B, total): prompts then generated tokens
    prompts: Sequence[Sequence[int]],
    limit: torch.Tensor,  # (B,): each row's end, prompt + max_new_tokens
    stop_ids: Sequence[int] | frozenset[int],
) -> list[Completion]:
    """Each row's generated tokens, cut at (and without) its first stop token."""
    out = []
    for b, p in enumerate(prompts):
        row = tokens[b, len(p) : int(limit[b])].tolist()
        stop_token = None
        for i, t in enumerate(row):
            if t in stop_ids:
                row, stop_token = row[:i], t
                break
        out.append(Completion(row, stop_token))
    return out


def generate_text(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    params: SamplingParams | None = None,
    bos: bool = True,
) -> list[str]:
    """Plain completion of strings: encode, generate until a stop token, decode."""
    encoded = [tokenizer.encode(p, bos=bos, eos=False) for p in prompts]
    pad = tokenizer.pad_id if getattr(tokenizer, "pad_id", -1) >= 0 else 0
    completions = generate(model, encoded, params, stop_ids=tokenizer.stop_ids, pad_id=pad)
    return [tokenizer.decode(c.tokens) for c in completions]
