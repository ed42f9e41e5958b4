"""Rejection-sampling decode time: shared-prefix KV cache vs prefilling every copy, printed as JSON.

    python benchmarks/rejection_sampling_prefix_cache.py --dim 256 --n-layers 4 --prompt-len 512 \\
        --k 10 30 --new-tokens 16
    python benchmarks/rejection_sampling_prefix_cache.py --preset llama3_2_1b --prompt-len 2048 \\
        --k 10 30 --new-tokens 32 --device cuda --dtype bf16

A randomly initialised model of the given shape samples K completions of random prompts (temperature 1,
no stop tokens, so both ways decode exactly `--new-tokens` tokens per row and draw the same random
numbers); the two must produce identical tokens. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from herd.sample import sample_recompute, sample_shared_prefix
from herd.text.args import PRESET_NAMES, get_preset
from herd.text.generation import SamplingParams
from herd.text.loading import parse_dtype
from herd.text.model import build_llama


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=PRESET_NAMES)
    p.add_argument("--dim", type=int, default=None, help="override the preset's model dim")
    p.add_argument("--n-layers", type=int, default=None)
    p.add_argument("--n-heads", type=int, default=None)
    p.add_argument("--n-kv-heads", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=None, help="default: the preset's (128,256 for Llama 3)")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument(
        "--prompts", type=int, default=1, help="distinct prompts, decoded together (--batch-prompts)"
    )
    p.add_argument("--k", type=int, nargs="+", default=[10, 30])
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per way; the fastest is reported")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"])
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def timed(fn, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    overrides = {
        name: value
        for name, value in (("dim", a.dim), ("n_layers", a.n_layers), ("n_heads", a.n_heads),
                            ("n_kv_heads", a.n_kv_heads), ("vocab_size", a.vocab_size))
        if value is not None
    }  # fmt: skip
    overrides["max_seq_len"] = a.prompt_len + a.new_tokens
    if "n_heads" in overrides and "n_kv_heads" not in overrides:
        overrides["n_kv_heads"] = overrides["n_heads"]
    args = get_preset(a.preset, **overrides)
    device = torch.device(a.device)
    torch.manual_seed(a.seed)
    model = build_llama(args, device=device, dtype=parse_dtype(a.dtype)).eval()
    g = torch.Generator().manual_seed(a.seed)
    prompts = [
        torch.randint(0, args.vocab_size, (a.prompt_len,), generator=g).tolist() for _ in range(a.prompts)
    ]
    params = SamplingParams(a.new_tokens, temperature=1.0, top_p=1.0, seed=a.seed)
    # warm-up (kernels, allocator) on a short prompt
    sample_shared_prefix(
        model, [p[:16] for p in prompts], 2, SamplingParams(2, 1.0, seed=0), batch_prompts=a.prompts
    )
    runs = []
    for k in a.k:
        best: dict[str, float] = {}
        outputs = {}
        for name, fn in (("shared_prefix", sample_shared_prefix), ("recompute", sample_recompute)):
            for _ in range(a.repeats):
                seconds, out = timed(
                    lambda fn=fn, k=k: fn(model, prompts, k, params, batch_prompts=a.prompts), device
                )
                best[name] = min(best.get(name, float("inf")), seconds)
                outputs[name] = out
        new_tokens = a.prompts * k * a.new_tokens
        runs.append({
            "k": k,
            "shared_prefix_s": round(best["shared_prefix"], 4),
            "recompute_s": round(best["recompute"], 4),
            "speedup": round(best["recompute"] / best["shared_prefix"], 2),
            "shared_prefix_new_tokens_per_s": round(new_tokens / best["shared_prefix"], 1),
            "recompute_new_tokens_per_s": round(new_tokens / best["recompute"], 1),
            "prefill_tokens": {"shared_prefix": a.prompts * a.prompt_len, "recompute": a.prompts * k * a.prompt_len},
            "identical_tokens": outputs["shared_prefix"] == outputs["recompute"],
        })  # fmt: skip
    report = {
        "model": {"preset": a.preset, **{f: getattr(args, f) for f in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")}},
        "params": args.num_params(),
        "prompt_len": a.prompt_len,
        "prompts": a.prompts,
        "new_tokens": a.new_tokens,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "runs": runs,
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
