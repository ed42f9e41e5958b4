"""`herd plan` as a function: a job (a config file or a preset, plus flags) → every 4D layout, ranked.

    report = plan_job(gpus=8192, preset="llama3_1_405b", global_batch_tokens="16M", impl="paper")
    report.plans[0].layout.label(), report.plans[0].fits, report.to_dict(top=3)

`herd.planner` holds the analytic model (memory and throughput of one layout); this module turns a job
into its inputs — the model, sequence length, tokens per step, dtype, activation-checkpointing mode and
implementation profile, from `--config` or `--preset`, flags taking precedence — and evaluates the
layout the config asks for beside the ranked list. The numbers are a model, not a measurement
(docs/planner.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from herd.planner import (
    AC_MODES,
    EfficiencyModel,
    GiB,
    Impl,
    Layout,
    Plan,
    enumerate_layouts,
    evaluate_layout,
)


def parse_size(text: str) -> float:
    """'80GB' / '80GiB' / '80' → bytes. GPU "GB" are GiB: an "80 GB" H100 holds ~80 GiB."""
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 2**10, "M": 2**20, "G": GiB, "T": 2**40}
    try:
        return float(s[:-1]) * units[s[-1]] if s and s[-1] in units else float(s) * GiB
    except ValueError:
        raise ValueError(f"{text!r} is not a size (expected e.g. 80GB, 80GiB, 512MiB or 80)") from None


def parse_count(text: str) -> int:
    """'16M' tokens → 16·2^20 (the paper's "16M" batch is 2048 sequences of 8192), '4K' → 4096."""
    s = text.strip().upper().replace("_", "")
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    try:
        return int(float(s[:-1]) * units[s[-1]]) if s and s[-1] in units else int(float(s))
    except ValueError:
        raise ValueError(f"{text!r} is not a count (expected e.g. 16M, 4K or 1_000)") from None


@dataclass
class JobPlan:
    """What `plan_job` found: the job's inputs, the ranked plans and the configured layout's plan."""

    name: str  # model preset
    gpus: int
    gpu_mem_bytes: float
    seq_len: int
    global_batch_tokens: int
    dtype: str
    impl: Impl
    plans: list[Plan]
    configured: Plan | None = None  # the config's own [parallel] layout, when it is usable
    notes: list[str] = field(default_factory=list)  # why the configured layout could not be evaluated

    @property
    def any_fits(self) -> bool:
        return any(p.fits for p in self.plans)

    def to_dict(self, top: int | None = None) -> dict[str, Any]:
        """The JSON report of `herd plan --json` (the first `top` plans)."""
        return {
            "model": self.name, "gpus": self.gpus, "gpu_mem_bytes": self.gpu_mem_bytes, "seq_len": self.seq_len,
            "global_batch_tokens": self.global_batch_tokens, "dtype": self.dtype,
            "impl": dataclasses.asdict(self.impl), "efficiency": dataclasses.asdict(EfficiencyModel()),
            "configured": self.configured.to_dict() if self.configured else None,
            "plans": [p.to_dict() for p in self.plans[:top]],
        }  # fmt: skip


def _from_config(config: str, overrides: list[str], gpus: int, flags: dict[str, Any]) -> dict[str, Any]:
    """The job's inputs from a config file; the flags that are set take precedence."""
    from herd.config import load_config
    from herd.text.args import get_preset

    cfg = load_config(config, overrides)
    par = cfg.parallel
    seq = flags["seq_len"] or cfg.data.seq_len
    out: dict[str, Any] = dict(
        name=cfg.model.preset, model=get_preset(cfg.model.preset, **cfg.model.args), seq=seq,
        batch=flags["global_batch_tokens"] or str(cfg.data.batch_size * seq * cfg.train.grad_accum),
        dtype=flags["dtype"] or (cfg.train.dtype if par.param_dtype == "auto" else par.param_dtype),
        ac=flags["ac"] or par.activation_checkpoint,
        impl=Impl.herd(par.compile or flags["compile"], par.fsdp_reshard_after_forward),
        configured=None, configured_micro_batch=1, notes=[],
    )  # fmt: skip
    try:
        lay = out["configured"] = Layout.of(par, world=gpus)
        # herd's trainer: batch_size sequences per micro-batch over all DP ranks, cut into
        # pp_microbatches pipeline micro-batches
        pieces = (par.pp_microbatches or lay.pp) if lay.pp > 1 else 1
        out["configured_micro_batch"] = max(1, cfg.data.batch_size // lay.dp // pieces)
    except (TypeError, ValueError) as e:
        out["notes"].append(f"{config}: parallel layout not usable on {gpus} GPUs: {e}")
    return out


def plan_job(
    gpus: int,
    config: str | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
    gpu_mem: str = "80GB",
    gpus_per_node: int = 8,
    seq_len: int | None = None,
    global_batch_tokens: str | None = None,
    micro_batch: int = 1,
    peak_tflops: float = 989.0,
    ac: str | None = None,
    impl: str = "herd",
    compile: bool = False,
    dtype: str | None = None,
    reserve: str = "3GiB",
    virtual_stages: int | None = None,
    include_unfit: bool = False,
) -> JobPlan:
    """Rank every layout of `gpus` GPUs for the job of `config` (a TOML file, with `overrides`) or of
    model `preset`. Unset options come from the config, else: seq_len 8192, 16M tokens per step, bf16,
    AC "auto" (every mode tried). `impl`: "herd" (this repository's code) or "paper" (Meta's stack)."""
    if (config is None) == (preset is None):
        raise ValueError("give exactly one of config (a job TOML) or preset (a model preset name)")
    if impl not in ("herd", "paper"):
        raise ValueError(f"impl must be 'herd' or 'paper', got {impl!r}")
    flags = dict(
        seq_len=seq_len, global_batch_tokens=global_batch_tokens, dtype=dtype, ac=ac, compile=compile
    )
    if config is not None:
        job = _from_config(config, list(overrides or []), gpus, flags)
    else:
        from herd.text.args import get_preset

        if overrides:
            raise ValueError(f"{' '.join(overrides)}: config overrides need a config file")
        job = dict(
            name=preset, model=get_preset(preset), seq=seq_len or 8192, batch=global_batch_tokens or "16M",
            dtype=dtype or "bf16", ac=ac or "auto", impl=Impl.herd(compile), configured=None, notes=[],
        )  # fmt: skip
    if impl == "paper":
        job["impl"] = Impl.paper()
    mem, batch = parse_size(gpu_mem), parse_count(job["batch"])
    kw: dict[str, Any] = dict(
        ac_modes=AC_MODES if job["ac"] == "auto" else (job["ac"],), param_dtype=job["dtype"], impl=job["impl"],
        reserve_bytes=parse_size(reserve), peak_tflops=peak_tflops, gpus_per_node=gpus_per_node,
    )  # fmt: skip
    plans = enumerate_layouts(
        gpus, mem, job["model"], job["seq"], batch, virtual_stages=virtual_stages, include_unfit=include_unfit,
        micro_batch=micro_batch, **kw,
    )  # fmt: skip
    configured = None
    if job["configured"] is not None:
        try:
            configured = evaluate_layout(
                job["model"], job["configured"], job["seq"], batch, mem,
                micro_batch=job["configured_micro_batch"], **kw,
            )  # fmt: skip
        except ValueError as e:  # e.g. a batch that does not split over this world's DP degree
            job["notes"].append(f"configured layout {job['configured'].label()}: {e}")
    return JobPlan(
        name=job["name"], gpus=gpus, gpu_mem_bytes=mem, seq_len=job["seq"], global_batch_tokens=batch,
        dtype=job["dtype"], impl=job["impl"], plans=plans, configured=configured, notes=job["notes"],
    )  # fmt: skip


__all__ = ["JobPlan", "parse_count", "parse_size", "plan_job"]
