"""Checkpoint conversion for `herd convert`: Meta ⇄ Hugging Face, and export of training checkpoints (DCP).

    convert("runs/x/checkpoints", "x-hf", dst_format="hf")          # a run's newest complete checkpoint
    convert("Llama-3.2-1B", "llama32-1b-meta", dst_format="meta", src_format="hf", num_shards=1)

Meta ⇄ Hugging Face lives with the model (`herd.text.loading.convert_checkpoint`); this module adds
the training checkpoints written by `herd.checkpoint` (torch.distributed.checkpoint), which is why it
sits in `herd` rather than `herd.text`: reading DCP needs torch.distributed, which model code must not
import.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

FORMATS = ("meta", "hf", "dcp")  # sources; destinations are meta or hf


def dcp_source(src: str | Path) -> Path | None:
    """The DCP checkpoint `src` names: itself (.metadata or herd.json), or a run's newest in a folder."""
    from herd.checkpoint import DCP_METADATA, META_FILE, list_checkpoints

    src = Path(src)
    if (src / DCP_METADATA).is_file() or (src / META_FILE).is_file():
        return src
    found = list_checkpoints(src)
    return found[-1][1] if found else None


def convert_dcp(
    src: str | Path,
    dst: str | Path,
    dst_format: str = "hf",
    num_shards: int = 1,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Any:
    """Export the model of a training checkpoint to a Meta or Hugging Face directory (one process)."""
    from herd.checkpoint import load_dcp_model
    from herd.text.args import ModelArgs
    from herd.text.checkpoint_hf import save_hf_checkpoint
    from herd.text.checkpoint_meta import save_meta_checkpoint
    from herd.text.loading import ConvertResult, parse_dtype

    start = time.perf_counter()
    args_dict, sd = load_dcp_model(src)
    if not args_dict:
        raise ValueError(f"{src}: herd.json holds no model args; the checkpoint cannot be exported")
    args = ModelArgs(**args_dict)
    cast = parse_dtype(dtype)
    if cast is not None:
        sd = {k: v.to(cast) if v.is_floating_point() else v for k, v in sd.items()}
    if dst_format == "meta":
        files = save_meta_checkpoint(dst, args, sd, num_shards=num_shards, overwrite=overwrite)
    elif dst_format == "hf":
        if num_shards != 1:
            raise ValueError("num_shards applies to Meta checkpoints; use max_shard_size for Hugging Face")
        files = save_hf_checkpoint(dst, args, sd, max_shard_size, overwrite=overwrite)
    else:
        raise ValueError(f"cannot write format {dst_format!r} (expected 'meta' or 'hf')")
    return ConvertResult(
        src_format="dcp",
        dst_format=dst_format,
        num_tensors=len(sd),
        num_params=sum(t.numel() for t in sd.values()),
        seconds=time.perf_counter() - start,
        files=files,
    )


def convert(
    src: str | Path,
    dst: str | Path,
    dst_format: str,
    src_format: str | None = None,
    num_shards: int = 1,
    max_shard_size: int | str = "5GB",
    dtype: str | None = None,
    overwrite: bool = False,
) -> tuple[Path, Any]:
    """`herd convert`: any checkpoint `src` (format detected unless `src_format` says) → `dst`.

    A DCP source may be one checkpoint or a run's checkpoints folder (its newest complete one is used).
    Returns (the source actually read, `herd.text.loading.ConvertResult`).
    """
    from herd.text.loading import convert_checkpoint  # lazy: torch only when converting

    if src_format is not None and src_format not in FORMATS:
        raise ValueError(f"unknown source format {src_format!r} (expected one of {', '.join(FORMATS)})")
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: checkpoint not found")
    found = dcp_source(src) if src_format in (None, "dcp") and src.is_dir() else None
    if src_format == "dcp" and found is None:
        raise FileNotFoundError(f"{src}: not a DCP checkpoint, nor a folder holding a complete one")
    if found is not None:
        return found, convert_dcp(found, dst, dst_format, num_shards, dtype, max_shard_size, overwrite)
    result = convert_checkpoint(
        src, dst, src_format=src_format, dst_format=dst_format, num_shards=num_shards, dtype=dtype,
        max_shard_size=max_shard_size, overwrite=overwrite,
    )  # fmt: skip
    return src, result


__all__ = ["FORMATS", "convert", "convert_dcp", "dcp_source"]
