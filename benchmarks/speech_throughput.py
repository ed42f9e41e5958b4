"""Speech throughput, printed as JSON: BEST-RQ pretraining of the Conformer encoder through herd's own loop
(utterance-seconds per second of the training step, peak memory), and the feature pipeline that builds its
batches (log-mel, crop, normalisation, masking, noise: `SpeechEncoderTask.encode`).

    python benchmarks/speech_throughput.py --encoder tiny --codebooks 4 --codebook-size 256 --device cpu
    python benchmarks/speech_throughput.py --encoder speech_1b --seconds 60 --batch-size 8 --dtype bf16

The utterances are random harmonic tones (`herd.data.synthetic.tones`) of `--seconds` each, generated and
encoded into `--pool` batches before the run, so the loop's step time (fetching the batch to the
optimizer step) is the model's; the encode time is measured apart, on the same utterances, on one CPU
thread of this process. `--seconds 60` is the paper's 6,000-frame crop. The quantizer and heads follow
`--codebooks` × `--codebook-size` (the paper: 16 × 8192). The speech adapter's SFT is not measured yet:
its task (`herd train speech`) does not exist. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from typing import Any

import numpy as np
import torch

from herd.config import load_config
from herd.data.synthetic.tones import tone_utterance
from herd.paths import config_path
from herd.tasks.speech_encoder import SpeechEncoderTask
from herd.trainer import peak_memory_gib, train


class PooledSpeechTask(SpeechEncoderTask):
    """`herd train speech-encoder`'s task on batches made before the run (no files, no decoding)."""

    def __init__(self, *args: Any, pool: list[dict[str, Any]], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.pool = pool

    def train_batches(self, rank: int, world_size: int):
        return itertools.cycle(self.pool)

    def export(self, state_dict, out_dir, fmt="meta"):
        return None  # a benchmark keeps no model


def utterances(a: argparse.Namespace, n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        wave = tone_utterance(np.random.default_rng([a.seed, i]), a.seconds)
        out.append({"audio": torch.from_numpy(wave), "seed": i})
    return out


def job_config(a: argparse.Namespace):
    overrides = [
        f"--speech.encoder={a.encoder}", f"--speech.num_codebooks={a.codebooks}",
        f"--speech.codebook_size={a.codebook_size}", f"--speech.crop_frames={int(a.seconds * 100) + 1}",
        "--speech.train_manifest=unused.jsonl", f"--data.batch_size={a.batch_size}",
        f"--train.steps={a.warmup + a.steps}", f"--train.dtype={a.dtype}", "--train.eval_every=0",
        "--metrics.log_every=1", "--metrics.tensorboard=false", "--checkpoint.save_final=false",
        "--checkpoint.resume=none", f"--train.run_dir={a.run_dir}", f"--train.device={a.device}",
        *(f"--{kv}" for kv in a.set),
    ]  # fmt: skip
    return load_config(config_path("speech/bestrq_tiny.toml"), overrides)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="tiny", help="speech preset: tiny | speech_1b")
    p.add_argument("--codebooks", type=int, default=16)
    p.add_argument("--codebook-size", type=int, default=8192)
    p.add_argument("--seconds", type=float, default=10.0, help="seconds per utterance")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--pool", type=int, default=2, help="distinct batches, cycled")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--set", action="append", default=[], help="herd config override, e.g. parallel.compile=true"
    )
    p.add_argument("--run-dir", default="runs/bench_speech")
    a = p.parse_args()
    cfg = job_config(a)
    probe = SpeechEncoderTask.from_config(cfg)
    samples = utterances(a, a.pool * a.batch_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    pool = [probe.encode(samples[i : i + a.batch_size]) for i in range(0, len(samples), a.batch_size)]
    encode_s = time.perf_counter() - start
    torch.set_num_threads(threads)
    task = PooledSpeechTask(cfg.speech, cfg.data, pool=pool)
    result = train(cfg, task, show_progress=False)
    targets = [task.num_targets(b) for b in pool]
    step_s = [
        targets[(h["step"] - 1) % a.pool] / h["targets_per_s"] for h in result.history if h["step"] > a.warmup
    ]
    mean_step = sum(step_s) / len(step_s)
    audio_s = a.batch_size * a.seconds
    frames = int(pool[0]["lengths"][0])
    results = {
        "encoder": {"preset": a.encoder, "params": task.encoder_args.num_params(), **task.encoder_args.to_dict()},
        "bestrq": {"codebooks": a.codebooks, "codebook_size": a.codebook_size, "params": task.model_args.num_params()},
        "seconds_per_utterance": a.seconds, "frames_per_utterance": frames, "batch_size": a.batch_size,
        "masked_fraction": sum(targets) / (len(pool) * a.batch_size * -(-frames // 4)),
        "dtype": a.dtype, "device": str(result.runtime.device),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "torch": torch.__version__,
        "train_step_s": mean_step, "train_utterance_seconds_per_s": audio_s / mean_step,
        "peak_mem_gib": peak_memory_gib(result.runtime.device), "final_loss": result.final_loss,
        "encode_utterance_seconds_per_s_one_thread": len(samples) * a.seconds / encode_s,
        "adapter_sft": None,  # not yet: `herd train speech` does not exist
    }  # fmt: skip
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
