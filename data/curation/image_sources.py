"""Image-text inputs for dedup/curation: an image folder, a jsonl manifest, or webdataset tar shards.

All three are cut into *work shards*, the unit of parallelism and resumption:
  * folder / manifest: consecutive chunks of `shard_size` records (input order);
  * tar shards: one work shard per tar file (sorted glob order).
Rank r of a torchrun job owns the shards with `index % world == r`. Records keep every manifest
field; `image` is a file path, or `TAR#member` for an image inside a tar shard.
"""

from __future__ import annotations

import glob
import io
import json
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from herd.data.records import IMAGE_EXTS, iter_jsonl, split_key


@dataclass
class Sample:
    record: dict[str, Any]
    path: str | None = None  # image file on disk
    data: bytes | None = None  # image bytes (tar member)

    def load(self) -> Image.Image:
        src = self.path if self.path is not None else io.BytesIO(self.data or b"")
        with Image.open(src) as im:
            return im.convert("RGB")


@dataclass
class WorkShard:
    index: int
    samples: Callable[[], Iterator[Sample]]  # re-iterable: called once per embedding run


@dataclass
class ImageSource:
    """Base: subclasses implement `_iter_all_shards`; bad inputs are counted in `bad`."""

    bad: Counter = field(default_factory=Counter)
    n_shards: int | None = None  # total number of work shards, known once a pass has finished

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def _iter_all_shards(self, owned: Callable[[int], bool]) -> Iterator[WorkShard]:
        raise NotImplementedError

    def iter_shards(self, rank: int = 0, world: int = 1) -> Iterator[WorkShard]:
        """The work shards this rank owns (index % world == rank)."""
        yield from self._iter_all_shards(lambda i: i % world == rank)

    def iter_records(self) -> Iterator[dict[str, Any]]:
        """Every record in input order (the row order `--embeddings` must follow)."""
        for shard in self._iter_all_shards(lambda i: True):
            for s in shard.samples():
                yield s.record


def _chunked_shards(
    src: ImageSource, records: Iterator[dict[str, Any]], shard_size: int, owned: Callable[[int], bool]
) -> Iterator[WorkShard]:
    """Cut a record stream into shards of `shard_size`; only owned shards keep their records."""
    chunk: list[dict[str, Any]] = []
    index = 0

    def make(idx: int, recs: list[dict[str, Any]]) -> WorkShard:
        return WorkShard(idx, lambda: (Sample(r, path=r["image"]) for r in recs))

    for rec in records:
        # Shards another rank owns are only counted, not kept (bounded memory on every rank).
        chunk.append(rec if owned(index) else {})
        if len(chunk) == shard_size:
            if owned(index):
                yield make(index, chunk)
            chunk, index = [], index + 1
    if chunk:
        if owned(index):
            yield make(index, chunk)
        index += 1
    src.n_shards = index


