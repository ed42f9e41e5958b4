"""Decode speed: prefill and decode tokens/s of herd (eager, compiled static cache) and transformers'
`generate` (static cache + torch.compile) on the same random weights, with the memory-bandwidth bound.

    python benchmarks/decode.py --preset llama3_2_1b --dtype bf16 --device cuda          # a GPU
    python benchmarks/decode.py --preset tiny --dim 256 --n-layers 4 --vocab-size 4096 \
        --dtype fp32 --device cpu --new-tokens 16                                        # the CPU run

Each engine generates greedily with max_new_tokens 1 (prefill: the prompt plus one token) and 1 + N,
after a warm-up of the same shapes (compilation happens there). prefill tokens/s = B·T / t(1);
decode tokens/s = B·N / (t(1+N) − t(1)). The bound of a decode step is the bytes it must read —
every weight except the embedding table (the embedding reads B rows; a tied head reads it whole)
plus the live K/V of every row (mean length T + N/2) — over the memory bandwidth; `bound_fraction` is
the bound's step time over the measured one (1.0 = at the bandwidth limit). The bandwidth comes from
--bandwidth-gbs, else a table of device specs, else (CPU) a measured large copy.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from herd.fast_decode import compiled_steps
from herd.text import build_llama, get_preset
from herd.text.checkpoint_hf import save_hf_checkpoint
from herd.text.generation import EAGER_STEPS, DecodeSteps, SamplingParams, generate

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# HBM bandwidth from the vendors' datasheets, GB/s (10^9 bytes/s)
DEVICE_BANDWIDTH_GBS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0,
                        "A100-SXM4-80GB": 2039.0, "A100-SXM4-40GB": 1555.0, "A100 80GB PCIe": 1935.0,
                        "L40S": 864.0, "RTX 4090": 1008.0}  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_copy_bandwidth(device: torch.device, mbytes: int = 512, repeats: int = 5) -> float:
    """GB/s of a large tensor copy (bytes read + bytes written), the best of `repeats`."""
    src = torch.empty(mbytes << 20, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() / best / 1e9


def bandwidth_gbs(device: torch.device, flag: float | None) -> tuple[float, str]:
    if flag:
        return flag, "--bandwidth-gbs"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in DEVICE_BANDWIDTH_GBS.items():
            if all(part.lower() in name.lower() for part in key.split()):
                return value, f"spec of {key} ({name})"
    return measured_copy_bandwidth(device), "measured tensor copy"


def bytes_per_step(model: torch.nn.Module, batch: int, kv_len: float) -> float:
    """Weights read by one decode step (all but the embedding unless tied) + the K/V of every row."""
    args = model.args
    elt = next(model.parameters()).element_size()
    weights = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("tok_embeddings"))
    if args.tie_embeddings:
        weights += model.tok_embeddings.weight.numel()
    kv = 2 * args.n_layers * batch * kv_len * args.n_kv_heads * args.head_dim
    return (weights + kv) * elt


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def herd_engine(model: torch.nn.Module, steps: DecodeSteps) -> Callable[[torch.Tensor, int], Any]:
    def run(prompts: torch.Tensor, new: int) -> Any:
        return generate(model, prompts.tolist(), SamplingParams(max_new_tokens=new), steps=steps)

    return run


def hf_engine(model: torch.nn.Module, args: Any, dtype: torch.dtype, device: torch.device, compile: bool):
    """transformers' LlamaForCausalLM on the same weights (herd's HF export), static cache + compile:
    the setting its docs give as the fastest (generation_config.cache_implementation="static" and a
    compiled forward; mode reduce-overhead on a GPU)."""
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        save_hf_checkpoint(tmp, args, {k: v.float() for k, v in model.state_dict().items()})
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
    hf.generation_config.cache_implementation = "static"
    hf.generation_config.pad_token_id = 0
    if compile:
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        hf.forward = torch.compile(hf.forward, mode=mode, fullgraph=True)

    @torch.inference_mode()
    def run(prompts: torch.Tensor, new: int) -> Any:
        return hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False)  # fmt: skip

    return run


def measure(run: Callable[[torch.Tensor, int], Any], prompts: torch.Tensor, new: int, device: torch.device,
            repeats: int) -> tuple[float, float]:  # fmt: skip
    """(seconds for prefill + 1 token, seconds for the N further tokens), medians of `repeats` after a warm-up."""
    run(prompts, 1)
    run(prompts, 1 + new)  # warm-up: compilation, CUDA graph capture, allocator
    firsts, totals = [], []
    for _ in range(repeats):
        firsts.append(timed(lambda: run(prompts, 1), device))
        totals.append(timed(lambda: run(prompts, 1 + new), device))
    first, total = sorted(firsts)[len(firsts) // 2], sorted(totals)[len(totals) // 2]
    return first, max(total - first, 1e-9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama3_2_1b")
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--n-layers", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-sizes", default="1,8,64")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="default: the device's spec / measured")
    p.add_argument("--engines", default="herd_eager,herd_compiled,hf_compiled")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--fp8", action="store_true", help="herd engines with row-wise FP8 FFNs (herd.quantize)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    overrides = {
        k: v for k, v in {"dim": a.dim, "n_layers": a.n_layers, "vocab_size": a.vocab_size}.items() if v
    }
    args = get_preset(a.preset, **overrides, max_seq_len=a.prompt_len + a.new_tokens + 1)
    torch.manual_seed(0)
    model = build_llama(args, device=device, dtype=dtype).eval()
    bandwidth, source = bandwidth_gbs(device, a.bandwidth_gbs)
    herd_model = model
    if a.fp8:  # transformers keeps the bf16 weights (its export reads the unquantized state dict)
        import copy

        from herd.quantize import apply_fp8

        herd_model = copy.deepcopy(model)
        apply_fp8(herd_model)
    engines = {
        "herd_eager": lambda: herd_engine(herd_model, EAGER_STEPS),
        "herd_compiled": lambda: herd_engine(herd_model, compiled_steps(herd_model)),
        "hf_compiled": lambda: hf_engine(model, args, dtype, device, compile=True),
        "hf_eager": lambda: hf_engine(model, args, dtype, device, compile=False),
    }
    results = []
    for name in a.engines.split(","):
        run = engines[name]()
        for batch in [int(b) for b in a.batch_sizes.split(",")]:
            g = torch.Generator().manual_seed(batch)
            prompts = torch.randint(1, args.vocab_size, (batch, a.prompt_len), generator=g).to(device)
            first, rest = measure(run, prompts, a.new_tokens, device, a.repeats)
            step = rest / a.new_tokens
            bound = bytes_per_step(model, batch, a.prompt_len + a.new_tokens / 2) / (bandwidth * 1e9)
            results.append({"engine": name, "batch": batch,
                            "prefill_tokens_per_s": round(batch * a.prompt_len / first, 1),
                            "decode_tokens_per_s": round(batch * a.new_tokens / rest, 1),
                            "decode_step_ms": round(step * 1e3, 3), "bound_step_ms": round(bound * 1e3, 3),
                            "bound_fraction": round(bound / step, 3)})  # fmt: skip
            print(json.dumps(results[-1]), flush=True, file=__import__("sys").stderr)
    print(json.dumps({"preset": a.preset, "overrides": overrides, "dtype": a.dtype, "fp8": a.fp8, "device": str(device),
                      "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "threads": torch.get_num_threads(), "params": args.num_params(),
                      "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "bandwidth_gbs": round(bandwidth, 1),
                      "bandwidth_source": source, "torch": torch.__version__, "results": results}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
