"""Video throughput, printed as JSON (paper §7.2–7.4): frame decoding with decord vs PyAV on the same
generated files, decord's memory over many reads with and without our mitigation, and clips/s + peak
memory of one forward + backward of a `MultimodalLlama` with a video adapter.

    python benchmarks/video_adapter_throughput.py --device cpu                      # small, ~1 min on 2 cores
    python benchmarks/video_adapter_throughput.py --device cuda --frames 64 --tile 336 --tiles 4 \\
        --vision-preset vit_h14_336 --llm-preset llama3_2_1b --perceiver-preset llama3_8b --dtype bf16 \\
        --batch-size 2 --video-size 640x360 --video-frames 300

decode: `--videos` H.264 files of `--video-frames` frames at `--video-size` (moving coloured squares,
`herd.data.synthetic.videos`), each read with `read_frames(path, --frames)` (uniform sampling: the
frames the model gets) and with every frame (`read_frames(path, n)`: the decoder's raw rate), per
backend; frames/s counts frames handed back. The same files' frames are compared between the readers
(`max_abs_diff`, uint8 levels; the tests allow 2).

rss (decord only, dmlc/decord #197/#208): `--rss-reads` calls in a fresh process each, RSS (from
/proc/self/statm, current, not peak) after 20 warm-up calls, after each tenth of the calls and at the
end: "read_frames" = what training calls (PyAV probe, then a new decord reader, seeked back to 0,
dropped); "reopen" = that decord part alone; "naive" = one `decord.VideoReader` per file kept open for
the whole run, `get_batch` of the same sampled frames each call, never seeked back.

model: tiny presets by default; the encoder, projector, image cross-attention and LLM are frozen, the
perceiver resampler and video cross-attention layers train (the video stage). Inputs come from real
decoded frames through `video_tiles` (`ImageTransform(--tile, --tiles)`) and `collate_videos`; the loss is
cross-entropy on random targets. clips/s = batch / mean step time after `--warmup` steps; peak memory is
`torch.cuda.max_memory_allocated`, or on CPU the peak RSS of a fresh process that only runs the model.
Never part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from herd.data.synthetic.videos import write_video
from herd.vision.video import decord_available, read_frames, sample_frame_indices

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib() -> float:
    """Current resident set size (not the peak), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def make_videos(a: argparse.Namespace, root: Path) -> list[Path]:
    w, h = (int(x) for x in a.video_size.split("x"))
    return [
        write_video(root / f"v{i}.mp4", a.video_frames, fps=30, width=w, height=h) for i in range(a.videos)
    ]


# --- decode --------------------------------------------------------------------------------------------------
def decode_rates(a: argparse.Namespace, files: list[Path]) -> dict[str, Any]:
    backends = (["decord"] if decord_available() else []) + ["pyav"]
    out: dict[str, Any] = {}
    for backend in backends:
        row = {}
        for label, n in (("sampled", a.frames), ("all_frames", a.video_frames)):
            read_frames(files[0], n, backend)  # warm-up: imports, codec init
            t0, frames = time.perf_counter(), 0
            for _ in range(a.repeats):
                for f in files:
                    frames += read_frames(f, n, backend).frames.shape[0]
            seconds = time.perf_counter() - t0
            row[label] = {
                "frames_per_s": round(frames / seconds, 1),
                "clips_per_s": round(a.repeats * len(files) / seconds, 2),
            }
        out[backend] = row
    if len(backends) == 2:
        diff = max(
            (read_frames(f, a.frames, "decord").frames.int() - read_frames(f, a.frames, "pyav").frames.int())
            .abs()
            .max()
            .item()
            for f in files
        )
        out["max_abs_diff"] = int(diff)
    return out


