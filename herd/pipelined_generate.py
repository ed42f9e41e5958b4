"""`herd generate --pp N --microbatches M` under torchrun: text generation with the layers split over N
ranks and M micro-batches in flight (`herd.parallel.pipeline_inference`, paper §6.1).

    torchrun --nproc-per-node 2 -m herd generate --model runs/x/model --prompt a --prompt b --pp 2 --microbatches 2

Every rank loads the checkpoint and keeps its stage (the Llama plan's split); rank 0 runs the decode loop
and returns the completions, the other ranks serve their stage until rank 0 is done and return None.
"""

from __future__ import annotations

from collections.abc import Sequence

from herd.text.generation import SamplingParams


def generate_text_pipelined(
    path: str,
    prompts: Sequence[str],
    params: SamplingParams,
    pp: int,
    microbatches: int,
    device: str = "cpu",
    dtype: str | None = None,
) -> list[str] | None:
    """Completions of `prompts` on rank 0 (None on the other ranks) of a pp-rank torchrun job."""
    from herd.parallel.launch import init_distributed
    from herd.parallel.pipeline_inference import (
        PipelinedModel,
        build_inference_stage,
        generate_pipelined,
        serve_stage,
    )
    from herd.plans.llama import LLAMA_PLAN
    from herd.text.generation import generate
    from herd.text.loading import load_pretrained

    rank, world, _ = init_distributed()
    if world != pp or pp < 2:
        raise ValueError(
            f"--pp {pp} needs exactly {pp} ranks (torchrun --nproc-per-node {pp}); this job has {world}"
        )
    model, tokenizer = load_pretrained(path, device=device, dtype=dtype)
    stage = build_inference_stage(model, LLAMA_PLAN, pp, rank)
    del model
    if rank != 0:
        serve_stage(stage)
        return None
    piped = PipelinedModel(stage)
    encoded = [tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    pad = tokenizer.pad_id if getattr(tokenizer, "pad_id", -1) >= 0 else 0
    try:
        completions = generate_pipelined(piped, encoded, microbatches, generate, params=params,
                                         stop_ids=tokenizer.stop_ids, pad_id=pad)  # fmt: skip
    finally:
        piped.stop()
    return [tokenizer.decode(c.tokens) for c in completions]


__all__ = ["generate_text_pipelined"]
