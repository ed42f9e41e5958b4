"""`herd data ...`: data preparation (paper §3.1, §7.1); every command prints a JSON summary or one line.

    herd data tokenize --source jsonl --input 'corpus/*.jsonl.gz' --out shards/web
    herd data dedup-images --manifest pairs.jsonl --weights sscd.torchscript.pt --threshold 0.75 --out d
    torchrun --nproc-per-node 4 -m herd data dedup-images --manifest m.jsonl --embeddings d.npy …
    herd data dedup-text --input crawl/*.jsonl.gz --out runs/dedup_text
    torchrun --nproc-per-node 8 -m herd data dedup-text --sharded --input crawl/*.jsonl.gz --out runs/dd
    herd data filter-text --input runs/dedup_text/part-*.jsonl --out runs/filtered --dirty-words words.txt
    herd data filter-clip --manifest pairs.jsonl --model ViT-B-32 --pretrained vit.pt --threshold 0.2 --out c
    herd data resample --captions pairs.jsonl --vocab-texts titles.txt --threshold 20000 --out runs/rs
    herd data filter-videos --manifest videos.jsonl --threshold 0.02 --out runs/motion
    herd data curate-sft --input dialogs.jsonl --out runs/curated --reward-model runs/rm/model  (data_curation.py)

Library functions: `herd.data.training.text_sources.tokenize_corpus`, and in `herd.data.curation`:
`image_dedup.dedup_images`, `text_dedup.dedup_text` (`sharded_text_dedup.dedup_text_sharded` with --sharded),
`text_filters.filter_text`, `clip_filter.filter_clip`,
`ngram_resample.resample_jsonl`, `motion.filter_videos`. Heavy libraries (torch, faiss, open_clip,
datasketch, pyarrow, av) are imported inside the commands, after a check that says which extra to install.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from herd.commands.common import UsageError, print_summary, require
from herd.commands.registry import add_command, add_group

TEXT_SUMMARY = ("input_records", "output_records", "bad_records", "removed")


# --------------------------------------------------------------------------------------------- tokenize
def cmd_tokenize(args: argparse.Namespace) -> int:
    """`tokenize_corpus`, then a summary on stderr (stdout stays free for pipes)."""
    from rich.console import Console

    from herd.data.training.text_sources import tokenize_corpus
    from herd.data.training.token_shards import MANIFEST

    m = tokenize_corpus(
        source=args.source, inputs=args.input, out=args.out, tokenizer=args.tokenizer,
        text_field=args.text_field, shard_tokens=args.shard_tokens, dtype=args.dtype, workers=args.workers,
        overwrite=args.overwrite, progress=not args.no_progress,
    )  # fmt: skip
    before = m["resumed_tokens"]
    resumed = f" (resumed: {before:,} tokens were already done)" if before else ""
    console = Console(stderr=True)
    console.print(
        f"{m['num_docs']:,} docs, {m['num_tokens']:,} tokens ({m['dtype']}) in {len(m['shards'])} shard(s) "
        f"→ {Path(args.out) / MANIFEST}{resumed}\nskipped records: {m['skipped_records']:,}; "
        f"{m['seconds']:.1f} s, {(m['num_tokens'] - before) / max(m['seconds'], 1e-9):,.0f} tokens/s",
        highlight=False,
        soft_wrap=True,  # one line per fact, even on a narrow or non-terminal stderr
    )
    if m["skipped_records"] and m["skipped_examples"]:
        console.print(f"[yellow]e.g. {m['skipped_examples'][0]}", highlight=False, soft_wrap=True)
    return 0


def _add_tokenize(group: Any) -> None:
    from herd.data.training.text_sources import SOURCES

    p = add_command(
        group,
        "tokenize",
        cmd_tokenize,
        help="tokenise jsonl / parquet / text files into memory-mapped token shards (resumable)",
        description="Tokenise jsonl / parquet / plain-text corpora into pre-tokenised memmap shards that "
        'training reads with data.source = "tokens"; rerunning after a kill resumes after the last '
        "complete shard (docs/data_pipeline.md).",
    )
    p.add_argument("--source", choices=SOURCES, required=True, help="input format")
    p.add_argument(
        "--input", nargs="+", action="extend", required=True, metavar="PATH",
        help="files, folders or quoted glob patterns (repeatable); .gz / .zst are decompressed",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="output shard directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model or checkpoint dir (default: Llama 3)")
    p.add_argument("--text-field", default="text", help="jsonl key / parquet column holding the text")
    p.add_argument("--shard-tokens", type=int, default=None, help="target tokens per shard (default 2^27)")
    p.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"], help="token storage type")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--overwrite", action="store_true", help="discard existing shards in --out")
    p.add_argument("--no-progress", action="store_true", help="no live progress line")


# ----------------------------------------------------------------------------------------- dedup-images
def cmd_dedup_images(args: argparse.Namespace) -> int:
    """`herd.data.curation.image_dedup.dedup_images` with SSCD embedding (or given descriptors)."""
    require("faiss", "scipy")
    from herd.data.curation.embed import EmbedConfig, default_device, dist_env
    from herd.data.curation.image_dedup import dedup_images
    from herd.data.curation.image_sources import make_source
    from herd.data.curation.near_dup_search import SearchConfig

    if args.embeddings is None and args.weights is None and not args.random_init:
        raise UsageError(
            "give --weights (e.g. sscd_disc_mixup.torchscript.pt), --embeddings, or --random-init"
        )
    rank, world = dist_env()
    source = make_source(args.images, args.manifest, args.shards, shard_size=args.shard_size)
    search = SearchConfig(
        threshold=args.threshold, method=args.method, n_clusters=args.n_clusters,
        nprobe_assign=args.nprobe_assign, nprobe=args.nprobe, k=args.k, kmeans_iters=args.kmeans_iters,
        refine_passes=args.refine_passes, seed=args.seed,
    )  # fmt: skip
    model, embed_cfg = None, None
    if args.embeddings is None:
        from herd.data.curation.sscd import load_sscd

        device = args.device or default_device()
        weights = None if args.random_init else args.weights
        model = lambda: load_sscd(weights, device=device)  # built only if some shard still needs embedding
        embed_cfg = EmbedConfig(
            batch_size=args.batch_size, resize=args.resize, image_size=args.image_size,
            decode_threads=args.decode_threads, device=device, progress=not args.no_progress,
        )  # fmt: skip
    sharded = args.search == "sharded" or (args.search == "auto" and world > 1 and args.method == "clusters")
    report = dedup_images(
        source, args.out, search, embeddings=args.embeddings, model=model, embed_cfg=embed_cfg,
        work_dir=args.work_dir, rank=rank, world=world, wait_timeout_s=args.wait_timeout,
        contact_groups=args.contact_groups, sharded=sharded, shard_rows=args.shard_rows,
    )  # fmt: skip
    if report is None:  # rank > 0: its part is done, rank 0 writes the outputs
        print(json.dumps({"rank": rank, "world": world, "embedded": True, "sharded_search": sharded}))
        return 0
    return print_summary(report, ("records", "pairs", "groups", "removed", "kept", "largest_groups", "embed"))


def _add_dedup_images(group: Any) -> None:
    p = add_command(
        group,
        "dedup-images",
        cmd_dedup_images,
        help="near-duplicate image removal (SSCD descriptors + faiss)",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="folder of images (recursive, sorted)")
    src.add_argument("--manifest", metavar="FILE.jsonl", help='lines {"id": …, "image": path, …}')
    src.add_argument(
        "--shards", metavar="GLOB", help="webdataset tar shards, a quoted glob, e.g. 'data/*.tar'"
    )
    p.add_argument(
        "--embeddings", metavar="FILE.npy", help="bring descriptors (rows in input order); no model"
    )
    p.add_argument("--weights", metavar="PATH", help="SSCD torchscript file or state dict")
    p.add_argument("--random-init", action="store_true", help="random SSCD weights (testing only)")
    p.add_argument(
        "--threshold", type=float, required=True, help="cosine similarity for duplicates (SSCD: 0.75)"
    )
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--method", choices=["clusters", "ivf", "exact"], default="clusters")
    p.add_argument("--n-clusters", type=int, default=None, help="k-means clusters / IVF lists (default 4·√n)")
    p.add_argument("--nprobe-assign", type=int, default=2, help="clusters: centroids per vector (≥2)")
    p.add_argument("--nprobe", type=int, default=16, help="ivf: lists probed per query")
    p.add_argument("--k", type=int, default=32, help="ivf: initial neighbours per query")
    p.add_argument("--kmeans-iters", type=int, default=10)
    p.add_argument("--refine-passes", type=int, default=2, help="full-data Lloyd steps after k-means")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--resize", choices=["square", "short"], default="square", help="SSCD: 320² or short edge 288"
    )
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--decode-threads", type=int, default=4)
    p.add_argument("--shard-size", type=int, default=10_000, help="records per work shard (folder/manifest)")
    p.add_argument("--work-dir", default=None, help="embedding shards (default OUT/embeddings)")
    p.add_argument("--device", default=None)
    p.add_argument(
        "--wait-timeout", type=float, default=86400.0, help="rank 0: seconds to wait for other ranks"
    )
    p.add_argument("--contact-groups", type=int, default=8)
    p.add_argument(
        "--search", choices=["auto", "single", "sharded"], default="auto",
        help="sharded: every search stage on every torchrun rank (docs/data.md); single: rank 0 alone; "
        "auto: sharded when WORLD_SIZE > 1 and --method clusters",
    )  # fmt: skip
    p.add_argument("--shard-rows", type=int, default=65536, help="sharded + --embeddings: rows per shard")
    p.add_argument("--no-progress", action="store_true")


# ------------------------------------------------------------------------------- dedup-text, filter-text
def cmd_dedup_text(args: argparse.Namespace) -> int:
    """`herd.data.curation.text_dedup.dedup_text`: URL, MinHash-LSH and line dedup."""
    require("datasketch")
    from herd.data.curation.text_dedup import TextDedupConfig, dedup_text

    cfg = TextDedupConfig(
        text_field=args.text_field, url_field=args.url_field, timestamp_field=args.timestamp_field,
        stages=tuple(s.strip() for s in args.stages.split(",") if s.strip()), num_perm=args.num_perm,
        shingle_size=args.shingle_size, lsh_threshold=args.lsh_threshold, seed=args.seed,
        line_bucket=args.line_bucket, line_max_repeats=args.line_max_repeats, chunk_size=args.chunk_size,
        out_format=args.format, write_rejects=not args.no_rejects, progress=not args.no_progress,
    )  # fmt: skip
    if not args.sharded:
        return print_summary(dedup_text(args.input, args.out, cfg), TEXT_SUMMARY)
    from herd.data.curation.sharded_text_dedup import dedup_text_sharded, shard_env

    env_rank, env_world = shard_env()
    rank = env_rank if args.rank is None else args.rank
    world = env_world if args.world is None else args.world
    report = dedup_text_sharded(args.input, args.out, cfg, rank, world, wait_timeout_s=args.wait_timeout)
    if report is None:  # rank > 0: its shards are done, rank 0 merges the report
        print(json.dumps({"rank": rank, "world": world, "done": True}))
        return 0
    return print_summary(report, TEXT_SUMMARY)


def _thresholds(text: str) -> dict[int, float]:
    """`--dup-ngram` "5:0.15,6:0.14" → {5: 0.15, 6: 0.14}; '' disables the filter."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        n, _, v = part.partition(":")
        try:
            out[int(n)] = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected n:max_coverage pairs like 5:0.15, got {part!r}"
            ) from None
    return out


