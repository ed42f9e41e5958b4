"""Load a pretrained Llama from a Meta or Hugging Face checkpoint, and convert between the two.

The model is built on the meta device and the checkpoint's tensors are assigned into it
(`load_state_dict(assign=True)`), so no memory is spent on a throwaway random init and an mmap'd Meta
shard is not even copied when device and dtype already match.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import torch

from herd.text.args import ModelArgs
from herd.text.checkpoint_hf import (
    CONFIG_FILE,
    INDEX_FILE,
    SINGLE_FILE,
    load_hf_checkpoint,
    read_hf_config,
    save_hf_checkpoint,
)
from herd.text.checkpoint_meta import (
    PARAMS_FILE,
    CheckpointError,
    check_keys,
    fmt_shape,
    load_meta_checkpoint,
    save_meta_checkpoint,
)
from herd.text.model import Llama

CheckpointFormat = Literal["meta", "hf", "dcp"]
DCP_METADATA = ".metadata"
# herd.text.tokenizer.SUBSET_FILE, spelled out: importing the tokenizer module would load tiktoken eagerly.
SUBSET_FILE = "vocab_subset.json"
# Files that travel with the weights on conversion; the tokenizer loader finds them in either layout.
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def detect_format(path: str | PathLike) -> CheckpointFormat:
    """ "meta" (params.json + consolidated.NN.pth), "hf" (config.json + safetensors) or "dcp" (.metadata)."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    if not root.is_dir():
        raise CheckpointError(f"{root} is a file; pass the checkpoint directory ({root.parent})")
    if (root / DCP_METADATA).is_file():
        return "dcp"
    has_weights = (root / SINGLE_FILE).is_file() or (root / INDEX_FILE).is_file()
    if (root / CONFIG_FILE).is_file() and has_weights:
        return "hf"
    if (root / PARAMS_FILE).is_file() or any(root.glob("consolidated.*.pth")):
        return "meta"
    if (root / CONFIG_FILE).is_file():
        return "hf"  # config without weights: the HF reader says which file is missing
    hint = ""
    if (root / "original" / PARAMS_FILE).is_file():
        hint = f"; a Meta checkpoint lies in {root / 'original'}"
    raise CheckpointError(
        f"{root}: not a checkpoint directory (looked for params.json + consolidated.NN.pth, "
        f"config.json + model.safetensors / {INDEX_FILE}, or {DCP_METADATA}){hint}"
    )


