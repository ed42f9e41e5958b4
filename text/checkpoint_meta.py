"""Meta's checkpoint layout: `params.json` + `consolidated.NN.pth`, one file per model-parallel rank.

Meta's reference code (its model-parallel layers) splits each weight across ranks the way its parallel layer does:
column-parallel layers (wq, wk, wv, w1, w3, output) along the output dim 0, row-parallel ones
(wo, w2) along the input dim 1; norms are replicated. The token embedding is split along the model
dim (ParallelEmbedding, Llama 1/2) or the vocabulary (VocabParallelEmbedding, Llama 3): which one is
read off the shard shapes. When there are more ranks than KV heads (405B at MP16) each KV head is
stored on several consecutive ranks; merging keeps one copy.

params.json holds only the keys Meta's files use, so llama-models' own loader reads it
(`ModelArgs(max_seq_len=..., max_batch_size=..., **params)`); what those keys cannot say (the context
length, the tie flag, a non-default RoPE scaling table) goes into `herd_params.json` beside it. A tied
model (Llama 3.2 1B/3B) is written with `output.weight` as a copy of the embedding, as Meta's own files
are, because Meta's `Transformer` always has an output layer.

Also home of the helpers shared with the Hugging Face reader (`CheckpointError`, `expected_shapes`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import torch

from herd.text.args import ModelArgs, RopeScaling

PARAMS_FILE = "params.json"
HERD_PARAMS_FILE = "herd_params.json"  # herd's additions to params.json; Meta's tools never read it
_HERD_PARAM_TYPES: dict[str, tuple[type, ...]] = {
    "max_seq_len": (int,),
    "tie_embeddings": (bool,),
    "rope_scaling": (dict,),
}
_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")
# Derived buffers that some Meta checkpoints carry (Llama 1/2 store `rope.freqs`); recomputed, never loaded.
_DERIVED_KEYS = frozenset({"rope.freqs"})

_COLUMN = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight")
_COLUMN += ("feed_forward.w1.weight", "feed_forward.w3.weight")
_ROW = ("attention.wo.weight", "feed_forward.w2.weight")
_KV = ("attention.wk.weight", "attention.wv.weight")

EmbeddingSplit = Literal["vocab", "dim"]


class CheckpointError(ValueError):
    """A checkpoint that does not match its config, or cannot be read."""


class CheckpointFileMissing(CheckpointError, FileNotFoundError):
    """A file the checkpoint needs (shard, config) is absent."""


def fmt_shape(shape: Iterable[int]) -> str:
    return str(tuple(int(s) for s in shape))


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every parameter name of `Llama(args)` (Meta naming) and its shape, in the model's order."""
    from herd.text.model import Llama  # lazy: keeps this module importable without building models

    with torch.device("meta"):
        model = Llama(args)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_keys(have: Iterable[str], want: Iterable[str], source: str) -> None:
    """Raise listing the missing and unexpected keys of `source` (a file or checkpoint name)."""
    have_s, want_s = set(have), set(want)
    missing = [k for k in want if k not in have_s]
    unexpected = sorted(have_s - want_s)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        raise CheckpointError(f"{source}: " + "; ".join(parts))


def _split_kind(name: str) -> str:
    if name == "output.weight" or name.endswith(_COLUMN):
        return "column"
    if name.endswith(_ROW):
        return "row"
    if name == "tok_embeddings.weight":
        return "embedding"
    return "replicated"


def _kv_copies(args: ModelArgs, num_shards: int) -> int:
    """How many consecutive ranks hold the same KV heads (1 unless num_shards > n_kv_heads)."""
    kv = args.n_kv_heads
    if num_shards > kv:
        if num_shards % kv:
            raise CheckpointError(f"{num_shards} shards cannot hold {kv} KV heads ({num_shards} % {kv} != 0)")
        return num_shards // kv
    return 1


