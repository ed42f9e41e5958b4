"""Hugging Face Llama layout: `config.json` + `model.safetensors` (or shards with an index).

Names map one to one onto Meta's; the difference is RoPE. Meta rotates interleaved pairs (dims 2i,
2i+1 of a head), transformers rotates halves (dims i, i + hd/2), so HF's conversion script permutes
the rows of wq and wk within each head. Reading undoes that permutation, writing redoes it; both
are pure row gathers, so a round trip is bit exact. With GQA, wk has n_kv_heads heads.

config.json differs between transformers 4.x (`rope_theta`, `rope_scaling`, `torch_dtype`) and 5.x
(`rope_parameters`, `dtype`): both are read, and both are written so that either version loads it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from herd.text.args import PUBLISHED_FFN_RULES, ModelArgs, RopeScaling
from herd.text.checkpoint_meta import (
    CheckpointError,
    CheckpointFileMissing,
    check_keys,
    expected_shapes,
    fmt_shape,
    read_json_file,
)

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Meta name (after "layers.N.") → HF name (after "model.layers.N.").
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
_TOP_NAMES["output.weight"] = "lm_head.weight"
_HF_TO_META_LAYER = {v: k for k, v in _LAYER_NAMES.items()}
_HF_TO_META_TOP = {v: k for k, v in _TOP_NAMES.items()}
# Old transformers saved the RoPE inverse frequencies; derived state, never loaded.
_DERIVED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def meta_to_hf_name(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    _, layer, rest = name.split(".", 2)
    return f"model.layers.{layer}.{_LAYER_NAMES[rest]}"


def hf_to_meta_name(name: str) -> str | None:
    """Meta name of an HF key, or None for a key this layout does not know."""
    if name in _HF_TO_META_TOP:
        return _HF_TO_META_TOP[name]
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", name)
    if m and m.group(2) in _HF_TO_META_LAYER:
        return f"layers.{m.group(1)}.{_HF_TO_META_LAYER[m.group(2)]}"
    return None


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rows (per head: pair i at rows 2i, 2i+1) → HF's halves (rows i, i + hd/2)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `permute_to_hf`."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _heads_of(meta_name: str, args: ModelArgs) -> int | None:
    if meta_name.endswith("attention.wq.weight"):
        return args.n_heads
    if meta_name.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


# --- config.json ⇄ ModelArgs ------------------------------------------------------------------------
def _ffn_fields(dim: int, heads: int, intermediate: int) -> dict[str, Any]:
    """A published (multiple_of, multiplier) pair when one gives the width, else the width itself;
    `ModelArgs.to_meta_params` then derives a pair for Meta's formula when writing params.json."""
    for multiple_of, mult in PUBLISHED_FFN_RULES:
        probe = ModelArgs(dim=dim, n_heads=heads, multiple_of=multiple_of, ffn_dim_multiplier=mult)
        if probe.ffn_hidden_dim == intermediate:
            return {"multiple_of": multiple_of, "ffn_dim_multiplier": mult}
    return {"ffn_dim": intermediate}


def _rope_fields(config: Mapping[str, Any], source: str) -> dict[str, Any]:
    params = config.get("rope_parameters") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10_000.0))
    scaling = config.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return {"rope_theta": float(theta), "rope_scaling": None}
    if kind != "llama3":
        raise NotImplementedError(f"{source}: RoPE scaling {kind!r} is not supported (only 'llama3')")
    rs = RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position=int(scaling["original_max_position_embeddings"]),
    )
    return {"rope_theta": float(theta), "rope_scaling": rs}


def args_from_hf_config(config: Mapping[str, Any], source: str = CONFIG_FILE) -> ModelArgs:
    """ModelArgs of a transformers LlamaConfig dict (defaults are LlamaConfig's where a key is absent)."""
    if config.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{source}: model_type {config['model_type']!r} is not a Llama")
    unsupported = {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu"}
    for key, ok in unsupported.items():
        if config.get(key, ok) != ok:
            raise NotImplementedError(f"{source}: {key}={config[key]!r} is not supported (Llama uses {ok!r})")
    dim, heads = int(config.get("hidden_size", 4096)), int(config.get("num_attention_heads", 32))
    if config.get("head_dim") not in (None, dim // heads):
        raise NotImplementedError(
            f"{source}: head_dim {config['head_dim']} != hidden_size / num_attention_heads"
        )
    return ModelArgs(
        dim=dim,
        n_layers=int(config.get("num_hidden_layers", 32)),
        n_heads=heads,
        n_kv_heads=config.get("num_key_value_heads") or heads,
        vocab_size=int(config.get("vocab_size", 32_000)),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_seq_len=int(config.get("max_position_embeddings", 2048)),
        **_ffn_fields(dim, heads, int(config.get("intermediate_size", 11_008))),
        **_rope_fields(config, source),
    )


def hf_config_from_args(
    args: ModelArgs, dtype: torch.dtype | None = None, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A config.json that transformers 4.x and 5.x both load as the same LlamaConfig."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": args.rope_theta}
    scaling = None
    if args.rope_scaling is not None:
        s = args.rope_scaling
        scaling = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position,
        }
        rope = {**scaling, "rope_theta": args.rope_theta}
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": rope,
        "tie_word_embeddings": args.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
    }
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        config["torch_dtype"] = config["dtype"] = name
    config.update(extra or {})
    return config


def read_hf_config(path: str | PathLike) -> dict[str, Any]:
    return read_json_file(Path(path) / CONFIG_FILE, "a Hugging Face checkpoint")


