"""Checkpoint averaging (Llama 3 §3.1.3, §4.1.5): the weighted mean of runs of one architecture.

    herd post average runs/rm-v1/model runs/rm-v2/model runs/rm-v3/model --out runs/rm-avg
    herd post average runs/dpo-a/model runs/dpo-b/model --weights 2 1 --out runs/dpo-avg

Llama 3 averages the models of reward-model, SFT and DPO runs made with different data or
hyper-parameter versions (and annealing checkpoints in pre-training). The mean is taken in fp32
and cast back to each tensor's stored dtype; checkpoints are read one at a time, so memory holds the
fp32 sum plus one checkpoint. The result is a Meta-layout directory with the first checkpoint's
tokenizer files, which `herd.text.loading.load_pretrained` reads.

Reward-model exports (`herd train rm`: a tied-embedding Meta trunk + `score_head.safetensors` +
`reward_model.json`) average too: the head's tensors join the state dict as `score.weight` /
`score.bias` and are written back in the same layout, which `herd.text.reward_model.load_reward_model` reads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from herd.text.args import ModelArgs
from herd.text.checkpoint_hf import CONFIG_FILE
from herd.text.checkpoint_meta import PARAMS_FILE, CheckpointError, save_meta_checkpoint
from herd.text.loading import copy_tokenizer_files, detect_format, load_checkpoint
from herd.text.vocab_subset import SUBSET_FILE

SCORE_PREFIX = "score."  # a reward model's scalar head, as `RewardModel` names it


def normalized_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Weights summing to 1 (uniform when None); negative, non-finite or all-zero weights are rejected."""
    if n < 1:
        raise ValueError("average_checkpoints needs at least one checkpoint")
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} checkpoints")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights must be finite and >= 0, got {weights}")
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"weights must not all be zero, got {weights}")
    return [w / total for w in weights]


def _config_file(path: Path) -> Path:
    """The file a checkpoint's architecture is read from (params.json or config.json)."""
    return path / (PARAMS_FILE if detect_format(path) == "meta" else CONFIG_FILE)


# How the FFN width is written differs by layout (Meta: multiple_of + multiplier, HF: the width itself),
# so those fields are compared through the width they produce.
_FFN_FIELDS = ("multiple_of", "ffn_dim_multiplier", "ffn_dim")


def _architecture(args: ModelArgs) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(ModelArgs):
        if f.name in _FFN_FIELDS:
            out.setdefault("ffn_hidden_dim", args.ffn_hidden_dim)
        else:
            out[f.name] = getattr(args, f.name)
    return out


def _first_difference(a: ModelArgs, b: ModelArgs) -> tuple[str, Any, Any] | None:
    """(field, a's value, b's value) of the first architecture field that differs, or None."""
    arch_a, arch_b = _architecture(a), _architecture(b)
    return next(((k, v, arch_b[k]) for k, v in arch_a.items() if v != arch_b[k]), None)