def shard_shapes(
    args: ModelArgs,
    num_shards: int,
    embedding_split: EmbeddingSplit = "vocab",
    full: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, tuple[int, ...]] | None:
    """Per-rank shape of every weight for a `num_shards`-way split, or None if the dims don't divide.

    `full` (from `expected_shapes(args)`) saves rebuilding the meta model when called in a loop.
    """
    n, kv = num_shards, args.n_kv_heads
    if n > kv and n % kv:
        return None
    copies = n // kv if n > kv else 1
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in (full or expected_shapes(args)).items():
        kind = _split_kind(name)
        dim = {"column": 0, "row": 1, "embedding": 0 if embedding_split == "vocab" else 1}.get(kind)
        if dim is None:
            out[name] = shape
            continue
        parts = n // copies if name.endswith(_KV) else n
        if shape[dim] % parts:
            return None
        out[name] = tuple(s // parts if i == dim else s for i, s in enumerate(shape))
    return out


def shard_file(index: int) -> str:
    return f"consolidated.{index:02d}.pth"


def find_shards(path: str | PathLike) -> list[Path]:
    """The `consolidated.NN.pth` files of a directory, in rank order; raises if a rank is absent."""
    root = Path(path)
    found = {int(m.group(1)): root / f.name for f in root.iterdir() if (m := _SHARD_RE.match(f.name))}
    if not found:
        raise CheckpointFileMissing(f"{root}: no consolidated.NN.pth files (Meta checkpoint expected)")
    missing = [shard_file(i) for i in range(max(found) + 1) if i not in found]
    if missing:
        have = ", ".join(p.name for _, p in sorted(found.items()))
        raise CheckpointFileMissing(f"{root}: {', '.join(missing)} missing (found {have})")
    return [found[i] for i in sorted(found)]


def read_json_file(file: Path, needed_by: str) -> dict[str, Any]:
    """A checkpoint's JSON config; errors name the file (`needed_by`: "a Meta checkpoint", ...)."""
    if not file.is_file():
        raise CheckpointFileMissing(f"{file} not found ({needed_by} needs {file.name})")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON ({e})") from e


def read_params(path: str | PathLike) -> dict[str, Any]:
    return read_json_file(Path(path) / PARAMS_FILE, "a Meta checkpoint")


def read_herd_params(path: str | PathLike) -> dict[str, Any]:
    """`herd_params.json` of a Meta checkpoint ({} when absent: Meta's own files, older herd exports)."""
    file = Path(path) / HERD_PARAMS_FILE
    if not file.is_file():
        return {}
    data = read_json_file(file, "a Meta checkpoint")
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    for key, value in data.items():
        types = _HERD_PARAM_TYPES.get(key)
        if types is None:
            raise CheckpointError(f"{file}: unknown key {key!r} (known: {', '.join(_HERD_PARAM_TYPES)})")
        if not isinstance(value, types) or (types == (int,) and isinstance(value, bool)):
            raise CheckpointError(f"{file}: {key} must be {types[0].__name__}, got {value!r}")
    if data.get("max_seq_len", 1) < 1:
        raise CheckpointError(f"{file}: max_seq_len must be positive, got {data['max_seq_len']}")
    if "rope_scaling" in data:
        fields = {f.name for f in dataclasses.fields(RopeScaling)}
        if set(data["rope_scaling"]) != fields:
            raise CheckpointError(f"{file}: rope_scaling needs exactly the keys {', '.join(sorted(fields))}")
    return data


def _tie_flag(params: Mapping[str, Any]) -> bool | None:
    """The explicit tie flag of merged params.json + herd_params.json, or None (Meta's files carry none)."""
    for key in ("tie_embeddings", "tie_word_embeddings"):
        if key in params:
            return bool(params[key])
    return None


def args_from_params(
    params: Mapping[str, Any],
    vocab_size: int | None = None,
    has_output: bool | None = None,
    herd_params: Mapping[str, Any] | None = None,
) -> ModelArgs:
    """ModelArgs of a params.json (+ herd_params.json); `vocab_size` fills Llama 1/2's `-1` (read off the
    tensors).

    `has_output`: whether the shards hold output.weight. Without an explicit tie flag a checkpoint without a
    head is read as tied; one with a head as untied here (`load_meta_checkpoint` then ties it when the head
    is a copy of the embedding, as in Meta's Llama 3.2 files).
    """
    merged = {**params, **(herd_params or {})}
    overrides: dict[str, Any] = {}
    if vocab_size is not None and merged.get("vocab_size", -1) == -1:
        overrides["vocab_size"] = vocab_size
    if has_output is not None and _tie_flag(merged) is None:
        overrides["tie_embeddings"] = not has_output
    return ModelArgs.from_meta_params(merged, **overrides)


def _load_shard(file: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, pickle with non-tensor objects, ...: name the file
        raise CheckpointError(f"{file}: could not be read ({type(e).__name__}: {e})") from e
    if not isinstance(sd, dict):
        raise CheckpointError(f"{file}: expected a dict of tensors, got {type(sd).__name__}")
    return {k: v for k, v in sd.items() if k not in _DERIVED_KEYS}


def _infer_vocab(shard0: Mapping[str, torch.Tensor], params: Mapping[str, Any], n: int) -> int | None:
    """Vocabulary size of a checkpoint whose params.json says -1 (Llama 1/2)."""
    if params.get("vocab_size", -1) != -1:
        return None
    if "output.weight" in shard0:  # column-parallel: rows are vocab / n
        return shard0["output.weight"].shape[0] * n
    emb = shard0.get("tok_embeddings.weight")
    if emb is None:
        return None
    return emb.shape[0] * (n if emb.shape[1] == params.get("dim") else 1)


def _shape_error(file: Path, name: str, got: tuple[int, ...], want: tuple[int, ...], n: int) -> str:
    where = "" if n == 1 else f" for 1 of {n} shards"
    return f"{file.name}: {name} has shape {fmt_shape(got)} but params.json implies {fmt_shape(want)}{where}"


def _check_shard(
    file: Path, sd: Mapping[str, torch.Tensor], args: ModelArgs, n: int, full: Mapping[str, tuple[int, ...]]
) -> EmbeddingSplit:
    """Validate one rank's keys and shapes; returns how its embedding is split."""
    check_keys(sd.keys(), full.keys(), file.name)
    by_vocab, by_dim = shard_shapes(args, n, "vocab", full), shard_shapes(args, n, "dim", full)
    emb = tuple(sd["tok_embeddings.weight"].shape)
    split: EmbeddingSplit = "dim" if by_dim and emb == by_dim["tok_embeddings.weight"] else "vocab"
    want = by_vocab if split == "vocab" else by_dim
    for name in full:
        got = tuple(sd[name].shape)
        if want is None or got != want[name]:
            msg = _shape_error(file, name, got, (want or full)[name], n)
            raise CheckpointError(msg + _missing_shard_hint(sd, args, n, full))
    return split


def _missing_shard_hint(
    sd: Mapping[str, torch.Tensor], args: ModelArgs, n: int, full: Mapping[str, tuple[int, ...]]
) -> str:
    """If this rank's shapes fit a k-rank split with k > n, the other k - n files were lost."""
    for k in range(n + 1, 129):  # Meta never published more than 16 ranks; 128 is generous
        for split in ("vocab", "dim"):
            want = shard_shapes(args, k, split, full)  # type: ignore[arg-type]
            if want is not None and all(tuple(sd[name].shape) == s for name, s in want.items()):
                missing = ", ".join(shard_file(i) for i in range(n, k))
                return f" — its shapes fit a {k}-shard checkpoint: {missing} missing?"
    return ""


def _merge(
    shards: list[dict[str, torch.Tensor]], args: ModelArgs, split: EmbeddingSplit, files: list[Path]
) -> dict[str, torch.Tensor]:
    n = len(shards)
    copies = _kv_copies(args, n)
    merged: dict[str, torch.Tensor] = {}
    for name in expected_shapes(args):
        kind = _split_kind(name)
        parts = [sd[name] for sd in shards]
        if kind == "replicated":
            for f, p in zip(files[1:], parts[1:]):
                if not torch.equal(p, parts[0]):
                    raise CheckpointError(f"{f.name}: replicated {name} differs from {files[0].name}'s")
            merged[name] = parts[0]
            continue
        if n == 1:
            merged[name] = parts[0]
            continue
        if name.endswith(_KV) and copies > 1:  # each KV head lives on `copies` consecutive ranks
            for i in range(0, n, copies):
                for j in range(i + 1, i + copies):
                    if not torch.equal(parts[j], parts[i]):
                        raise CheckpointError(
                            f"{files[j].name}: {name} should repeat {files[i].name}'s KV heads "
                            f"({n} shards > {args.n_kv_heads} KV heads) but differs"
                        )
            parts = parts[::copies]
        dim = {"column": 0, "row": 1}.get(kind, 0 if split == "vocab" else 1)
        merged[name] = torch.cat(parts, dim=dim)
    return merged


def load_meta_checkpoint(
    path: str | PathLike, dtype: torch.dtype | None = None
) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Read params.json (+ herd_params.json) and every consolidated.NN.pth; returns the args and the merged
    state dict."""
    root = Path(path)
    params, extra = read_params(root), read_herd_params(root)
    files = find_shards(root)
    shards = [_load_shard(f) for f in files]
    vocab = _infer_vocab(shards[0], params, len(files))
    has_output = "output.weight" in shards[0]
    args = args_from_params(params, vocab, has_output=has_output, herd_params=extra)
    tie = _tie_flag({**params, **extra})
    if has_output and args.tie_embeddings:  # a tied model written with Meta's copy of the head
        args = dataclasses.replace(args, tie_embeddings=False)
    full = expected_shapes(args)
    splits = {_check_shard(f, sd, args, len(files), full) for f, sd in zip(files, shards)}
    if len(splits) > 1:
        raise CheckpointError(f"{root}: shards disagree on how tok_embeddings.weight is split")
    sd = _merge(shards, args, splits.pop(), files)
    if has_output and tie is not False:
        if torch.equal(sd["output.weight"], sd["tok_embeddings.weight"]):
            del sd["output.weight"]
            args = dataclasses.replace(args, tie_embeddings=True)
        elif tie:
            raise CheckpointError(
                f"{root}: {HERD_PARAMS_FILE} says tie_embeddings but output.weight differs from "
                "tok_embeddings.weight"
            )
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    return args, sd


def split_state_dict(
    sd: Mapping[str, torch.Tensor],
    args: ModelArgs,
    num_shards: int,
    embedding_split: EmbeddingSplit = "vocab",
) -> list[dict[str, torch.Tensor]]:
    """The inverse of the merge: one dict per rank, split as Meta's model-parallel layers would."""
    n = num_shards
    if shard_shapes(args, n, embedding_split) is None:
        raise CheckpointError(f"the model's dims are not divisible into {n} shards ({embedding_split} split)")
    copies = _kv_copies(args, n)
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for name in expected_shapes(args):
        t, kind = sd[name], _split_kind(name)
        if kind == "replicated" or n == 1:
            pieces = [t] * n
        else:
            dim = {"column": 0, "row": 1}.get(kind, 0 if embedding_split == "vocab" else 1)
            parts = n // copies if name.endswith(_KV) else n
            pieces = [p for p in t.chunk(parts, dim=dim) for _ in range(copies if name.endswith(_KV) else 1)]
        for rank, p in enumerate(pieces):
            out[rank][name] = p
    return out


def _owned(t: torch.Tensor) -> torch.Tensor:
    # torch.save writes a view's whole storage: a chunk would carry every other rank's slice too.
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def save_meta_checkpoint(
    path: str | PathLike,
    args: ModelArgs,
    state_dict: Mapping[str, torch.Tensor],
    num_shards: int = 1,
    dtype: torch.dtype | None = None,
    embedding_split: EmbeddingSplit = "vocab",
    overwrite: bool = False,
) -> list[Path]:
    """Write params.json, herd_params.json and `num_shards` consolidated.NN.pth files; returns the files
    written."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    existing = [f for f in root.iterdir() if _SHARD_RE.match(f.name)]
    if existing and not overwrite:
        raise FileExistsError(f"{root} already holds {existing[0].name}; pass overwrite=True to replace it")
    check_keys(state_dict.keys(), expected_shapes(args).keys(), "state dict")
    for f in existing:  # a stale consolidated.03.pth would be read as a fourth rank
        f.unlink()
    (root / PARAMS_FILE).write_text(json.dumps(args.to_meta_params(), indent=2) + "\n")
    (root / HERD_PARAMS_FILE).write_text(json.dumps(args.to_herd_params(), indent=2) + "\n")
    written = [root / PARAMS_FILE, root / HERD_PARAMS_FILE]
    if args.tie_embeddings:
        # Meta's Transformer always has `output`; its tied releases store the embedding there again. One
        # shard saves the same tensor under both names, which torch.save stores once.
        state_dict = {**state_dict, "output.weight": state_dict["tok_embeddings.weight"]}
        args = dataclasses.replace(args, tie_embeddings=False)
    for rank, shard in enumerate(split_state_dict(state_dict, args, num_shards, embedding_split)):
        file = root / shard_file(rank)
        torch.save({k: _owned(v if dtype is None else v.to(dtype)) for k, v in shard.items()}, file)
        written.append(file)
    return written


__all__ = [
    "CheckpointError",
    "CheckpointFileMissing",
    "HERD_PARAMS_FILE",
    "PARAMS_FILE",
    "args_from_params",
    "check_keys",
    "expected_shapes",
    "find_shards",
    "load_meta_checkpoint",
    "read_herd_params",
    "read_params",
    "save_meta_checkpoint",
    "shard_file",
    "shard_shapes",
    "split_state_dict",
]