def load_checkpoint(
    path: str | PathLike, format: CheckpointFormat | None = None, dtype: torch.dtype | str | None = None
) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Args and full state dict (Meta naming, Meta RoPE layout) of a checkpoint directory."""
    fmt = format or detect_format(path)
    if fmt == "meta":
        return load_meta_checkpoint(path, parse_dtype(dtype))
    if fmt == "hf":
        return load_hf_checkpoint(path, parse_dtype(dtype))
    if fmt == "dcp":
        raise NotImplementedError(
            f"{path} is a torch.distributed.checkpoint (DCP) directory; loading DCP checkpoints is not "
            "implemented yet — export the run to Meta or Hugging Face format first"
        )
    raise ValueError(f"unknown checkpoint format {fmt!r} (expected 'meta', 'hf' or 'dcp')")


def model_from_state_dict(
    args: ModelArgs,
    state_dict: dict[str, torch.Tensor],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
) -> Llama:
    """Build `Llama(args)` on meta and assign `state_dict` into it (strict: keys and shapes must match)."""
    dtype = parse_dtype(dtype)
    with torch.device("meta"):
        model = Llama(args)
    want = model.state_dict()
    check_keys(state_dict.keys(), want.keys(), "checkpoint")
    for name, ref in want.items():
        got = state_dict[name]
        if got.shape != ref.shape:
            raise CheckpointError(
                f"checkpoint: {name} has shape {fmt_shape(got.shape)} but the model expects {fmt_shape(ref.shape)}"
            )
    tensors = {
        k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else None)
        for k, v in state_dict.items()
    }
    model.load_state_dict(tensors, strict=True, assign=True)
    model.init_rope()
    return model.eval()


def load_model(
    path: str | PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    format: CheckpointFormat | None = None,
) -> Llama:
    """The model of a Meta or Hugging Face checkpoint directory, in eval mode (dtype None: as stored)."""
    args, sd = load_checkpoint(path, format)
    return model_from_state_dict(args, sd, device, dtype)


def load_pretrained(
    path: str | PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    format: CheckpointFormat | None = None,
) -> tuple[Llama, Any]:
    """Model and tokenizer of a checkpoint directory (tokenizer.model in it or in original/)."""
    model = load_model(path, device, dtype, format)
    from herd.text.tokenizer import load_tokenizer  # lazy: tokenizers pull in tiktoken/sentencepiece

    return model, load_tokenizer(path, vocab_size=model.args.vocab_size)


def save_text_model(
    state_dict: dict[str, torch.Tensor],
    args: ModelArgs,
    tokenizer: Any,
    out_dir: str | PathLike,
    fmt: Literal["meta", "hf", "none"] = "meta",
) -> Path | None:
    """Write a model where `load_pretrained` reads it, with the tokenizer it was trained with.

    "meta": params.json + herd_params.json + consolidated.00.pth, `tokenizer.model`, and
    `vocab_subset.json` for a trimmed vocabulary. "hf": config.json (with bos/eos ids) + safetensors,
    `tokenizer.model`, and for the Llama 3 tokenizer the files transformers and serving stacks read
    (tokenizer.json, tokenizer_config.json with the chat template, special_tokens_map.json,
    generation_config.json). A trimmed vocabulary cannot be written as "hf" (`refuse_subset_vocabulary`
    says why); that is checked before anything is written. "none" writes nothing (returns None).
    """
    if fmt == "none":
        return None
    out = Path(out_dir)
    from herd.text.tokenizer import Tokenizer
    from herd.text.vocab_subset import SubsetTokenizer

    if fmt == "meta":
        save_meta_checkpoint(out, args, state_dict, overwrite=True)
    elif fmt == "hf":
        from herd.text.hf_tokenizer import hf_token_ids, refuse_subset_vocabulary

        refuse_subset_vocabulary(tokenizer, out)
        extra = hf_token_ids(tokenizer) if tokenizer is not None else {}
        save_hf_checkpoint(out, args, state_dict, extra_config=extra, overwrite=True)
    else:
        raise ValueError(f"checkpoint.export_format must be meta, hf or none, got {fmt!r}")
    if isinstance(tokenizer, SubsetTokenizer):
        tokenizer.save(out)
        tokenizer = tokenizer.base
    tok_file = getattr(tokenizer, "path", None)
    if tok_file is not None and Path(tok_file).is_file():
        shutil.copy2(tok_file, out / "tokenizer.model")
    if fmt == "hf" and isinstance(tokenizer, Tokenizer):
        from herd.text.hf_tokenizer import write_hf_tokenizer

        write_hf_tokenizer(tokenizer, out, args.max_seq_len)
    return out


# --- conversion ----------------------------------------------------------------------------------------
@dataclass
class ConvertResult:
    src_format: str
    dst_format: str
    num_tensors: int
    num_params: int
    seconds: float
    files: list[Path] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)  # tokenizer/generation files carried across or derived


def _token_ids(src: Path, src_format: str, tokenizer: Any = None) -> dict[str, Any]:
    """bos/eos/pad ids for a written config.json: from the source config, else generation_config.json,
    else the source's tokenizer (a Meta checkpoint has only tokenizer.model)."""
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    sources = [read_hf_config(src)] if src_format == "hf" else []
    gen = src / "generation_config.json"
    if gen.is_file():
        # A broken generation config only loses the token ids, not the conversion.
        with contextlib.suppress(json.JSONDecodeError):
            sources.append(json.loads(gen.read_text()))
    for cfg in sources:
        if any(k in cfg for k in keys):
            return {k: cfg[k] for k in keys if k in cfg}
    if tokenizer is not None:
        from herd.text.hf_tokenizer import hf_token_ids

        return hf_token_ids(tokenizer)
    return {}


def _source_file(src: Path, name: str) -> Path | None:
    """`src/name`, else `src/original/name` (Meta's files inside a Hugging Face repository), else None."""
    return next((p for p in (src / name, src / "original" / name) if p.is_file()), None)