# --- reading -----------------------------------------------------------------------------------------
def _weight_files(root: Path) -> dict[str, list[str]]:
    """file name → the keys the index says it holds (no index: the single file, with no list)."""
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
        files: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            files.setdefault(fname, []).append(key)
        for fname in files:
            if not (root / fname).is_file():
                raise CheckpointFileMissing(
                    f"{root / fname} missing ({INDEX_FILE} maps {files[fname][0]} to it)"
                )
        return files
    if (root / SINGLE_FILE).is_file():
        return {SINGLE_FILE: []}
    hint = " (pytorch_model.bin checkpoints are not supported: re-save with safetensors)"
    old = (root / "pytorch_model.bin").exists() or (root / "pytorch_model.bin.index.json").exists()
    raise CheckpointFileMissing(
        f"{root}: neither {SINGLE_FILE} nor {INDEX_FILE} found" + (hint if old else "")
    )


def _read_file(file: Path, listed: list[str]) -> dict[str, torch.Tensor]:
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            keys = list(f.keys())
            absent = [k for k in listed if k not in keys]
            if absent:
                raise CheckpointError(
                    f"{file.name}: {INDEX_FILE} lists {', '.join(absent)} but the file lacks it"
                )
            return {k: f.get_tensor(k) for k in keys}
    except CheckpointError:
        raise
    except Exception as e:  # header or data truncated: name the file
        raise CheckpointError(f"{file}: could not be read ({type(e).__name__}: {e})") from e


def load_hf_checkpoint(
    path: str | PathLike, dtype: torch.dtype | None = None
) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Read config.json and the safetensors file(s); returns args and a state dict in Meta naming."""
    root = Path(path)
    args = args_from_hf_config(read_hf_config(root), str(root / CONFIG_FILE))
    full = expected_shapes(args)
    want = {meta_to_hf_name(k): (k, s) for k, s in full.items()}
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for fname, listed in _weight_files(root).items():
        for key, t in _read_file(root / fname, listed).items():
            if _DERIVED.match(key):
                continue
            tensors[key], origin[key] = t, fname
    if args.tie_embeddings and "lm_head.weight" in tensors:
        # Some tied checkpoints store the head anyway; accept it only as the embedding's copy.
        head, emb = tensors.pop("lm_head.weight"), tensors.get("model.embed_tokens.weight")
        if emb is not None and not torch.equal(head, emb):
            raise CheckpointError(
                f"{origin['lm_head.weight']}: lm_head.weight differs from model.embed_tokens.weight "
                "but config.json says tie_word_embeddings=true"
            )
    check_keys(tensors.keys(), want.keys(), str(root))
    sd: dict[str, torch.Tensor] = {}
    for key, (meta_name, shape) in want.items():
        t = tensors[key]
        if tuple(t.shape) != shape:
            raise CheckpointError(
                f"{origin[key]}: {key} has shape {fmt_shape(t.shape)} but config.json implies {fmt_shape(shape)}"
            )
        heads = _heads_of(meta_name, args)
        t = t if heads is None else permute_from_hf(t, heads)
        sd[meta_name] = t if dtype is None else t.to(dtype)
    return args, sd


# --- writing -----------------------------------------------------------------------------------------
def parse_size(size: int | str) -> int:
    """Bytes of "5GB" / "500MB" / "50KB" (powers of 10, as transformers) or "2GiB" (powers of 2)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", size.upper())
    if not m:
        raise ValueError(f"cannot parse size {size!r} (expected e.g. 5GB, 500MB, 2GiB or a byte count)")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


def _pack(names: list[str], tensors: Mapping[str, torch.Tensor], limit: int) -> list[list[str]]:
    """Greedy in-order packing into shards of at most `limit` bytes (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save_hf_checkpoint(
    path: str | PathLike,
    args: ModelArgs,
    state_dict: Mapping[str, torch.Tensor],
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    extra_config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write config.json and safetensors file(s) from a Meta-named state dict; returns the files written."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    existing = [f for f in root.iterdir() if f.name.endswith(".safetensors") or f.name == INDEX_FILE]
    if existing and not overwrite:
        raise FileExistsError(f"{root} already holds {existing[0].name}; pass overwrite=True to replace it")
    full = expected_shapes(args)
    check_keys(state_dict.keys(), full.keys(), "state dict")
    hf: dict[str, torch.Tensor] = {}
    for name in full:
        t = state_dict[name] if dtype is None else state_dict[name].to(dtype)
        heads = _heads_of(name, args)
        hf[meta_to_hf_name(name)] = (t if heads is None else permute_to_hf(t, heads)).contiguous()
    for f in existing:  # stale shards of an earlier, differently split write
        f.unlink()
    out_dtype = next(iter(hf.values())).dtype
    config = hf_config_from_args(args, out_dtype, extra_config)
    (root / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    written = [root / CONFIG_FILE]
    shards = _pack(list(hf), hf, parse_size(max_shard_size))
    meta = {"format": "pt"}  # transformers expects it in the header
    if len(shards) == 1:
        save_file(hf, root / SINGLE_FILE, metadata=meta)
        return [*written, root / SINGLE_FILE]
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: hf[n] for n in names}, root / fname, metadata=meta)
        weight_map.update(dict.fromkeys(names, fname))
        written.append(root / fname)
    total = sum(t.numel() * t.element_size() for t in hf.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [*written, root / INDEX_FILE]


__all__ = [
    "CONFIG_FILE",
    "INDEX_FILE",
    "SINGLE_FILE",
    "args_from_hf_config",
    "hf_config_from_args",
    "hf_to_meta_name",
    "load_hf_checkpoint",
    "meta_to_hf_name",
    "parse_size",
    "permute_from_hf",
    "permute_to_hf",
    "read_hf_config",
    "save_hf_checkpoint",
]
