"""RLHF with PPO (`herd train ppo`): Llama 2-Chat's reinforcement learning stage (Llama 2 §3.2.3; Ouyang et
al. 2022), as a task of the one training loop.

The objective (Llama 2 eq. 2–4): maximise E_{p∼D, g∼π_θ}[R(g | p)] with

    R(g | p) = R_c(g | p) − β · D_KL(π_θ(g | p) ‖ π_0(g | p))

R_c the reward model's score of the response, π_0 the frozen reference (initial) policy, β =
`ppo.kl_coef`. Implemented the standard way (InstructGPT, TRL): the KL is estimated per generated token
as log π_θ − log π_0 and paid as a per-token reward −β·(log π_θ − log π_0); the score is added at the last
generated token. Optionally (`ppo.whiten_reward`) the score is whitened over the batch first, Llama 2's
WHITEN(LOGIT(R_c)) (the herd reward model's output already is the logit). Advantages come from GAE
(γ = `ppo.gamma` 1.0, λ = `ppo.gae_lambda` 0.95) against a per-token value head, are whitened over the
global batch, and feed PPO's clipped surrogate (ε = `ppo.clip`) plus a clipped value loss weighted
by `ppo.value_coef`.

How it fits the loop (`herd.trainer.train`): `train_batches` yields prompt batches, each rollout
`ppo.epochs` times (see `herd.tasks.ppo_rollout`); the task's per-step hook `before_step` samples the
responses of a step's new rollouts (no grad) before any training forward, scores them with the frozen
reference and reward model and caches them on the task; `loss` is the PPO loss on a batch's rollout for
every epoch, so epochs ≥ 1 are the clipped-ratio updates of real PPO.
At epoch 0 the "old" log-probabilities and values are the training forward's own, detached: the ratio
is exactly 1 there. One `PPOModel` holds the trainable policy and value model and the frozen reference
and reward model, so FSDP shards all four like any model; every sub-model runs through
`PPOModel.forward`, FSDP's root. Data parallelism only (dp_replicate / dp_shard): the statistics of a
rollout (whitening, token counts) are all-reduced over every rank.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from torch import nn

from herd.config import DataConfig, MetricsConfig, ModelConfig, PPOConfig, TrainConfig, grad_accum_at
from herd.data.records import SkipCounter
from herd.losses import token_logprobs
from herd.plans.preference import PPO_PLAN
from herd.task import LayoutNotSupported, LossOutput, TaskBase
from herd.tasks.ppo_rollout import (
    PromptBatches,
    Responses,
    all_reduce_,
    read_prompts,
    row_uniforms,
    sample_responses,
)
from herd.tasks.text import CausalLMObjective
from herd.text.args import ModelArgs
from herd.text.chat_format import ChatFormat
from herd.text.kv_cache import KVCache
from herd.text.loading import save_text_model
from herd.text.model import Llama
from herd.text.reward_model import RewardModel


# --- the objective: pure functions on (B, N) response tensors -------------------------------------------
def kl_penalized_rewards(
    scores: torch.Tensor,  # (B,) reward-model score of each response
    logprobs: torch.Tensor,  # (B, N) log π_θ of the generated tokens
    ref_logprobs: torch.Tensor,  # (B, N) log π_0 of the same tokens
    mask: torch.Tensor,  # (B, N) bool, a prefix per row: the response up to its stop token
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards −β·(log π_θ − log π_0), plus the score at each row's last token; and the KL
    estimate (log π_θ − log π_0) itself. Both (B, N), zero where masked."""
    m = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * m
    rewards = -kl_coef * kl
    last = mask.sum(dim=1) - 1  # (B,)
    rewards = rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))
    return rewards, kl


