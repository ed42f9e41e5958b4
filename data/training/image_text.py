"""Image-text training data: a jsonl manifest + image folder, or webdataset tar shards; and the
media-agnostic machinery (`Media`, `MediaTextDataset`) that `video_text.VideoTextDataset` shares.

Both formats become one list of `Record`s (text fields in memory, the image as a file or a byte range
inside a tar), so shuffling, sharding and resuming are one mechanism and the two formats of the same
data yield the same samples in the same order:
  * manifest: one json object per line, `{"image": relpath, "caption"/"text": …, "question": …,
    "answer": …, "question_type": …}`; image paths are relative to the manifest's folder (or `root`);
  * tar shards: webdataset layout, `key.png|jpg|…` plus `key.json` (fields) and/or `key.txt` (→ "text"),
    members of one sample contiguous, shards read in sorted path order. Only the headers are scanned
    when indexing; an image is read later with one seek, so shards must be uncompressed `.tar`.

Bad data never stops a run. Unparseable lines, samples without an image, samples without the fields the
objective needs (`check`: e.g. a question and an answer for visual QA), and images that cannot be
decoded (missing, truncated, not an image, absurdly large) are skipped and counted by reason in
`dataset.skipped` (a `herd.data.records.SkipCounter`), which the training loop logs.

One media hook generalises this to video (data/training/video_text.py): a `Media` names the field and
the tar member extensions of the one file per sample, and a `MediaTextDataset` subclass decodes a
`Record` into the sample's value and names the skip reason of a decoding error. Everything else
(indexing, shuffling, sharding, skipping, resuming, writing shards) is this module's, once.

Order and resumption (`MediaTextDataset`): epoch e is a permutation of all records seeded by (seed, e);
round j of it gives data-parallel rank r the record at j·world_size + r. Every rank yields exactly one
sample per round: when its record is unreadable it takes the next readable record of its own share
instead (and remembers the bad one). Ranks therefore stay in lockstep, and the state (epoch, round)
is the same on every rank, which is what the checkpointer stores once for all ranks. Decoding is
deterministic, so a resumed run yields exactly the samples the uninterrupted run would have.
"""

from __future__ import annotations

import glob
import io
import json
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch.utils.data
from PIL import Image, UnidentifiedImageError

from herd.data.records import (
    IMAGE_EXTS,
    NoUsableRecords,
    SkipCounter,
    atomic_write,
    dumps,
    iter_jsonl,
    split_key,
)
from herd.vision.tiling import to_rgb

TEXT_MEMBERS = {"txt": "text", "text": "text", "caption": "caption"}  # tar member extension → field


@dataclass(frozen=True)
class Media:
    """The one file per sample that a dataset decodes beside its text fields."""

    field: str  # the manifest key holding its path, and the sample key holding the decoded value
    exts: tuple[str, ...]  # tar member extensions (with the dot) that hold it; the first such member wins
    default_ext: str  # what `write_tar_shards` names a member whose file has none of `exts`


IMAGE = Media("image", IMAGE_EXTS, ".jpg")


@dataclass(frozen=True)
class Record:
    key: str
    fields: dict[str, Any]  # text fields of the sample (caption, question, answer, …)
    path: str  # media file (image, video), or the tar shard holding it
    offset: int = -1  # byte range inside the tar shard; -1 = the whole file at `path`
    size: int = -1

    @property
    def in_shard(self) -> bool:
        return self.offset >= 0

    def media_bytes(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.offset < 0:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)  # short when the shard is truncated; the decoder then says so


def decode_image(data: bytes) -> Image.Image:
    """Fully decoded RGB image; transparency is composited onto white, as the tiling transform does."""
    im = Image.open(io.BytesIO(data))
    im.load()  # decode now, so a truncated file fails here (and is counted), not in a later transform
    return to_rgb(im)


def _failure_reason(err: BaseException) -> str:
    if isinstance(err, FileNotFoundError):
        return "missing_file"
    if isinstance(err, IsADirectoryError | PermissionError):
        return "not_a_readable_file"
    if isinstance(err, UnidentifiedImageError):
        return "not_an_image"
    if isinstance(err, Image.DecompressionBombError):
        return "too_large"
    if isinstance(err, OSError) and "truncated" in str(err).lower():  # PNG and JPEG decoders word it apart
        return "truncated_image"
    return "decode_error"


