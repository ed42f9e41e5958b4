"""Embedding extraction: sources, batching, sharding across ranks, and resumption after a kill."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from synthetic_inputs import draw_image, write_jsonl
from torch import nn

from herd.data.curation.embed import EmbedConfig, embed_source, load_embeddings, shard_files, wait_for_ranks
from herd.data.curation.image_sources import (
    FolderSource,
    ManifestSource,
    TarShardSource,
    make_source,
    open_image_ref,
)


class TinyDescriptor(nn.Module):
    """Stand-in descriptor model: the pipeline mechanics do not depend on the network."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 5, stride=4)
        self.fc = nn.Linear(8 * 4, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.adaptive_avg_pool2d(F.relu(self.conv(x)), 2).flatten(1)  # (N, 32)
        return self.fc(h) * 3.0  # deliberately not unit norm: the pipeline normalises


def cfg(**kw) -> EmbedConfig:
    return EmbedConfig(**{"batch_size": 3, "image_size": 32, "decode_threads": 2, "progress": False, **kw})


def make_folder(root: Path, n: int) -> Path:
    (root / "sub").mkdir(parents=True)
    for i in range(n):
        draw_image(i, (40, 36)).save(root / ("sub" if i % 2 else "") / f"im{i:02d}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_embedding_is_resumable(tmp_path: Path) -> None:
    src = FolderSource(root=make_folder(tmp_path / "imgs", 7), shard_size=3)  # shards of 3, 3, 1
    work = tmp_path / "work"
    model = TinyDescriptor()
    s1 = embed_source(src, model, work, cfg())
    assert (s1.computed_shards, s1.skipped_shards, s1.images) == (3, 0, 7)
    x, recs, n_bad = load_embeddings(work, 3)
    assert x.shape == (7, 16) and x.dtype == np.float32 and n_bad == 0
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    ids = [r["id"] for r in recs]
    assert ids == sorted(ids) and "sub/im01.png" in ids and len(ids) == 7

    s2 = embed_source(src, model, work, cfg())  # a finished job computes nothing
    assert (s2.computed_shards, s2.skipped_shards, s2.images) == (0, 3, 0)

    shard_files(work, 1)[0].unlink()  # "killed" before shard 1's embeddings landed
    s3 = embed_source(src, model, work, cfg())
    assert (s3.computed_shards, s3.skipped_shards, s3.images) == (1, 2, 3)
    x3, recs3, _ = load_embeddings(work, 3)
    np.testing.assert_allclose(x3, x, atol=1e-6)
    assert recs3 == recs
    assert not list(work.glob("*.tmp")) and not list(work.glob(".*"))  # no partial files left

    with pytest.raises(ValueError, match="other settings"):
        embed_source(src, model, work, cfg(image_size=48))


def test_ranks_split_shards_and_rank0_waits(tmp_path: Path) -> None:
    src = FolderSource(root=make_folder(tmp_path / "imgs", 5), shard_size=2)  # 3 shards
    work = tmp_path / "work"
    model = TinyDescriptor()
    with pytest.raises(TimeoutError):
        wait_for_ranks(work, 2, timeout_s=0.0, poll_s=0.0)
    a = embed_source(src, model, work, cfg(), rank=0, world=2)  # shards 0, 2
    b = embed_source(src, model, work, cfg(), rank=1, world=2)  # shard 1
    assert (a.computed_shards, a.images, b.computed_shards, b.images) == (2, 3, 1, 2)
    assert wait_for_ranks(work, 2, timeout_s=1.0, poll_s=0.01) == 3
    x, recs, _ = load_embeddings(work, 3)
    single, srecs, _ = (None, None, None)
    embed_source(src, model, tmp_path / "single", cfg())
    single, srecs, _ = load_embeddings(tmp_path / "single", 3)
    np.testing.assert_allclose(x, single, atol=1e-6)  # same result as one process
    assert recs == srecs


def test_manifest_bad_lines_and_bad_images_are_counted(tmp_path: Path) -> None:
    make_folder(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"definitely not a jpeg")
    rows = [
        {"id": "a", "image": "imgs/im00.png", "caption": "x", "clip_score": 0.3},
        "{not json",
        {"id": "b"},  # no image field
        {"id": "c", "image": "imgs/broken.jpg"},
        {"id": "d", "image": "imgs/missing.png"},
        {"id": "e", "image": str(tmp_path / "imgs" / "im02.png")},  # absolute path
    ]
    src = ManifestSource(manifest=write_jsonl(tmp_path / "m.jsonl", rows), shard_size=10)
    st = embed_source(src, TinyDescriptor(), tmp_path / "work", cfg())
    assert st.images == 4 and st.bad_images == 2
    assert dict(src.bad) == {"bad_json": 1, "missing_image_field": 1}
    x, recs, n_bad = load_embeddings(tmp_path / "work", 1)
    assert [r["id"] for r in recs] == ["a", "e"] and n_bad == 2
    assert recs[0]["caption"] == "x" and recs[0]["clip_score"] == 0.3  # other fields kept
    bad = [json.loads(ln) for ln in shard_files(tmp_path / "work", 0)[2].read_text().splitlines()]
    assert {b["id"] for b in bad} == {"c", "d"} and all(b["reason"] for b in bad)


def _tar(path: Path, start: int, n: int) -> None:
    with tarfile.open(path, "w") as tf:
        for i in range(start, start + n):
            buf = io.BytesIO()
            draw_image(i, (40, 36)).save(buf, format="JPEG")
            members = {
                f"s{i:04d}.jpg": buf.getvalue(),
                f"s{i:04d}.txt": f"caption {i}".encode(),
                f"s{i:04d}.json": json.dumps({"clip_score": i / 10}).encode(),
            }
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_webdataset_tar_shards(tmp_path: Path) -> None:
    _tar(tmp_path / "shard-000.tar", 0, 3)
    _tar(tmp_path / "shard-001.tar", 3, 2)
    src = make_source(shards=str(tmp_path / "shard-*.tar"))
    assert isinstance(src, TarShardSource)
    recs = list(src.iter_records())
    assert [r["id"] for r in recs] == [f"s{i:04d}" for i in range(5)]
    assert recs[4]["txt"] == "caption 4" and recs[4]["clip_score"] == 0.4
    assert recs[0]["image"].endswith("shard-000.tar#s0000.jpg")
    assert open_image_ref(recs[4]["image"]).size == (40, 36)
    st = embed_source(src, TinyDescriptor(), tmp_path / "work", cfg())
    assert (st.computed_shards, st.images) == (2, 5)  # one work shard per tar
    x, erecs, _ = load_embeddings(tmp_path / "work", 2)
    assert x.shape == (5, 16) and [r["id"] for r in erecs] == [r["id"] for r in recs]


def test_make_source_validates(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_source()
    with pytest.raises(ValueError):
        make_source(images=str(tmp_path), manifest="x.jsonl")
    with pytest.raises(FileNotFoundError):
        make_source(shards=str(tmp_path / "*.tar"))
