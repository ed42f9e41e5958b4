"""Parallel plans of the post-training models that hold several Llamas: DPO's policy + frozen reference
(`herd.tasks.dpo.DPOModel`) and PPO's policy, value model, reference and reward model
(`herd.tasks.ppo.PPOModel`). The plans read the models' sub-modules by name; they import no task.

DPO
- FSDP / checkpoint / compile units: the Transformer blocks of the policy and of the reference.
- Tensor parallelism: both Llamas as the Llama plan shards them (the reference stays frozen).
- Pipeline: stage s holds the policy's and the reference's blocks of the same range. The two hidden
  streams travel between stages as one tensor, the policy's rows then the reference's (B·2, T, D): the
  reference half is computed without gradient and cut off the graph on every stage, so backward runs
  through the policy only. The last stage returns both models' per-token log-probs of the targets, as
  `DPOModel.forward` does.
- No context parallelism: the DPO loss needs each reply's whole log-probability on one rank.

PPO: FSDP units only (generation runs token by token on whole sequences: no TP, CP or PP).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from herd.losses import token_logprobs
from herd.parallel.plan import ParallelPlan, PipelineSplit, prefixed
from herd.plans.llama import LlamaStage, apply_tensor_parallel, cut_llama, init_rope_everywhere, llama_blocks


def _units(*prefixes: str):
    rules = [prefixed(llama_blocks, p) for p in prefixes]
    return lambda model: [name for rule in rules for name in rule(model)]


# --- DPO ----------------------------------------------------------------------------------------------------
def _dpo_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = True) -> None:
    for name in ("policy", "reference"):
        llm = getattr(model, name, None)
        if llm is not None:
            apply_tensor_parallel(llm, tp_mesh, sequence_parallel)


class DPOStage(nn.Module):
    """A pipeline stage of DPO's policy (and frozen reference); see the module docstring."""

    stage_id: int

    def __init__(self, policy: LlamaStage, reference: LlamaStage | None) -> None:
        super().__init__()
        self.policy, self.reference = policy, reference

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # x: (R, T) ids on the first stage, else (R, T, D) or (2R, T, D) with the reference's rows;
        # targets: (R, T) the token each position predicts
        R = targets.shape[0]
        first = self.policy.tok_embeddings is not None
        if not first and torch.is_grad_enabled() and x.is_leaf and not x.requires_grad:
            x.requires_grad_(True)  # a received activation: the gradient must flow back
        h_policy = self.policy.stage_hidden(x if first else x[:R], None, None)
        h_ref = None
        if self.reference is not None:
            with torch.no_grad():
                h_ref = self.reference.stage_hidden(x if first else x[R:].detach(), None, None)
        if self.policy.output is None:  # not the last stage: pass both streams on
            return (h_policy,) if h_ref is None else (torch.cat([h_policy, h_ref]),)
        policy = token_logprobs(self.policy.output(self.policy.norm(h_policy)), targets)  # (R, T)
        if h_ref is None:
            return (policy,)
        with torch.no_grad():
            reference = token_logprobs(self.reference.output(self.reference.norm(h_ref)), targets)
        return policy, reference


def build_dpo_stage(model: nn.Module, stage_id: int, n_stages: int, unit_ids: list[int]) -> nn.Module:
    first, last = stage_id == 0, stage_id == n_stages - 1
    policy = cut_llama(model.policy, unit_ids, first, last, LlamaStage, stage_id)  # type: ignore[arg-type]
    reference = None
    if model.reference is not None:
        reference = cut_llama(model.reference, unit_ids, first, last, LlamaStage, stage_id)  # type: ignore[arg-type]
    stage = DPOStage(policy, reference)
    stage.stage_id = stage_id
    return stage


DPO_PLAN = ParallelPlan(
    name="DPO policy + reference",
    fsdp_units=_units("policy", "reference"),
    checkpoint_units=_units("policy", "reference"),
    compile_units=_units("policy", "reference"),
    tensor_parallel=_dpo_tensor_parallel,
    context_parallel=False,
    pipeline=PipelineSplit(
        unit_sizes=lambda model: [1] * len(model.policy.layers),  # type: ignore[union-attr]
        build_stage=build_dpo_stage,
    ),
    init_buffers=init_rope_everywhere,
)

# --- PPO ----------------------------------------------------------------------------------------------------
PPO_PLAN = ParallelPlan(
    name="PPO policy, value, reference and reward models",
    fsdp_units=_units("policy", "value.trunk", "reference", "reward.trunk"),
    checkpoint_units=_units("policy", "value.trunk"),  # the frozen models run without grad
    compile_units=_units("policy", "value.trunk", "reference", "reward.trunk"),
    init_buffers=init_rope_everywhere,
)

__all__ = ["DPOStage", "DPO_PLAN", "PPO_PLAN", "build_dpo_stage"]
