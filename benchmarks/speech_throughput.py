"""Speech throughput, printed as JSON: BEST-RQ pretraining of the Conformer encoder through herd's own loop
(utterance-seconds per second of the training step, peak memory), and the feature pipeline that builds its
batches (log-mel, crop, normalisation, masking, noise: `SpeechEncoderTask.encode`).

    python benchmarks/speech_throughput.py --encoder tiny --codebooks 4 --codebook-size 256 --device cpu
    python benchmarks/speech_throughput.py --encoder speech_1b --seconds 60 --batch-size 8 --dtype bf16

The utterances are random harmonic tones (`herd.data.synthetic.tones`) of `--seconds` each, generated and
encoded into `--pool` batches before the run, so the loop's step time (fetching the batch to the
optimizer step) is the model's; the encode time is measured apart, on the same utterances, on one CPU
thread of this process. `--seconds 60` is the paper's 6,000-frame crop. The quantizer and heads follow
`--codebooks` × `--codebook-size` (the paper: 16 × 8192).

`--mode sft` times the speech adapter's SFT step instead (paper §8.3): a `SpeechLlama` of a frozen LLM
(`--llm-preset`, random weights), the encoder (`--encoder`) and the adapter (`--adapter-preset`, widths
following the encoder and the LLM), one forward + backward + AdamW step on encoder + adapter with bf16
autocast, on `--batch-size` clips of `--seconds` (random features) and `--text-tokens` prompt + target
tokens each. Utterance-seconds/s = batch · seconds / step time after `--warmup` steps.

    python benchmarks/speech_throughput.py --mode sft --encoder speech_1b --llm-preset llama3_8b \
        --adapter-preset speech_adapter_8b --seconds 30 --batch-size 8 --dtype bf16 --device cuda

Never part of the test suite.
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


def sft_run(a: argparse.Namespace) -> dict[str, Any]:
    """The adapter SFT step (module docstring), timed outside the loop like the video benchmark's model."""
    from herd.adapters.speech import get_speech_adapter_preset
    from herd.adapters.speech_llama import SpeechLlama
    from herd.speech.conformer import ConformerEncoder
    from herd.speech.conformer_args import get_speech_preset
    from herd.speech.features import num_frames
    from herd.text.args import get_preset
    from herd.text.model import Llama

    torch.manual_seed(a.seed)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          "cpu" if a.device == "auto" else a.device)  # fmt: skip
    enc_args = get_speech_preset(a.encoder)
    frames = int(num_frames(int(a.seconds * 16_000)))  # 10 ms log-mel frames of a clip
    encoder_frames = -(-frames // enc_args.stack)  # 40 ms frames
    n_audio = -(-encoder_frames // 2)  # the adapter's stride 2: 80 ms
    llm_args = get_preset(a.llm_preset, max_seq_len=max(2048, n_audio + a.text_tokens))
    adapter = get_speech_adapter_preset(a.adapter_preset, encoder_dim=enc_args.dim, llm_dim=llm_args.dim)
    with device:
        model = SpeechLlama(Llama(llm_args), ConformerEncoder(enc_args), adapter)
    assert model.audio_tokens(frames) == n_audio
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    B, V = a.batch_size, llm_args.vocab_size
    text = torch.randint(0, V, (B, a.text_tokens), device=device)
    tokens = torch.cat([text[:, :8], torch.full((B, n_audio), model.audio_token_id, device=device),
                        text[:, 8:]], 1)  # fmt: skip
    features = torch.randn(B, frames, enc_args.n_mels, device=device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> float:
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(tokens, features)  # (B, S, V)
            target = logits[:, -a.text_tokens + 8 : -1].float()
            loss = torch.nn.functional.cross_entropy(
                target.flatten(0, 1), tokens[:, -a.text_tokens + 9 :].flatten()
            )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    for _ in range(a.warmup):
        step()
    times = [step() for _ in range(a.steps)]
    mean = sum(times) / len(times)
    return {
        "mode": "sft", "device": str(device), "dtype": a.dtype,
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "torch": torch.__version__,
        "llm": {"preset": a.llm_preset, "params": llm_args.num_params()},
        "encoder": {"preset": a.encoder, "params": enc_args.num_params()},
        "adapter": {"preset": a.adapter_preset, "params": adapter.num_params()},
        "trainable_params": sum(p.numel() for p in params),
        "seconds_per_utterance": a.seconds, "audio_tokens_per_utterance": n_audio,
        "text_tokens": a.text_tokens, "batch_size": B, "sequence": tokens.shape[1],
        "train_step_s": mean, "train_utterance_seconds_per_s": B * a.seconds / mean,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="bestrq", choices=["bestrq", "sft"])
    p.add_argument("--llm-preset", default="tiny", help="sft: the frozen LLM (llama3_8b: the paper's)")
    p.add_argument("--adapter-preset", default="tiny", help="sft: tiny | speech_adapter_8b")
    p.add_argument("--text-tokens", type=int, default=64, help="sft: prompt + target tokens per row")
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
    if a.mode == "sft":
        print(json.dumps(sft_run(a), indent=2))
        return
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
    }  # fmt: skip
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
