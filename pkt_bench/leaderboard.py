"""The leaderboard: methods as rows, tasks as columns, the primary metric's mean ± std over seeds.

Records that differ in anything but task, seed and pair (a method's config, the budget, the item limit, the
backend, ...) are different variants of a method and get rows of their own, labelled with a short digest; when
the records come from several generation backends, every row also names its backend. A task run with different
options or versions (0-shot and 8-shot, say) gets columns of its own, labelled the same way: task options belong
to the task, so one method's row spans tasks with different option sets.
Each cell also shows the 95% bootstrap CI over items × seeds and how many seeds and items it rests on. With a
baseline, each row gets the difference to the baseline on the same items with its paired-bootstrap CI and the
p-value of a paired test (McNemar's for 0/1 metrics, else the paired bootstrap's), marked when p < 0.05; see
`pkt_bench.stats`. Records whose items carry no per-item values still show mean ± std, without CIs. Every format prints the same numbers; `table`,
`md` and `latex` round them for reading.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pkt_bench import stats
from pkt_bench.api import UserError
from pkt_bench.spec import cell_key

FORMATS = ("table", "md", "csv", "json", "latex")
ALPHA = 0.05
_NOT_VARIANT = ("task", "task_version", "task_options", "seed", "teacher", "student")
_TASK_VARIANT = ("task_version", "task_options")  # these name the task's column, not a variant of the method
_FIRST = {"student": 0, "teacher": 1}


@dataclass
class Score:
    method: str
    pair: str
    task: str
    metric: str
    mean: float
    std: float | None
    seeds: int
    items: int
    best: bool = False
    ci_low: float | None = None
    ci_high: float | None = None
    per_seed: dict[int, float] = field(default_factory=dict)
    wall_s: float | None = None
    costs: dict[str, float] = field(default_factory=dict)
    baseline: str | None = None
    delta: float | None = None
    delta_low: float | None = None
    delta_high: float | None = None
    p_value: float | None = None
    test: str | None = None
    top_letter_share: float | None = None  # multiple choice: how often the most predicted letter was chosen
    significant: bool | None = None


@dataclass
class _Group:
    score: Score
    records: list[dict[str, Any]]
    outcomes: tuple[list[str], np.ndarray] | None  # item ids, [seeds, items]


def scores(records: Iterable[dict[str, Any]], tasks: list[str] | None = None, baseline: str | None = None) -> list[Score]:
    """One `Score` per (method variant, pair, task); with `baseline` (a method name or row label), Δ against it."""
    by_key: dict[tuple[str, str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
    variants: dict[str, set[str]] = defaultdict(set)
    task_variants: dict[str, set[str]] = defaultdict(set)
    records = [r for r in records if not tasks or r["task"] in tasks]
    several_backends = len({r["cell"].get("backend", "hf") for r in records}) > 1
    for record in records:
        variant = cell_key({k: v for k, v in record["cell"].items() if k not in _NOT_VARIANT})[:6]
        variants[record["method"]].add(variant)
        task_variant = cell_key({k: record["cell"].get(k) for k in _TASK_VARIANT})[:6]
        task_variants[record["task"]].add(task_variant)
        pair = f"{record['teacher']} -> {record['student']}"
        by_key[(record["method"], variant, pair, record["task"], task_variant)].append(record)
    groups = []
    for (method, variant, pair, task, task_variant), group in by_key.items():
        label = f"{method} [{variant}]" if len(variants[method]) > 1 else method
        task = f"{task} [{task_variant}]" if len(task_variants[task]) > 1 else task
        if several_backends:  # a column never mixes generation backends without saying so
            label += f" ({group[0]['cell'].get('backend', 'hf')})"
        group = sorted(group, key=lambda r: r["seed"])
        metric = group[0]["primary_metric"]
        per_seed = {r["seed"]: r["metrics"][metric] for r in group}
        mean, std = stats.mean_std(list(per_seed.values()))
        score = Score(label, pair, task, metric, mean, std, len(group), len(group[0]["items"]), per_seed=per_seed,
                      wall_s=_mean([r.get("wall_s") for r in group]), costs=_mean_costs(group),
                      top_letter_share=_mean([r["metrics"].get("top_letter_share") for r in group]))
        outcomes = _outcomes(group, metric)
        if outcomes is not None:
            ci = stats.bootstrap_ci(outcomes[1])
            score.ci_low, score.ci_high = ci.low, ci.high
        groups.append(_Group(score, group, outcomes))
    if baseline is not None and groups:
        _compare(groups, baseline)
    out = [g.score for g in groups]
    for task in {s.task for s in out}:
        column = [s for s in out if s.task == task]
        top = max(s.mean for s in column)
        for s in column:
            s.best = s.mean == top
    return sorted(out, key=lambda s: (_FIRST.get(s.method.split(" ")[0], 2), s.method, s.pair, s.task))


def _mean(values: list[Any]) -> float | None:
    numbers = [v for v in values if isinstance(v, (int, float))]
    return sum(numbers) / len(numbers) if numbers else None


def _mean_costs(group: list[dict[str, Any]]) -> dict[str, float]:
    names = sorted({name for r in group for name in r.get("costs", {})})
    return {name: sum(r.get("costs", {}).get(name, 0) for r in group) / len(group) for name in names}


def _outcomes(group: list[dict[str, Any]], metric: str) -> tuple[list[str], np.ndarray] | None:
    """The group's per-item values of `metric` as (item ids, `[seeds, items]`); None when any is missing."""
    ids = [str(item.get("id", i)) for i, item in enumerate(group[0]["items"])]
    if not ids:
        return None
    rows = []
    for record in group:
        values = {str(item.get("id", i)): item.get(metric) for i, item in enumerate(record["items"])}
        row = [values.get(i) for i in ids]
        if not all(isinstance(v, (int, float)) for v in row):
            return None
        rows.append(row)
    return ids, np.array(rows, dtype=float)