def _vocab_subset(path: Path) -> list[int] | None:
    """The kept token ids of a trimmed-vocabulary checkpoint, None for a full vocabulary."""
    file = path / SUBSET_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())["keep_ids"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{file}: not a valid vocabulary subset file ({e})") from e


def _reward_head_file(root: Path) -> Path | None:
    """The score-head file of a reward-model export, None for a plain checkpoint."""
    from herd.text.reward_model import REWARD_MODEL_FILE, SCORE_HEAD_FILE

    marker = root / REWARD_MODEL_FILE
    if not marker.is_file():
        return None
    try:
        meta = json.loads(marker.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{marker}: invalid JSON ({e})") from e
    return root / meta.get("score_head", SCORE_HEAD_FILE)


def _load(root: Path) -> tuple[ModelArgs, dict[str, torch.Tensor], bool]:
    """(args, state dict, is a reward model); a reward model's head enters as `score.*`."""
    args, sd = load_checkpoint(root)
    head_file = _reward_head_file(root)
    if head_file is None:
        return args, sd, False
    from safetensors.torch import load_file

    if not head_file.is_file():
        raise CheckpointError(f"{head_file} not found (the reward model's score head)")
    sd = dict(sd)
    sd.update({f"{SCORE_PREFIX}{k}": v for k, v in load_file(head_file).items()})
    return args, sd, True


def average_checkpoints(
    paths: Sequence[str | PathLike], weights: Sequence[float] | None = None
) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Weighted (normalised) or uniform average of checkpoint directories (Meta or Hugging Face layout).

    All must share the architecture (the error names the first differing field and the file), the
    token-id mapping (`vocab_subset.json`), the parameter names and shapes (the error names the key).
    Floating tensors are averaged in fp32 and cast back to the first checkpoint's dtype; integer
    tensors must be equal. Reward-model exports must all be reward models; their score heads are
    averaged as `score.weight` / `score.bias`. Returns the first checkpoint's args and the state dict.
    """
    roots = [Path(p) for p in paths]
    w = normalized_weights(weights, len(roots))
    first_args: ModelArgs | None = None
    first_subset: list[int] | None = None
    first_is_rm = False
    dtypes: dict[str, torch.dtype] = {}
    acc: dict[str, torch.Tensor] = {}  # fp32 running sum
    for root, wi in zip(roots, w):
        args, sd, is_rm = _load(root)
        subset = _vocab_subset(root)
        if first_args is None:
            first_args, first_subset, first_is_rm = args, subset, is_rm
            dtypes = {k: v.dtype for k, v in sd.items()}
            acc = {k: v.float() * wi if v.is_floating_point() else v.clone() for k, v in sd.items()}
            continue
        if is_rm != first_is_rm:
            kinds = ("a plain checkpoint", "a reward model export")
            raise CheckpointError(f"{root} is {kinds[is_rm]} but {roots[0]} is {kinds[first_is_rm]}")
        diff = _first_difference(first_args, args)
        if diff is not None:
            name, want, got = diff
            raise CheckpointError(
                f"{_config_file(root)}: architecture differs from {roots[0]}: {name} = {got!r}, expected {want!r}"
            )
        if subset != first_subset:
            raise CheckpointError(
                f"{root / SUBSET_FILE}: token ids differ from {roots[0]}'s (different vocabulary subsets)"
            )
        missing = [k for k in acc if k not in sd]
        if missing:
            raise CheckpointError(f"{root}: key {missing[0]} of {roots[0]} is missing")
        extra = [k for k in sd if k not in acc]
        if extra:
            raise CheckpointError(f"{root}: unexpected key {extra[0]} (absent from {roots[0]})")
        for k, t in sd.items():
            if t.shape != acc[k].shape:
                raise CheckpointError(
                    f"{root}: {k} has shape {tuple(t.shape)} but {roots[0]} has {tuple(acc[k].shape)}"
                )
            if not t.is_floating_point():
                if not torch.equal(t, acc[k]):
                    raise CheckpointError(f"{root}: integer tensor {k} differs from {roots[0]}'s")
                continue
            acc[k].add_(t.float(), alpha=wi)
        del sd
    assert first_args is not None
    state = {k: v.to(dtypes[k]) if v.is_floating_point() else v for k, v in acc.items()}
    return first_args, state


def save_averaged(
    args: ModelArgs,
    state_dict: dict[str, torch.Tensor],
    out_dir: str | PathLike,
    source: str | PathLike,
    overwrite: bool = False,
) -> list[str]:
    """Write a Meta-layout checkpoint plus the tokenizer files of `source` (tokenizer.model,
    vocab_subset.json, ... when present); returns the names of the files written.

    With `score.*` tensors (an averaged reward model) the head goes to `source`'s score-head file name
    and `source`'s reward_model.json is copied, so `load_reward_model` reads the result.
    """
    out, src = Path(out_dir), Path(source)
    head = {k.removeprefix(SCORE_PREFIX): v for k, v in state_dict.items() if k.startswith(SCORE_PREFIX)}
    trunk = {k: v for k, v in state_dict.items() if not k.startswith(SCORE_PREFIX)}
    written = [f.name for f in save_meta_checkpoint(out, args, trunk, overwrite=overwrite)]
    written += copy_tokenizer_files(src, out)
    if (src / SUBSET_FILE).is_file():
        shutil.copy2(src / SUBSET_FILE, out / SUBSET_FILE)
        written.append(SUBSET_FILE)
    if head:
        from safetensors.torch import save_file

        from herd.text.reward_model import REWARD_MODEL_FILE

        head_file = _reward_head_file(src)
        if head_file is None:
            raise CheckpointError(
                f"{src}: the state dict holds a score head but {src} is no reward model export"
            )
        save_file({k: v.contiguous() for k, v in head.items()}, out / head_file.name)
        shutil.copy2(src / REWARD_MODEL_FILE, out / REWARD_MODEL_FILE)
        written += [head_file.name, REWARD_MODEL_FILE]
    return written


# --- folders in, folder out -----------------------------------------------------------------------------
def average_to_dir(
    checkpoints: Sequence[str | PathLike],
    out: str | PathLike,
    weights: Sequence[float] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """`herd post average`: `average_checkpoints` then `save_averaged` (tokenizer files from the first).

    Returns a summary: the normalised weights, the output folder, tensor and parameter counts, the
    files written and the seconds taken.
    """
    start = time.perf_counter()
    w = normalized_weights(weights, len(checkpoints))
    model_args, state = average_checkpoints(checkpoints, w)
    files = save_averaged(model_args, state, out, checkpoints[0], overwrite=overwrite)
    return {
        "weights": w,
        "out": str(out),
        "tensors": len(state),
        "params": sum(t.numel() for t in state.values()),
        "files": files,
        "seconds": time.perf_counter() - start,
    }