def _tiktoken_tokenizer(src: Path, vocab_size: int) -> Any:
    """The Llama 3 tokenizer of a checkpoint folder, or None when it has no tiktoken tokenizer.model."""
    from herd.text.tokenizer import Tokenizer, detect_tokenizer_format

    file = _source_file(src, "tokenizer.model")
    if file is None:
        return None
    try:
        if detect_tokenizer_format(file) != "tiktoken":
            return None  # SentencePiece (Llama 1/2): copied as it is
    except ValueError:
        return None  # neither format (a placeholder): copied as it is, no tokenizer files derived
    tokenizer = Tokenizer(file)
    if tokenizer.vocab_size > vocab_size:
        raise CheckpointError(
            f"{file}: {tokenizer.vocab_size} tokens, more than the checkpoint's vocab_size {vocab_size}"
        )
    return tokenizer


def copy_tokenizer_files(src: str | PathLike, dst: str | PathLike) -> list[str]:
    """Copy the tokenizer/generation files of `src` (or `src/original/`) into `dst`; returns their names."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in (*TOKENIZER_FILES, SUBSET_FILE):
        found = _source_file(src, name)
        if found is not None:
            shutil.copy2(found, dst / name)
            copied.append(name)
    return copied


def convert_checkpoint(
    src: str | PathLike,
    dst: str | PathLike,
    src_format: CheckpointFormat | None = None,
    dst_format: Literal["meta", "hf"] = "hf",
    num_shards: int = 1,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> ConvertResult:
    """Convert a checkpoint directory between Meta and Hugging Face layouts (or reshard within one).

    `num_shards` is the Meta model-parallel split; `max_shard_size` bounds HF safetensors files.
    """
    start = time.perf_counter()
    src_path, dst_path = Path(src), Path(dst)
    if src_path.resolve() == dst_path.resolve():
        raise ValueError(f"source and destination are the same directory ({src_path})")
    fmt = src_format or detect_format(src_path)
    if dst_format == "hf" and num_shards != 1:
        raise ValueError("num_shards applies to Meta checkpoints; use max_shard_size for Hugging Face")
    if dst_format == "hf" and (subset := _source_file(src_path, SUBSET_FILE)) is not None:
        raise CheckpointError(
            f"{subset}: the model was trained on a trimmed vocabulary, which no Hugging Face tokenizer "
            "reproduces (see herd.text.hf_tokenizer.refuse_subset_vocabulary); keep it in the Meta layout"
        )
    args, sd = load_checkpoint(src_path, fmt, dtype)
    # A Meta source carries only tokenizer.model: transformers needs tokenizer.json & co. derived from it.
    derive = dst_format == "hf" and _source_file(src_path, "tokenizer.json") is None
    tokenizer = _tiktoken_tokenizer(src_path, args.vocab_size) if derive else None
    if dst_format == "meta":
        files = save_meta_checkpoint(dst_path, args, sd, num_shards=num_shards, overwrite=overwrite)
    elif dst_format == "hf":
        extra = _token_ids(src_path, fmt, tokenizer)
        files = save_hf_checkpoint(
            dst_path, args, sd, max_shard_size, extra_config=extra, overwrite=overwrite
        )
    else:
        raise ValueError(f"cannot write format {dst_format!r} (expected 'meta' or 'hf')")
    copied = copy_tokenizer_files(src_path, dst_path)
    if tokenizer is not None:
        from herd.text.hf_tokenizer import write_hf_tokenizer

        # A generation_config.json of the source (sampling defaults, its own stop ids) is kept.
        keep_generation = "generation_config.json" in copied
        written = write_hf_tokenizer(tokenizer, dst_path, args.max_seq_len, generation=not keep_generation)
        copied = sorted({*copied, *(f.name for f in written)})
    return ConvertResult(
        src_format=fmt,
        dst_format=dst_format,
        num_tensors=len(sd),
        num_params=sum(t.numel() for t in sd.values()),
        seconds=time.perf_counter() - start,
        files=files,
        copied=copied,
    )


__all__ = [
    "CheckpointFormat",
    "ConvertResult",
    "TOKENIZER_FILES",
    "convert_checkpoint",
    "copy_tokenizer_files",
    "detect_format",
    "load_checkpoint",
    "load_model",
    "load_pretrained",
    "model_from_state_dict",
    "parse_dtype",
    "save_text_model",
]
