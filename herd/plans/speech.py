"""The parallel plan of the speech model (`herd.adapters.SpeechLlama`: frozen Llama + Conformer encoder +
speech adapter), paper §8.

- FSDP / activation-checkpoint / compile units: the encoder's Conformer blocks, the adapter (one
  Transformer layer and its conv: a single unit), and the LLM's Transformer blocks.
- Tensor parallelism: the frozen LLM is sharded as the Llama plan shards it, without sequence
  parallelism: the adapter's rows are put into the whole embedded sequence on every TP rank (the
  embedding's output is replicated), so the residual stream stays replicated between blocks. The
  encoder and adapter (~1.1B of the paper's 9B model, and trained) are replicated on every TP rank, like
  the image encoder in `herd.plans.multimodal`: TP ranks see the same batch, so they compute the same
  gradients for them.
- No context or pipeline parallelism: utterances are not split along time (the encoder's depthwise
  convolution reads neighbouring frames), and the model is not cut into stages.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from herd.adapters.speech_llama import SpeechLlama
from herd.parallel.plan import ParallelPlan
from herd.plans.llama import apply_tensor_parallel, init_rope_everywhere


def blocks(model: nn.Module) -> list[str]:
    """Every unit in forward order: encoder blocks, the adapter, the LLM's blocks."""
    encoder = getattr(model, "encoder", None)
    out = [f"encoder.layers.{i}" for i in range(len(encoder.layers))] if encoder is not None else []
    if getattr(model, "adapter", None) is not None:
        out.append("adapter")
    llm = getattr(model, "llm", None)
    if llm is not None:
        out += [f"llm.layers.{key}" for key in llm.layers]
    return out


def apply_speech_tensor_parallel(
    model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = True
) -> None:
    """Shard the frozen LLM over `tp_mesh` (no sequence parallelism, see the module docstring)."""
    if not isinstance(model, SpeechLlama):
        raise ValueError(f"the speech plan shards a SpeechLlama, not a {type(model).__name__}")
    apply_tensor_parallel(model.llm, tp_mesh, sequence_parallel=False)


SPEECH_PLAN = ParallelPlan(
    name="speech adapter (SpeechLlama)",
    fsdp_units=blocks,
    checkpoint_units=blocks,
    compile_units=blocks,
    tensor_parallel=apply_speech_tensor_parallel,
    init_buffers=init_rope_everywhere,
)

__all__ = ["SPEECH_PLAN", "apply_speech_tensor_parallel", "blocks"]
