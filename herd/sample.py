"""Rejection sampling (Llama 2 §3.2.3, Llama 3 §4.2.2): K responses per prompt, the reward model keeps the best.

    herd post sample --policy runs/sft/model --reward-model runs/rm/model --prompts prompts.jsonl \\
        --out best.jsonl --k 10 --max-new-tokens 256

The K samples of one prompt share its prefix, so the prompt is prefilled ONCE and its KV cache copied
to K rows (`herd.text.generation.prefill_shared`, i.e. `KVCache.expand_rows`) before the K rows decode
together; the naive way (`sample_recompute`) prefills every copy. Both run the one decode loop
(`herd.text.generation.decode`) with `generate`'s sampler, so with the same seed they draw the same
random numbers in the same order and produce the same tokens as `generate` on the K-fold repeated
prompts.

The output jsonl is what `herd train sft` reads: one `{"messages": [...prompt..., best reply]}` per prompt,
with the reward of the kept reply and all K rewards.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from herd.data.records import SkipCounter
from herd.data.training.prompts import read_prompts
from herd.text.chat_format import ChatFormat, Message
from herd.text.generation import (
    Completion,
    SamplingParams,
    StopRule,
    decode,
    evaluating,
    left_aligned,
    prefill_shared,
    prompt_lengths,
    seeded_generator,
    split_completions,
    token_sampler,
)

# Scores a batch of full dialogs (prompt messages + one assistant reply each): one float per dialog.
RewardFn = Callable[[Sequence[list[Message]]], Sequence[float]]


# --- K samples per prompt --------------------------------------------------------------------------------
@torch.inference_mode()
def _sample_group(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    k: int,
    params: SamplingParams,
    stop_ids: Sequence[int] | frozenset[int],
    pad_id: int,
    generator: torch.Generator | None,
    share_prefix: bool,
    vocab_limit: int | None,
    step_logits: list[torch.Tensor] | None,
) -> list[Completion]:
    """K completions of each prompt, rows ordered prompt-major (row g·K + r is sample r of prompt g)."""
    min_len, total_len = prompt_lengths(model, prompts, params.max_new_tokens)
    rows = [p for p in prompts for _ in range(k)]
    tokens, lens = left_aligned(rows, total_len, pad_id, next(model.parameters()).device)  # (G·K, total)
    # shared: the G distinct prompts prefilled up to the shortest one, each row's cache copied K times;
    # otherwise (the naive baseline) every copy of a prompt is prefilled on its own row
    prefilled = prefill_shared(model, tokens[:, :min_len], k, total_len) if share_prefix else None
    draw = token_sampler(params, generator, vocab_limit)

    def sample(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # (G·K, V) → (G·K,)
        if step_logits is not None:
            step_logits.append(logits.float().clone())  # before the vocabulary cut
        return draw(logits, index)

    stop = StopRule(params.max_new_tokens, stop_ids)
    decode(model, tokens, lens, sample, stop, pad_id, prefilled=prefilled)
    return split_completions(tokens, rows, lens + params.max_new_tokens, stop_ids)


def _groups(prompts: Sequence[Sequence[int]], batch_prompts: int) -> list[list[int]]:
    """Prompt indices in batches of similar length (sorted by length), each batch in input order."""
    if batch_prompts < 1:
        raise ValueError(f"batch_prompts must be >= 1, got {batch_prompts}")
    by_length = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [sorted(by_length[i : i + batch_prompts]) for i in range(0, len(by_length), batch_prompts)]


def _sample_k(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    k: int,
    params: SamplingParams,
    stop_ids: Sequence[int] | frozenset[int],
    pad_id: int,
    batch_prompts: int,
    share_prefix: bool,
    vocab_limit: int | None = None,
    step_logits: list[torch.Tensor] | None = None,
) -> Iterator[tuple[list[int], list[list[Completion]]]]:
    """Yields (prompt indices, K completions of each) batch by batch; one RNG stream for the whole call."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    generator = seeded_generator(params.seed, next(model.parameters()).device)
    with evaluating(model):
        for group in _groups(prompts, batch_prompts):
            flat = _sample_group(
                model, [prompts[i] for i in group], k, params, stop_ids, pad_id, generator,
                share_prefix, vocab_limit, step_logits,
            )  # fmt: skip
            yield group, [flat[g * k : (g + 1) * k] for g in range(len(group))]


def sample_shared_prefix(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    k: int,
    params: SamplingParams,
    stop_ids: Sequence[int] | frozenset[int] = (),
    pad_id: int = 0,
    batch_prompts: int = 1,
    vocab_limit: int | None = None,
    step_logits: list[torch.Tensor] | None = None,
) -> list[list[Completion]]:
    """K completions of each prompt, the prompt prefilled once and its KV cache copied to K rows.

    `batch_prompts` prompts (of similar length) decode together, i.e. batch_prompts·K rows. Within a
    batch the rows and random draws are those of `generate(model, [p0]*K + [p1]*K + ..., params)`.
    `vocab_limit` restricts sampling to ids below it (a trimmed tokenizer under a padded vocabulary);
    `step_logits`, if given, receives the (rows, V) logits of every decoding step (for tests).
    """
    out: list[list[Completion]] = [[] for _ in prompts]
    for group, completions in _sample_k(
        model, prompts, k, params, stop_ids, pad_id, batch_prompts, True, vocab_limit, step_logits
    ):
        for i, c in zip(group, completions):
            out[i] = c
    return out


