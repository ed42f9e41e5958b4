"""`herd dedup images|text`, `herd filter text|clip`, `herd resample` — data preparation commands.

`add_parsers(subparsers)` registers them on the top-level `herd` parser; every leaf sets
`func(args) -> int` (0 on success; a JSON summary is printed). Heavy libraries (torch, faiss,
open_clip, datasketch, pyarrow) are imported inside the commands, with an install hint if missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

_EXTRA_HINT = "pip install 'herd[data]'"


def _require(*modules: str, hint: str = _EXTRA_HINT) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"this command needs {', '.join(missing)}: {hint}")


def _summary(report: dict[str, Any], keys: tuple[str, ...]) -> int:
    print(json.dumps({k: report.get(k) for k in keys}, indent=2, default=str))
    return 0


# ------------------------------------------------------------------------------------ dedup images


def cmd_dedup_images(args: argparse.Namespace) -> int:
    _require("faiss", "scipy")
    from herd.data.curation.embed import EmbedConfig, default_device, dist_env
    from herd.data.curation.image_dedup import dedup_images
    from herd.data.curation.image_sources import make_source
    from herd.data.curation.near_dup_search import SearchConfig

    rank, world = dist_env()
    source = make_source(args.images, args.manifest, args.shards, shard_size=args.shard_size)
    search = SearchConfig(
        threshold=args.threshold, method=args.method, n_clusters=args.n_clusters,
        nprobe_assign=args.nprobe_assign, nprobe=args.nprobe, k=args.k, kmeans_iters=args.kmeans_iters,
        refine_passes=args.refine_passes, seed=args.seed,
    )  # fmt: skip
    model, embed_cfg = None, None
    if args.embeddings is None:
        if args.weights is None and not args.random_init:
            raise SystemExit(
                "give --weights (e.g. sscd_disc_mixup.torchscript.pt), --embeddings, or --random-init"
            )
        from herd.data.curation.sscd import load_sscd

        device = args.device or default_device()
        weights = None if args.random_init else args.weights
        model = lambda: load_sscd(weights, device=device)  # built only if some shard still needs embedding
        embed_cfg = EmbedConfig(
            batch_size=args.batch_size, resize=args.resize, image_size=args.image_size,
            decode_threads=args.decode_threads, device=device, progress=not args.no_progress,
        )  # fmt: skip
    report = dedup_images(
        source, args.out, search, embeddings=args.embeddings, model=model, embed_cfg=embed_cfg,
        work_dir=args.work_dir, rank=rank, world=world, wait_timeout_s=args.wait_timeout,
        contact_groups=args.contact_groups,
    )  # fmt: skip
    if report is None:  # rank > 0: embedding done, rank 0 searches
        print(json.dumps({"rank": rank, "world": world, "embedded": True}))
        return 0
    return _summary(report, ("records", "pairs", "groups", "removed", "kept", "largest_groups", "embed"))


def _add_dedup_images(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("images", help="near-duplicate image removal (SSCD descriptors + faiss)")
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
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_dedup_images)


# -------------------------------------------------------------------------------------- dedup text


def cmd_dedup_text(args: argparse.Namespace) -> int:
    _require("datasketch")
    from herd.data.curation.text_dedup import TextDedupConfig, dedup_text

    cfg = TextDedupConfig(
        text_field=args.text_field, url_field=args.url_field, timestamp_field=args.timestamp_field,
        stages=tuple(s.strip() for s in args.stages.split(",") if s.strip()), num_perm=args.num_perm,
        shingle_size=args.shingle_size, lsh_threshold=args.lsh_threshold, seed=args.seed,
        line_bucket=args.line_bucket, line_max_repeats=args.line_max_repeats, chunk_size=args.chunk_size,
        out_format=args.format, write_rejects=not args.no_rejects, progress=not args.no_progress,
    )  # fmt: skip
    report = dedup_text(args.input, args.out, cfg)
    return _summary(report, ("input_records", "output_records", "bad_records", "removed"))


def _add_io(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input", nargs="+", required=True, metavar="FILE", help="jsonl(.gz) / parquet files, in order"
    )
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--text-field", default="text")
    p.add_argument("--chunk-size", type=int, default=100_000, help="records per checkpoint")
    p.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl", help="output parts")
    p.add_argument("--no-rejects", action="store_true", help="do not write rejects.jsonl")
    p.add_argument("--no-progress", action="store_true")


def _add_dedup_text(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("text", help="URL, MinHash-LSH and line-level dedup of a text corpus")
    _add_io(p)
    p.add_argument("--url-field", default="url")
    p.add_argument("--timestamp-field", default="timestamp")
    p.add_argument("--stages", default="url,minhash,lines", help="comma list of url, minhash, lines")
    p.add_argument("--num-perm", type=int, default=128)
    p.add_argument("--shingle-size", type=int, default=5, help="words per shingle")
    p.add_argument("--lsh-threshold", type=float, default=0.8, help="Jaccard threshold of MinHash LSH")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--line-bucket", type=int, default=30_000_000, help="documents per line-dedup bucket")
    p.add_argument("--line-max-repeats", type=int, default=6, help="drop lines seen more often per bucket")
    p.set_defaults(func=cmd_dedup_text)


# ------------------------------------------------------------------------------------- filter text


def _parse_thresholds(s: str) -> dict[int, float]:
    if not s.strip():
        return {}
    out = {}
    for part in s.split(","):
        n, _, v = part.partition(":")
        out[int(n)] = float(v)
    return out


def cmd_filter_text(args: argparse.Namespace) -> int:
    from herd.data.curation.text_filters import FilterConfig, ReferenceDistribution, filter_text

    dirty: list[str] = []
    if args.dirty_words:
        dirty = [
            ln.strip() for ln in Path(args.dirty_words).read_text(encoding="utf-8").splitlines() if ln.strip()
        ]
    ref = None
    if args.reference_dist:
        ref = ReferenceDistribution.load(args.reference_dist, args.text_field, alpha=args.kl_alpha)
    if args.max_kl is not None and ref is None:
        raise SystemExit("--max-kl needs --reference-dist")
    cfg = FilterConfig(
        text_field=args.text_field, dup_ngram_thresholds=_parse_thresholds(args.dup_ngram), dirty_words=dirty,
        max_dirty_words=args.max_dirty_words, reference=ref, max_kl=args.max_kl, min_words=args.min_words,
        chunk_size=args.chunk_size, out_format=args.format, write_rejects=not args.no_rejects,
        progress=not args.no_progress,
    )  # fmt: skip
    report = filter_text(args.input, args.out, cfg)
    return _summary(report, ("input_records", "output_records", "bad_records", "removed"))


def _add_filter_text(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("text", help="heuristic filters: duplicated n-grams, dirty words, token KL")
    _add_io(p)
    p.add_argument(
        "--dup-ngram", default="5:0.15,6:0.14,7:0.13,8:0.12,9:0.11,10:0.10",
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
    p.set_defaults(func=cmd_filter_text)


# ------------------------------------------------------------------------------------- filter clip


def cmd_filter_clip(args: argparse.Namespace) -> int:
    _require("open_clip", hint="pip install 'herd[data]' open_clip_torch")
    from herd.data.curation.clip_filter import filter_clip, load_clip
    from herd.data.curation.embed import default_device
    from herd.data.curation.image_sources import make_source

    if args.pretrained is None and not args.random_init:
        raise SystemExit("give --pretrained PATH (local open_clip weights) or --random-init")
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
    return _summary(report, ("pairs", "kept", "removed", "pairs_per_s"))


def _add_filter_clip(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("clip", help="drop image-text pairs with low CLIP score (open_clip)")
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
    p.set_defaults(func=cmd_filter_clip)


# ---------------------------------------------------------------------------------------- resample


def cmd_resample(args: argparse.Namespace) -> int:
    from herd.data.curation.ngram_resample import build_vocabulary, read_vocabulary_texts, resample_jsonl

    vocab = build_vocabulary(read_vocabulary_texts(args.vocab_texts), args.max_n, args.min_vocab_count)
    report = resample_jsonl(
        args.captions, args.out, vocab, args.threshold, max_n=args.max_n, text_field=args.text_field,
        id_field=args.id_field, seed=args.seed, keep_unmatched=args.keep_unmatched,
    )  # fmt: skip
    return _summary(report, ("captions", "kept", "kept_fraction", "expected_kept_fraction", "bad_records"))


def _add_resample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("resample", help="n-gram frequency resampling of image-text captions (§7.1)")
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
    p.set_defaults(func=cmd_resample)


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register `dedup`, `filter` and `resample` on the top-level subparsers of `herd`."""
    dedup = subparsers.add_parser("dedup", help="image / text deduplication")
    dsub = dedup.add_subparsers(dest="dedup_command", required=True, metavar="{images,text}")
    _add_dedup_images(dsub)
    _add_dedup_text(dsub)
    filt = subparsers.add_parser("filter", help="text heuristics / CLIP-score filtering")
    fsub = filt.add_subparsers(dest="filter_command", required=True, metavar="{text,clip}")
    _add_filter_text(fsub)
    _add_filter_clip(fsub)
    _add_resample(subparsers)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m herd.data.cli …`) until the commands are wired into `herd`."""
    ap = argparse.ArgumentParser(prog="herd")
    add_parsers(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
