"""Training checkpoints with torch.distributed.checkpoint (DCP): resumable bit-exactly, on any mesh.

A checkpoint holds the model, optimizer, LR scheduler, data-loader and per-rank RNG state:

    <dir>/step-00000010/
        .metadata, __0_0.distcp, ...   DCP: model.* (FQN keys), optimizer.* (flattened, FQN keys),
                                       scheduler.*, dataloader.*
        rng/rank-00000.pt ...          each rank's python/numpy/torch(/cuda) generator state
        herd.json                      step, model args, time, world size, mesh description, extra

Model and optimizer state go through `torch.distributed.checkpoint.state_dict.get_state_dict` /
`set_state_dict`, which see plain modules, FSDP2 and TP DTensors alike and name everything by FQN; the
optimizer state is *flattened* (one key per parameter and state), so a checkpoint written on one mesh
(FSDP×2, several pipeline stages per rank) loads on another (TP×2, one stage): DCP reshards on load.

Atomicity: every rank writes into `step-XXXXXXXX.partial/`; only when the whole checkpoint is written
(all ranks, DCP's `.metadata` last) does rank 0 rename it to `step-XXXXXXXX/`. A process killed during
a save leaves only a `.partial` directory, which `latest()` ignores and the next save deletes.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from herd.config import CheckpointConfig

log = logging.getLogger(__name__)

META_FILE = "herd.json"
DCP_METADATA = ".metadata"
PARTIAL = ".partial"
MODEL_PREFIX = "model."  # DCP joins nested keys with "."; `load_dcp_model` selects the model by it
_STEP_RE = re.compile(r"^step-(\d{8})$")
# FQN-keyed optimizer state: the same key for a parameter whatever the mesh or pipeline split.
_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _barrier() -> None:
    if _distributed():
        dist.barrier()


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it 'assumes a single process' whenever no process group exists; that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


# --- state of model parts and their optimizers (torchtitan's ModelWrapper / OptimizersContainer idea) ---
def model_state_dict(model_parts: Sequence[nn.Module]) -> dict[str, Any]:
    """FQN → tensor (DTensor when sharded) of every part; pipeline stages hold disjoint FQN subsets."""
    return {k: v for part in model_parts for k, v in get_model_state_dict(part).items()}


def optimizer_state_dict(
    model_parts: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer]
) -> dict[str, Any]:
    _check_pairs(model_parts, optimizers)
    return {
        k: v
        for part, opt in zip(model_parts, optimizers)
        for k, v in get_optimizer_state_dict(part, opt, options=_OPTIM_OPTIONS).items()
    }


def _check_pairs(model_parts: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer]) -> None:
    if len(model_parts) != len(optimizers):
        raise ValueError(
            f"{len(model_parts)} model parts but {len(optimizers)} optimizers: pass one optimizer per part "
            "(DCP maps optimizer state to FQNs through the module that owns the parameters)"
        )


def describe_mesh(model_parts: Sequence[nn.Module]) -> list[dict[str, Any]]:
    """The device meshes the parameters live on (empty for plain modules), for herd.json readers."""
    meshes: dict[tuple, dict[str, Any]] = {}
    for part in model_parts:
        for p in part.parameters():
            if isinstance(p, DTensor):
                mesh = p.device_mesh
                names = list(mesh.mesh_dim_names or ())
                meshes[(tuple(names), tuple(mesh.shape))] = {"dims": names, "shape": list(mesh.shape)}
    return list(meshes.values())


# --- RNG: per rank, outside DCP (each rank's generators differ; DCP dedups equal keys across ranks) -----
def rng_state() -> dict[str, Any]:
    """python, numpy, torch (and CUDA) generator states, in types `torch.load(weights_only=True)` reads."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_file(ckpt: Path, rank: int) -> Path:
    return ckpt / "rng" / f"rank-{rank:05d}.pt"


# --- finding checkpoints ------------------------------------------------------------------------------
def is_complete(path: str | Path) -> bool:
    """A published checkpoint: final name (no .partial), DCP metadata and herd.json present."""
    p = Path(path)
    return bool(_STEP_RE.match(p.name)) and (p / DCP_METADATA).is_file() and (p / META_FILE).is_file()


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `directory`, oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and is_complete(p)]
    return sorted(found)


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / META_FILE).read_text())


