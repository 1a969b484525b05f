"""The leaderboard: methods as rows, tasks as columns, the primary metric's mean ± std over seeds.

Records that differ in anything but task, seed and pair (a method's config, the budget, the item limit, the
backend, ...) are different variants of a method and get rows of their own, labelled with a short digest.
Every format prints the same numbers; `table` and `md` round them for reading.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from pkt_bench.spec import cell_key

FORMATS = ("table", "md", "csv", "json")
_NOT_VARIANT = ("task", "task_version", "seed", "teacher", "student")
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


def scores(records: Iterable[dict[str, Any]], tasks: list[str] | None = None) -> list[Score]:
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
    variants: dict[str, set[str]] = defaultdict(set)
    for record in records:
        if tasks and record["task"] not in tasks:
            continue
        variant = cell_key({k: v for k, v in record["cell"].items() if k not in _NOT_VARIANT})[:6]
        variants[record["method"]].add(variant)
        groups[(record["method"], variant, f"{record['teacher']} -> {record['student']}", record["task"])].append(record)
    out = []
    for (method, variant, pair, task), group in groups.items():
        label = f"{method} [{variant}]" if len(variants[method]) > 1 else method
        metric = group[0]["primary_metric"]
        values = [r["metrics"][metric] for r in sorted(group, key=lambda r: r["seed"])]
        out.append(Score(label, pair, task, metric, statistics.fmean(values),
                         statistics.stdev(values) if len(values) > 1 else None, len(values),
                         sum(len(r["items"]) for r in group) // len(group)))
    for task in {s.task for s in out}:
        column = [s for s in out if s.task == task]
        top = max(s.mean for s in column)
        for s in column:
            s.best = s.mean == top
    return sorted(out, key=lambda s: (_FIRST.get(s.method, 2), s.method, s.pair, s.task))


def _cell_text(score: Score) -> str:
    text = f"{score.mean:.3f}" if score.std is None else f"{score.mean:.3f} ± {score.std:.3f}"
    return f"{text} (n={score.seeds})" if score.seeds > 1 else text


def _grid(rows: list[Score]) -> tuple[list[str], list[tuple[str, str]], dict[tuple[str, str, str], Score]]:
    tasks = sorted({s.task for s in rows})
    keys = list(dict.fromkeys((s.method, s.pair) for s in rows))
    return tasks, keys, {(s.method, s.pair, s.task): s for s in rows}


def render(rows: list[Score], fmt: str) -> Any:
    """A Rich table for "table", else the text of the md/csv/json rendering."""
    if fmt == "json":
        return json.dumps([asdict(s) for s in rows], indent=1)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(Score.__dataclass_fields__), lineterminator="\n")
        writer.writeheader()
        writer.writerows(asdict(s) for s in rows)
        return buffer.getvalue()
    tasks, keys, by_key = _grid(rows)
    metrics = {t: next(s.metric for s in rows if s.task == t) for t in tasks}
    headers = ["method", "pair"] + [f"{t} ({metrics[t]})" for t in tasks]
    if fmt == "md":
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        for method, pair in keys:
            cells = []
            for t in tasks:
                s = by_key.get((method, pair, t))
                cells.append("" if s is None else f"**{_cell_text(s)}**" if s.best else _cell_text(s))
            lines.append("| " + " | ".join([method, pair, *cells]) + " |")
        return "\n".join(lines)
    from rich.table import Table

    table = Table(title="pkt-bench leaderboard (best per column in bold green)")
    for header in headers:
        table.add_column(header, justify="left" if header in ("method", "pair") else "right")
    for method, pair in keys:
        cells = []
        for t in tasks:
            s = by_key.get((method, pair, t))
            cells.append("" if s is None else f"[bold green]{_cell_text(s)}[/]" if s.best else _cell_text(s))
        table.add_row(method, pair, *cells)
    return table