def cmd_filter_text(args: argparse.Namespace) -> int:
    """`herd.data.curation.text_filters.filter_text`: duplicated n-grams, dirty words, token KL."""
    from herd.data.curation.text_filters import FilterConfig, ReferenceDistribution, filter_text

    if args.max_kl is not None and args.reference_dist is None:
        raise UsageError("--max-kl needs --reference-dist")
    dirty: list[str] = []
    if args.dirty_words:
        lines = Path(args.dirty_words).read_text(encoding="utf-8").splitlines()
        dirty = [ln.strip() for ln in lines if ln.strip()]
    ref = None
    if args.reference_dist:
        ref = ReferenceDistribution.load(args.reference_dist, args.text_field, alpha=args.kl_alpha)
    language = None
    if args.languages is not None:
        from herd.data.curation.language_id import LanguageIdConfig, build_detector

        language = LanguageIdConfig(
            keep=_codes(args.languages), min_confidence=args.min_language_confidence,
            candidates=_codes(args.language_candidates) or None, low_accuracy=args.language_low_accuracy,
        )  # fmt: skip
        build_detector(language)  # a bad language code stops here, before any work
    cfg = FilterConfig(
        text_field=args.text_field, dup_ngram_thresholds=args.dup_ngram, dirty_words=dirty,
        max_dirty_words=args.max_dirty_words, reference=ref, max_kl=args.max_kl, min_words=args.min_words,
        language=language, chunk_size=args.chunk_size, out_format=args.format, write_rejects=not args.no_rejects,
        progress=not args.no_progress,
    )  # fmt: skip
    return print_summary(filter_text(args.input, args.out, cfg), (*TEXT_SUMMARY, "languages"))


