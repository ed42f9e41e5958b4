"""Benchmark: sharded text dedup (URL + MinHash + lines) on 1, 2, 4 CPU ranks vs the single process (JSON).

    .venv/bin/python benchmarks/text_dedup_sharded.py --docs 20000 --files 8 --worlds 1 2 4

Corpus: benchmarks/text_dedup.py's synthetic corpus (Zipf words, 10% near-duplicates), with every
tenth document's URL re-published later (URL dedup has work to do), split into `--files` jsonl files
(the shards). Each world size runs its ranks as separate `spawn` processes synchronised only through
the filesystem markers, as a Slurm array would; wall time includes process start. The output records
must equal `herd data dedup-text`'s single-process run. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from text_dedup import make_corpus  # noqa: E402


def _cfg():
    from herd.data.curation.text_dedup import TextDedupConfig

    return TextDedupConfig(progress=False, chunk_size=5000, line_bucket=5000)


def _rank(rank: int, world: int, inputs: list[str], out: str) -> None:
    from herd.data.curation.sharded_dup_search import rank_peak_rss_mb
    from herd.data.curation.sharded_text_dedup import dedup_text_sharded

    base = rank_peak_rss_mb()  # VmHWM: ru_maxrss would include the parent's peak
    dedup_text_sharded(inputs, out, _cfg(), rank, world, poll_s=0.2)
    peak = rank_peak_rss_mb()
    Path(out, f"rss_{rank}.json").write_text(json.dumps({"baseline": base, "peak": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=20_000)
    ap.add_argument("--words", type=int, default=300)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()

    from herd.data.curation.text_dedup import dedup_text
    from herd.data.records import read_parts, write_jsonl

    docs, _ = make_corpus(args.docs, args.words, 0.1, 0)
    for i, d in enumerate(docs):
        if i % 10 == 0:
            d["url"] = f"https://example.org/{i // 2}"  # collides with document i // 2's URL
    res: dict = {"docs": len(docs), "files": args.files, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        per = -(-len(docs) // args.files)
        inputs = [str(Path(tmp) / f"in{f:03d}.jsonl") for f in range(args.files)]
        for f, path in enumerate(inputs):
            write_jsonl(path, docs[f * per : (f + 1) * per])
        t0 = time.perf_counter()
        ref = dedup_text(inputs, Path(tmp) / "single", _cfg())
        single_s = time.perf_counter() - t0
        want = list(read_parts(ref["output_parts"]))
        res["single"] = {"wall_s": round(single_s, 1), "docs_per_s": round(len(docs) / single_s, 1),
                         "output_records": ref["output_records"], "removed": ref["removed"]}  # fmt: skip
        ctx = mp.get_context("spawn")
        for world in args.worlds:
            out = Path(tmp) / f"w{world}"
            t0 = time.perf_counter()
            procs = [ctx.Process(target=_rank, args=(r, world, inputs, str(out))) for r in range(world)]
            [p.start() for p in procs]
            [p.join() for p in procs]
            wall = time.perf_counter() - t0
            rep = json.loads((out / "report.json").read_text())
            rss = [json.loads((out / f"rss_{r}.json").read_text()) for r in range(world)]
            stages = rep["sharded"]["ranks"]
            res[f"sharded_w{world}"] = {
                "wall_s_with_start": round(wall, 1), "docs_per_s": round(len(docs) / wall, 1),
                "equal_to_single": list(read_parts(rep["output_parts"])) == want and rep["removed"] == ref["removed"],
                "stage_s_per_rank": [{k[:-2]: v for k, v in s.items() if k.endswith("_s")} for s in stages],
                "peak_rss_mb_per_rank": [round(r["peak"], 1) for r in rss],
                "peak_rss_mb_above_baseline_per_rank": [round(r["peak"] - r["baseline"], 1) for r in rss],
            }  # fmt: skip
    res["loadavg"] = os.getloadavg()
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
