"""Training throughput of the image adapter (paper §7: frozen LLM, trainable image encoder, projector and
gated cross-attention) through herd's own loop, printed as JSON: samples/s and peak memory for a config;
optionally beside transformers' `MllamaForConditionalGeneration` training step on the same config.

    python benchmarks/vision_adapter_throughput.py --llm-preset tiny --vision-preset tiny --seq-len 64 \\
        --batch-size 4 --steps 3 --warmup 1 --device cpu --compare-hf
    python benchmarks/vision_adapter_throughput.py --llm-preset llama3_2_1b --vision-preset vit_h14 \\
        --tiles 1 --seq-len 512 --batch-size 8 --dtype bf16 --steps 10 --warmup 3 --compare-hf

Both sides get the same random batches (one `<|image|>` per sample, every later token sees its tiles,
every token after the image is a target), the same AdamW (herd.optim's groups: matrices decayed) with
the same gradient clipping, fp32 master weights with bf16 autocast on one device, and the same frozen
parts: the LLM's self-attention layers, embedding, norm and head. transformers keeps the 8 image-token
embeddings in the LLM's (vocab + 8)-row embedding, so they stay frozen there (herd trains them: 8 rows,
`trainable_params` shows the difference). Mllama's head cannot share that embedding, so the LLM is untied
on both sides. Timing: herd's loop times each step from fetching its batch to the optimizer step (the
batches are generated before the run), transformers' the same span; samples/s = batch / mean step time
after `--warmup` steps. Peak memory: `torch.cuda.max_memory_allocated`, or on CPU the peak RSS, which is
why transformers runs in a fresh process of its own. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import time
from typing import Any

import torch

from herd.adapters.hf_mllama import hf_from_schedule
from herd.adapters.multimodal import MultimodalLlama
from herd.config import load_config
from herd.data.records import IGNORE_INDEX
from herd.losses import causal_lm_loss
from herd.optim import build_optimizer
from herd.parallel.launch import init_distributed, run_in_fresh_process
from herd.plans.multimodal import MULTIMODAL_PLAN
from herd.task import LossOutput, TaskBase
from herd.text.args import ModelArgs, get_preset
from herd.text.checkpoint_hf import hf_config_from_args
from herd.text.model import Llama
from herd.trainer import peak_memory_gib, resolve_device, train
from herd.vision.encoder import VisionEncoder
from herd.vision.vision_args import VisionArgs, get_vision_preset


# --- the config both sides share -------------------------------------------------------------------------
def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def llm_args(a: argparse.Namespace) -> ModelArgs:
    overrides = {k: parse_value(v) for k, v in (kv.split("=", 1) for kv in a.llm_set)}
    base = get_preset(a.llm_preset)
    overrides.setdefault("max_seq_len", max(a.seq_len, base.max_seq_len))
    overrides["tie_embeddings"] = False  # Mllama's head cannot share the (vocab + 8)-row embedding
    return get_preset(a.llm_preset, **overrides)


def vision_args(a: argparse.Namespace) -> VisionArgs:
    return get_vision_preset(a.vision_preset, max_num_tiles=a.tiles)


def random_batches(a: argparse.Namespace, args: ModelArgs, vargs: VisionArgs, rows: int, seed: int) -> list:
    """`--pool` batches of `rows` samples: bos, `<|image|>` (id vocab_size), seq_len − 2 random tokens."""
    g = torch.Generator().manual_seed(seed)
    T, tiles, S = a.seq_len, vargs.max_num_tiles, vargs.image_size
    # an arrangement that uses every tile: aspect-ratio ids are 1-based indices into aspect_ratios
    ratio_id = 1 + next(i for i, (r, c) in enumerate(vargs.aspect_ratios or []) if r * c == tiles)
    out = []
    for _ in range(a.pool):
        seq = torch.randint(0, args.vocab_size, (rows, T + 1), generator=g)
        seq[:, 0], seq[:, 1] = 0, args.vocab_size  # bos stand-in, `<|image|>`
        labels = seq[:, 1:].clone()
        labels[:, 0] = IGNORE_INDEX  # the image token is given, not predicted
        xmask = torch.ones(rows, T, 1, tiles, dtype=torch.long)  # (B, T, M, tiles)
        xmask[:, 0] = 0  # bos comes before the image
        out.append({
            "tokens": seq[:, :-1], "labels": labels,
            "pixel_values": torch.randn(rows, 1, tiles, 3, S, S, generator=g),  # (B, M, tiles, C, S, S)
            "aspect_ratio_ids": torch.full((rows, 1), ratio_id), "aspect_ratio_mask": torch.ones(rows, 1, tiles),
            "cross_attention_mask": xmask,
        })  # fmt: skip
    return out


# --- herd --------------------------------------------------------------------------------------------------
class RandomImageTextTask(TaskBase):
    """The vision task's model and loss on pre-generated random batches (throughput is content-blind)."""

    name = "bench-vision"
    layouts = frozenset({"fsdp", "hsdp", "tp", "pp"})
    plan = MULTIMODAL_PLAN

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.model_args, self.vision_args = llm_args(a), vision_args(a)  # model_args: the init-mode choice

    def build_model(self) -> MultimodalLlama:
        with torch.device("meta"):
            return MultimodalLlama(
                Llama(self.model_args),
                VisionEncoder(self.vision_args),
                cross_attention_every=self.a.cross_attention_every,
            )

    @torch.no_grad()
    def init_weights(self, model: MultimodalLlama) -> None:
        """Finite values everywhere (the numbers do not matter, NaNs would stop the loop)."""
        model.llm.init_weights()
        for block in model.cross_attention.values():
            block.init_weights()
        model.projector.reset_parameters()
        model.image_token_embeddings.weight.normal_(std=0.02)
        for p in model.vision.parameters():
            p.normal_(std=0.02)
        for m in model.vision.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.reset_parameters()
        model.freeze_llm()

    def train_batches(self, rank: int, world_size: int):
        rows = self.a.batch_size // world_size
        return itertools.cycle(random_batches(self.a, self.model_args, self.vision_args, rows, seed=rank))

    def num_targets(self, batch: dict[str, Any]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def inputs(self, batch: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        keys = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")
        return (batch["tokens"],), {k: batch[k] for k in keys}

    def loss_from_output(self, logits: torch.Tensor, batch: dict[str, Any]) -> LossOutput:
        loss_sum, n = causal_lm_loss(logits, batch["labels"])  # logits (B, T, V)
        return LossOutput(loss_sum, n)

    def export(self, state_dict, out_dir, fmt="meta"):
        return None  # a benchmark keeps no model


def herd_config(a: argparse.Namespace):
    overrides = [f"--train.steps={a.warmup + a.steps}", f"--train.dtype={a.dtype}", "--train.eval_every=0",
                 "--metrics.log_every=1", "--metrics.tensorboard=false", "--checkpoint.save_final=false",
                 "--checkpoint.resume=none", f"--train.run_dir={a.run_dir}", f"--train.device={a.device}",
                 *(["--parallel.compile=true"] if a.compile else []), *(f"--{kv}" for kv in a.set)]  # fmt: skip
    return load_config(None, overrides)


def bench_herd(a: argparse.Namespace) -> dict[str, Any]:
    task = RandomImageTextTask(a)
    result = train(herd_config(a), task, show_progress=False)
    targets = a.batch_size * (a.seq_len - 1)  # per step, over all data-parallel ranks
    step_s = [targets / h["targets_per_s"] for h in result.history if h["step"] > a.warmup]
    runtime = result.runtime
    trainable = sum(p.numel() for _, p in runtime.named_trainable_parameters())  # DTensors: global sizes
    return {"impl": "herd", "samples_per_s": a.batch_size / (sum(step_s) / len(step_s)),
           "step_s": sum(step_s) / len(step_s), "peak_mem_gib": peak_memory_gib(runtime.device),
           "trainable_params": trainable, "world_size": runtime.world,
           "layout": {k: getattr(runtime.dims, k) for k in ("dp_replicate", "dp_shard", "cp", "pp", "tp")},
           "final_loss": result.final_loss}  # fmt: skip


# --- transformers -------------------------------------------------------------------------------------------
def hf_mllama_config(a: argparse.Namespace):
    """transformers' MllamaConfig of the same architecture (layer indices: `hf_from_schedule`)."""
    import transformers

    args, vargs = llm_args(a), vision_args(a)
    with torch.device("meta"):
        schedule = MultimodalLlama(
            Llama(args), None, cross_attention_every=a.cross_attention_every, vision_dim=vargs.output_dim
        ).cross_attention_layers
    llama = hf_config_from_args(args)
    text = {k: llama[k] for k in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads",
                                  "intermediate_size", "rms_norm_eps", "rope_theta", "rope_scaling",
                                  "rope_parameters", "tie_word_embeddings")}  # fmt: skip
    text.update(num_hidden_layers=args.n_layers + len(schedule), cross_attention_layers=hf_from_schedule(schedule),
                max_position_embeddings=args.max_seq_len, pad_token_id=0)  # fmt: skip
    return transformers.MllamaConfig(
        vision_config=vargs.to_hf_config(), text_config=text, image_token_index=args.vocab_size
    ), hf_from_schedule(schedule)


def bench_hf(a: argparse.Namespace) -> dict[str, Any]:
    """transformers' MllamaForConditionalGeneration, one device; runs in a process of its own."""
    import transformers

    device = resolve_device(a.device)
    torch.manual_seed(0)
    config, cross_layers = hf_mllama_config(a)
    model = transformers.MllamaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    model.to(device).train()
    trainable_prefixes = ("vision_model.", "multi_modal_projector.")
    cross_names = tuple(f"language_model.layers.{i}." for i in cross_layers) + tuple(
        f"language_model.model.layers.{i}."
        for i in cross_layers  # transformers 4.x names
    )
    named = []
    for name, p in model.named_parameters():
        p.requires_grad_(any(s in name for s in trainable_prefixes + cross_names))
        if p.requires_grad:
            named.append((name, p))
    cfg = herd_config(a)
    opt = build_optimizer(named, cfg.optimizer)  # herd's AdamW groups and hyper-parameters
    params = [p for _, p in named]
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    batches = itertools.cycle(random_batches(a, llm_args(a), vision_args(a), a.batch_size, seed=0))
    times, loss = [], float("nan")
    for step in range(a.warmup + a.steps):
        start = time.perf_counter()
        b = {k: v.to(device) for k, v in next(batches).items()}
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(
                input_ids=b["tokens"], pixel_values=b["pixel_values"], aspect_ratio_ids=b["aspect_ratio_ids"],
                aspect_ratio_mask=b["aspect_ratio_mask"], cross_attention_mask=b["cross_attention_mask"],
            ).logits  # fmt: skip
        loss_sum, n = causal_lm_loss(logits, b["labels"])
        (loss_sum / n).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(loss_sum.detach()) / n  # synchronises, as herd's loop does
        if step >= a.warmup:
            times.append(time.perf_counter() - start)
    step_s = sum(times) / len(times)
    return {"impl": "transformers", "version": transformers.__version__, "samples_per_s": a.batch_size / step_s,
            "step_s": step_s, "peak_mem_gib": peak_memory_gib(device),
            "trainable_params": sum(p.numel() for p in params), "final_loss": loss}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm-preset", default="tiny", help="herd.text preset of the frozen LLM")
    p.add_argument("--llm-set", action="append", default=[], help="LLM arg override, e.g. n_layers=8")
    p.add_argument("--vision-preset", default="tiny", help="tiny | vit_h14 | vit_h14_336 | vit_h14_metaclip")
    p.add_argument("--tiles", type=int, default=1, help="tiles per image (each image uses all of them)")
    p.add_argument("--cross-attention-every", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128, help="text tokens per sample (bos + <|image|> + text)")
    p.add_argument("--batch-size", type=int, default=4, help="samples per step over all data-parallel ranks")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--pool", type=int, default=2, help="distinct random batches, cycled")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true", help="herd: torch.compile the LLM blocks")
    p.add_argument("--set", action="append", default=[], help="herd config override, e.g. parallel.tp=2")
    p.add_argument("--compare-hf", action="store_true", help="also time transformers' Mllama on one device")
    p.add_argument("--run-dir", default="runs/bench_vision")
    a = p.parse_args()
    if a.seq_len < 3:
        p.error("--seq-len must be at least 3 (bos, <|image|>, one target)")
    rank, _, _ = init_distributed()
    device = resolve_device(a.device)
    args, vargs = llm_args(a), vision_args(a)
    results: dict[str, Any] = {
        "llm": {"preset": a.llm_preset, "overrides": a.llm_set, "params": args.num_params()},
        "vision": {"preset": a.vision_preset, "tiles": a.tiles, "image_size": vargs.image_size,
                   "tokens_per_image": vargs.num_patches * a.tiles, "params": vargs.num_params()},
        "cross_attention_every": a.cross_attention_every, "seq_len": a.seq_len, "batch_size": a.batch_size,
        "dtype": a.dtype, "steps": a.steps, "warmup": a.warmup,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "runs": [bench_herd(a)],
    }  # fmt: skip
    if a.compare_hf and rank == 0:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        results["runs"].append(run_in_fresh_process(bench_hf, a))  # peak memory of its own
    if rank == 0:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
