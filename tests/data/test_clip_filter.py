"""CLIP-score filtering with a tiny random open_clip model built from a custom config (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic_inputs import draw_image, write_jsonl

from herd.commands import build_parser
from herd.data.curation.image_sources import ManifestSource
from herd.data.records import read_jsonl

open_clip = pytest.importorskip("open_clip")

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip():
    from herd.data.curation.clip_filter import load_clip, register_model_config

    register_model_config("herd-test-tiny", TINY)
    torch.manual_seed(0)
    return load_clip("herd-test-tiny", None, random_init=True)


def make_manifest(tmp_path: Path, n: int = 12) -> Path:
    (tmp_path / "imgs").mkdir(exist_ok=True)
    rows: list = []
    for i in range(n):
        draw_image(i, (48, 40)).save(tmp_path / "imgs" / f"{i}.png")
        rows.append({"id": i, "image": f"imgs/{i}.png", "caption": f"a picture of shape number {i}"})
    rows += [
        {"id": "nocap", "image": "imgs/0.png"},
        {"id": "missing", "image": "imgs/none.png", "caption": "x"},
        "not json",
    ]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def direct_scores(model, preprocess, tokenizer, manifest: Path, n: int) -> np.ndarray:
    """Reference: cosine of the embeddings, computed straight from the open_clip model."""
    from PIL import Image

    recs = read_jsonl(manifest)[:n]
    ims = torch.stack([preprocess(Image.open(manifest.parent / r["image"]).convert("RGB")) for r in recs])
    with torch.no_grad():
        a = model.encode_image(ims)
        b = model.encode_text(tokenizer([r["caption"] for r in recs]))
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).numpy()


def test_scores_equal_direct_cosine_and_threshold(tiny_clip, tmp_path: Path) -> None:
    from herd.data.curation.clip_filter import filter_clip

    model, preprocess, tokenizer = tiny_clip
    manifest = make_manifest(tmp_path)
    want = direct_scores(model, preprocess, tokenizer, manifest, 12)
    t = float(np.median(want))
    rep = filter_clip(ManifestSource(manifest=manifest), tmp_path / "out", model, preprocess, tokenizer, t,
                      batch_size=5, progress=False)  # fmt: skip
    kept = read_jsonl(tmp_path / "out" / "kept.jsonl")
    rejects = read_jsonl(tmp_path / "out" / "rejects.jsonl")
    got = {r["id"]: r["clip_score"] for r in kept + rejects if "clip_score" in r}
    np.testing.assert_allclose([got[i] for i in range(12)], want, atol=1e-5)
    assert sorted(r["id"] for r in kept) == [i for i in range(12) if want[i] >= t]
    assert rep["kept"] == int((want >= t).sum()) == len(kept)
    assert rep["removed"] == {"clip_score_below_threshold": int((want < t).sum()), "missing_text": 1,
                              "unreadable_image": 1}  # fmt: skip
    assert rep["bad_records"] == {"bad_json": 1}
    reasons = {r["id"]: r["reason"] for r in rejects}
    assert reasons["nocap"] == "missing_text" and reasons["missing"] == "unreadable_image"
    assert sum(rep["score_histogram"]["counts"]) == 12 and rep["pairs"] == 14
    assert all(r["caption"] for r in kept)  # records keep their fields


def test_cli_with_config_file_and_local_weights(tiny_clip, tmp_path: Path) -> None:
    model, preprocess, tokenizer = tiny_clip
    cfg_path = tmp_path / "herd-test-file.json"
    cfg_path.write_text(json.dumps(TINY))
    weights = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), weights)
    manifest = make_manifest(tmp_path, n=4)
    want = direct_scores(model, preprocess, tokenizer, manifest, 4)
    ap = build_parser()
    out = tmp_path / "out"
    args = ap.parse_args(["data", "filter-clip", "--manifest", str(manifest), "--model", "herd-test-file",
                          "--model-config", str(cfg_path), "--pretrained", str(weights), "--threshold", "-1",
                          "--out", str(out), "--no-progress"])  # fmt: skip
    assert args.func(args) == 0
    kept = read_jsonl(out / "kept.jsonl")
    assert [r["id"] for r in kept] == [0, 1, 2, 3]  # threshold -1 keeps every readable captioned pair
    np.testing.assert_allclose(
        [r["clip_score"] for r in kept], want, atol=1e-5
    )  # the saved weights were used
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        from herd.data.curation.clip_filter import load_clip

        load_clip("herd-test-file", "openai")