def _codes(text: str | None) -> list[str]:
    return [c.strip() for c in (text or "").split(",") if c.strip()]


def _add_text_io(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input", nargs="+", required=True, metavar="FILE", help="jsonl(.gz) / parquet files, in order"
    )
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--text-field", default="text")
    p.add_argument("--chunk-size", type=int, default=100_000, help="records per checkpoint")
    p.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl", help="output parts")
    p.add_argument("--no-rejects", action="store_true", help="do not write rejects.jsonl")
    p.add_argument("--no-progress", action="store_true")


def _add_text_commands(group: Any) -> None:
    p = add_command(
        group, "dedup-text", cmd_dedup_text, help="URL, MinHash-LSH and line-level dedup of a text corpus"
    )
    _add_text_io(p)
    p.add_argument("--url-field", default="url")
    p.add_argument("--timestamp-field", default="timestamp")
    p.add_argument("--stages", default="url,minhash,lines", help="comma list of url, minhash, lines")
    p.add_argument("--num-perm", type=int, default=128)
    p.add_argument("--shingle-size", type=int, default=5, help="words per shingle")
    p.add_argument("--lsh-threshold", type=float, default=0.8, help="Jaccard threshold of MinHash LSH")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--line-bucket", type=int, default=30_000_000, help="documents per line-dedup bucket")
    p.add_argument("--line-max-repeats", type=int, default=6, help="drop lines seen more often per bucket")
    p.add_argument(
        "--sharded", action="store_true",
        help="stages over input files on many ranks (torchrun or a Slurm array; docs/data.md)",
    )  # fmt: skip
    p.add_argument("--rank", type=int, default=None, help="--sharded: this rank (default: from the launcher)")
    p.add_argument("--world", type=int, default=None, help="--sharded: number of ranks (default: launcher)")
    p.add_argument(
        "--wait-timeout", type=float, default=7 * 86400.0, help="--sharded: seconds to wait for ranks"
    )

    p = add_command(
        group,
        "filter-text",
        cmd_filter_text,
        help="heuristic filters: duplicated n-grams, dirty words, token KL",
    )
    _add_text_io(p)
    p.add_argument(
        "--dup-ngram", type=_thresholds, default="5:0.15,6:0.14,7:0.13,8:0.12,9:0.11,10:0.10",
        help="n:max_coverage list (Gopher defaults); '' disables",
    )  # fmt: skip
    p.add_argument("--dirty-words", metavar="FILE", help="one word or phrase per line")
    p.add_argument("--max-dirty-words", type=int, default=0, help="remove documents with more occurrences")
    p.add_argument("--reference-dist", metavar="FILE", help="{word: count} .json, or a jsonl/parquet corpus")
    p.add_argument(
        "--max-kl", type=float, default=None, help="remove documents with KL(doc‖ref) above (nats)"
    )
    p.add_argument("--kl-alpha", type=float, default=1.0, help="add-α smoothing of the reference")
    p.add_argument("--min-words", type=int, default=1)
    p.add_argument(
        "--languages",
        metavar="CODES",
        help="language ID stage (Lingua): keep these ISO 639-1 codes, e.g. en,de",
    )
    p.add_argument(
        "--min-language-confidence", type=float, default=0.5, help="below: low_language_confidence"
    )
    p.add_argument(
        "--language-candidates", metavar="CODES", help="languages to choose among (default all 75)"
    )
    p.add_argument("--language-low-accuracy", action="store_true", help="Lingua's faster low-accuracy mode")