# A record check: the text fields of a sample → the reason it cannot be used, or None.
RecordCheck = Callable[[dict[str, Any]], str | None]


def index_jsonl(
    manifest: str | Path,
    root: str | Path | None = None,
    skipped: SkipCounter | None = None,
    check: RecordCheck | None = None,
    media: Media = IMAGE,
) -> list[Record]:
    """Records of a jsonl manifest in line order; `image` (`media.field`) paths are relative to `root`
    (default: the manifest's folder). The manifest itself is read now; media files only when iterated."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: {media.field}-text manifest not found")
    base = Path(root) if root is not None else manifest.parent
    skipped = skipped if skipped is not None else SkipCounter()
    records = []
    for item in iter_jsonl(manifest):
        if item.record is None:
            skipped.add(item.bad or "bad_record", item.where)
            continue
        rec = dict(item.record)
        file = rec.pop(media.field, None)
        if not isinstance(file, str) or not file:
            skipped.add(f"no_{media.field}_field", item.where)
            continue
        if check is not None and (reason := check(rec)) is not None:
            skipped.add(reason, item.where)
            continue
        key = str(rec.pop("id", file))
        records.append(Record(key, rec, str(base / file)))
    return records


def _shard_groups(tf: tarfile.TarFile) -> Iterator[tuple[str, list[tarfile.TarInfo]]]:
    """(key, members) per sample; webdataset keeps the members of one sample contiguous. A sample is
    only emitted once the next one's header was read, so a sample cut by a truncated shard never is."""
    key, members = "", []
    for m in tf:
        if not m.isfile():
            continue
        k, _ = split_key(m.name)
        if k != key and members:
            yield key, members
            members = []
        key = k
        members.append(m)
    # tarfile treats a header cut short as the end of the archive, so check for the end-of-archive
    # block where the next header would start: without it the last sample may lack members.
    tf.fileobj.seek(tf.offset)  # type: ignore[union-attr]
    end = tf.fileobj.read(tarfile.BLOCKSIZE)  # type: ignore[union-attr]
    if len(end) < tarfile.BLOCKSIZE or end.strip(b"\0"):
        raise tarfile.ReadError(f"no end-of-archive block at byte {tf.offset}: the shard is truncated")
    if members:
        yield key, members


def _shard_record(
    tf: tarfile.TarFile,
    path: str,
    key: str,
    members: list[tarfile.TarInfo],
    skipped: SkipCounter,
    media: Media = IMAGE,
) -> Record | None:
    fields: dict[str, Any] = {}
    found: tuple[int, int] | None = None
    for m in members:
        ext = split_key(m.name)[1].rsplit(".", 1)[-1]
        if f".{ext}" in media.exts:
            found = found or (m.offset_data, m.size)  # the first media member is the sample's
        elif ext == "json" or ext in TEXT_MEMBERS:
            raw = tf.extractfile(m).read()  # type: ignore[union-attr]
            try:
                if ext != "json":
                    fields[TEXT_MEMBERS[ext]] = raw.decode("utf-8")
                elif isinstance(meta := json.loads(raw), dict):
                    fields.update(meta)
                else:
                    raise ValueError("json member is not an object")
            except ValueError:  # bad JSON and bad UTF-8 are both ValueErrors
                skipped.add("bad_text_member", f"{path}#{m.name}")
                return None
    if found is None:
        skipped.add(f"no_{media.field}", f"{path}#{key}")
        return None
    # An explicit id (write_tar_shards stores the manifest's) names the sample as the manifest did.
    return Record(str(fields.pop("id", key)), fields, path, *found)


def _index_shard(
    path: str, records: list[Record], skipped: SkipCounter, check: RecordCheck | None, media: Media
) -> None:
    opened = False
    try:
        with tarfile.open(path, mode="r:") as tf:  # "r:" refuses compressed tars: reading by offset needs raw
            opened = True
            for key, members in _shard_groups(tf):
                if (rec := _shard_record(tf, path, key, members, skipped, media)) is None:
                    continue
                if check is not None and (reason := check(rec.fields)) is not None:
                    skipped.add(reason, f"{path}#{key}")
                    continue
                records.append(rec)
    except (tarfile.TarError, OSError) as err:
        # Not a tar (or a compressed one), or an interrupted copy: the samples before the cut are kept.
        skipped.add("truncated_shard" if opened else "unreadable_shard", f"{path}: {err}")


