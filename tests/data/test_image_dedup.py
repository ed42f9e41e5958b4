"""Image dedup end to end: keep rule, outputs, planted image near-duplicates, random-SSCD mechanics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic_inputs import thumb_descriptor

from herd.commands import build_parser
from herd.data.curation.image_dedup import choose_keep, dedup_embeddings, group_members, similarity_histogram
from herd.data.curation.image_sources import open_image_ref
from herd.data.curation.near_dup_search import SearchConfig, same_partition
from herd.data.records import read_jsonl

pytest.importorskip("faiss")


def run_cli(*argv: str) -> int:
    args = build_parser().parse_args(list(argv))
    return args.func(args)


def test_keep_rule() -> None:
    recs = [
        {"id": 0},
        {"id": 1, "clip_score": 0.2},
        {"id": 2, "clip_score": 0.31},
        {"id": 3, "clip_score": 0.31},
    ]
    assert choose_keep([0, 1, 2, 3], recs) == 2  # highest score; the tie with 3 keeps the earlier
    assert choose_keep([0, 3], recs) == 3  # a scored record beats an unscored one
    assert choose_keep([0], recs) == 0
    plain = [{"id": i} for i in range(4)]
    assert choose_keep([1, 3], plain) == 1  # no scores: first in input order
    assert choose_keep([1, 2], [{}, {"clip_score": True}, {"clip_score": "0.9"}]) == 1  # non-numeric ignored


def test_group_members_and_histogram() -> None:
    labels = np.array([5, 1, 5, 2, 1, 5, 7])
    groups = group_members(labels)
    assert [g.tolist() for g in groups] == [[0, 2, 5], [1, 4]]
    h = similarity_histogram(np.array([0.8, 0.87, 0.99, 1.0000001]), 0.8, bins=4)
    assert h["counts"] == [1, 1, 0, 2] and h["edges"][0] == 0.8 and h["edges"][-1] == 1.0


def test_dedup_embeddings_outputs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((40, 32)).astype(np.float32)
    x = np.concatenate([base, base[:5] + 0.01 * rng.standard_normal((5, 32)).astype(np.float32), base[:1]])
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # rows 40..44 copy rows 0..4; row 45 copies row 0
    recs = [{"id": f"r{i}", "image": f"/nowhere/{i}.png", "n": i} for i in range(len(x))]
    recs[45]["clip_score"] = 0.5
    rep = dedup_embeddings(x, recs, SearchConfig(threshold=0.95, n_clusters=4), tmp_path)
    assert (rep["records"], rep["groups"], rep["removed"], rep["kept"], rep["pairs"]) == (46, 5, 6, 40, 7)
    assert rep["largest_groups"] == [3, 2, 2, 2, 2]
    assert sum(rep["similarity_histogram"]["counts"]) == rep["pairs"]
    kept = read_jsonl(tmp_path / "keep.jsonl")
    assert len(kept) == 40 and {"id", "image", "n"} <= set(kept[0])
    kept_ids = {r["id"] for r in kept}
    assert "r45" in kept_ids and "r0" not in kept_ids and "r40" not in kept_ids  # clip_score wins group 0
    assert {"r1", "r2", "r3", "r4"} <= kept_ids and not {"r41", "r42", "r43", "r44"} & kept_ids
    groups = read_jsonl(tmp_path / "groups.jsonl")
    assert groups[0]["size"] == 3 and groups[0]["kept"] == "r45"
    assert [m["id"] for m in groups[0]["members"]] == ["r0", "r40", "r45"]
    assert json.loads((tmp_path / "report.json").read_text())["groups"] == 5
    with Image.open(tmp_path / "contact_sheet.png") as sheet:  # placeholders for missing images
        assert sheet.format == "PNG" and sheet.height >= 5 * 96


def test_planted_image_duplicates_with_brought_descriptors(planted_image_set, tmp_path: Path) -> None:
    """Crops, resizes, JPEG re-encodes and flips of drawn images are grouped; distinct ones are not."""
    manifest, rows, truth = planted_image_set
    rows = [dict(r, clip_score=float(i % 5)) for i, r in enumerate(rows)]  # v4 has the highest score
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    emb = np.stack([thumb_descriptor(open_image_ref(str(manifest.parent / r["image"]))) for r in rows])
    np.save(tmp_path / "emb.npy", emb)
    out = tmp_path / "out"
    rc = run_cli(
        "data", "dedup-images", "--manifest", str(manifest), "--embeddings", str(tmp_path / "emb.npy"),
        "--threshold", "0.8", "--out", str(out), "--n-clusters", "3",
    )  # fmt: skip
    assert rc == 0
    groups = read_jsonl(out / "groups.jsonl")
    assert len(groups) == 6 and all(g["size"] == 5 for g in groups)
    labels = np.arange(len(rows))
    for g in groups:
        labels[[m["row"] for m in g["members"]]] = g["members"][0]["row"]
    assert same_partition(labels, truth)
    # Brute force on the same descriptors gives the same groups.
    s = emb @ emb.T
    exact = np.arange(len(rows))
    for i, j in zip(*np.nonzero(np.triu(s >= 0.8, 1))):
        exact[exact == exact[j]] = exact[i]
    assert same_partition(labels, exact)
    kept = read_jsonl(out / "keep.jsonl")
    assert len(kept) == 6 + 10
    assert sorted(r["id"] for r in kept if r["id"].startswith("g")) == [f"g{g}_v4" for g in range(6)]
    rep = json.loads((out / "report.json").read_text())
    assert rep["removed"] == 24 and rep["embeddings"].endswith("emb.npy")

    np.save(tmp_path / "short.npy", emb[:-1])
    with pytest.raises(ValueError, match="valid records"):
        run_cli("data", "dedup-images", "--manifest", str(manifest), "--embeddings", str(tmp_path / "short.npy"),
                "--threshold", "0.8", "--out", str(out))  # fmt: skip


def test_random_sscd_end_to_end_and_resume(planted_image_set, tmp_path: Path) -> None:
    """Mechanics with the real architecture (random weights): shapes, unit norm, resume, outputs."""
    manifest, rows, _ = planted_image_set
    out = tmp_path / "out"
    argv = (
        "data", "dedup-images", "--manifest", str(manifest), "--random-init", "--threshold", "0.999",
        "--out", str(out), "--image-size", "64", "--batch-size", "8", "--shard-size", "16", "--no-progress",
    )  # fmt: skip
    with pytest.warns(UserWarning, match="random weights"):
        assert run_cli(*argv) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["embed"]["computed_shards"] == 3 and rep["embed"]["images"] == len(rows) == 40
    x = np.concatenate([np.load(out / "embeddings" / f"emb_{i:05d}.npy") for i in range(3)])
    assert x.shape == (40, 512)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    assert rep["records"] == 40 and rep["kept"] + rep["removed"] == 40
    assert run_cli(*argv) == 0  # second run: everything already embedded, the model is not even built
    rep2 = json.loads((out / "report.json").read_text())
    assert rep2["embed"]["computed_shards"] == 0 and rep2["embed"]["skipped_shards"] == 3
    assert rep2["pairs"] == rep["pairs"]
    with pytest.raises(SystemExit, match="--weights"):
        run_cli("data", "dedup-images", "--manifest", str(manifest), "--threshold", "0.9", "--out", str(out))