def gae_advantages(
    rewards: torch.Tensor,  # (B, N)
    values: torch.Tensor,  # (B, N) V(s_t): the value of the state before token t
    mask: torch.Tensor,  # (B, N) bool prefix
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation: A_t = Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γ·V_{t+1} − V_t, with V = 0
    after the last unmasked token (the episode ends there); returns (advantages, returns = A + V)."""
    m = mask.to(values.dtype)
    r, v = rewards * m, values * m
    advantages = torch.zeros_like(v)
    running = torch.zeros_like(v[:, 0])
    for t in reversed(range(v.shape[1])):
        next_value = v[:, t + 1] if t + 1 < v.shape[1] else torch.zeros_like(running)
        delta = r[:, t] + gamma * next_value - v[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * m
    return advantages, (advantages + v) * m


def ppo_policy_loss(
    logprobs: torch.Tensor,  # (B, N) log π_θ now (with grad)
    old_logprobs: torch.Tensor,  # (B, N) log π_θ_old at sampling time
    advantages: torch.Tensor,  # (B, N)
    mask: torch.Tensor,  # (B, N) bool
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate, summed over unmasked tokens: Σ max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = π_θ/π_θ_old.

    Returns (loss_sum, number of tokens where the clipped branch is taken, Σ of the k3 KL estimate
    (ρ − 1) − log ρ of π_θ_old ‖ π_θ)."""
    m = mask.to(logprobs.dtype)
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss_sum = (torch.maximum(unclipped, clipped) * m).sum()
    clip_count = ((clipped > unclipped) & mask).sum()
    approx_kl = (((ratio - 1.0) - log_ratio) * m).sum()
    return loss_sum, clip_count.detach(), approx_kl.detach()


def ppo_value_loss(
    values: torch.Tensor,  # (B, N) with grad
    old_values: torch.Tensor,  # (B, N) at sampling time
    returns: torch.Tensor,  # (B, N) GAE returns
    mask: torch.Tensor,  # (B, N) bool
    clip: float,
) -> torch.Tensor:
    """Clipped value loss summed over unmasked tokens:
    Σ ½·max((V − R)², (V_old + clip(V − V_old, ±ε) − R)²)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    per_token = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return (per_token * mask.to(values.dtype)).sum()


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the unmasked entries of *every rank* (population variance); zero where masked."""
    m = mask.to(torch.float64)
    x64 = x.double()
    moments = all_reduce_(torch.stack([(x64 * m).sum(), (x64 * x64 * m).sum(), m.sum()]))
    mean = moments[0] / moments[2]
    var = (moments[1] / moments[2] - mean * mean).clamp_min(0)
    return ((x64 - mean) / (var + eps).sqrt() * m).to(x.dtype)


# --- the model --------------------------------------------------------------------------------------------
def _pick(h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """h (B, T, D) at positions (B, N) → (B, N, D)."""
    return h.gather(1, positions[..., None].expand(-1, -1, h.shape[-1]))


class _ActivationDtypeCache(KVCache):
    """A KV cache that takes the dtype of the first keys written (bf16 under FSDP mixed precision or
    autocast, fp32 otherwise), so the task need not guess the compute dtype of the layout."""

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        if self.k.dtype != k.dtype:
            self.k, self.v = self.k.to(k.dtype), self.v.to(v.dtype)
        return super().update(layer, start_pos, k, v)


class PPOModel(nn.Module):
    """Policy (trained), value model (trained), reference policy and reward model (frozen)."""

    def __init__(self, policy: ModelArgs, value: ModelArgs, reference: ModelArgs, reward: ModelArgs) -> None:
        super().__init__()
        self.policy = Llama(policy)
        self.value = RewardModel(value)  # its score head read at every token: V(prefix)
        self.reference = Llama(reference)
        self.reward = RewardModel(reward)
        self.freeze()

    def freeze(self) -> None:
        for p in itertools.chain(self.reference.parameters(), self.reward.parameters()):
            p.requires_grad_(False)

    def forward(
        self,
        tokens: torch.Tensor,  # (B, T)
        mode: str,
        positions: torch.Tensor | None = None,  # (B, N) positions whose next-token logits/values to return
        last_index: torch.Tensor | None = None,  # (B,) the token the reward model scores
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> Any:
        """One entry point for every sub-model, so FSDP's root gathers its parameters on each use.

        generate: policy logits (B, T, V) with a KV cache. score: reference logits at `positions`
        (B, N, V) and reward-model scores (B,). train: policy logits (B, N, V) and values (B, N)."""
        if mode == "generate":
            return self.policy(tokens, kv_cache=kv_cache, start_pos=start_pos)
        if mode == "score":
            ref_logits = self.reference.head(_pick(self.reference.forward_hidden(tokens), positions))
            return ref_logits, self.reward(tokens, last_index)
        if mode == "train":
            logits = self.policy.head(_pick(self.policy.forward_hidden(tokens), positions))  # (B, N, V)
            h = _pick(self.value.trunk.forward_hidden(tokens), positions)  # (B, N, D)
            values = self.value.score(self.value.trunk.norm(h)).squeeze(-1).float()  # (B, N)
            return logits, values
        raise ValueError(f"PPOModel mode must be generate, score or train, got {mode!r}")


@dataclass
class Rollout:
    responses: Responses
    response_tokens: torch.Tensor  # (b, N)
    ref_logprobs: torch.Tensor  # (b, N)
    scores: torch.Tensor  # (b,)
    # set by the first training forward (epoch 0)
    old_logprobs: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    scale: float = 1.0  # global token slots / global generated tokens: makes the loop's mean per token
    global_tokens: float = 1.0  # generated (unmasked) tokens of the rollout over all ranks
    stats: dict[str, float] | None = None


# --- the task ---------------------------------------------------------------------------------------------
class PPOTask(TaskBase):
    """Config sections: `[model]` (init_from: the SFT policy), `[data]` (batch_size: prompts per rollout over
    all ranks, seed: prompt order), `[ppo]` (reward_model, prompts in train_data, reference, kl_coef, clip,
    epochs, value_coef, value_clip, value_init, gamma, gae_lambda, whiten_reward, missing_stop_penalty,
    max_new_tokens, temperature), `[train]` (seed: sampling; grad_accum; run_dir: ppo.jsonl) and
    `[metrics]` (log_every). Data parallel only (FSDP/HSDP)."""

    name = "ppo"
    layouts = frozenset({"fsdp", "hsdp"})
    plan = PPO_PLAN
    sections = ("model", "data", "ppo", "train", "metrics")

    def __init__(
        self,
        model: ModelConfig,
        data: DataConfig,
        ppo: PPOConfig,
        train: TrainConfig,
        metrics: MetricsConfig,
        tokenizer: Any | None = None,
    ) -> None:
        from herd.text.loading import load_checkpoint
        from herd.text.reward_model import load_reward_model
        from herd.text.tokenizer import load_tokenizer

        needed = {"model.init_from": model.init_from, "ppo.reward_model": ppo.reward_model,
                  "ppo.train_data": ppo.train_data}  # fmt: skip
        missing = [f"--{key}=..." for key, value in needed.items() if not value]
        if missing:
            raise ValueError(
                f"herd train ppo needs {' '.join(missing)} (SFT policy, reward model, prompt jsonl)"
            )
        if ppo.epochs < 1 or ppo.max_new_tokens < 1 or ppo.temperature <= 0 or ppo.clip <= 0:
            raise ValueError(
                "ppo.epochs and ppo.max_new_tokens must be ≥ 1, ppo.temperature and ppo.clip > 0 "
                f"(got {ppo.epochs}, {ppo.max_new_tokens}, {ppo.temperature}, {ppo.clip})"
            )
        # a PPO round (one rollout per micro-batch, `epochs` steps) needs the same micro-batch count throughout
        inside = [s for s, _ in train.grad_accum_ramp if (s - 1) % ppo.epochs]
        if inside:
            raise ValueError(
                f"train.grad_accum_ramp steps {inside} fall inside a PPO round: with "
                f"ppo.epochs={ppo.epochs} a ramp step must be 1 more than a multiple of {ppo.epochs}"
            )
        self.model_cfg, self.data, self.ppo, self.train, self.metrics = model, data, ppo, train, metrics
        self.value_init = ppo.value_init
        self.policy_args = self.model_args = load_checkpoint(model.init_from)[0]
        self.reference_path = ppo.reference or model.init_from
        self.reference_args = load_checkpoint(self.reference_path)[0]
        reward_model, reward_tokenizer = load_reward_model(ppo.reward_model, "cpu")
        self.reward_args = reward_model.args
        self._reward_state = {k: v.detach() for k, v in reward_model.state_dict().items()}
        self.value_args = self.reward_args if self.value_init == "reward_model" else self.policy_args
        if tokenizer is None:
            tokenizer = load_tokenizer(model.init_from, vocab_size=self.policy_args.vocab_size)
        self.tokenizer, self.format = tokenizer, ChatFormat(tokenizer)
        self._check_vocabularies(reward_tokenizer)
        self.vocab_limit = tokenizer.vocab_size  # the models' padding rows are never sampled
        self.pad_id = tokenizer.pad_id if getattr(tokenizer, "pad_id", -1) >= 0 else tokenizer.eos_id
        all_args = (self.policy_args, self.reference_args, self.reward_args, self.value_args)
        room = min(a.max_seq_len for a in all_args) - ppo.max_new_tokens
        self.skipped = SkipCounter()
        self.prompts = read_prompts(ppo.train_data, self.format, room, self.skipped)
        self._rollouts: dict[int, Rollout] = {}
        self.history: list[dict[str, float]] = []  # one record per loss call, global means (rank-identical)

    def check_layout(self, degrees: dict[str, int]) -> None:
        if any(degrees.get(d, 1) > 1 for d in ("tp", "cp", "pp")):
            raise LayoutNotSupported(
                "herd train ppo runs data-parallel only (dp_replicate / dp_shard): token-by-token generation "
                "cannot be split along the sequence (tp's sequence parallelism, cp) or across pipeline stages"
            )
        super().check_layout(degrees)

    def skip_counts(self) -> dict[str, SkipCounter]:
        return {"prompts": self.skipped}

    def _check_vocabularies(self, reward_tokenizer: Any) -> None:
        ours, theirs = self.tokenizer, reward_tokenizer
        same = ours.vocab_size == theirs.vocab_size and getattr(ours, "keep_ids", None) == getattr(
            theirs, "keep_ids", None
        )
        vocabs = {a.vocab_size for a in (self.policy_args, self.reference_args, self.reward_args)}
        if not same or len(vocabs) > 1:
            raise ValueError(
                f"policy ({self.model_cfg.init_from}), reference ({self.reference_path}) and reward model "
                f"({self.ppo.reward_model}) must share one tokenizer and vocabulary (model vocab sizes "
                f"{sorted(vocabs)}; tokenizer sizes {ours.vocab_size} vs {theirs.vocab_size})"
            )

    # --- model ----------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        with torch.device("meta"):
            return PPOModel(self.policy_args, self.value_args, self.reference_args, self.reward_args)

    def init_weights(self, model: nn.Module) -> None:
        """Policy from model.init_from, reference from ppo.reference (or the same), reward model from
        ppo.reward_model; the value model from the reward model (Llama 2) or the policy trunk + new head."""
        from herd.text.loading import load_checkpoint

        policy_state = load_checkpoint(self.model_cfg.init_from)[1]
        model.policy.load_state_dict(policy_state, strict=True)
        same = Path(self.reference_path).resolve() == Path(self.model_cfg.init_from).resolve()
        model.reference.load_state_dict(policy_state if same else load_checkpoint(self.reference_path)[1])
        model.reward.load_state_dict(self._reward_state, strict=True)
        if self.value_init == "reward_model":
            model.value.load_state_dict(self._reward_state, strict=True)
        else:
            trunk = {k: v for k, v in policy_state.items() if not k.startswith("output.")}
            model.value.trunk.load_state_dict(trunk, strict=True)
            model.value.reset_score_head()
        model.freeze()

    # --- data -----------------------------------------------------------------------------------------
    def train_batches(self, rank: int, world_size: int) -> PromptBatches:
        return PromptBatches(self.prompts, self.data.batch_size, self.ppo.epochs,
                             lambda step: grad_accum_at(self.train, step), rank, world_size, self.data.seed,
                             self.pad_id)  # fmt: skip

    def val_batches(self) -> None:
        return None  # PPO has no held-out loss; watch the reward and KL in `history`

    def num_targets(self, batch: dict[str, Any]) -> int:
        """Token *slots* (rows × max_new_tokens), known before sampling; `loss` rescales by slots/generated
        tokens so the loop's normalisation yields the mean over generated tokens."""
        return batch["prompt_tokens"].shape[0] * self.ppo.max_new_tokens

    # --- rollout --------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, model: nn.Module, batch: dict[str, Any]) -> Rollout:
        """Sample max_new_tokens per prompt with the policy, score with the reference and reward model."""
        post = self.ppo
        uniforms = row_uniforms(self.train.seed, batch["stream_index"].cpu(), post.max_new_tokens)
        responses = sample_responses(
            lambda tokens, cache, start: model(tokens, mode="generate", kv_cache=cache, start_pos=start),
            lambda rows, length: model.policy.new_kv_cache(rows, length, cache_cls=_ActivationDtypeCache),
            batch["prompt_tokens"], batch["prompt_lens"], uniforms, post.temperature, self.vocab_limit,
            self.tokenizer.stop_ids, self.pad_id,
        )  # fmt: skip
        response_tokens = responses.tokens.gather(1, responses.positions)  # (b, N)
        ref_logits, scores = model(responses.tokens, mode="score", positions=responses.positions - 1,
                                   last_index=responses.last_index)  # fmt: skip
        ref_logprobs = token_logprobs(ref_logits, response_tokens, post.temperature, self.vocab_limit)
        return Rollout(responses, response_tokens, ref_logprobs, scores.float())

    @torch.no_grad()
    def _advantages(self, ro: Rollout, logprobs: torch.Tensor, values: torch.Tensor) -> None:
        """Rewards, GAE and whitening from the epoch-0 log-probs / values; statistics over all ranks."""
        mask = ro.responses.mask
        kl = (logprobs - ro.ref_logprobs) * mask  # (b, N)
        local = [float(mask.sum()), mask.numel(), len(ro.scores), float(ro.scores.sum()), float(kl.sum())]
        counts = torch.tensor(local, dtype=torch.float64, device=mask.device)
        tokens, slots, rows, score_sum, kl_sum = all_reduce_(counts).tolist()
        # Llama 2's WHITEN(LOGIT(R_c)): the herd reward model's score already is the logit
        scores = whiten(ro.scores, torch.ones_like(mask[:, 0])) if self.ppo.whiten_reward else ro.scores
        if self.ppo.missing_stop_penalty:  # a reply cut off at max_new_tokens was scored mid-sentence
            scores = scores - self.ppo.missing_stop_penalty * (~ro.responses.finished).to(scores.dtype)
        rewards, _ = kl_penalized_rewards(scores, logprobs, ro.ref_logprobs, mask, self.ppo.kl_coef)
        advantages, returns = gae_advantages(rewards, values, mask, self.ppo.gamma, self.ppo.gae_lambda)
        ro.old_logprobs, ro.old_values, ro.returns = logprobs, values, returns
        ro.advantages = whiten(advantages, mask)
        ro.scale, ro.global_tokens = slots / tokens, tokens
        ro.stats = {"reward": score_sum / rows, "kl": kl_sum / rows, "response_tokens": tokens / rows}

    # --- the step hook and the loss ---------------------------------------------------------------------
    def before_step(self, model: nn.Module, micro_batches: list[dict[str, Any]]) -> None:
        """Sample the rollouts of this step's micro-batches that are not cached yet (epoch 0 of a round, or
        a run resumed inside one), before any training forward, and hand each batch its rollout."""
        for batch in micro_batches:
            rollout_id, epoch = int(batch["rollout"]), int(batch["epoch"])
            ro = self._rollouts.get(rollout_id)
            if ro is None:
                if epoch > 0:  # resumed from a checkpoint inside a round: the cached rollout is gone
                    Console(stderr=True).print(
                        f"[yellow]rollout {rollout_id} resumed at epoch {epoch}: resampled"
                    )
                ro = self._rollouts[rollout_id] = self.rollout(model, batch)
            batch["ppo_rollout"] = ro

    def inputs(self, batch: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        ro = batch["ppo_rollout"]  # set by before_step
        return (ro.responses.tokens,), {"mode": "train", "positions": ro.responses.positions - 1}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        if "ppo_rollout" not in batch:  # called outside the loop: sample the rollout first
            self.before_step(model, [batch])
        return super().loss(model, batch)

    def loss_from_output(
        self, output: tuple[torch.Tensor, torch.Tensor], batch: dict[str, Any]
    ) -> LossOutput:
        """The PPO loss on this batch's rollout, rescaled so the loop's division by token slots gives the
        mean over generated tokens of the whole global batch."""
        rollout_id, epoch = int(batch["rollout"]), int(batch["epoch"])
        post = self.ppo
        ro = batch["ppo_rollout"]
        logits, values = output
        logprobs = token_logprobs(logits, ro.response_tokens, post.temperature, self.vocab_limit)  # (b, N)
        if ro.advantages is None:
            self._advantages(ro, logprobs.detach(), values.detach())
        mask = ro.responses.mask
        policy_sum, clipped, approx_kl = ppo_policy_loss(
            logprobs, ro.old_logprobs, ro.advantages, mask, post.clip
        )
        value_sum = ppo_value_loss(values, ro.old_values, ro.returns, mask, post.value_clip)
        local = torch.stack([policy_sum.detach(), value_sum.detach(), clipped, approx_kl]).double()
        p_sum, v_sum, clip_sum, kl_sum = (x / ro.global_tokens for x in all_reduce_(local).tolist())
        self._record({"rollout": rollout_id, "epoch": epoch, **ro.stats, "policy_loss": p_sum,
                      "value_loss": v_sum, "clip_frac": clip_sum, "approx_kl": kl_sum})  # fmt: skip
        if epoch >= post.epochs - 1:
            self._rollouts.pop(rollout_id, None)
        tokens = float(mask.sum())
        extra = {  # this rank's sums; the loop logs each over its `_count` (summed over ranks and steps)
            "reward": float(ro.scores.sum()), "reward_count": float(len(ro.scores)),  # mean score per reply
            "kl": float(((ro.old_logprobs - ro.ref_logprobs) * mask).sum()), "kl_count": float(len(ro.scores)),
            "response_tokens": tokens, "response_tokens_count": float(len(ro.scores)),
            "clip_frac": float(clipped), "clip_frac_count": tokens,
            "approx_kl": float(approx_kl), "approx_kl_count": tokens,
        }  # fmt: skip
        total = policy_sum + post.value_coef * value_sum
        return LossOutput(total * ro.scale, self.num_targets(batch), extra)

    def _record(self, entry: dict[str, float]) -> None:
        """Keep the rollout's global statistics; rank 0 appends them to <run_dir>/ppo.jsonl (the loop logs
        the same means per logging window) and prints every `metrics.log_every`-th rollout."""
        self.history.append(entry)
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        run_dir = Path(self.train.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        with (run_dir / "ppo.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        if entry["epoch"] == self.ppo.epochs - 1 and entry["rollout"] % self.metrics.log_every == 0:
            Console().print(
                f"ppo rollout {entry['rollout']:>6}  reward {entry['reward']:.4f}  kl {entry['kl']:.4f}  "
                f"response_tokens {entry['response_tokens']:.1f}  clip_frac {entry['clip_frac']:.3f}",
                soft_wrap=True,
            )

    def check_export(self, out_dir: str | Path, fmt: str) -> None:
        CausalLMObjective.check_export(self, out_dir, fmt)  # type: ignore[arg-type]

    def export(
        self, state_dict: dict[str, torch.Tensor], out_dir: str | Path, fmt: str = "meta"
    ) -> Path | None:
        """Write the trained policy (only) where `load_pretrained` reads it, with its tokenizer."""
        policy = {k.removeprefix("policy."): v for k, v in state_dict.items() if k.startswith("policy.")}
        return save_text_model(policy, self.policy_args, self.tokenizer, out_dir, fmt)  # type: ignore[arg-type]