def _compare(groups: list[_Group], baseline: str) -> None:
    """Fill each score's Δ against the baseline row of the same pair and task, on the items both evaluated."""
    chosen = [g for g in groups if g.score.method == baseline or re.split(r" [\[(]", g.score.method)[0] == baseline]
    if not chosen:
        known = sorted({g.score.method for g in groups})
        raise UserError(f"baseline {baseline!r} has no records here; pick one of: {', '.join(known)}")
    by_cell: dict[tuple[str, str], list[_Group]] = defaultdict(list)
    for g in chosen:
        by_cell[(g.score.pair, g.score.task)].append(g)
    for (pair, task), found in by_cell.items():
        if len(found) > 1:
            raise UserError(f"baseline {baseline!r} has {len(found)} variants on {task} ({pair}): "
                            f"{', '.join(g.score.method for g in found)}; name one with --baseline")
    for g in groups:
        base = by_cell.get((g.score.pair, g.score.task), [None])[0]
        g.score.baseline = base.score.method if base else None
        if base is None or base is g or g.outcomes is None or base.outcomes is None:
            continue
        ids, x = g.outcomes
        base_ids, y = base.outcomes
        position = {item: j for j, item in enumerate(base_ids)}
        shared = [(i, position[item]) for i, item in enumerate(ids) if item in position]
        if not shared:
            continue
        mine, theirs = [i for i, _ in shared], [j for _, j in shared]
        paired = stats.paired_bootstrap(x[:, mine], y[:, theirs])
        s = g.score
        s.delta, s.delta_low, s.delta_high = paired.delta, paired.ci.low, paired.ci.high
        if stats.is_binary(x) and stats.is_binary(y):
            s.p_value, s.test = stats.mcnemar(x[:, mine], y[:, theirs]), "mcnemar"
        else:
            s.p_value, s.test = paired.p_value, "bootstrap"
        s.significant = s.p_value < ALPHA


def legend(baseline: str | None) -> str:
    """What a rendered cell shows."""
    text = "mean ± std over seeds [95% bootstrap CI over items × seeds] (seeds × items); best per column in bold"
    if baseline is None:
        return text
    return (f"{text}. Δ vs {baseline}: difference on the same items [95% paired-bootstrap CI], two-sided p of "
            f"McNemar's test for 0/1 metrics, else of the paired bootstrap; * p < {ALPHA}")


def score_text(score: Score) -> str:
    """What follows the mean in a cell: ` ± std [CI] (seeds×items)`."""
    text = f" ± {score.std:.3f}" if score.std is not None else ""
    if score.ci_low is not None:
        text += f" [{score.ci_low:.3f}, {score.ci_high:.3f}]"
    text += f" ({score.seeds}×{score.items})"
    if score.top_letter_share is not None:  # a model that names one letter for everything shows here
        text += f" top letter {score.top_letter_share:.0%}"
    return text


def delta_text(score: Score) -> str:
    if score.baseline is not None and score.method == score.baseline:
        return "baseline"
    if score.delta is None:
        return ""
    p = "p<0.001" if score.p_value < 0.001 else f"p={score.p_value:.3f}"
    return f"{score.delta:+.3f} [{score.delta_low:+.3f}, {score.delta_high:+.3f}] {p}{' *' if score.significant else ''}"


def _grid(rows: list[Score]) -> tuple[list[str], list[tuple[str, str]], dict[tuple[str, str, str], Score]]:
    tasks = sorted({s.task for s in rows})
    keys = list(dict.fromkeys((s.method, s.pair) for s in rows))
    return tasks, keys, {(s.method, s.pair, s.task): s for s in rows}


