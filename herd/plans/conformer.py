"""The parallel plan of the speech encoder's pretraining model (`herd.speech.bestrq.BestRQModel`: a Conformer
encoder, a frozen random-projection quantizer and one softmax head per codebook), paper §8.1.1.

- FSDP units: each Conformer block, and the BEST-RQ heads (16 × 8192 × 1536 = 201M parameters at the
  paper's size: a fifth of the model, gathered only for the loss); the root keeps the input projection
  and the quantizer's buffers (buffers are never sharded).
- Activation-checkpoint and compile units: the Conformer blocks (the heads are one matmul).
- No tensor, context or pipeline parallelism: the encoder is ~1B parameters, which FSDP alone fits on
  any accelerator; splitting its attention by heads or its utterances along time would need a TP plan and
  a CP-aware convolution (the depthwise conv reads neighbouring frames), neither written nor tested.
"""

from __future__ import annotations

from torch import nn

from herd.parallel.plan import ParallelPlan
from herd.speech.bestrq import BestRQModel


def conformer_blocks(model: nn.Module) -> list[str]:
    """The encoder's blocks, in forward order."""
    encoder = getattr(model, "encoder", None)
    if encoder is None:
        return []
    return [f"encoder.layers.{i}" for i in range(len(encoder.layers))]


def fsdp_units(model: nn.Module) -> list[str]:
    """The blocks, then the heads (they run last, after the encoder)."""
    return conformer_blocks(model) + (["heads"] if getattr(model, "heads", None) is not None else [])


def init_quantizer(model: nn.Module) -> None:
    """The frozen quantizer is a function of its seed: redraw it after materialisation, so every rank and
    every initialisation mode (full or sharded) holds the same codebooks."""
    if isinstance(model, BestRQModel):
        model.quantizer.reset_parameters()


CONFORMER_PLAN = ParallelPlan(
    name="speech encoder (BEST-RQ Conformer)",
    fsdp_units=fsdp_units,
    checkpoint_units=conformer_blocks,
    compile_units=conformer_blocks,
    init_buffers=init_quantizer,
)

__all__ = ["CONFORMER_PLAN", "conformer_blocks", "fsdp_units", "init_quantizer"]
