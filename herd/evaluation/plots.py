"""The PNGs of the evaluation reports (matplotlib, headless): bars beside a reference, and histograms."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: reports are written from jobs and tests
    import matplotlib.pyplot as plt

    return plt


def bar_chart(
    values: Mapping[str, float],
    out: str | Path,
    title: str,
    ylabel: str,
    reference: Mapping[str, float] | None = None,
    reference_label: str = "chance",
) -> Path:
    """One bar per key of `values`; with `reference`, a lighter bar beside each (chance or a baseline)."""
    plt = _pyplot()
    names = list(values)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(names) + 2), 3.5))
    width = 0.4 if reference else 0.7
    xs = range(len(names))
    ax.bar(
        [x - (width / 2 if reference else 0) for x in xs], [values[n] for n in names], width, label="model"
    )
    if reference:
        ax.bar([x + width / 2 for x in xs], [reference.get(n, 0.0) for n in names], width,
               label=reference_label, color="lightgray")  # fmt: skip
        ax.legend()
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def histogram(
    series: Mapping[str, Sequence[float]], out: str | Path, title: str, xlabel: str, bins: int = 30
) -> Path:
    """Overlaid histograms of one or more named score lists (shared bins), with each mean marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    everything = [v for values in series.values() for v in values]
    lo, hi = min(everything), max(everything)
    edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)] if hi > lo else bins
    for name, values in series.items():
        patches = ax.hist(values, bins=edges, alpha=0.5, label=name)[2]
        mean = sum(values) / len(values)
        ax.axvline(mean, linestyle="--", color=patches[0].get_facecolor(), alpha=1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("responses")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["bar_chart", "histogram"]