def sample_recompute(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    k: int,
    params: SamplingParams,
    stop_ids: Sequence[int] | frozenset[int] = (),
    pad_id: int = 0,
    batch_prompts: int = 1,
    vocab_limit: int | None = None,
) -> list[list[Completion]]:
    """The naive baseline of `sample_shared_prefix`: each of the K copies of a prompt is prefilled."""
    out: list[list[Completion]] = [[] for _ in prompts]
    for group, completions in _sample_k(
        model, prompts, k, params, stop_ids, pad_id, batch_prompts, False, vocab_limit
    ):
        for i, c in zip(group, completions):
            out[i] = c
    return out


# --- scoring and selection -------------------------------------------------------------------------------
class RewardModelScorer:
    """A `RewardFn` over a `herd.text.reward_model.RewardModel`: the reward of a dialog is the model's score
    of its last token, the `<|eot_id|>` closing the assistant reply (as the reward model was trained).

    Dialogs are right-padded into batches: attention is causal, so padding after the scored token cannot
    change its score. A dialog longer than the model's context keeps its last max_seq_len tokens (counted
    in `truncated`); the scored token is always kept.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, batch_size: int = 16) -> None:
        self.model, self.format, self.batch_size = model, ChatFormat(tokenizer), batch_size
        self.pad_id = max(getattr(tokenizer, "pad_id", 0), 0)
        self.truncated = 0

    @torch.inference_mode()
    def __call__(self, dialogs: Sequence[list[Message]]) -> list[float]:
        device = next(self.model.parameters()).device
        max_len = self.model.args.max_seq_len
        encoded = []
        for dialog in dialogs:
            ids = self.format.encode_dialog_prompt(dialog, add_generation_prompt=False)
            if len(ids) > max_len:
                self.truncated += 1
                ids = ids[-max_len:]
            encoded.append(ids)
        was_training = self.model.training
        self.model.eval()
        rewards: list[float] = []
        for start in range(0, len(encoded), self.batch_size):
            chunk = encoded[start : start + self.batch_size]
            width = max(len(ids) for ids in chunk)
            tokens = torch.full((len(chunk), width), self.pad_id, dtype=torch.long, device=device)  # (B, T)
            for b, ids in enumerate(chunk):
                tokens[b, : len(ids)] = torch.tensor(ids, dtype=torch.long, device=device)
            last = torch.tensor([len(ids) - 1 for ids in chunk], device=device)  # (B,)
            rewards.extend(self.model(tokens, last).tolist())
        self.model.train(was_training)
        return rewards


@dataclass
class RejectionRecord:
    prompt: list[Message]
    responses: list[Message]  # the K decoded replies
    rewards: list[float]  # one per reply
    best_index: int  # the first reply with the highest reward

    @property
    def best(self) -> Message:
        return self.responses[self.best_index]

    def to_json(self) -> dict[str, Any]:
        """The SFT-ready record: prompt + best reply as `messages`, its reward and all K rewards.

        Assistant turns of a multi-turn prompt are context (`"train": false`): SFT learns the kept reply.
        """
        prompt = [message_to_dict(m, train=False if m.role == "assistant" else None) for m in self.prompt]
        return {
            "messages": [*prompt, message_to_dict(self.best)],
            "reward": self.rewards[self.best_index],
            "rewards": self.rewards,
            "k": len(self.responses),
            "best_index": self.best_index,
        }


def message_to_dict(message: Message, train: bool | None = None) -> dict[str, Any]:
    """A message as the SFT reader (`herd.data.training.dialogs`) takes it."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = message.tool_calls
    if message.stop_reason == "end_of_message":  # a tool call that continues the turn: keep <|eom_id|>
        out["stop_reason"] = message.stop_reason
    if train is not None:
        out["train"] = train
    return out