# ------------------------------------------------------------------------------ filter-clip, resample
def cmd_filter_clip(args: argparse.Namespace) -> int:
    """`herd.data.curation.clip_filter.filter_clip` with a local open_clip model."""
    require("open_clip", hint="pip install 'herd[data]' open_clip_torch")
    from herd.data.curation.clip_filter import filter_clip, load_clip
    from herd.data.curation.embed import default_device
    from herd.data.curation.image_sources import make_source

    if args.pretrained is None and not args.random_init:
        raise UsageError("give --pretrained PATH (local open_clip weights) or --random-init")
    device = args.device or default_device()
    model, preprocess, tokenizer = load_clip(
        args.model,
        args.pretrained,
        model_config=args.model_config,
        random_init=args.random_init,
        device=device,
    )
    source = make_source(manifest=args.manifest, shards=args.shards)
    report = filter_clip(
        source, args.out, model, preprocess, tokenizer, args.threshold, text_field=args.text_field,
        batch_size=args.batch_size, decode_threads=args.decode_threads, device=device,
        progress=not args.no_progress,
    )  # fmt: skip
    return print_summary(report, ("pairs", "kept", "removed", "pairs_per_s"))


def cmd_resample(args: argparse.Namespace) -> int:
    """`herd.data.curation.ngram_resample.resample_jsonl` against a vocabulary of high-quality texts."""
    from herd.data.curation.ngram_resample import build_vocabulary, read_vocabulary_texts, resample_jsonl

    vocab = build_vocabulary(read_vocabulary_texts(args.vocab_texts), args.max_n, args.min_vocab_count)
    report = resample_jsonl(
        args.captions, args.out, vocab, args.threshold, max_n=args.max_n, text_field=args.text_field,
        id_field=args.id_field, seed=args.seed, keep_unmatched=args.keep_unmatched,
    )  # fmt: skip
    return print_summary(
        report, ("captions", "kept", "kept_fraction", "expected_kept_fraction", "bad_records")
    )


