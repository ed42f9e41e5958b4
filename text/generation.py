"""The one decode loop: `prefill`, `decode_one_token` and `decode` with its hooks; `generate` on top.

Every caller that samples from a model goes through `decode` (gpt-fast's split: one prefill, then one
token per step): `generate` / `generate_text` / `ChatSession`, rejection sampling (`herd.sample`: K
samples per prompt sharing one prefill), PPO rollouts (`herd.tasks.ppo_rollout.sample_responses`:
inverse-CDF draws from given uniforms, lock-step across data-parallel ranks), image generation
(`herd.adapters.generate_with_images`: `generate` after binding the images to the KV cache) and Ghost
Attention's sampler (`generate` with a vocabulary limit). What differs between them is a hook:

- a `Sampler` (logits of the next position → a token per row): temperature / top-p with a seeded
  generator and an optional vocabulary limit (`token_sampler`), or PPO's inverse-CDF draw;
- a `StopRule`: stop ids, the per-row length limit (prompt + max_new_tokens), and `lock_step` (never
  leave the loop early, so that every data-parallel rank makes the same forward passes);
- where the loop starts: `start` (PPO passes the shortest prompt over all ranks) and an already
  filled cache with its last logits (`prefill_shared`: K copies of a prompt prefilled once);
- how the model runs (`DecodeSteps`): eager with the growing `KVCache` (the default), or with a
  `StaticKVCache` read whole and the position as a tensor (`STATIC_STEPS`), so every decode step has
  the same shapes — what `herd.fast_decode.compiled_steps` compiles (CUDA graphs on a GPU).

Prompt scheme (Meta's reference): prompts are left-aligned in one (B, total) buffer, so all rows share
positions; decoding starts after the shortest prompt, and a row still inside its prompt takes its
prompt token instead of the sample. That needs no padding mask, so every row computes exactly what it
would alone; the cost is that rows with longer prompts prefill one token per step after the shortest
one. After its stop token or its length limit a row writes `pad_id`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from herd.text.model import Llama

# (logits of the next position (B, V), response index of that position (B,); < 0 inside the prompt)
# → the next token of every row (B,). Rows inside their prompt or finished are overwritten afterwards,
# but the sampler still sees them: a random stream advances the same way whatever the rows' states.
Sampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


@dataclass(frozen=True)
class StopRule:
    """When a row is finished, and whether the loop may end before the buffer does."""

    max_new_tokens: int  # a row ends at its prompt length + max_new_tokens
    stop_ids: Sequence[int] | frozenset[int] = ()  # a generated stop token ends its row (and is kept)
    lock_step: bool = False  # True: decode up to the buffer's end even when every row has finished


# --- sampling hooks -------------------------------------------------------------------------------------
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


def seeded_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A generator on `device` seeded with `seed`, or None (torch's global stream) without a seed."""
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def token_sampler(
    params: SamplingParams, generator: torch.Generator | None = None, vocab_limit: int | None = None
) -> Sampler:
    """Greedy / temperature / top-p (`sample_next`) over ids below `vocab_limit` (a trimmed tokenizer
    under a padded embedding: the padding rows decode to no token, so they are never drawn)."""

    def sample(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if vocab_limit is not None:
            logits = logits[:, :vocab_limit]  # (B, V')
        return sample_next(logits, params.temperature, params.top_p, generator)

    return sample


# --- the model's two steps ------------------------------------------------------------------------------
def prefill(model: nn.Module, tokens: torch.Tensor, cache: Any, start_pos: int = 0) -> torch.Tensor:
    """tokens (B, T) through the model into `cache` at start_pos; the logits of the last position (B, V).

    A `Llama` runs the head on that position only: the head over all T positions would cost T·V per row
    (1 GB of fp32 logits for 2048 tokens of Llama 3). Other models (composed ones, PPO's step) return
    logits for every position, of which the last is kept."""
    if isinstance(model, Llama):
        h = model.forward_hidden(tokens, kv_cache=cache, start_pos=start_pos)  # (B, T, D)
        return model.head(h[:, -1:])[:, 0]  # (B, V)
    return model(tokens, kv_cache=cache, start_pos=start_pos)[:, -1]  # (B, V)


def decode_one_token(
    model: nn.Module, token: torch.Tensor, cache: Any, pos: int | torch.Tensor
) -> torch.Tensor:
    """The token (B, 1) at position `pos` into `cache`; the logits of the next position (B, V).
    `pos` is a 0-dim long tensor with a static cache (`DecodeSteps.static_cache`)."""
    return model(token, kv_cache=cache, start_pos=pos)[:, -1]


@dataclass(frozen=True)
class DecodeSteps:
    """How `decode` runs the model: the cache it makes and the two steps (same signatures as `prefill`
    and `decode_one_token`). With `static_cache` the loop asks `model.new_kv_cache(..., static=True)` and
    passes decode positions as 0-dim long tensors; the tokens are the eager path's (same math, keys past
    a position masked instead of sliced off)."""

    static_cache: bool = False
    prefill: Callable[[nn.Module, torch.Tensor, Any], torch.Tensor] = prefill
    decode_one_token: Callable[[nn.Module, torch.Tensor, Any, Any], torch.Tensor] = decode_one_token
    # (model, rows, length) → an empty cache for `length` positions; None → model.new_kv_cache
    new_cache: Callable[[nn.Module, int, int], Any] | None = None

    def make_cache(self, model: nn.Module, rows: int, length: int) -> Any:
        if self.new_cache is not None:
            return self.new_cache(model, rows, length)
        if self.static_cache:
            return model.new_kv_cache(rows, length, static=True)
        return model.new_kv_cache(rows, length)


EAGER_STEPS = DecodeSteps()
STATIC_STEPS = DecodeSteps(static_cache=True)


def prefill_shared(
    model: nn.Module, tokens: torch.Tensor, copies: int, max_seq_len: int
) -> tuple[Any, torch.Tensor]:
    """Rows g·copies … g·copies+copies-1 of tokens (B, T) hold the same prompt prefix: prefill each
    group's first row only, then copy its cache and last logits to the group's rows (rejection
    sampling's shared prefix). Returns (cache of B rows holding positions 0..T-1, logits (B, V))."""
    distinct = tokens[::copies]  # (G, T)
    cache = model.new_kv_cache(distinct.shape[0], max_seq_len)
    logits = prefill(model, distinct, cache)  # (G, V)
    return cache.expand_rows(copies, tokens.shape[1]), logits.repeat_interleave(copies, dim=0)


# --- the loop -------------------------------------------------------------------------------------------
def decode(
    model: nn.Module,
    tokens: torch.Tensor,  # (B, total): prompts left-aligned, pad_id after them; decoded in place
    prompt_lens: torch.Tensor,  # (B,)
    sample: Sampler,
    stop: StopRule,
    pad_id: int,
    start: int | None = None,
    prefilled: tuple[Any, torch.Tensor] | None = None,
    steps: DecodeSteps = EAGER_STEPS,
) -> torch.Tensor:
    """Fill positions start..total-1 of `tokens` and return it.

    `start` defaults to the shortest prompt; it may be smaller (PPO agrees it over ranks), never larger.
    `prefilled` = (cache, logits (B, V)) already holding positions 0..start-1 (`prefill_shared`);
    otherwise the loop makes a cache with `model.new_kv_cache(B, total)` and prefills it. `model` is
    anything `prefill` / `decode_one_token` can call; `steps` how (`DecodeSteps`). The caller picks
    no_grad / inference_mode."""
    B, total = tokens.shape
    device = tokens.device
    lens = prompt_lens.to(device)
    shortest = int(lens.min())
    start = shortest if start is None else start
    if not 1 <= start <= shortest:
        raise ValueError(f"decoding must start inside [1, shortest prompt {shortest}], not {start}")
    if start >= total:
        return tokens  # nothing to decode (max_new_tokens 0 and prompts of one length)
    if prefilled is None:
        cache = steps.make_cache(model, B, total)
        logits = steps.prefill(model, tokens[:, :start], cache)  # (B, V)
    else:
        cache, logits = prefilled
        if steps.static_cache != bool(getattr(cache, "static", False)):
            raise ValueError("the prefilled cache and `steps` disagree on static_cache")
    # a static cache takes positions as tensors: one compiled step (one CUDA graph) for all of them
    positions = torch.arange(total, device=device) if steps.static_cache else None
    in_prompt = torch.arange(total, device=device)[None, :] < lens[:, None]  # (B, total)
    stops = torch.tensor(sorted(stop.stop_ids), dtype=torch.long, device=device)
    limit = lens + stop.max_new_tokens  # (B,): each row's end
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for cur in range(start, total):
        if cur > start:
            pos = cur - 1 if positions is None else positions[cur - 1]
            logits = steps.decode_one_token(model, tokens[:, cur - 1 : cur], cache, pos)  # (B, V)
        nxt = sample(logits, cur - lens)  # (B,)
        nxt = torch.where(in_prompt[:, cur], tokens[:, cur], nxt)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens[:, cur] = nxt
        done |= ~in_prompt[:, cur] & torch.isin(nxt, stops)
        done |= (cur + 1) >= limit
        if not stop.lock_step and bool(done.all()):  # a host sync per step; lock-step skips it
            break
    return tokens


def left_aligned(
    prompts: Sequence[Sequence[int]], total_len: int, pad_id: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loop's buffer: prompts at position 0, pad_id after them → (tokens (B, total), lengths (B,))."""
    tokens = torch.full((len(prompts), total_len), pad_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(list(p), dtype=torch.long, device=device)
    return tokens, torch.tensor([len(p) for p in prompts], device=device)


def prompt_lengths(
    model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int
) -> tuple[int, int]:
    """(shortest prompt, longest prompt + max_new_tokens); a clear error past the model's max_seq_len."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    min_len = min(len(p) for p in prompts)
    max_len = max(len(p) for p in prompts)
    total_len = max_len + max_new_tokens
    if total_len > model.args.max_seq_len:
        raise ValueError(
            f"prompt ({max_len}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_seq_len {model.args.max_seq_len}"
        )
    return min_len, total_len


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """The model in eval mode for the block (no dropout), its previous mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# --- generate -------------------------------------------------------------------------------------------
@torch.inference_mode()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    stop_ids: Sequence[int] | frozenset[int] = (),
    pad_id: int = 0,
    vocab_limit: int | None = None,
    steps: DecodeSteps = EAGER_STEPS,
) -> list[Completion]:
    """Complete each prompt; `model` is a `Llama` (anything with its forward/new_kv_cache API).
    `vocab_limit`: sample only ids below it (a trimmed tokenizer under a padded vocabulary). `steps`:
    eager (default), `STATIC_STEPS`, or compiled (`herd.fast_decode.compiled_steps`)."""
    params = params or SamplingParams()
    _, total_len = prompt_lengths(model, prompts, params.max_new_tokens)
    device = next(model.parameters()).device
    tokens, lens = left_aligned(prompts, total_len, pad_id, device)  # (B, total), (B,)
    sample = token_sampler(params, seeded_generator(params.seed, device), vocab_limit)
    with evaluating(model):
        decode(model, tokens, lens, sample, StopRule(params.max_new_tokens, stop_ids), pad_id, steps=steps)
    return split_completions(tokens, prompts, lens + params.max_new_tokens, stop_ids)


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
    tokenizer: Any,
    prompts: Sequence[str],
    params: SamplingParams | None = None,
    bos: bool = True,
    steps: DecodeSteps = EAGER_STEPS,
) -> list[str]:
    """Plain completion of strings: encode, generate until a stop token, decode."""
    encoded = [tokenizer.encode(p, bos=bos, eos=False) for p in prompts]
    pad = tokenizer.pad_id if getattr(tokenizer, "pad_id", -1) >= 0 else 0
    completions = generate(model, encoded, params, stop_ids=tokenizer.stop_ids, pad_id=pad, steps=steps)
    return [tokenizer.decode(c.tokens) for c in completions]
