"""Image-text datasets: manifest and tar shards agree, bad inputs are skipped and counted, sharding and
resumption are exact."""

from __future__ import annotations

import io
import json
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch.utils.data
from PIL import Image

from herd.data.synthetic.shapes import write_shapes_dataset
from herd.data.training.image_text import (
    ImageTextDataset,
    SkipCounter,
    decode_image,
    index_jsonl,
    index_tar_shards,
    write_tar_shards,
)

N_TRAIN = 30


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """The shapes manifest plus planted bad inputs: a truncated PNG, a text file posing as an image,
    a missing file, an unparseable line and a record without an image."""
    root = tmp_path / "shapes"
    write_shapes_dataset(root, n_train=N_TRAIN, n_val=0, seed=11, image_size=32)
    png = root / "images/train/000004.png"
    png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    (root / "images/train/000009.png").write_text("this is not an image")
    manifest = root / "train.jsonl"
    with manifest.open("a") as f:
        f.write(json.dumps({"image": "images/train/gone.png", "caption": "missing"}) + "\n")
        f.write('{"image": "images/train/000001.png", "caption": \n')  # cut mid-line
        f.write(json.dumps({"caption": "an orphan caption"}) + "\n")
    return manifest


def keys(samples: list[dict]) -> list[str]:
    return [s["key"] for s in samples]


def test_manifest_and_tar_shards_yield_the_same_samples(corpus: Path, tmp_path: Path) -> None:
    shards = write_tar_shards(corpus, tmp_path / "shards", samples_per_shard=8)
    assert len(shards) == 4  # 30 readable-or-not records (the missing file is left out) → 8+8+8+6
    a = ImageTextDataset.from_jsonl(corpus, seed=1, loop=False)
    b = ImageTextDataset.from_tar_shards(tmp_path / "shards", seed=1, loop=False)
    a_samples, b_samples = list(a), list(b)
    assert len(a_samples) == len(a) == N_TRAIN + 1  # the missing file's record is indexed, then skipped
    assert len(b_samples) == len(b) == N_TRAIN
    # The missing-file record takes a slot in the manifest's order, so compare by key.
    by_key = {s["key"]: s for s in b_samples}
    assert set(by_key) == set(keys(a_samples))
    for s in a_samples:
        t = by_key[s["key"]]
        assert {k: v for k, v in s.items() if k != "image"} == {k: v for k, v in t.items() if k != "image"}
        assert s["image"].mode == "RGB" and np.array_equal(np.asarray(s["image"]), np.asarray(t["image"]))

    decode = {"truncated_image": 1, "not_an_image": 1}
    assert dict(b.skipped.counts) == decode
    assert dict(a.skipped.counts) == {**decode, "missing_file": 1, "bad_json": 1, "no_image_field": 1}
    assert a.skipped.metrics()["data/skipped"] == 5.0
    assert any("000004.png" in e for e in a.skipped.examples)
    # Without the missing file both formats index the same records in the same order: same samples.
    a2 = ImageTextDataset(index_jsonl(corpus)[:N_TRAIN], seed=4, loop=False)
    b2 = ImageTextDataset.from_tar_shards(shards, seed=4, loop=False)
    assert keys(list(a2)) == keys(list(b2))


def test_truncated_and_foreign_shards_are_counted(corpus: Path, tmp_path: Path) -> None:
    shards = write_tar_shards(corpus, tmp_path / "shards", samples_per_shard=10)
    data = shards[1].read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar archive" * 10)
    skipped = SkipCounter()
    records = index_tar_shards([shards[0], cut, junk], skipped)
    assert dict(skipped.counts) == {"truncated_shard": 1, "unreadable_shard": 1}
    kept = [r for r in records if r.path == str(cut)]
    assert len(records) - len(kept) == 10 and 0 < len(kept) < 10  # shard 0 whole, the samples before the cut
    complete = {r.key: r for r in index_tar_shards([shards[1]])}
    for r in kept:  # every kept sample of the cut shard has all its fields and bytes
        assert r.fields == complete[r.key].fields and r.offset + r.size <= len(data) // 2