def shard_paths(paths: str | Path | Iterable[str | Path]) -> list[str | Path]:
    """Shard files as given, a folder's `*.tar` (sorted), or a glob pattern's matches (sorted)."""
    if isinstance(paths, str | Path):
        if Path(paths).is_dir():
            return sorted(Path(paths).glob("*.tar"))
        return sorted(glob.glob(str(paths))) if any(c in str(paths) for c in "*?[") else [paths]
    return list(paths)


def index_tar_shards(
    paths: Iterable[str | Path],
    skipped: SkipCounter | None = None,
    check: RecordCheck | None = None,
    media: Media = IMAGE,
) -> list[Record]:
    """Records of webdataset shards (sorted by path), from a scan of the tar headers plus the small
    text members; media bytes are not read. A shard cut short keeps the samples before the cut."""
    skipped = skipped if skipped is not None else SkipCounter()
    records: list[Record] = []
    for path in sorted(str(p) for p in paths):
        _index_shard(path, records, skipped, check, media)
    return records


class MediaTextDataset(torch.utils.data.IterableDataset):
    """Shuffled, rank-sharded, resumable stream of `{"key", **text fields, media.field: decoded value}`.

    A subclass sets `media` and implements `_decode` (a `Record` → the value; raises on a bad file) and
    `_failure_reason` (that exception → the reason it is counted under).

    `loop=True` runs forever (training); `loop=False` ends after the current epoch (the next `iter`
    starts the following one). `len()` is the number of samples a rank gets per epoch. Under a
    DataLoader with workers, worker w takes rounds w, w+n, … so the loader's round-robin yields the same
    order; the loader's copies hold the state then, so resume by calling `load_state_dict` before
    building the loader.
    """

    def __init__(
        self,
        records: Sequence[Record],
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        loop: bool = True,
        skipped: SkipCounter | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.skipped = skipped if skipped is not None else SkipCounter()
        if len(records) < world_size:
            raise NoUsableRecords(
                f"{len(records)} records cannot feed {world_size} data-parallel rank(s): nothing usable is "
                f"left ({self.skipped.summary()})"
            )
        self.records, self.rank, self.world_size = list(records), rank, world_size
        self.seed, self.shuffle, self.loop = seed, shuffle, loop
        self.rounds = len(self.records) // world_size  # the tail of each permutation waits for the next epoch
        self.epoch, self.position = 0, 0
        self._bad: set[int] = set()  # records known to be unreadable (decoding is deterministic)
        self._order_epoch, self._order = -1, np.arange(0)

    @classmethod
    def from_jsonl(
        cls, manifest: str | Path, root: str | Path | None = None, check: RecordCheck | None = None, **kw: Any
    ) -> Any:  # an instance of cls
        """`check`: fields → skip reason (or None), e.g. the vision task's "needs a question and answer";
        `kw`: the constructor's other arguments."""
        skipped = SkipCounter()
        return cls(index_jsonl(manifest, root, skipped, check, cls.media), skipped=skipped, **kw)

    @classmethod
    def from_tar_shards(
        cls, paths: str | Path | Iterable[str | Path], check: RecordCheck | None = None, **kw: Any
    ) -> Any:  # an instance of cls
        """`paths`: shard files, a folder (all its `*.tar`) or a glob pattern ("shards/*.tar")."""
        skipped = SkipCounter()
        return cls(index_tar_shards(shard_paths(paths), skipped, check, cls.media), skipped=skipped, **kw)

    def __len__(self) -> int:
        return self.rounds

    def _mine(self, epoch: int) -> np.ndarray:
        """Record indices of this rank for `epoch`, one per round."""
        if self._order_epoch != epoch:
            n = len(self.records)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order = order[self.rank : self.rounds * self.world_size : self.world_size]
            self._order_epoch = epoch
        return self._order

    media: ClassVar[Media]

    def _decode(self, rec: Record) -> Any:
        raise NotImplementedError

    def _failure_reason(self, err: BaseException) -> str:
        raise NotImplementedError

    def _load(self, index: int) -> dict[str, Any] | None:
        rec = self.records[index]
        try:
            value = self._decode(rec)
        # Decoders raise many types (OSError, SyntaxError, ValueError, …); none may stop a run.
        except Exception as err:
            self._bad.add(index)
            self.skipped.add(self._failure_reason(err), f"{rec.path}#{rec.key}: {type(err).__name__}: {err}")
            return None
        return {"key": rec.key, **rec.fields, self.media.field: value}

    def _sample_for_round(self, epoch: int, round_: int) -> dict[str, Any]:
        mine = self._mine(epoch)
        for k in range(self.rounds):  # the round's record, else the next readable one of this rank
            index = int(mine[(round_ + k) % self.rounds])
            if index not in self._bad and (sample := self._load(index)) is not None:
                return sample
        raise NoUsableRecords(
            f"no readable {self.media.field} among the {self.rounds} records of data rank {self.rank}: nothing usable is "
            f"left ({self.skipped.summary()})"
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        start = t = self.epoch * self.rounds + self.position  # rounds are counted across epochs
        end = (self.epoch + 1) * self.rounds  # loop=False: the rest of the current epoch
        while self.loop or t < end:
            epoch, round_ = divmod(t, self.rounds)
            t += 1
            if (t - 1 - start) % n_workers != worker:
                continue
            sample = self._sample_for_round(epoch, round_)
            self.epoch, self.position = divmod(t, self.rounds)  # set before yielding: resume *after* it
            yield sample
        self.epoch, self.position = divmod(end, self.rounds)

    def state_dict(self) -> dict[str, Any]:
        # The same on every rank (no per-rank counters): the checkpointer stores one copy for all.
        return {
            "epoch": self.epoch,
            "position": self.position,
            "world_size": self.world_size,
            "seed": self.seed,
            "n_records": len(self.records),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["n_records"], state["seed"]) != (len(self.records), self.seed):
            raise ValueError(
                f"data state is for {state['n_records']} records with seed {state['seed']}, this dataset has "
                f"{len(self.records)} with seed {self.seed}: resuming would change the samples"
            )
        self.epoch, position = int(state["epoch"]), int(state["position"])
        # Another data-parallel size: continue after the same number of records of the global order
        # (rounded down, so at most one round's records are seen twice).
        self.position = position * int(state["world_size"]) // self.world_size


class ImageTextDataset(MediaTextDataset):
    """Shuffled, rank-sharded, resumable stream of `{"key", "image": PIL RGB, **text fields}` (the
    behaviour is `MediaTextDataset`'s; unreadable images count as missing_file, not_an_image, …)."""

    media = IMAGE

    def _decode(self, rec: Record) -> Image.Image:
        return decode_image(rec.media_bytes())

    def _failure_reason(self, err: BaseException) -> str:
        return _failure_reason(err)


def write_tar_shards(
    manifest: str | Path,
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    root: str | Path | None = None,
    prefix: str = "shard",
    media: Media = IMAGE,
) -> list[Path]:
    """Copy a manifest + media folder into webdataset shards `{prefix}-000000.tar`, … in manifest order.

    Media bytes are copied as they are (no re-encode, so a bad file stays bad and is counted by the
    reader exactly as for the manifest); the other fields go to `key.json`. Records whose media file is
    missing are left out. Shards are written atomically and reproducibly (fixed mtime and owner).
    """
    out = Path(out_dir)
    records = index_jsonl(manifest, root, media=media)
    written: list[Path] = []
    for first in range(0, len(records), samples_per_shard):
        path = out / f"{prefix}-{len(written):06d}.tar"
        with (
            atomic_write(path, "wb") as f,
            tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf,
        ):
            for i, rec in enumerate(records[first : first + samples_per_shard], start=first):
                if not Path(rec.path).is_file():
                    continue
                # The reader decodes by content; the extension only marks which member is the media.
                ext = Path(rec.path).suffix.lower()
                ext = ext if ext in media.exts else media.default_ext
                key = f"{i:09d}"
                for name, data in (
                    (key + ext, rec.media_bytes()),
                    (key + ".json", dumps({"id": rec.key, **rec.fields}).encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tf.addfile(info, io.BytesIO(data))
        written.append(path)
    return written
