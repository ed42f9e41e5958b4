"""Text dedup (URL, MinHash, lines) split into stages over input shards and ranks, datatrove-style.

No process holds the whole index. Shards are the input files (file F belongs to rank F % world);
a document's key is (F << 40) | its index among F's valid records, which sorts like today's global
ordinal. Stages, each a set of per-file / per-rank files written atomically under `OUT/_sharded`:

  sign     per file: MinHash signature (the single-process stage's vectorised affine32 MinHash), URL
           hash + timestamp; each LSH band slice is routed to rank hash(band, slice) % world and each
           URL to rank url_hash % world (`route/`), so later stages read only their partition
  url      per rank: newest version of each URL in its partition wins (ties: the earlier document)
  buckets  per rank: documents grouped by exact (band, slice) — datasketch's bucket key — and the
           buckets with ≥2 documents written as (bucket, document) pairs
  resolve  rank 0 alone, over the small collision lists: the single-process rule, replayed in
           document order — a document is removed when it shares a bucket with an earlier *kept*
           document (dup_of = the smallest such). This greedy sweep, not plain union-find, is what
           `MinHashLSH.query`-then-`insert` does (A~B, B~C, A≁C keeps A and C), so results are equal.
  lines    per file: counts of (line bucket, line hash) of the surviving documents, routed to rank
           hash % world; per rank: (bucket, hash) seen more than `line_max_repeats` times
  filter   per file: output part and rejects; rank 0 merges the report

Synchronisation is by done-markers on the shared filesystem (no process group), so the same code runs
under torchrun (RANK / WORLD_SIZE) or as a Slurm array (SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT);
a restarted rank skips every file it already wrote.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from herd.data.curation.text_dedup import (
    _WORD,
    ShingleHasher,
    TextDedupConfig,
    _fmix64,
    _h64,
    minhash_values,
    normalise_url,
    parse_timestamp,
)
from herd.data.curation.text_pipeline import _PartSink, concat_rejects, validate
from herd.data.records import RecordReader, atomic_save_npy, atomic_write, atomic_write_json, dumps

KEY_BITS = 40  # up to 2^40 valid records per input file, 2^23 files


def shard_env() -> tuple[int, int]:
    """(rank, world): torchrun's RANK/WORLD_SIZE, else a Slurm array task, else Slurm tasks, else (0, 1)."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return int(env.get("RANK", 0)), int(env["WORLD_SIZE"])
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
    if "SLURM_NTASKS" in env:
        return int(env.get("SLURM_PROCID", 0)), int(env["SLURM_NTASKS"])
    return 0, 1


def _mix(cols: np.ndarray) -> np.ndarray:
    """(e,) uint64 hash of each row of an (e, c) uint64 array (routing only; buckets compare exactly)."""
    h = np.zeros(len(cols), np.uint64)
    with np.errstate(over="ignore"):
        for c in range(cols.shape[1]):
            h = _fmix64(h * np.uint64(0x100000001B3) + cols[:, c] + np.uint64(1))
    return h


