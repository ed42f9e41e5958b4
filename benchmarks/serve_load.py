"""Load test of `herd serve` on loopback: N concurrent chat requests against a small random Llama, with
continuous batching (max_batch = N) and one request at a time (max_batch = 1); prints JSON with errors,
p50/p99 latency and generated tokens/s of each.

    python benchmarks/serve_load.py --requests 32 --max-tokens 32        # ~1-2 min on 2 CPU cores

Bounded: every request has a timeout, and the whole run stops after --time-limit seconds per mode.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from herd.serving.engine import ServedModel
from herd.serving.server import ServeOptions, running
from herd.text import build_llama, get_preset
from herd.text.loading import save_text_model
from herd.text.tokenizer import Tokenizer
from herd.text.vocab_subset import SubsetTokenizer

WORDS = "user assistant system\n\n Count: one two three four five six seven eight nine ten. Say hi. What color is the sky?"


def write_model(out: Path, dim: int, layers: int) -> Path:
    tok = SubsetTokenizer.from_texts(Tokenizer(), [WORDS])
    torch.manual_seed(0)
    args = get_preset("tiny", dim=dim, n_layers=layers, n_heads=8, n_kv_heads=4, multiple_of=64,
                      vocab_size=-(-tok.vocab_size // 64) * 64, max_seq_len=512)  # fmt: skip
    save_text_model(build_llama(args).state_dict(), args, tok, out, "meta")
    return out


def run_mode(served: ServedModel, n: int, max_batch: int, max_tokens: int, time_limit: float) -> dict:
    options = ServeOptions(port=0, max_batch=max_batch, max_queue=n, max_tokens=max_tokens)
    prompts = [f"Count: {' '.join(['one', 'two', 'three'][: 1 + i % 3])} {i}" for i in range(n)]
    with running(served, options) as url, httpx.Client(base_url=url, timeout=time_limit) as client:

        def one(prompt: str) -> tuple[int, float, int]:
            # ignore_eos: a random model would end at a stop token after a few tokens
            body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True}  # fmt: skip
            t = time.perf_counter()
            try:
                r = client.post("/v1/chat/completions", json=body)
            except httpx.HTTPError:
                return 0, time.perf_counter() - t, 0
            made = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0
            return r.status_code, time.perf_counter() - t, made

        one(prompts[0])  # warm-up
        start = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            results = list(pool.map(one, prompts))
        wall = time.perf_counter() - start
    lat = sorted(r[1] for r in results)
    tokens = sum(r[2] for r in results)
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
    return {"max_batch": max_batch, "requests": n, "errors": sum(r[0] != 200 for r in results),
            "p50_s": round(pick(0.5), 3), "p99_s": round(pick(0.99), 3), "wall_s": round(wall, 2),
            "tokens": tokens, "tokens_per_s": round(tokens / wall, 1)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--time-limit", type=float, default=300.0)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        served = ServedModel.load(write_model(Path(tmp) / "llm", a.dim, a.layers))
        params = sum(x.numel() for x in served.model.parameters())
        out = {
            "model": {"dim": a.dim, "layers": a.layers, "params": params, "threads": torch.get_num_threads()}
        }
        out["batched"] = run_mode(served, a.requests, a.requests, a.max_tokens, a.time_limit)
        out["one_at_a_time"] = run_mode(served, a.requests, 1, a.max_tokens, a.time_limit)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
