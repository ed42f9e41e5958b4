"""The parallel plan of the reward model (`herd.text.RewardModel`: a Llama trunk + a scalar score head).

- FSDP / activation-checkpoint / compile units: the trunk's Transformer blocks.
- Tensor parallelism: the trunk as the Llama plan shards it; the score head replicated over the TP mesh
  (`replicate_score_head`). Needs sequence parallelism: AdamW's multi-tensor step cannot mix the head's
  DTensor bias with plain norm weights in one parameter group, and only sequence parallelism makes the
  norms DTensors too.
- Pipeline: the trunk's blocks as units; the last stage ends with the final norm and the score head,
  picking each sequence's last token (`last_index`, a keyword input every stage receives).
- No context parallelism: a sequence's reward needs its last token's hidden state on one rank.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from herd.parallel.plan import ParallelPlan, PipelineSplit, prefixed
from herd.plans.llama import LlamaStage, apply_tensor_parallel, cut_llama, init_rope_everywhere, llama_blocks
from herd.text.reward_model import RewardModel


def replicate_score_head(model: RewardModel) -> None:
    """Make the score head's parameters replicated DTensors on the trunk's TP mesh. Every TP rank computes
    the head on the same gathered hidden states, so its gradient is already complete on each rank."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    probe = model.trunk.layers[next(iter(model.trunk.layers))].attention.wq.weight
    if isinstance(model.score.weight, DTensor) or not isinstance(probe, DTensor):
        return

    def to_dtensor(_module, inputs, mesh):
        return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False) for x in inputs)

    def to_local(_module, output, _mesh):
        return output.to_local()

    distribute_module(model.score, probe.device_mesh, input_fn=to_dtensor, output_fn=to_local)


def _tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = True) -> None:
    if not sequence_parallel:
        raise ValueError(
            "the reward model under tensor parallelism needs parallel.sequence_parallel = true: the score "
            "head's bias must be a DTensor like the (sequence-parallel) norms it shares an optimizer group with"
        )
    apply_tensor_parallel(model.trunk, tp_mesh, sequence_parallel)  # type: ignore[arg-type]
    replicate_score_head(model)  # type: ignore[arg-type]


class RewardStage(RewardModel):
    """A pipeline stage of a RewardModel: its trunk holds some blocks; the last stage also scores."""

    stage_id: int

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,  # (R, T) token ids on the first stage, (R, T, D) hidden states elsewhere
        last_index: torch.Tensor | None = None,  # (R,) the scored token of each row
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.trunk.stage_hidden(x, document_ids, None)  # type: ignore[operator]
        if self.score is None:
            return h
        return self.score_hidden(h, last_index)


def build_reward_stage(model: nn.Module, stage_id: int, n_stages: int, unit_ids: list[int]) -> nn.Module:
    if not isinstance(model, RewardModel):
        raise TypeError(f"reward-model stages are cut from a RewardModel, got {type(model).__name__}")
    first, last = stage_id == 0, stage_id == n_stages - 1
    trunk = cut_llama(model.trunk, unit_ids, first, last, LlamaStage, stage_id)
    stage = RewardModel.__new__(RewardStage)
    nn.Module.__init__(stage)
    stage.args, stage.trunk = model.args, trunk
    stage.score = copy.deepcopy(model.score) if last else None
    stage.stage_id = stage_id
    return stage


REWARD_PLAN = ParallelPlan(
    name="reward model",
    fsdp_units=prefixed(llama_blocks, "trunk"),
    checkpoint_units=prefixed(llama_blocks, "trunk"),
    compile_units=prefixed(llama_blocks, "trunk"),
    tensor_parallel=_tensor_parallel,
    context_parallel=False,
    pipeline=PipelineSplit(
        unit_sizes=lambda model: [1] * len(model.trunk.layers),  # type: ignore[union-attr]
        build_stage=build_reward_stage,
    ),
    init_buffers=init_rope_everywhere,
)

__all__ = ["REWARD_PLAN", "RewardStage", "build_reward_stage", "replicate_score_head"]