class ShardedTextDedup:
    def __init__(
        self, inputs: list[str | Path], out_dir: str | Path, cfg: TextDedupConfig, rank: int, world: int,
        wait_timeout_s: float = 7 * 86400.0, poll_s: float = 2.0,
    ):  # fmt: skip
        unknown = set(cfg.stages) - {"url", "minhash", "lines"}
        if unknown or not cfg.stages:
            raise ValueError(f"stages must be among url, minhash, lines (got {cfg.stages})")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        self.inputs, self.cfg, self.rank, self.world = [Path(p) for p in inputs], cfg, rank, world
        RecordReader(self.inputs)  # existence check with the usual errors
        self.out = Path(out_dir)
        self.work = self.out / "_sharded"
        self.timeout, self.poll = wait_timeout_s, poll_s
        self.mine = list(range(rank, len(self.inputs), world))
        self.stats: dict[str, Any] = {"rank": rank, "world": world, "stages": {}}
        self.dedup_pass = "url" in cfg.stages or "minhash" in cfg.stages
        if "minhash" in cfg.stages:
            from datasketch import MinHash, MinHashLSH

            self.perms = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme="affine32").permutations
            self.bands = MinHashLSH(threshold=cfg.lsh_threshold, num_perm=cfg.num_perm).hashranges

    # ---------------------------------------------------------------------------- bookkeeping
    def _p(self, *parts: str) -> Path:
        return self.work.joinpath(*parts)

    def _check_plan(self) -> None:
        plan = {"inputs": [str(p) for p in self.inputs], "world": self.world,
                "config": {k: v for k, v in self.cfg.__dict__.items() if k != "progress"} | {"stages": list(self.cfg.stages)}}  # fmt: skip
        path = self._p("plan.json")
        if path.is_file():
            if json.loads(path.read_text()) != json.loads(json.dumps(plan)):
                raise ValueError(f"{path}: this work folder was started with other inputs/settings/world")
        elif self.rank == 0:
            atomic_write_json(path, plan)

    def _wait(self, paths: list[Path], what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not all(p.is_file() for p in paths):
            if time.monotonic() > deadline:
                missing = [str(p.relative_to(self.work)) for p in paths if not p.is_file()]
                raise TimeoutError(f"waited {self.timeout:.0f}s for {what}: missing {missing[:5]}")
            time.sleep(self.poll)

    def _stage(self, name: str, body: Callable[[], None], everyone: bool = True) -> None:
        """Run `body` unless this rank's marker exists, then wait for every rank's marker."""
        mine = self._p("done", f"{name}_r{self.rank:04d}")
        t0 = time.perf_counter()
        if mine.is_file():
            self.stats["stages"][name] = "skipped"
        else:
            body()
            mine.parent.mkdir(parents=True, exist_ok=True)
            mine.touch()
            self.stats["stages"][name] = "ran"
            self.stats[f"{name}_s"] = round(time.perf_counter() - t0, 3)
        if everyone:
            self._wait([self._p("done", f"{name}_r{r:04d}") for r in range(self.world)], f"stage {name}")

    def _valid(self, f: int):
        """(index among valid records, record, None) or (None, None, Item) for a bad one, in file order."""
        i = 0
        for it in RecordReader([self.inputs[f]]):
            rec, why = validate(it, self.cfg.text_field)
            if rec is None:
                yield None, why, it
                continue
            yield i, rec, it
            i += 1

    # ------------------------------------------------------------------------------------ sign
    def _sign(self) -> None:
        for f in self.mine:
            if self._p("sign", f"f{f:05d}.json").is_file():
                continue
            self._sign_file(f)

    def _sign_file(self, f: int) -> None:
        cfg = self.cfg
        hasher = ShingleHasher(cfg.shingle_size)
        url_h, url_ts, sigs, sig_keys = [], [], [], []
        bad, stats, n = Counter(), Counter(), 0
        for i, rec, _ in self._valid(f):
            if i is None:
                bad[rec or "bad"] += 1
                continue
            n += 1
            key = (f << KEY_BITS) | i
            if "url" in cfg.stages:
                url = rec.get(cfg.url_field)
                if isinstance(url, str) and url.strip():
                    ts = parse_timestamp(rec.get(cfg.timestamp_field))
                    if ts is None:
                        stats["bad_timestamp"] += 1
                        ts = -np.inf  # an undated copy loses to any dated one
                    url_h.append(_h64(normalise_url(url)) or 1)
                    url_ts.append((ts, key))
                else:
                    stats["no_url"] += 1
            if "minhash" in cfg.stages and _WORD.search(rec[cfg.text_field]):
                sigs.append(minhash_values(hasher(rec[cfg.text_field]), self.perms))
                sig_keys.append(key)
        if "url" in cfg.stages:
            h = np.array(url_h, np.uint64)
            ts = np.array([t for t, _ in url_ts], np.float64)
            keys = np.array([k for _, k in url_ts], np.int64)
            for r in range(self.world):
                sel = h % np.uint64(self.world) == r
                with atomic_write(self._p("route", f"url_f{f:05d}_r{r:04d}.npz"), "wb") as fh:
                    np.savez(fh, h=h[sel], ts=ts[sel], key=keys[sel])
        if "minhash" in cfg.stages:
            sig = np.array(sigs, np.uint64).reshape(len(sigs), cfg.num_perm)  # (docs, num_perm)
            keys = np.array(sig_keys, np.int64)
            rows = []  # one row per (document, band): [band, key, slice...] as uint64
            for b, (s0, s1) in enumerate(self.bands):
                rows.append(
                    np.column_stack([np.full(len(sig), b, np.uint64), keys.astype(np.uint64), sig[:, s0:s1]])
                )
            ent = np.concatenate(rows) if rows else np.zeros((0, 2), np.uint64)
            owner = _mix(np.delete(ent, 1, axis=1)) % np.uint64(self.world)
            for r in range(self.world):
                atomic_save_npy(self._p("route", f"bands_f{f:05d}_r{r:04d}.npy"), ent[owner == r])
        atomic_write_json(self._p("sign", f"f{f:05d}.json"), {"valid": n, "bad": dict(bad), **stats})

    # -------------------------------------------------------------------------- url, buckets
    def _url(self) -> None:
        if "url" not in self.cfg.stages or self._p("url", f"losers_r{self.rank:04d}.npy").is_file():
            return
        parts = [
            np.load(self._p("route", f"url_f{f:05d}_r{self.rank:04d}.npz")) for f in range(len(self.inputs))
        ]
        h = np.concatenate([p["h"] for p in parts])
        ts = np.concatenate([p["ts"] for p in parts])
        key = np.concatenate([p["key"] for p in parts])
        order = np.lexsort((key, -ts, h))  # by url, newest first, then document order
        first = np.ones(len(h), bool)
        first[1:] = h[order][1:] != h[order][:-1]
        atomic_save_npy(self._p("url", f"losers_r{self.rank:04d}.npy"), np.sort(key[order[~first]]))

    def _buckets(self) -> None:
        if "minhash" not in self.cfg.stages or self._p("buckets", f"r{self.rank:04d}.npy").is_file():
            return
        ent = np.concatenate(
            [
                np.load(self._p("route", f"bands_f{f:05d}_r{self.rank:04d}.npy"))
                for f in range(len(self.inputs))
            ]
        )
        if len(ent):
            _, inv, counts = np.unique(
                np.delete(ent, 1, axis=1), axis=0, return_inverse=True, return_counts=True
            )
            inv = inv.ravel()
            multi = counts[inv] > 1
            pairs = np.column_stack([inv[multi], ent[multi, 1].astype(np.int64)])  # (bucket, key)
        else:
            pairs = np.zeros((0, 2), np.int64)
        atomic_save_npy(self._p("buckets", f"r{self.rank:04d}.npy"), pairs)

    # --------------------------------------------------------------------------------- resolve
    def _resolve(self) -> None:
        """Rank 0: URL losers + the greedy MinHash sweep over documents in colliding buckets."""
        if self.rank != 0 or self._p("resolve.npz").is_file():
            return
        losers = np.zeros(0, np.int64)
        if "url" in self.cfg.stages:
            losers = np.concatenate(
                [np.load(self._p("url", f"losers_r{r:04d}.npy")) for r in range(self.world)]
            )
        mh_keys, mh_dup = [], []
        if "minhash" in self.cfg.stages:
            per_rank = [np.load(self._p("buckets", f"r{r:04d}.npy")) for r in range(self.world)]
            offs = np.cumsum([0] + [int(p[:, 0].max()) + 1 if len(p) else 0 for p in per_rank])
            bp = np.concatenate([p + np.array([o, 0]) for p, o in zip(per_rank, offs[:-1])])
            bp = bp[~np.isin(bp[:, 1], losers)]  # URL losers never reach the MinHash stage
            bp = bp[np.lexsort((bp[:, 0], bp[:, 1]))]
            first_kept = np.full(int(offs[-1]), -1, np.int64)  # per bucket: its first kept document
            docs, starts = np.unique(bp[:, 1], return_index=True)
            for key, s0, s1 in zip(docs, starts, np.append(starts[1:], len(bp))):
                bids = bp[s0:s1, 0]
                hit = first_kept[bids]
                hit = hit[hit >= 0]
                if len(hit):
                    mh_keys.append(key)
                    mh_dup.append(hit.min())
                else:
                    first_kept[bids] = key
        with atomic_write(self._p("resolve.npz"), "wb") as fh:
            np.savez(
                fh, url=np.sort(losers), mh=np.array(mh_keys, np.int64), mh_dup=np.array(mh_dup, np.int64)
            )

    # ----------------------------------------------------------------------------------- lines
    def _removed(self) -> tuple[set[int], dict[int, int]]:
        """URL losers and MinHash removals (key → key of the kept document it duplicates)."""
        if not hasattr(self, "_rm"):
            url, mh = set(), {}
            if self.dedup_pass:
                z = np.load(self._p("resolve.npz"))
                url, mh = set(z["url"].tolist()), dict(zip(z["mh"].tolist(), z["mh_dup"].tolist()))
            self._rm = (url, mh)
        return self._rm

    def _offsets(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per file, what comes before it: valid records; surviving (URL + MinHash) records; and line-
        pass stream positions. The single-process line pass cuts its buckets by stream items: the
        survivors of the first pass, or — with no first pass — every input item, bad ones included."""
        n = len(self.inputs)
        signs = [json.loads(self._p("sign", f"f{f:05d}.json").read_text()) for f in range(n)]
        valid = np.array([s["valid"] for s in signs], np.int64)
        bad = np.array([sum(s["bad"].values()) for s in signs], np.int64)
        url, mh = self._removed()
        gone = np.bincount(np.array(sorted(url | set(mh)), np.int64) >> KEY_BITS, minlength=n)
        items = valid - gone + (0 if self.dedup_pass else bad)
        cum = lambda v: np.concatenate([[0], np.cumsum(v)])  # noqa: E731
        return cum(valid), cum(valid - gone), cum(items)

    def _line_counts(self) -> None:
        url, mh = self._removed()
        pos_off = self._offsets()[2]
        for f in self.mine:
            if self._p("lines", f"f{f:05d}.done").is_file():
                continue
            counts: Counter = Counter()
            pos = int(pos_off[f])  # position in the line pass' input stream
            for i, rec, _ in self._valid(f):
                if i is None:
                    pos += 0 if self.dedup_pass else 1
                    continue
                if (f << KEY_BITS) | i in url or (f << KEY_BITS) | i in mh:
                    continue
                b, pos = pos // self.cfg.line_bucket, pos + 1
                for line in rec[self.cfg.text_field].split("\n"):
                    if t := line.strip():
                        counts[(b, _h64(t))] += 1
            arr = np.array([(b, h, c) for (b, h), c in counts.items()], np.uint64).reshape(-1, 3)
            for r in range(self.world):
                atomic_save_npy(
                    self._p("route", f"lines_f{f:05d}_r{r:04d}.npy"),
                    arr[arr[:, 1] % np.uint64(self.world) == r],
                )
            atomic_write_json(self._p("lines", f"f{f:05d}.done"), {"entries": len(arr)})

    def _line_reduce(self) -> None:
        out = self._p("lines", f"frequent_r{self.rank:04d}.npy")
        if out.is_file():
            return
        arr = np.concatenate(
            [
                np.load(self._p("route", f"lines_f{f:05d}_r{self.rank:04d}.npy"))
                for f in range(len(self.inputs))
            ]
        )
        if len(arr):
            keys, inv = np.unique(arr[:, :2], axis=0, return_inverse=True)
            tot = np.bincount(inv.ravel(), weights=arr[:, 2].astype(np.float64))
            arr = keys[tot > self.cfg.line_max_repeats]
        atomic_save_npy(out, arr[:, :2].reshape(-1, 2))

    # ---------------------------------------------------------------------------------- filter
    def _filter(self) -> None:
        frequent: set[tuple[int, int]] = set()
        if "lines" in self.cfg.stages:
            for r in range(self.world):
                frequent |= set(map(tuple, np.load(self._p("lines", f"frequent_r{r:04d}.npy")).tolist()))
        for f in self.mine:
            if not self._p("filter", f"f{f:05d}.json").is_file():
                self._filter_file(f, frequent)

    def _filter_file(self, f: int, frequent: set[tuple[int, int]]) -> None:
        cfg = self.cfg
        url, mh = self._removed()
        valid_off, surv_off, pos_off = self._offsets()
        ordinal_of = lambda k: int(valid_off[k >> KEY_BITS]) + (k & ((1 << KEY_BITS) - 1))  # noqa: E731
        removed = {st: Counter() for st in ("url", "minhash", "lines") if st in cfg.stages}
        lines_ctr, bad, n_in, n_out = Counter(), Counter(), 0, 0
        part = self.out / f"part-{f:05d}.{cfg.out_format}"
        sink = _PartSink(part)
        rej = {w: atomic_write(self._p("rejects", f"{w}_f{f:05d}.jsonl")) for w in ("dedup", "lines")}
        fh = {w: cm.__enter__() for w, cm in rej.items()}
        s, pos = int(surv_off[f]), int(pos_off[f])  # line pass: record ordinal, stream position
        try:
            for i, rec, it in self._valid(f):
                if i is None:  # bad input: listed with the first pass, as the single-process run does
                    bad[rec or "bad"] += 1
                    pos += 0 if self.dedup_pass else 1
                    line = {"where": it.where, "reason": rec, "stage": "input"}
                    fh["dedup" if self.dedup_pass else "lines"].write(dumps(line) + "\n")
                    continue
                n_in += 1
                key, ordinal = (f << KEY_BITS) | i, int(valid_off[f]) + i
                base = {"id": rec.get("id"), "ordinal": ordinal}
                if key in url:
                    removed["url"]["older_url_version"] += 1
                    fh["dedup"].write(dumps({**base, "stage": "url", "reason": "older_url_version"}) + "\n")
                    continue
                if key in mh:
                    removed["minhash"]["near_duplicate"] += 1
                    line = {
                        **base,
                        "stage": "minhash",
                        "reason": "near_duplicate",
                        "dup_of_ordinal": ordinal_of(mh[key]),
                    }
                    fh["dedup"].write(dumps(line) + "\n")
                    continue
                if "lines" in cfg.stages:
                    rec, dropped = self._drop_lines(rec, pos // cfg.line_bucket, frequent, lines_ctr)
                    pos += 1
                    if rec is None:
                        removed["lines"]["empty_after_line_dedup"] += 1
                        line = {"id": base["id"], "ordinal": s, "stage": "lines", "reason": "empty_after_line_dedup",
                                "lines_removed": dropped}  # fmt: skip
                        fh["lines"].write(dumps(line) + "\n")
                        s += 1
                        continue
                    s += 1
                sink.write(rec)
                n_out += 1
        finally:
            sink.close()
            for cm in rej.values():
                cm.__exit__(None, None, None)
        if n_out == 0:
            part.unlink(missing_ok=True)
        atomic_write_json(self._p("filter", f"f{f:05d}.json"), {
            "input_records": n_in, "output_records": n_out, "bad_records": dict(bad),
            "removed": {k: dict(v) for k, v in removed.items()}, "lines": dict(lines_ctr),
        })  # fmt: skip

    def _drop_lines(
        self, rec: dict[str, Any], bucket: int, frequent: set, ctr: Counter
    ) -> tuple[dict[str, Any] | None, int]:
        """The single-process LineDedup.process with (bucket, stable line hash) counts: (record or
        None when nothing is left, lines dropped)."""
        kept, dropped = [], 0
        for line in rec[self.cfg.text_field].split("\n"):
            t = line.strip()
            if t and (bucket, _h64(t)) in frequent:
                dropped += 1
                ctr["chars_removed"] += len(line)
            else:
                kept.append(line)
        if not dropped:
            return rec, 0
        ctr["lines_removed"] += dropped
        ctr["documents_changed"] += 1
        text = "\n".join(kept)
        return (None if not text.strip() else {**rec, self.cfg.text_field: text}), dropped

    # ---------------------------------------------------------------------------------- driver
    def run(self) -> dict[str, Any] | None:
        """Every stage for this rank; rank 0 waits for all ranks and returns (and writes) the report."""
        t0 = time.perf_counter()
        self.work.mkdir(parents=True, exist_ok=True)
        self._check_plan()
        self._stage("sign", self._sign)
        if self.dedup_pass:
            self._stage("partition", lambda: (self._url(), self._buckets()))
            self._stage("resolve", self._resolve)
        if "lines" in self.cfg.stages:
            self._stage("line_counts", self._line_counts)
            self._stage("line_reduce", self._line_reduce)
        self._stage("filter", self._filter, everyone=False)
        self.stats["total_s"] = round(time.perf_counter() - t0, 3)
        atomic_write_json(self._p("rank_stats", f"r{self.rank:04d}.json"), self.stats)
        if self.rank != 0:
            return None
        self._wait([self._p("done", f"filter_r{r:04d}") for r in range(self.world)], "stage filter")
        return self._report()

    def _report(self) -> dict[str, Any]:
        n = len(self.inputs)
        tot: dict[str, Any] = {
            "input_records": 0,
            "output_records": 0,
            "bad_records": Counter(),
            "lines": Counter(),
        }
        removed: dict[str, Counter] = {}
        for f in range(n):
            c = json.loads(self._p("filter", f"f{f:05d}.json").read_text())
            tot["input_records"] += c["input_records"]
            tot["output_records"] += c["output_records"]
            tot["bad_records"].update(c["bad_records"])
            tot["lines"].update(c["lines"])
            for st, v in c["removed"].items():
                removed.setdefault(st, Counter()).update(v)
        sign = [json.loads(self._p("sign", f"f{f:05d}.json").read_text()) for f in range(n)]
        report: dict[str, Any] = {
            "inputs": [str(p) for p in self.inputs],
            "config": self.cfg.__dict__ | {"stages": list(self.cfg.stages)},
            "input_records": tot["input_records"], "bad_records": dict(tot["bad_records"]),
            "output_records": tot["output_records"], "removed": {k: dict(v) for k, v in removed.items()},
            "output_parts": [str(self.out / f"part-{f:05d}.{self.cfg.out_format}") for f in range(n)
                             if (self.out / f"part-{f:05d}.{self.cfg.out_format}").is_file()],
            "line_dedup": dict(tot["lines"]),
            "sharded": {"world": self.world, "shards": n, "ranks": [json.loads(p.read_text()) for p in
                        sorted(self._p("rank_stats").glob("r*.json"))]},
        }  # fmt: skip
        if "url" in self.cfg.stages:
            report["url_pass"] = {
                "documents": sum(s["valid"] for s in sign),
                "no_url": sum(s.get("no_url", 0) for s in sign),
                "bad_timestamp": sum(s.get("bad_timestamp", 0) for s in sign),
                "url_duplicates": removed.get("url", Counter()).total(),
            }
        if self.cfg.write_rejects:
            parts = [
                str(self._p("rejects", f"{w}_f{f:05d}.jsonl")) for w in ("dedup", "lines") for f in range(n)
            ]
            report["rejects"] = concat_rejects(parts, self.out / "rejects.jsonl")
        atomic_write_json(self.out / "report.json", report)
        return report


def dedup_text_sharded(
    inputs: list[str | Path], out_dir: str | Path, cfg: TextDedupConfig, rank: int, world: int,
    wait_timeout_s: float = 7 * 86400.0, poll_s: float = 2.0,
) -> dict[str, Any] | None:  # fmt: skip
    """URL → MinHash → line dedup over input files spread on `world` ranks (call once per rank, in any
    order or all at once); equal to `text_dedup.dedup_text` on the same inputs. Rank 0 returns the report."""
    return ShardedTextDedup(inputs, out_dir, cfg, rank, world, wait_timeout_s, poll_s).run()