def _publish(partial: Path, final: Path) -> None:
    """Make a fully written checkpoint visible: one rename, atomic on POSIX file systems."""
    if final.exists():  # re-saving a step (e.g. a resumed run's final save): move the old one aside first
        stale = final.with_name(final.name + ".stale")
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        os.replace(partial, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(partial, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:  # persist the rename itself, not only the files
        os.fsync(fd)
    finally:
        os.close(fd)


# --- single-process export ---------------------------------------------------------------------------
def load_dcp_model(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(model args, full model state dict) of a DCP checkpoint, in this process, no process group needed.

    Only the `model.*` entries are read (DCP reassembles every sharded tensor); keys lose the prefix.
    """
    root = Path(path)
    if not (root / DCP_METADATA).is_file():
        raise FileNotFoundError(f"{root}: no {DCP_METADATA}; not a (complete) DCP checkpoint")
    metadata = dcp.FileSystemReader(root).read_metadata()
    wanted: dict[str, torch.Tensor] = {}
    for key, item in metadata.state_dict_metadata.items():
        if key.startswith(MODEL_PREFIX) and hasattr(item, "size"):
            wanted[key] = torch.empty(item.size, dtype=item.properties.dtype)
    if not wanted:
        raise ValueError(f"{root}: the checkpoint holds no {MODEL_PREFIX}* tensors")
    with _quiet_single_process():
        dcp.load(wanted, checkpoint_id=root, no_dist=True)
    meta = read_checkpoint_meta(root) if (root / META_FILE).is_file() else {}
    args = meta.get("model_args") or {}
    return args, {k[len(MODEL_PREFIX) :]: v for k, v in wanted.items()}


class Checkpointer:
    """Save/resume a run's training state under `cfg.dir` (default `<run_dir>/checkpoints`).

    Every method is collective: all ranks call it at the same point. With `async_save`, `save` returns
    once the state is copied to CPU; the checkpoint is published by the next `save`, `wait`, `load` or
    `close` (so at most one save is in flight and its memory is bounded by one CPU copy).
    """

    def __init__(self, cfg: CheckpointConfig, run_dir: str | Path) -> None:
        self.cfg = cfg
        self.dir = Path(cfg.dir) if cfg.dir else Path(run_dir) / "checkpoints"
        self._pending: tuple[Future, Path, Path] | None = None
        self._async_pg = None
        if cfg.async_save and _distributed() and _world_size() > 1:
            # The background save runs collectives (plan gather, metadata); on the training group they
            # could interleave with the training step's own collectives. A separate gloo group cannot.
            self._async_pg = dist.new_group(backend="gloo")

    # -- when --
    def due(self, step: int, last_step: int) -> bool:
        """Whether the loop should save after `step`: every `interval` steps, and the last if save_final."""
        if self.cfg.interval > 0 and step % self.cfg.interval == 0:
            return True
        return self.cfg.save_final and step == last_step

    def latest(self) -> Path | None:
        found = list_checkpoints(self.dir)
        return found[-1][1] if found else None

    # -- save --
    def _state(
        self,
        model_parts: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
        scheduler: Any,
        dataloader: Any,
    ) -> dict[str, Any]:
        state: dict[str, Any] = {
            "model": model_state_dict(model_parts),
            "optimizer": optimizer_state_dict(model_parts, optimizers),
        }
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        if dataloader is not None:  # the same on every rank: DCP keeps one copy of equal keys
            state["dataloader"] = dataloader.state_dict()
        return state

    def save(
        self,
        step: int,
        model_parts: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
        scheduler: Any,
        dataloader: Any,
        model_args: dict[str, Any] | Any | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Write the checkpoint of `step`; returns its final path (published at once unless async)."""
        self.wait()  # one save in flight at a time; also publishes the previous async one
        final = self.dir / step_dir_name(step)
        partial = final.with_name(final.name + PARTIAL)
        rank = _rank()
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for suffix in (PARTIAL, ".stale"):  # leftovers of killed saves
                for stale in self.dir.glob(f"step-*{suffix}"):
                    shutil.rmtree(stale, ignore_errors=True)
            partial.mkdir()
        _barrier()  # nobody writes into the directory before it is clean and exists
        rng_file = _rng_file(partial, rank)
        rng_file.parent.mkdir(exist_ok=True)
        torch.save(rng_state(), rng_file)
        if rank == 0:
            if model_args is not None and not isinstance(model_args, dict):
                model_args = model_args.to_dict()
            meta = {
                "format": "herd-dcp",
                "version": 1,
                "step": step,
                "model_args": model_args,
                "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "world_size": _world_size(),
                "mesh": describe_mesh(model_parts),
                "extra": extra or {},
            }
            (partial / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        state = self._state(model_parts, optimizers, scheduler, dataloader)
        start = time.perf_counter()
        with _quiet_single_process():
            if self.cfg.async_save:
                future = dcp.async_save(state, checkpoint_id=partial, process_group=self._async_pg)
                self._pending = (future, partial, final)
                log.info(
                    "checkpoint %s: staged in %.2f s, writing in background",
                    final.name,
                    time.perf_counter() - start,
                )
                return final
            dcp.save(state, checkpoint_id=partial)
        self._finalize(partial, final)
        log.info("checkpoint %s written in %.2f s", final, time.perf_counter() - start)
        return final

    def _finalize(self, partial: Path, final: Path) -> None:
        # DCP's save ends with rank 0 writing .metadata after gathering every rank's write results, but
        # the barrier also covers the per-rank RNG files and keeps ranks from racing ahead to a load.
        _barrier()
        if _rank() == 0:
            _publish(partial, final)
            self._prune()
        _barrier()

    def _prune(self) -> None:
        if self.cfg.keep_last <= 0:
            return
        for _, old in list_checkpoints(self.dir)[: -self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def wait(self) -> None:
        """Finish and publish an async save in flight (collective; a no-op when none is)."""
        if self._pending is None:
            return
        future, partial, final = self._pending
        self._pending = None
        future.result()  # re-raises a failed background write here, on the training thread
        self._finalize(partial, final)

    def close(self) -> None:
        self.wait()
        if self._async_pg is not None:
            dist.destroy_process_group(self._async_pg)
            self._async_pg = None

    # -- load --
    def _resume_target(self, path: str | Path | None) -> Path | None:
        if path is None:
            if self.cfg.resume == "none":
                return None
            if self.cfg.resume == "auto":
                return self.latest()
            path = self.cfg.resume
        p = Path(path)
        if not is_complete(p):  # a run's checkpoint folder: its newest complete checkpoint
            found = list_checkpoints(p)
            if not found:
                raise FileNotFoundError(f"{p}: not a complete checkpoint, nor a folder holding one")
            p = found[-1][1]
        return p

    def load(
        self,
        model_parts: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
        scheduler: Any,
        dataloader: Any,
        path: str | Path | None = None,
    ) -> int | None:
        """Restore the training state in place; returns its step, or None when there is nothing to resume.

        `path` None follows `cfg.resume`. The parts may be sharded differently than when saved.
        """
        self.wait()
        target = self._resume_target(path) if _rank() == 0 else None
        if _distributed():  # rank 0 decides: ranks must not pick different checkpoints
            box = [None if target is None else str(target)]
            dist.broadcast_object_list(box, src=0)
            target = None if box[0] is None else Path(box[0])
        if target is None:
            return None
        meta = read_checkpoint_meta(target)
        # The placeholders are the live tensors (DTensor shards on this mesh): DCP reads into them in
        # place, and hands back the non-tensor entries (scheduler, data loader, param groups) as values.
        state = self._state(model_parts, optimizers, scheduler, dataloader)
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=target)
        strict = len(model_parts) == 1  # pipeline stages each take their own subset of the FQNs
        for part in model_parts:
            set_model_state_dict(part, state["model"], options=StateDictOptions(strict=strict))
        for part, opt in zip(model_parts, optimizers):
            set_optimizer_state_dict(part, opt, state["optimizer"], options=_OPTIM_OPTIONS)
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if dataloader is not None:
            dataloader.load_state_dict(state["dataloader"])
        rng_file = _rng_file(target, _rank())
        if rng_file.is_file() and meta.get("world_size") == _world_size():
            set_rng_state(torch.load(rng_file, weights_only=True))
        else:  # another world size: rank r's old stream means nothing here; the run's seeding stands
            log.warning(
                "checkpoint %s: RNG state of rank %d not restored (saved on %s ranks)",
                target,
                _rank(),
                meta.get("world_size"),
            )
        log.info("resumed from %s (step %d)", target, meta["step"])
        return int(meta["step"])


__all__ = [
    "Checkpointer",
    "describe_mesh",
    "is_complete",
    "list_checkpoints",
    "load_dcp_model",
    "model_state_dict",
    "optimizer_state_dict",
    "read_checkpoint_meta",
    "rng_state",
    "set_rng_state",
    "step_dir_name",
]