# --- decord RSS over many reads ------------------------------------------------------------------------------
def rss_run(mode: str, files: list[str], num_frames: int, reads: int) -> dict[str, Any]:
    """Runs in a fresh process: RSS after 20 warm-up calls, every reads/10 calls, and at the end."""
    import decord

    readers: dict[str, Any] = {}

    def sampled(vr: Any) -> list[int]:
        return sample_frame_indices(vr.get_frame_timestamp(list(range(len(vr))))[:, 0], num_frames)[
            0
        ].tolist()

    def naive(path: str) -> torch.Tensor:
        if path not in readers:  # opened once, kept open, never seeked back (the pattern of #197/#208)
            readers[path] = decord.VideoReader(path, ctx=decord.cpu(0))
        vr = readers[path]
        return torch.from_numpy(vr.get_batch(sampled(vr)).asnumpy())

    def reopen(path: str) -> torch.Tensor:  # the mitigation alone: a reader per call, seeked back, dropped
        vr = decord.VideoReader(path, ctx=decord.cpu(0))
        frames = torch.from_numpy(vr.get_batch(sampled(vr)).asnumpy())
        vr.seek(0)
        del vr
        return frames

    def full(path: str) -> torch.Tensor:  # what training calls: PyAV probe + the mitigated decord read
        return read_frames(path, num_frames, "decord").frames

    call = {"naive": naive, "reopen": reopen, "read_frames": full}[mode]
    for k in range(20):
        call(files[k % len(files)])
    start, t0, trace = rss_mib(), time.perf_counter(), []
    for k in range(reads):
        call(files[k % len(files)])
        if (k + 1) % max(1, reads // 10) == 0:
            trace.append(round(rss_mib() - start, 1))
    return {
        "rss_start_mib": round(start, 1),
        "growth_mib": round(rss_mib() - start, 1),
        "growth_trace_mib": trace,  # growth after each tenth of the reads: a plateau vs a steady leak
        "reads_per_s": round(reads / (time.perf_counter() - t0), 1),
    }


# --- the model ------------------------------------------------------------------------------------------------
def model_run(a: argparse.Namespace, files: list[str]) -> dict[str, Any]:
    """Runs in a fresh process (its peak RSS is the model's on CPU)."""
    from herd.adapters import MultimodalLlama, get_perceiver_preset
    from herd.text.args import get_preset
    from herd.text.model import Llama
    from herd.vision.encoder import VisionEncoder
    from herd.vision.tiling import ImageTransform
    from herd.vision.video import collate_videos, video_tiles
    from herd.vision.vision_args import get_vision_preset

    torch.manual_seed(0)
    device = torch.device(a.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    llm_args = get_preset(a.llm_preset, max_seq_len=max(a.seq_len, 64))
    vargs = get_vision_preset(a.vision_preset, image_size=a.tile, max_num_tiles=a.tiles)
    pargs = get_perceiver_preset(a.perceiver_preset, dim=llm_args.dim)
    with device:
        model = MultimodalLlama(Llama(llm_args), VisionEncoder(vargs), video=pargs)
    model.requires_grad_(False)
    assert model.video is not None
    model.video.requires_grad_(True)  # the video stage trains the resampler + video cross-attention only
    transform = ImageTransform(tile_size=a.tile, max_tiles=a.tiles)
    clips = [
        video_tiles(read_frames(files[b % len(files)], a.frames), transform) for b in range(a.batch_size)
    ]
    batch = {k: v.to(device) for k, v in collate_videos(clips, a.frames).items()}  # (B, F, K, 3, S, S), …
    tokens = torch.randint(0, llm_args.vocab_size, (a.batch_size, a.seq_len + 1), device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> float:
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(tokens[:, :-1], **batch)  # (B, T, V)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        for p in params:
            p.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    for _ in range(a.warmup):
        step()
    times = [step() for _ in range(a.steps)]
    mean = sum(times) / len(times)
    peak = (
        torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    return {
        "clips_per_s": round(a.batch_size / mean, 3),
        "step_s": round(mean, 4),
        "peak_mem_gib": round(peak, 3),
        "peak_mem_kind": "cuda_max_allocated" if device.type == "cuda" else "peak_rss",
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in model.parameters()),
        "video_tokens_per_clip": pargs.n_latents * -(-a.frames // pargs.frames_per_group),
        "pixel_values_shape": list(batch["video_pixel_values"].shape),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=16, help="frames sampled per video (paper: 16 / 64)")
    p.add_argument("--tile", type=int, default=56, help="tile size in px (paper: 336)")
    p.add_argument("--tiles", type=int, default=1, help="max tiles per frame")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--videos", type=int, default=4, help="generated files")
    p.add_argument("--video-frames", type=int, default=120, help="frames per generated file")
    p.add_argument("--video-size", default="320x240", help="WxH of the generated files")
    p.add_argument("--repeats", type=int, default=3, help="passes over the files per decode measurement")
    p.add_argument("--rss-reads", type=int, default=1000, help="read_frames calls for the RSS measurement")
    p.add_argument("--llm-preset", default="tiny")
    p.add_argument("--vision-preset", default="tiny")
    p.add_argument("--perceiver-preset", default="tiny")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--skip", nargs="*", default=[], choices=["decode", "rss", "model"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    spawn = mp.get_context("spawn")  # a fresh interpreter per measurement: RSS and peaks are its own
    with tempfile.TemporaryDirectory() as tmp:
        files = make_videos(a, Path(tmp))
        names = [str(f) for f in files]
        out: dict[str, Any] = {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), torch threads {torch.get_num_threads()}",
            "config": vars(a),
        }
        if "decode" not in a.skip:
            out["decode"] = decode_rates(a, files)
        if "rss" not in a.skip and decord_available():
            out["rss"] = {"reads": a.rss_reads}
            for mode in ("read_frames", "reopen", "naive"):
                with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                    out["rss"][mode] = pool.submit(rss_run, mode, names, a.frames, a.rss_reads).result()
        if "model" not in a.skip:
            with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                out["model"] = pool.submit(model_run, a, names).result()
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