def test_rank_shards_are_disjoint_and_in_lockstep(corpus: Path) -> None:
    world = 3
    ranks = [
        ImageTextDataset.from_jsonl(corpus, rank=r, world_size=world, seed=2, loop=False)
        for r in range(world)
    ]
    per_rank = [keys(list(ds)) for ds in ranks]
    assert all(len(k) == len(ranks[0]) == (N_TRAIN + 1) // world for k in per_rank)
    assert all(set(per_rank[i]).isdisjoint(per_rank[j]) for i in range(world) for j in range(i + 1, world))
    # Same number of samples, so the same state on every rank even though only some met bad images.
    assert all(ds.state_dict() == ranks[0].state_dict() for ds in ranks)
    with pytest.raises(ValueError, match="rank"):
        ImageTextDataset(index_jsonl(corpus), rank=3, world_size=3)


def test_bad_images_are_replaced_not_retried(corpus: Path) -> None:
    ds = ImageTextDataset.from_jsonl(corpus, seed=0, loop=True)
    samples = list(islice(ds, 3 * len(ds)))  # three epochs
    assert len(samples) == 3 * len(ds)
    assert all(isinstance(s["image"], Image.Image) for s in samples)
    # Each bad file is decoded (and counted) once, however many epochs pass.
    assert ds.skipped.counts["truncated_image"] == ds.skipped.counts["not_an_image"] == 1
    assert ds.state_dict()["epoch"] == 3 and ds.state_dict()["position"] == 0
    first_epoch = keys(samples[: len(ds)])
    assert "images/train/000004.png" not in first_epoch and len(set(first_epoch)) >= len(ds) - 3


@pytest.mark.parametrize("source", ["jsonl", "tar"])
def test_resume_sees_the_same_samples(corpus: Path, tmp_path: Path, source: str) -> None:
    def make(**kw) -> ImageTextDataset:
        if source == "tar":
            write_tar_shards(corpus, tmp_path / "s", 8)
            return ImageTextDataset.from_tar_shards(str(tmp_path / "s" / "shard-*.tar"), seed=9, **kw)
        return ImageTextDataset.from_jsonl(corpus, seed=9, **kw)

    full = keys(list(islice(make(), 70)))  # crosses two epoch boundaries
    for stop in (0, 13, 31, len(make())):
        first = make()
        head = keys(list(islice(first, stop)))
        resumed = make()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # survives serialisation
        assert head + keys(list(islice(resumed, 70 - stop))) == full, stop

    other = ImageTextDataset(index_jsonl(corpus)[:10], seed=9)
    with pytest.raises(ValueError, match="records"):
        other.load_state_dict(make().state_dict())


def test_resume_on_another_data_parallel_size(corpus: Path) -> None:
    records = index_jsonl(corpus)[:N_TRAIN]
    records = [r for r in records if not r.path.endswith(("000004.png", "000009.png"))]  # 28 good ones
    two = [ImageTextDataset(records, rank=r, world_size=2, seed=5, loop=False) for r in range(2)]
    seen = [k for ds in two for k in keys(list(islice(ds, 6)))]
    one = ImageTextDataset(records, seed=5, loop=False)
    one.load_state_dict(two[0].state_dict())
    rest = keys(list(one))
    assert len(seen) + len(rest) == len(records) and set(seen) | set(rest) == {r.key for r in records}


def test_dataloader_workers_keep_the_order(corpus: Path) -> None:
    # Resumed at an odd position: worker 0 must take the first remaining round, not round 0 mod 2.
    reference = ImageTextDataset.from_jsonl(corpus, seed=3, loop=False)
    head = list(islice(reference, 5))
    ds = ImageTextDataset.from_jsonl(corpus, seed=3, loop=False)
    ds.load_state_dict(reference.state_dict())
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, collate_fn=lambda s: s)
    assert len(head) == 5 and keys(list(loader)) == keys(list(reference))


def test_unusable_inputs_fail_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "bad.png", "caption": "x"}) + "\n")
    ds = ImageTextDataset.from_jsonl(tmp_path / "m.jsonl")
    with pytest.raises(RuntimeError, match="no readable image"):
        next(iter(ds))
    with pytest.raises(ValueError, match="cannot feed"):
        ImageTextDataset([], world_size=1)


def test_decoded_images_are_rgb_with_transparency_on_white() -> None:
    def png(im: Image.Image) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    clear = Image.new("RGBA", (4, 3), (255, 0, 0, 0))  # red, fully transparent → white
    half = Image.new("LA", (4, 3), (0, 128))  # black at half opacity → mid grey
    for im, expected in ((clear, 255), (half, 127)):
        out = decode_image(png(im))
        assert out.mode == "RGB" and out.size == (4, 3)
        assert np.abs(np.asarray(out).astype(int) - expected).max() <= 1
