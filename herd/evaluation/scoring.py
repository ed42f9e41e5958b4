"""Log-likelihood scoring of continuations with a herd `Llama`: the one place evaluation runs the model
forward on given text (generation goes through `herd.text.generation`, the one decode loop).

Conventions (shared with lm-evaluation-harness's `hf` model with `add_bos_token=True`, so that the two
give the same numbers on the same checkpoint; see docs/evaluation.md):

- every request is encoded with `<|begin_of_text|>` first, as Llama 3 is scored;
- whitespace at the end of the context moves to the start of the continuation ("Answer: " + "7" is
  scored as "Answer:" + " 7"), which is how the BPE tokenises running text;
- the continuation's tokens are those of `encode(context + continuation)` after the context's tokens,
  so a merge across the boundary is scored as the text would be read;
- an input longer than the model's `max_seq_len` keeps its last tokens (the continuation always fits
  when it is shorter than the window).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from herd.text.generation import evaluating


@dataclass(frozen=True)
class Scored:
    logprob: float  # sum of the continuation tokens' log-probabilities
    greedy: bool  # every continuation token is the argmax at its position
    num_tokens: int  # continuation tokens scored


def encode_pair(
    tokenizer: Any, context: str, continuation: str, bos: bool = True
) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) by the conventions above; an empty context is just BOS."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [tokenizer.bos_id], tokenizer.encode(continuation, bos=False, eos=False)
    whole = tokenizer.encode(context + continuation, bos=bos, eos=False)
    ctx = tokenizer.encode(context, bos=bos, eos=False)
    return ctx, whole[len(ctx) :]


@torch.inference_mode()
def score_token_pairs(
    model: nn.Module, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 8
) -> list[Scored]:
    """Log P(continuation | context) of every (context ids, continuation ids) pair.

    Pairs are sorted longest first and right-padded into batches (causal attention: padding after a row
    never changes its scores); the head runs on the continuation positions only, so a 128K vocabulary
    costs len(continuation) × V per row, not T × V."""
    max_len = model.args.max_seq_len
    device = next(model.parameters()).device
    inputs: list[tuple[list[int], int]] = []  # (model input, continuation length)
    for ctx, cont in pairs:
        if not cont:
            raise ValueError("a continuation needs at least one token")
        if len(cont) > max_len:
            raise ValueError(f"a continuation of {len(cont)} tokens exceeds max_seq_len {max_len}")
        whole = (list(ctx) + list(cont))[-(max_len + 1) :]
        inputs.append((whole[:-1], len(cont)))
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))
    out: list[Scored | None] = [None] * len(inputs)
    with evaluating(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = len(inputs[rows[0]][0])
            tokens = torch.zeros(len(rows), width, dtype=torch.long, device=device)  # (B, T)
            for b, i in enumerate(rows):
                tokens[b, : len(inputs[i][0])] = torch.tensor(inputs[i][0], device=device)
            hidden = model.forward_hidden(tokens)  # (B, T, D)
            for b, i in enumerate(rows):
                seq, n = inputs[i]
                targets = torch.tensor((list(pairs[i][0]) + list(pairs[i][1]))[-n:], device=device)  # (n,)
                logits = model.head(hidden[b : b + 1, len(seq) - n : len(seq)])[0].float()  # (n, V)
                logp = torch.log_softmax(logits, dim=-1)
                picked = logp.gather(-1, targets[:, None])[:, 0]  # (n,)
                greedy = bool((logits.argmax(-1) == targets).all())
                out[i] = Scored(float(picked.sum()), greedy, n)
    return [s for s in out if s is not None]


def score_texts(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 8,
    bos: bool = True,
) -> list[Scored]:
    """`score_token_pairs` of (context, continuation) strings encoded by `encode_pair`."""
    return score_token_pairs(model, [encode_pair(tokenizer, c, x, bos) for c, x in pairs], batch_size)


__all__ = ["Scored", "encode_pair", "score_texts", "score_token_pairs"]