def iter_rejection_samples(
    policy: nn.Module,
    tokenizer: Any,
    reward_fn: RewardFn,
    dialogs: Sequence[list[Message]],
    k: int,
    params: SamplingParams,
    batch_prompts: int = 1,
) -> Iterator[tuple[int, RejectionRecord]]:
    """(dialog index, record) as each batch of prompts is sampled and scored; see `rejection_sample`."""
    chat = ChatFormat(tokenizer)
    prompts = [chat.encode_dialog_prompt(d, add_generation_prompt=True) for d in dialogs]
    pad = max(getattr(tokenizer, "pad_id", 0), 0)
    vocab = tokenizer.vocab_size if tokenizer.vocab_size < policy.args.vocab_size else None
    batches = _sample_k(policy, prompts, k, params, tokenizer.stop_ids, pad, batch_prompts, True, vocab)
    for group, completions in batches:
        replies = [
            [
                chat.decode_assistant_message(c.tokens + ([c.stop_token] if c.stop_token is not None else []))
                for c in samples
            ]
            for samples in completions
        ]
        scored = [list(dialogs[i]) + [reply] for i, rs in zip(group, replies) for reply in rs]
        rewards = [float(r) for r in reward_fn(scored)]
        if len(rewards) != len(scored):
            raise ValueError(f"reward_fn returned {len(rewards)} rewards for {len(scored)} dialogs")
        for g, i in enumerate(group):
            mine = rewards[g * k : (g + 1) * k]
            best = max(range(k), key=lambda j: (mine[j], -j))  # the first of equal maxima
            yield i, RejectionRecord(list(dialogs[i]), replies[g], mine, best)


def rejection_sample(
    policy: nn.Module,
    tokenizer: Any,
    reward_fn: RewardFn,
    dialogs: Sequence[list[Message]],
    k: int,
    params: SamplingParams,
    batch_prompts: int = 1,
) -> list[RejectionRecord]:
    """For each dialog (messages ending with a user turn) draw K replies from `policy` with a shared-prefix
    KV cache, score every (dialog + reply) with `reward_fn` and keep the best; records in input order."""
    out: list[RejectionRecord | None] = [None] * len(dialogs)
    for i, record in iter_rejection_samples(policy, tokenizer, reward_fn, dialogs, k, params, batch_prompts):
        out[i] = record
    return out  # type: ignore[return-value]


# --- prompts file ----------------------------------------------------------------------------------------
# --- prompts file → best-of-K file ----------------------------------------------------------------------
def rejection_sample_file(
    policy: str | Path,
    reward_model: str | Path,
    prompts: str | Path,
    out: str | Path,
    k: int = 10,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = 0,
    batch_prompts: int = 1,
    rm_batch_size: int = 16,
    device: str = "cpu",
    dtype: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """`herd post sample`: K replies per prompt of a jsonl file from the `policy` checkpoint, the best by
    the `reward_model` export written to `out` as SFT-ready jsonl (one `RejectionRecord.to_json` a line).

    Temperature 1.0 by default: the K replies come from the policy's own distribution, diverse enough
    for the best of K to beat the typical one (0 makes all K identical). Bad prompt records and prompts
    too long for the policy's context are skipped and counted. Returns the summary: prompts, skipped,
    k, out, mean_best_reward and mean_reward (best-of-K minus the average reply is what selection gains),
    seconds, and `skipped_examples` / `truncated` (dialogs cut to the reward model's context).
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from herd.text.loading import load_pretrained
    from herd.text.reward_model import load_reward_model

    if k < 1 or batch_prompts < 1 or max_new_tokens < 1:
        raise ValueError(f"k, batch_prompts and max_new_tokens must be >= 1, got {k}, {batch_prompts}, "
                         f"{max_new_tokens}")  # fmt: skip
    if not Path(prompts).is_file():
        raise FileNotFoundError(f"{prompts}: prompts file not found")
    policy_model, tokenizer = load_pretrained(policy, device=device, dtype=dtype)
    rm, rm_tokenizer = load_reward_model(reward_model, device)
    scorer = RewardModelScorer(rm, rm_tokenizer, rm_batch_size)
    params = SamplingParams(max_new_tokens, temperature, top_p, seed)

    skipped = SkipCounter()
    chat = ChatFormat(tokenizer)
    dialogs = []
    for where, dialog in read_prompts(prompts, skipped):
        n = len(chat.encode_dialog_prompt(dialog))
        if n + max_new_tokens > policy_model.args.max_seq_len:
            why = f"prompt of {n} tokens + {max_new_tokens} new > {policy_model.args.max_seq_len}"
            skipped.add("too_long", where, why)
            continue
        dialogs.append(dialog)

    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    start, best, mean = time.perf_counter(), [], []
    columns = (TextColumn("sampling"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    bar = Progress(*columns, console=Console(stderr=True), disable=not progress)
    with out_path.open("w", encoding="utf-8") as f, bar:
        task = bar.add_task("prompts", total=len(dialogs))
        for _, record in iter_rejection_samples(
            policy_model, tokenizer, scorer, dialogs, k, params, batch_prompts
        ):
            f.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
            f.flush()  # an interrupted run keeps what it finished
            best.append(record.rewards[record.best_index])
            mean.append(sum(record.rewards) / len(record.rewards))
            bar.advance(task)
    return {
        "prompts": len(dialogs),
        "skipped": skipped.count,
        "k": k,
        "out": str(out_path),
        "mean_best_reward": sum(best) / len(best) if best else None,
        "mean_reward": sum(mean) / len(mean) if mean else None,
        "seconds": round(time.perf_counter() - start, 2),
        "skipped_examples": list(skipped.examples),
        "truncated": scorer.truncated,
    }
