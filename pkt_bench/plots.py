"""PNG plots of leaderboard rows (matplotlib, extra `plots`): per task, methods' scores with their 95% CIs;
and cost (wall time or any recorded cost, such as teacher forward passes) against the gain over a baseline.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pkt_bench.api import UserError
from pkt_bench.leaderboard import Score, short_pairs


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'pkt-bench[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _labels(rows: list[Score]) -> list[str]:
    """Row labels, with the pair's short name (as the leaderboard prints it) where a task holds several pairs."""
    short = short_pairs({s.pair for s in rows}, width=80)  # a figure has room for names, and no legend of P1, P2
    return [f"{s.method} ({short[s.pair]})" if len(short) > 1 else s.method for s in rows]


def _file(out: Path, kind: str, task: str) -> Path:
    return out / f"{kind}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', task)}.png"


def cost_of(score: Score, cost: str) -> float | None:
    """The row's mean wall time ("wall_s") or mean recorded cost of that name."""
    return score.wall_s if cost == "wall_s" else score.costs.get(cost)


def plot(rows: list[Score], out: Path, cost: str = "wall_s") -> list[Path]:
    """Write `scores-<task>.png` for each task and, for rows compared to a baseline, `cost-<task>.png`."""
    if cost != "wall_s" and not any(cost in s.costs for s in rows):
        known = sorted({"wall_s", *(name for s in rows for name in s.costs)})
        raise UserError(f"no record states a cost {cost!r}; use one of: {', '.join(known)}")
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for task in sorted({s.task for s in rows}):
        column = [s for s in rows if s.task == task]
        written.append(_scores(plt, column, _file(out, "scores", task)))
        compared = [s for s in column if s.delta is not None and cost_of(s, cost) is not None]
        if compared:
            written.append(_cost(plt, compared, cost, _file(out, "cost", task)))
    return written


def _scores(plt: Any, rows: list[Score], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.6))
    ys = range(len(rows))
    for y, s in zip(ys, rows):
        low, high = (s.ci_low, s.ci_high) if s.ci_low is not None else (s.mean, s.mean)
        ax.errorbar(s.mean, y, xerr=[[s.mean - low], [high - s.mean]], fmt="o", capsize=4,
                    color="tab:green" if s.best else "tab:blue")
        ax.annotate(f"{s.mean:.3f} ({s.seeds}×{s.items})", (high, y), xytext=(6, 0), textcoords="offset points",
                    va="center", fontsize=8)
    baseline = next((s for s in rows if s.baseline == s.method), None)
    if baseline is not None:
        ax.axvline(baseline.mean, color="grey", linestyle="--", linewidth=1, label=f"baseline {baseline.method}")
    ax.plot([], [], "o", color="tab:green", label="best on this task")  # what the colours mean
    ax.plot([], [], "o", color="tab:blue", label="others")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(list(ys), _labels(rows))
    ax.invert_yaxis()
    ax.set_xlabel(f"{rows[0].metric} (mean, 95% bootstrap CI over items × seeds; seeds × items)")
    ax.set_title(f"{rows[0].task}: scores by method")
    ax.margins(x=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _cost(plt: Any, rows: list[Score], cost: str, path: Path) -> Path:
    """One marker per row, named in the legend beside the axes (labels on the points overlap when costs are
    close); filled markers are significant (p < 0.05), hollow ones are not."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colours = plt.get_cmap("tab10").colors
    for i, (s, label) in enumerate(zip(rows, _labels(rows))):
        x, colour = cost_of(s, cost), colours[i % len(colours)]
        ax.errorbar(x, s.delta, yerr=[[s.delta - s.delta_low], [s.delta_high - s.delta]], fmt="o", capsize=4,
                    color=colour, markerfacecolor=colour if s.significant else "white",
                    label=label + (" *" if s.significant else "") + (" †" if s.unequal_budget else ""))
    ax.axhline(0, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("wall time per cell (s, mean over seeds)" if cost == "wall_s" else f"{cost} (mean over seeds)")
    ax.set_ylabel(f"Δ {rows[0].metric} vs {rows[0].baseline} (95% paired CI)")
    ax.set_title(f"{rows[0].task}: cost against gain over {rows[0].baseline}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, frameon=False,
              title="filled, *: p < 0.05\nhollow: not significant" + ("\n†: other budget" if any(
                  s.unequal_budget for s in rows) else ""), title_fontsize=8)
    ax.margins(0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
