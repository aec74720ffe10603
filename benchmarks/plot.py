"""--plot: the ratios to plain as grouped bars on a log axis, one panel per mode (matplotlib)."""

from __future__ import annotations

import sys

from contenders import BASELINE
from report import group_by_case, several_dtypes

# Ratio ticks for the log axis: readable values, whichever range the data spans.
_RATIO_TICKS = [
    0.1,
    0.2,
    0.25,
    0.33,
    0.5,
    0.67,
    0.8,
    0.9,
    1,
    1.1,
    1.25,
    1.5,
    2,
    2.5,
    3,
    4,
    5,
    6,
    8,
    10,
    15,
    20,
    30,
    50,
    100,
]


def _ratio_ticks(low: float, high: float) -> list[float]:
    inside = [t for t in _RATIO_TICKS if low <= t <= high]
    step = max(1, len(inside) // 9)  # at most about 9 labels a panel
    ticks = inside[::step]
    return sorted(set(ticks) | {1})


def _plot_panel(ax, keys: list[tuple], cases: dict, names: list[str], colors: dict[str, str], with_dtype: bool) -> None:
    """Grouped bars of one mode, each rising or falling from the 1.0 line (plain)."""
    present = [n for n in names if any(n in cases[k] for k in keys)]
    width = 0.8 / max(1, len(present))
    ratios = [cases[k][n]["ratio_to_plain"] for k in keys for n in present if n in cases[k]]
    for j, name in enumerate(present):
        offset = (j - (len(present) - 1) / 2) * width
        points = [(i + offset, cases[k][name]["ratio_to_plain"]) for i, k in enumerate(keys) if name in cases[k]]
        ax.bar(
            [p[0] for p in points], [p[1] - 1 for p in points], bottom=1, width=width, label=name, color=colors[name]
        )
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    low, high = min(ratios + [1]) / 1.08, max(ratios + [1]) * 1.08
    ax.set_ylim(low, high)
    ax.set_yticks(_ratio_ticks(low, high))
    ax.set_yticklabels([f"{t:g}" for t in _ratio_ticks(low, high)])
    ax.minorticks_off()
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(
        [f"{k[0].split(':')[0]}\n{k[1]}" + (f" {k[2]}" if with_dtype else "") for k in keys],
        rotation=90 if len(keys) > 16 else 0,
        fontsize=8,
    )
    ax.set_xlim(-0.6, len(keys) - 0.4)
    ax.set_ylabel("median time / plain's (log)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(ncol=len(present), fontsize=8, loc="best")


def plot_ratios(results: list[dict], contenders: list[str], env: dict, path: str) -> None:
    """A PNG: per mode a panel of grouped bars (one per contender) of the ratio to plain per case."""
    try:
        import matplotlib
    except ImportError:
        sys.exit("bench: --plot needs matplotlib, which is not installed (pip install matplotlib)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [c for c in contenders if c != BASELINE]
    colors = {name: f"C{i}" for i, name in enumerate(others)}  # the same colour in every panel
    modes = list(dict.fromkeys(r["mode"] for r in results))
    cases = group_by_case(results)
    groups = {mode: [k for k in cases if k[3] == mode] for mode in modes}
    most = max(len(g) for g in groups.values())
    fig, axes = plt.subplots(
        len(modes), 1, squeeze=False, figsize=(max(8.0, 0.2 * most * len(others) + 2), 4.2 * len(modes))
    )
    with_dtype = several_dtypes(cases)
    for ax, mode in zip(axes[:, 0], modes):
        _plot_panel(ax, groups[mode], cases, others, colors, with_dtype)
        ax.set_title(f"{mode} (below 1: faster than plain)", fontsize=10)
    where = env.get("gpu") or env["cpu"]
    fig.suptitle(
        f"fusedtie benchmark: median time relative to plain (f(W) precomputed), lower is "
        f"better\n{env['device']} ({where}), torch {env['torch']}, {env['threads']} threads, "
        f"{env['date']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