def _add_caption_commands(group: Any) -> None:
    p = add_command(
        group, "filter-clip", cmd_filter_clip, help="drop image-text pairs with low CLIP score (open_clip)"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", metavar="FILE.jsonl", help='lines {"id", "image", "caption", …}')
    src.add_argument("--shards", metavar="GLOB", help="webdataset tar shards (image + txt/json)")
    p.add_argument("--model", required=True, help="open_clip architecture name, e.g. ViT-B-32")
    p.add_argument("--pretrained", metavar="PATH", help="local weights file (never downloaded)")
    p.add_argument(
        "--model-config", metavar="JSON", help="custom architecture config, registered by file stem"
    )
    p.add_argument("--random-init", action="store_true", help="random weights (testing only)")
    p.add_argument("--threshold", type=float, required=True, help="minimum cosine(image, text)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--text-field", default=None, help="caption field (default: caption, text or txt)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--decode-threads", type=int, default=4)
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")

    p = add_command(
        group, "resample", cmd_resample, help="n-gram frequency resampling of image-text captions (§7.1)"
    )
    p.add_argument("--captions", required=True, metavar="FILE.jsonl")
    p.add_argument(
        "--vocab-texts", required=True, metavar="FILE.txt", help="high-quality texts, one per line"
    )
    p.add_argument("--threshold", type=float, required=True, help="T: n-grams rarer than this keep the pair")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--max-n", type=int, default=3)
    p.add_argument("--min-vocab-count", type=int, default=1)
    p.add_argument("--text-field", default="caption")
    p.add_argument("--id-field", default="id")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-unmatched", action="store_true", help="keep captions with no vocabulary n-gram")


# ---------------------------------------------------------------------------------------- filter-videos
def cmd_filter_videos(args: argparse.Namespace) -> int:
    """`herd.data.curation.motion.filter_videos`: drop videos whose motion score is below a threshold."""
    require("av", hint="pip install 'herd[video]'")
    from herd.data.curation.motion import filter_videos

    report = filter_videos(
        args.out, args.threshold, manifest=args.manifest, videos=args.videos, num_frames=args.num_frames,
        backend=args.backend, bins=args.bins,
    )  # fmt: skip
    return print_summary(
        report, ("videos", "kept", "removed", "bad_files", "bad_records", "score", "histogram_png")
    )


def _add_filter_videos(group: Any) -> None:
    p = add_command(
        group,
        "filter-videos",
        cmd_filter_videos,
        help="drop low-motion videos (motion score: mean |frame difference| of sampled frames, §7.1)",
        description="Score each video by the mean absolute difference between consecutive uniformly sampled "
        "grayscale frames (in [0, 1]; static ≈ 0), keep those at or above --threshold; writes kept.jsonl, "
        "removed.jsonl, report.json and motion_hist.png to --out (docs/video.md).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", metavar="FILE.jsonl", help='lines {"video": relpath, …}')
    src.add_argument(
        "--videos",
        nargs="+",
        metavar="PATH",
        help="video files, or folders (their .mp4/.webm/.mkv/.avi/.mov)",
    )
    p.add_argument("--threshold", type=float, required=True, help="minimum motion score, in [0, 1]")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--num-frames", type=int, default=16, help="frames sampled uniformly per video")
    p.add_argument("--backend", choices=["auto", "decord", "pyav"], default="auto")
    p.add_argument("--bins", type=int, default=20, help="histogram bins")


def register(sub: Any) -> None:
    """Add the `data` family to the top-level subparsers."""
    group = add_group(
        sub, "data", "tokenize corpora; dedup and filter text and images; resample captions; filter videos"
    )
    from herd.commands.data_curation import add_curate_sft

    for add in (
        _add_tokenize,
        _add_dedup_images,
        _add_text_commands,
        _add_caption_commands,
        _add_filter_videos,
        add_curate_sft,
    ):
        add(group)
