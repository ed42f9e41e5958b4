"""Load a Hugging Face `MllamaForConditionalGeneration` checkpoint (Llama 3.2 Vision) into a
`MultimodalLlama`: `config.json` + safetensors (one file or shards with an index).

Layout differences handled here:
- HF keeps self- and cross-attention decoder layers in one list (`cross_attention_layers` are indices
  into it); herd keeps the frozen Llama's layers 0..L−1 and names each cross-attention layer by the LLM
  layer it precedes (`schedule_from_hf`).
- Self-attention q/k rows are permuted from HF's rotate-half RoPE to Meta's interleaved pairs
  (`herd.text.checkpoint_hf.permute_from_hf`); cross-attention has no RoPE and is copied as is.
- The text embedding has vocab + 8 rows: the first vocab go to the LLM, the 8 image tokens to
  `image_token_embeddings`.
- Vision q/k/v projections are fused into timm's `qkv`; the gated layers' `gate_attn`/`gate_ffn`
  become the TanhGates in `ls1`/`ls2`.
Checkpoints of transformers 4.x (`vision_model.*`, `language_model.model.*`) and 5.x (`model.*`) load.

Two behaviours of recent transformers differ from Meta's reference code, which is how Llama 3.2 Vision
was trained and what herd computes by default; `match_transformers=True` reproduces transformers instead:
- intermediate vision features: transformers ≥ 4.57 take the output of layer i for index i, one layer
  later than Meta (and transformers ≤ 4.53), see `herd.vision.vision_args`;
- text rows before their `<|image|>`: transformers does not zero their cross-attention output
  (huggingface/transformers#39379), see `herd.adapters.cross_attention`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from herd.adapters.multimodal import MultimodalLlama
from herd.text.args import ModelArgs
from herd.text.checkpoint_hf import (
    _read_file,
    _weight_files,
    args_from_hf_config,
    hf_to_meta_name,
    permute_from_hf,
    read_hf_config,
)
from herd.text.checkpoint_meta import CheckpointError
from herd.text.model import Llama
from herd.vision.vision_args import VisionArgs

_PREFIXES = (
    ("model.vision_model.", "vision."),
    ("vision_model.", "vision."),
    ("model.language_model.", "text."),
    ("language_model.model.", "text."),
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
    ("language_model.lm_head.", "head."),
    ("lm_head.", "head."),
)
_CROSS_NAMES = {
    "cross_attn.q_proj.weight": "attention.wq.weight",
    "cross_attn.k_proj.weight": "attention.wk.weight",
    "cross_attn.v_proj.weight": "attention.wv.weight",
    "cross_attn.o_proj.weight": "attention.wo.weight",
    "cross_attn.q_norm.weight": "attention.q_norm.weight",
    "cross_attn.k_norm.weight": "attention.k_norm.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "cross_attn_attn_gate": "gate_attn",
    "cross_attn_mlp_gate": "gate_ffwd",
}
_VISION_LAYER_NAMES = {
    "self_attn.o_proj.weight": "attn.proj.weight",
    "self_attn.o_proj.bias": "attn.proj.bias",
    "input_layernorm.": "norm1.",
    "post_attention_layernorm.": "norm2.",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
    "gate_attn": "ls1.gate",
    "gate_ffn": "ls2.gate",
}
_DERIVED = re.compile(r".*rotary_emb\.inv_freq$")


def schedule_from_hf(hf_cross_attention_layers: Sequence[int]) -> list[int]:
    """HF indices into the mixed layer list → the LLM layer each cross-attention layer precedes."""
    return [j - c for c, j in enumerate(sorted(hf_cross_attention_layers))]


def hf_from_schedule(schedule: Sequence[int]) -> list[int]:
    """Inverse of `schedule_from_hf`."""
    return [i + c for c, i in enumerate(sorted(schedule))]


def llm_args_from_mllama(text_config: Mapping[str, Any], source: str = "config.json") -> ModelArgs:
    """ModelArgs of the self-attention part of an `MllamaTextConfig` dict."""
    cross = text_config.get("cross_attention_layers") or [3, 8, 13, 18, 23, 28, 33, 38]
    cfg = dict(text_config, model_type="llama")
    cfg["num_hidden_layers"] = int(text_config.get("num_hidden_layers", 40)) - len(cross)
    cfg.setdefault("rms_norm_eps", 1e-5)
    if "rope_parameters" not in cfg and "rope_theta" not in cfg:
        cfg["rope_theta"] = 500_000.0  # MllamaTextConfig's default
    return args_from_hf_config(cfg, source)


def vision_state_dict_from_hf(sd: Mapping[str, torch.Tensor], args: VisionArgs) -> dict[str, torch.Tensor]:
    """`MllamaVisionModel` state dict (names relative to it) → `VisionEncoder` state dict."""
    out: dict[str, torch.Tensor] = {}
    for key, v in sd.items():
        m = re.match(r"^(transformer|global_transformer)\.layers\.(\d+)\.(.+)$", key)
        if m is None:
            out[key] = v
            continue
        stack, i, rest = m.groups()
        if re.match(r"self_attn\.[qkv]_proj\.", rest):
            if rest.startswith("self_attn.q_proj."):  # timm's qkv rows are [q; k; v]
                kind = rest.rsplit(".", 1)[1]
                parts = [sd[f"{stack}.layers.{i}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                out[f"{stack}.{i}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
            continue
        for old, new in _VISION_LAYER_NAMES.items():
            if rest.startswith(old):
                out[f"{stack}.{i}.{new}{rest[len(old) :]}"] = v
                break
        else:
            raise CheckpointError(f"unknown vision tensor {key}")
    return out


def _split_checkpoint(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "text": {}, "projector": {}, "head": {}}
    for key, v in tensors.items():
        if _DERIVED.match(key):
            continue
        for prefix, part in _PREFIXES:
            if key.startswith(prefix):
                parts[part[:-1]][key[len(prefix) :]] = v
                break
        else:
            raise CheckpointError(f"unexpected tensor {key} (not an Mllama checkpoint?)")
    return parts


def _text_state_dict(
    text: Mapping[str, torch.Tensor],
    head: Mapping[str, torch.Tensor],
    args: ModelArgs,
    hf_cross: Sequence[int],
) -> dict[str, torch.Tensor]:
    schedule = dict(zip(sorted(hf_cross), schedule_from_hf(hf_cross)))
    out: dict[str, torch.Tensor] = {}
    for key, v in text.items():
        if key == "embed_tokens.weight":
            out["llm.tok_embeddings.weight"] = v[: args.vocab_size]
            out["image_token_embeddings.weight"] = v[args.vocab_size :]
        elif key == "norm.weight":
            out["llm.norm.weight"] = v
        else:
            m = re.match(r"^layers\.(\d+)\.(.+)$", key)
            if m is None:
                raise CheckpointError(f"unexpected text tensor {key}")
            j, rest = int(m.group(1)), m.group(2)
            if j in schedule:
                if rest not in _CROSS_NAMES:
                    raise CheckpointError(f"unexpected cross-attention tensor {key}")
                out[f"cross_attention.{schedule[j]}.{_CROSS_NAMES[rest]}"] = v
                continue
            idx = j - sum(1 for c in schedule if c < j)
            meta = hf_to_meta_name(f"model.layers.{idx}.{rest}")
            if meta is None:
                raise CheckpointError(f"unexpected self-attention tensor {key}")
            if meta.endswith(("attention.wq.weight", "attention.wk.weight")):
                heads = args.n_heads if meta.endswith("wq.weight") else args.n_kv_heads
                v = permute_from_hf(v, heads)
            out["llm." + meta] = v
    if "weight" in head and not args.tie_embeddings:
        out["llm.output.weight"] = head["weight"]
    return out


def load_hf_mllama(
    path: str | PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    match_transformers: bool = False,
) -> MultimodalLlama:
    """A `MultimodalLlama` (LLM frozen) with the weights of an HF Mllama checkpoint directory.

    Default: Meta's reference semantics; `match_transformers=True`: the installed transformers' (≥ 4.57)
    numbers exactly (module docstring).
    """
    from herd.vision.encoder import VisionEncoder

    root = Path(path)
    config = read_hf_config(root)
    source = str(root / "config.json")
    if config.get("model_type") != "mllama":
        raise CheckpointError(f"{source}: model_type {config.get('model_type')!r} is not 'mllama'")
    text_cfg, vision_cfg = config.get("text_config") or {}, config.get("vision_config") or {}
    hf_cross = list(text_cfg.get("cross_attention_layers") or [3, 8, 13, 18, 23, 28, 33, 38])
    args = llm_args_from_mllama(text_cfg, source)
    vargs = VisionArgs.from_hf_config(vision_cfg, transformers_layer_outputs=match_transformers)

    tensors: dict[str, torch.Tensor] = {}
    for fname, listed in _weight_files(root).items():
        tensors.update(_read_file(root / fname, listed))
    parts = _split_checkpoint(tensors)
    sd = _text_state_dict(parts["text"], parts["head"], args, hf_cross)
    sd.update({f"vision.{k}": v for k, v in vision_state_dict_from_hf(parts["vision"], vargs).items()})
    sd.update({f"projector.{k}": v for k, v in parts["projector"].items()})

    with torch.device("meta"):
        model = MultimodalLlama(
            Llama(args),
            VisionEncoder(vargs),
            cross_attention_layers=schedule_from_hf(hf_cross),
            num_image_token_embeddings=8,  # the embedding has vocab_size + 8 rows
            mask_attention_rows=not match_transformers,
        )
    want = model.state_dict()
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or unexpected:
        raise CheckpointError(
            f"{root}: checkpoint does not match config.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for k, v in sd.items():
        if tuple(v.shape) != tuple(want[k].shape):
            raise CheckpointError(
                f"{root}: {k} has shape {tuple(v.shape)}, config.json implies {tuple(want[k].shape)}"
            )
        sd[k] = v.to(device=device, dtype=dtype or v.dtype)
    model.load_state_dict(sd, assign=True)
    model.llm.init_rope()
    model.freeze_llm()
    return model


__all__ = [
    "hf_from_schedule",
    "llm_args_from_mllama",
    "load_hf_mllama",
    "schedule_from_hf",
    "vision_state_dict_from_hf",
]