@dataclass
class FolderSource(ImageSource):
    root: Path = Path(".")
    shard_size: int = 10_000

    def describe(self) -> dict[str, Any]:
        return {"kind": "images", "root": str(self.root), "shard_size": self.shard_size}

    def _files(self) -> Iterator[Path]:
        # Sorted so every rank and every resume sees the same order.
        for p in sorted(self.root.rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
                yield p

    def _records(self) -> Iterator[dict[str, Any]]:
        for p in self._files():
            yield {"id": p.relative_to(self.root).as_posix(), "image": str(p)}

    def _iter_all_shards(self, owned: Callable[[int], bool]) -> Iterator[WorkShard]:
        yield from _chunked_shards(self, self._records(), self.shard_size, owned)


@dataclass
class ManifestSource(ImageSource):
    """jsonl lines `{"id": …, "image": path, …}`; relative image paths are relative to the manifest."""

    manifest: Path = Path("manifest.jsonl")
    shard_size: int = 10_000
    image_field: str = "image"

    def describe(self) -> dict[str, Any]:
        return {"kind": "manifest", "manifest": str(self.manifest), "shard_size": self.shard_size}

    def _records(self) -> Iterator[dict[str, Any]]:
        base = self.manifest.parent
        self.bad.clear()  # counted afresh on every pass
        for it in iter_jsonl(self.manifest):
            if it.record is None:
                self.bad[it.bad or "bad"] += 1
                continue
            rec = it.record
            img = rec.get(self.image_field)
            if not isinstance(img, str) or not img:
                self.bad["missing_image_field"] += 1
                continue
            p = Path(img)
            rec = dict(rec)
            rec["image"] = str(p if p.is_absolute() else base / p)
            rec.setdefault("id", img)
            yield rec

    def _iter_all_shards(self, owned: Callable[[int], bool]) -> Iterator[WorkShard]:
        yield from _chunked_shards(self, self._records(), self.shard_size, owned)


def iter_tar_samples(tar_path: str | Path, bad: Counter | None = None) -> Iterator[Sample]:
    """Stream the samples of a webdataset tar (members of one sample are contiguous)."""
    tar_path = str(tar_path)
    group: dict[str, tuple[str, bytes]] = {}
    key: str | None = None

    def emit(k: str, g: dict[str, tuple[str, bytes]]) -> Sample | None:
        img = next(((n, b) for ext, (n, b) in g.items() if "." + ext.rsplit(".", 1)[-1] in IMAGE_EXTS), None)
        if img is None:
            if bad is not None:
                bad["tar_sample_without_image"] += 1
            return None
        rec: dict[str, Any] = {}
        for ext, (_, b) in g.items():
            if ext == "json":
                try:
                    meta = json.loads(b)
                    if isinstance(meta, dict):
                        rec.update(meta)
                except json.JSONDecodeError:
                    if bad is not None:
                        bad["tar_bad_json"] += 1
            elif ext in ("txt", "caption", "text"):
                rec[ext] = b.decode("utf-8", errors="replace")
        rec.setdefault("id", k)
        rec["image"] = f"{tar_path}#{img[0]}"
        return Sample(rec, data=img[1])

    with tarfile.open(tar_path, mode="r|*") as tf:
        for m in tf:
            if not m.isfile():
                continue
            k, ext = split_key(m.name)
            if key is not None and k != key:
                s = emit(key, group)
                if s is not None:
                    yield s
                group = {}
            key = k
            f = tf.extractfile(m)
            group[ext] = (m.name, f.read() if f is not None else b"")
    if key is not None and group:
        s = emit(key, group)
        if s is not None:
            yield s


@dataclass
class TarShardSource(ImageSource):
    pattern: str = "*.tar"

    def __post_init__(self) -> None:
        self.paths = sorted(glob.glob(self.pattern))
        if not self.paths:
            raise FileNotFoundError(f"no tar shards match {self.pattern!r}")

    def describe(self) -> dict[str, Any]:
        return {"kind": "shards", "pattern": self.pattern, "n_tars": len(self.paths)}

    def _iter_all_shards(self, owned: Callable[[int], bool]) -> Iterator[WorkShard]:
        self.n_shards = len(self.paths)
        for i, p in enumerate(self.paths):
            if owned(i):
                yield WorkShard(i, lambda p=p: iter_tar_samples(p, self.bad))


def open_image_ref(ref: str) -> Image.Image:
    """Open a record's `image` (a path, or TAR#member written by `TarShardSource`)."""
    if "#" in ref:
        tar_path, _, member = ref.rpartition("#")
        if tar_path and Path(tar_path).is_file() and tarfile.is_tarfile(tar_path):
            with tarfile.open(tar_path) as tf:
                f = tf.extractfile(member)
                if f is None:
                    raise FileNotFoundError(ref)
                return Sample({}, data=f.read()).load()
    return Sample({}, path=ref).load()


def make_source(
    images: str | None = None,
    manifest: str | None = None,
    shards: str | None = None,
    shard_size: int = 10_000,
) -> ImageSource:
    """Exactly one of images / manifest / shards (the CLI's mutually exclusive inputs)."""
    given = [x is not None for x in (images, manifest, shards)]
    if sum(given) != 1:
        raise ValueError("give exactly one of images (folder), manifest (jsonl) or shards (tar glob)")
    if images is not None:
        root = Path(images)
        if not root.is_dir():
            raise NotADirectoryError(root)
        return FolderSource(root=root, shard_size=shard_size)
    if manifest is not None:
        m = Path(manifest)
        if not m.is_file():
            raise FileNotFoundError(m)
        return ManifestSource(manifest=m, shard_size=shard_size)
    return TarShardSource(pattern=str(shards))