def _flat(score: Score) -> dict[str, Any]:
    row = asdict(score)
    costs, per_seed = row.pop("costs"), row.pop("per_seed")
    return {**row, **{f"seed.{seed}": value for seed, value in per_seed.items()},
            **{f"cost.{name}": value for name, value in costs.items()}}


COSTS = ("examples_seen", "optimizer_steps", "teacher_forward", "teacher_backward", "teacher_tokens_generated")


def cost_columns(rows: list[Score]) -> dict[tuple[str, str], dict[str, float]]:
    """Per (method, pair): the mean cost of one run, summed over the tasks shown, with wall time and peak memory.

    The standard costs always appear (0 when a method spends none), then any other a method recorded.
    """
    names = list(COSTS) + sorted({n for s in rows for n in s.costs if n not in COSTS and n != "reused"})
    out: dict[tuple[str, str], dict[str, float]] = {}
    for s in rows:
        totals = out.setdefault((s.method, s.pair), dict.fromkeys([*names, "wall_s"], 0.0))
        for name in names:
            totals[name] += s.costs.get(name, 0.0)
        totals["wall_s"] += s.wall_s or 0.0
    return out


def render(rows: list[Score], fmt: str, cost: bool = False) -> Any:
    """A Rich table for "table", else the text of the md/csv/json/latex rendering; `cost` adds cost columns."""
    if fmt == "json":
        return json.dumps([asdict(s) for s in rows], indent=1)
    if fmt == "csv":
        flat = [_flat(s) for s in rows]
        fields = [f for f in Score.__dataclass_fields__ if f not in ("costs", "per_seed")]
        extra = sorted({name for row in flat for name in row if name not in fields},
                       key=lambda name: (not name.startswith("seed."), len(name), name))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields + extra, lineterminator="\n")
        writer.writeheader()
        writer.writerows(flat)
        return buffer.getvalue()
    tasks, keys, by_key = _grid(rows)
    metrics = {t: next(s.metric for s in rows if s.task == t) for t in tasks}
    baseline = next((s.baseline for s in rows if s.baseline is not None), None)
    compared = baseline is not None or any(s.delta is not None for s in rows)
    headers = ["method", "pair"]
    for t in tasks:
        headers += [f"{t} ({metrics[t]})"] + ([f"Δ {t} vs {baseline}"] if compared else [])
    costs = cost_columns(rows) if cost else {}
    cost_names = list(next(iter(costs.values()))) if costs else []
    headers += cost_names

    def row(method: str, pair: str, bold: Callable[[str], str], escape: Callable[[str], str]) -> list[str]:
        out = [escape(method), escape(pair)]
        for t in tasks:
            s = by_key.get((method, pair, t))
            if s is None:
                out += [""] * (2 if compared else 1)
                continue
            mean = f"{s.mean:.3f}"
            out.append((bold(mean) if s.best else mean) + escape(score_text(s)))
            if compared:
                out.append(escape(delta_text(s)))
        return out + [f"{costs[method, pair][name]:,.{1 if name == 'wall_s' else 0}f}" for name in cost_names]

    if fmt == "md":
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(row(m, p, lambda t: f"**{t}**", str)) + " |" for m, p in keys]
        return "\n".join(lines + ["", f"Cells: {legend(baseline)}."])
    if fmt == "latex":
        body = [row(m, p, lambda t: rf"\textbf{{{t}}}", _latex_escape) for m, p in keys]
        return _latex([_latex_escape(h) for h in headers], body, legend(baseline))
    from rich.markup import escape as rich_escape
    from rich.table import Table

    table = Table(title="pkt-bench leaderboard", caption=legend(baseline))
    for header in headers:
        table.add_column(rich_escape(header), justify="left" if header in ("method", "pair") else "right")
    for method, pair in keys:
        table.add_row(*row(method, pair, lambda t: f"[bold green]{t}[/]", rich_escape))
    return table


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "×": r"$\times$", "Δ": r"$\Delta$", "<": r"$<$", "->": r"$\rightarrow$"}


def _latex_escape(text: str) -> str:
    return re.sub(r"->|[\\&%$#_{}~^±×Δ<]", lambda match: _LATEX_ESCAPES[match.group()], text)


def _latex(headers: list[str], rows: list[list[str]], caption: str) -> str:
    """A booktabs tabular (needs `\\usepackage{booktabs}`), the legend as a comment above it."""
    lines = [f"% {caption}", r"\begin{tabular}{ll" + "r" * (len(headers) - 2) + "}", r"\toprule",
             " & ".join(headers) + r" \\", r"\midrule"]
    lines += [" & ".join(row) + r" \\" for row in rows]
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"])
