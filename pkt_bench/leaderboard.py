"""The leaderboard: methods as rows, tasks as columns, the primary metric's mean ± std over seeds.

Records that differ in anything but task, seed and pair (a method's config, the budget, the item limit, the
backend, ...) are different *variants* of a method and get rows of their own. A row is labelled by what sets it
apart (`lora (rank=4, 32×2)`): the method options that differ from the method's defaults, the budget fields and
other cell keys that vary across the table (`N×E`: train examples × epochs), and a short digest only when two
variants would still read the same. What every row shares (one budget, one pair) is said once in the caption.
A task run with different options or versions (0-shot and 8-shot, say) gets columns of its own, labelled the same
way: task options belong to the task, so one method's row spans tasks with different option sets.
Each cell also shows the 95% bootstrap CI over items × seeds and how many seeds and items it rests on. With a
baseline, each row gets the difference to the baseline on the same items with its paired-bootstrap CI and the
p-value of a paired test (McNemar's for 0/1 metrics, else the paired bootstrap's), marked when p < 0.05; see
`pkt_bench.stats`. A row trained on another budget than the baseline gets no Δ but says so, unless
`allow_unequal`, which shows that Δ marked †. Records whose items carry no per-item values still show mean ± std, without CIs. Every format prints
the same numbers; `table`, `md` and `latex` round them for reading, and the Rich table fits 80 columns (costs go
to a table of their own).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import PurePath
from typing import Any

import numpy as np

from pkt_bench import stats
from pkt_bench.api import UserError
from pkt_bench.spec import NEUTRAL_BUDGET_FIELDS, cell_key

FORMATS = ("table", "md", "csv", "json", "latex")
ALPHA = 0.05
_NOT_VARIANT = ("task", "task_version", "task_options", "seed", "teacher", "student")
_TASK_VARIANT = ("task_version", "task_options")  # these name the task's column, not a variant of the method
_OWN = ("method", "method_config", "budget")  # labelled by their own rules; every other cell key only when it varies
_FIRST = {"student": 0, "teacher": 1}
UNEQUAL = "†"
OTHER_BUDGET = "other budget"


@dataclass
class Score:
    method: str  # the row's label: the method name plus what sets this variant apart
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
    min_delta: float | None = None  # McNemar: the smallest |Δ| these items could show as significant
    top_letter_share: float | None = None  # multiple choice: how often the most predicted letter was chosen
    significant: bool | None = None
    name: str = ""  # the registered method name
    config: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, Any] | None = None  # None for methods that do not fine-tune
    unequal_budget: bool = False  # Δ taken against a baseline trained on another budget (--allow-unequal)


@dataclass
class _Group:
    score: Score
    records: list[dict[str, Any]]
    outcomes: tuple[list[str], np.ndarray] | None  # item ids, [seeds, items]


def scores(records: Iterable[dict[str, Any]], tasks: list[str] | None = None, baseline: str | None = None,
           allow_unequal: bool = False, note: Callable[[str], None] | None = None) -> list[Score]:
    """One `Score` per (method variant, pair, task); with `baseline` (a method name or row label), Δ against it.

    `note` receives a line saying which variant a bare baseline name resolved to, when there was a choice.
    """
    by_key: dict[tuple[str, str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
    task_variants: dict[str, set[str]] = defaultdict(set)
    records = [r for r in records if not tasks or r["task"] in tasks]
    labels = _labels(records)
    names = model_names(records)
    for record in records:
        variant = _variant_key(record)
        task_variant = cell_key({k: record["cell"].get(k) for k in _TASK_VARIANT})[:6]
        task_variants[record["task"]].add(task_variant)
        pair = (record.get("pair_name")  # a report's name for the pair (a sweep's `pairs: [{name: ...}]`)
                or f"{names[model_identity(record, 'teacher')]} -> {names[model_identity(record, 'student')]}")
        by_key[(record["method"], variant, pair, record["task"], task_variant)].append(record)
    groups = []
    for (method, variant, pair, task, task_variant), group in by_key.items():
        label = labels[(method, variant)]
        task = f"{task} [{task_variant}]" if len(task_variants[task]) > 1 else task
        group = sorted(group, key=lambda r: r["seed"])
        metric = group[0]["primary_metric"]
        per_seed = {r["seed"]: r["metrics"][metric] for r in group}
        mean, std = stats.mean_std(list(per_seed.values()))
        cell = group[0]["cell"]
        score = Score(label, pair, task, metric, mean, std, len(group), len(group[0]["items"]), per_seed=per_seed,
                      wall_s=_mean([r.get("wall_s") for r in group]), costs=_mean_costs(group), name=method,
                      config=dict(cell.get("method_config") or {}), budget=cell.get("budget"),
                      top_letter_share=_mean([r["metrics"].get("top_letter_share") for r in group]))
        outcomes = _outcomes(group, metric)
        if outcomes is not None:
            ci = stats.bootstrap_ci(outcomes[1])
            score.ci_low, score.ci_high = ci.low, ci.high
        groups.append(_Group(score, group, outcomes))
    if baseline is not None and groups:
        _compare(groups, resolve_baseline([g.score for g in groups], baseline, note), allow_unequal)
    out = [g.score for g in groups]
    for task in {s.task for s in out}:
        column = [s for s in out if s.task == task]
        top = max(s.mean for s in column)
        for s in column:
            s.best = s.mean == top
    return sorted(out, key=lambda s: (_FIRST.get(s.name, 2), s.method, s.pair, s.task))


def _variant_key(record: dict[str, Any]) -> str:
    return cell_key({k: v for k, v in record["cell"].items() if k not in _NOT_VARIANT})[:6]


def method_defaults(method: str) -> dict[str, Any] | None:
    """The options a registered method runs with when none are given (its preset included); None if unknown."""
    from pkt_bench.registry import METHODS

    try:
        return asdict(METHODS.get(method).make_config({}))
    except UserError:
        return None


def _value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _labels(records: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """The row label of every (method, variant key) among `records` (see the module docstring)."""
    cells = {(r["method"], _variant_key(r)): r["cell"] for r in records}
    budgets = [c["budget"] for c in cells.values() if c.get("budget")]
    fields = dict.fromkeys(k for b in budgets for k in b)  # whatever a record's budget holds, in its order
    varying_budget = [k for k in fields if len({json.dumps(b.get(k)) for b in budgets}) > 1]
    other = sorted({k for c in cells.values() for k in c if k not in (*_NOT_VARIANT, *_OWN)})
    # among the records that have the key: a key a method leaves out (references have no transfer format) is no variant
    varying = [k for k in other if len({json.dumps(c[k], default=str) for c in cells.values() if k in c}) > 1]
    defaults = {method: method_defaults(method) for method, _ in cells}
    labels = {}
    for (method, variant), cell in cells.items():
        config, known = cell.get("method_config") or {}, defaults[method]
        if known is None:  # an unregistered method: the options that vary among its own variants
            own = [c.get("method_config") or {} for (m, _), c in cells.items() if m == method]
            parts = [f"{k}={_value(v)}" for k, v in config.items() if any(o.get(k) != v for o in own)]
        else:
            parts = [f"{k}={_value(v)}" for k, v in config.items() if k in known and known[k] != v]
        budget = cell.get("budget")
        if budget:
            shown = [k for k in varying_budget if k not in ("examples", "epochs")]
            if {"examples", "epochs"} & set(varying_budget):
                parts.append(f"{budget.get('examples')}×{budget.get('epochs')}")
            parts += [f"{k}={_value(budget.get(k))}" for k in shown]
        parts += [_value(cell[k]) if k == "backend" else f"{k}={_value(cell[k])}" for k in varying if k in cell]
        labels[(method, variant)] = f"{method} ({', '.join(parts)})" if parts else method
    counts = Counter(labels.values())
    return {key: f"{label} [{key[1]}]" if counts[label] > 1 else label for key, label in labels.items()}


def resolve_baseline(rows: list[Score], name: str, note: Callable[[str], None] | None = None) -> str:
    """The row label `name` means: a label as shown, or a method name, which picks its only variant or else
    the variant that runs the method's default options; an unknown or ambiguous name is a `UserError`."""
    labels = sorted({s.method for s in rows})
    candidates = sorted({s.method for s in rows if s.name == name})
    if name in labels and name not in candidates:  # a full label such as "lora (rank=4)"
        return name
    if not candidates:
        raise UserError(f"baseline {name!r} has no records here; pick one of: {', '.join(labels)}")
    if len(candidates) == 1:
        return candidates[0]
    defaults = method_defaults(name)
    default = sorted({s.method for s in rows if s.name == name and defaults is not None
                      and all(defaults.get(k) == v for k, v in s.config.items())})
    if len(default) == 1:
        if note is not None:
            note(f"baseline {name!r} is {default[0]!r}, the variant with {name}'s default options "
                 f"(others: {'; '.join(c for c in candidates if c != default[0])})")
        return default[0]
    raise UserError(f"baseline {name!r} is ambiguous: {len(candidates)} variants ({'; '.join(candidates)}); "
                    f"name one, e.g. --baseline {candidates[0]!r}")


def _mean(values: list[Any]) -> float | None:
    numbers = [v for v in values if isinstance(v, (int, float))]
    return sum(numbers) / len(numbers) if numbers else None


def _mean_costs(group: list[dict[str, Any]]) -> dict[str, float]:
    names = sorted({name for r in group for name in r.get("costs", {})})
    return {name: sum(r.get("costs", {}).get(name, 0) for r in group) / len(group) for name in names}


def items_by_id(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A record's items by id (an item without one goes by its position), in the record's order."""
    return {str(item.get("id", i)): item for i, item in enumerate(record["items"])}


def _outcomes(group: list[dict[str, Any]], metric: str) -> tuple[list[str], np.ndarray] | None:
    """The group's per-item values of `metric` as (item ids, `[seeds, items]`); None when any is missing."""
    ids = list(items_by_id(group[0]))
    if not ids:
        return None
    rows = []
    for record in group:
        items = items_by_id(record)
        row = [items[i].get(metric) if i in items else None for i in ids]
        if not all(isinstance(v, (int, float)) for v in row):
            return None
        rows.append(row)
    return ids, np.array(rows, dtype=float)


def _compare(groups: list[_Group], baseline: str, allow_unequal: bool) -> None:
    """Fill each score's Δ against the baseline row of the same pair and task, on the items both evaluated."""
    by_cell = {(g.score.pair, g.score.task): g for g in groups if g.score.method == baseline}
    for g in groups:
        base = by_cell.get((g.score.pair, g.score.task))
        g.score.baseline = base.score.method if base else None
        if base is None or base is g or g.outcomes is None or base.outcomes is None:
            continue
        if g.score.budget and base.score.budget and g.score.budget != base.score.budget:
            g.score.unequal_budget = True
            if not allow_unequal:
                continue  # no Δ across budgets unless asked for; the row says why it has none
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
            s.min_delta = stats.smallest_significant_delta(x[:, mine], y[:, theirs], ALPHA)
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


def notes(rows: list[Score]) -> list[str]:
    """What every row shares or what a marker means, said once under a table: the budget, pairs, †."""
    out = []
    budgets = [s.budget for s in rows if s.budget]
    if budgets:
        # fields kept out of keys hold their defaults there, not what ran (each fine-tune's stats say that)
        common = {k: v for k, v in budgets[0].items()
                  if k not in NEUTRAL_BUDGET_FIELDS and all(b.get(k) == v for b in budgets)}
        if common:
            out.append("budget of every fine-tuning row: " + ", ".join(f"{k}={_value(v)}" for k, v in common.items()))
    if any(re.search(r"\(.*\d+×\d+", s.method) for s in rows):
        out.append("N×E in a label: N train examples × E epochs")
    pairs = sorted({s.pair for s in rows})
    short = short_pairs(pairs)
    if len(pairs) == 1:
        out.append(f"pair (teacher -> student): {pairs[0]}")
    elif any(short[p] != p for p in pairs):
        out.append("pairs: " + "; ".join(f"{short[p]} = {p}" for p in pairs))
    if any(s.unequal_budget and s.delta is not None for s in rows):
        out.append(f"{UNEQUAL}: Δ against a baseline trained on a different budget (--allow-unequal)")
    if any(s.unequal_budget and s.delta is None for s in rows):
        out.append(f"{OTHER_BUDGET}: trained on another budget than the baseline, so no Δ; --allow-unequal shows it "
                   f"marked {UNEQUAL}")
    return out


def model_identity(record: dict[str, Any], role: str) -> str:
    """The teacher's or student's identity in a record's cell (its name where the cell holds none)."""
    return record["cell"].get(role, record[role])


def model_names(records: Iterable[dict[str, Any]]) -> dict[str, str]:
    """Each model identity of the records (`cell.teacher`, `cell.student`) -> the name its earliest record gave it,
    so records of one model made under other paths (another machine resuming the sweep) make one pair, not two;
    a name given to two identities (a folder whose files changed) gets each identity's digest appended."""
    names: dict[str, str] = {}
    for record in sorted(records, key=lambda r: r.get("created_at", "")):
        for role in ("teacher", "student"):
            names.setdefault(model_identity(record, role), record[role])
    taken = Counter(names.values())
    return {identity: name if taken[name] == 1 else f"{name}@{identity.rsplit('@', 1)[-1]}"
            for identity, name in names.items()}


def short_names(names: Iterable[str]) -> dict[str, str]:
    """Short model names for tables: a built-in name as is, a hub id's or folder's last part, with as many parts
    before it as it takes to tell two apart."""
    names = sorted(set(names))
    parts = {n: PurePath(n.rstrip("/")).parts or (n,) for n in names}
    depth = dict.fromkeys(names, 1)
    while True:
        short = {n: "/".join(parts[n][-depth[n]:]) for n in names}
        clashes = [n for n in names if list(short.values()).count(short[n]) > 1 and depth[n] < len(parts[n])]
        if not clashes:
            return short
        for n in clashes:
            depth[n] += 1


def short_pairs(pairs: Iterable[str], width: int = 24) -> dict[str, str]:
    """`teacher -> student` with both by their short names (`short_names`), or `P1`, `P2`, ... where one of
    those would still be wider than `width` (the legend then gives each in full)."""
    split = {p: p.split(" -> ", 1) for p in sorted(set(pairs))}
    short = short_names(name for both in split.values() for name in both)
    out = {p: " -> ".join(short[name] for name in both) for p, both in split.items()}
    if max(map(len, out.values()), default=0) > width:
        return {p: f"P{i}" for i, p in enumerate(out, 1)}
    return out


def score_text(score: Score) -> str:
    """What follows the mean in a cell: ` ± std [CI] (seeds×items)`."""
    text = f" ± {score.std:.3f}" if score.std is not None else ""
    if score.ci_low is not None:
        text += f" [{score.ci_low:.3f}, {score.ci_high:.3f}]"
    text += f" ({score.seeds}×{score.items})"
    if score.top_letter_share is not None:  # a model that names one letter for everything shows here
        text += f" top letter {score.top_letter_share:.0%}"
    return text


def delta_text(score: Score, two_lines: bool = False) -> str:
    """`Δ [CI] p marks`, or for the Rich table `Δ Δ p marks` over `[CI]`."""
    if score.baseline is not None and score.method == score.baseline:
        return "baseline"
    if score.delta is None:
        return OTHER_BUDGET if score.unequal_budget else ""
    p = "p<0.001" if score.p_value < 0.001 else f"p={score.p_value:.3f}"
    marks = (" *" if score.significant else "") + (f" {UNEQUAL}" if score.unequal_budget else "")
    ci = f"[{score.delta_low:+.3f}, {score.delta_high:+.3f}]"
    if two_lines:
        return f"Δ {score.delta:+.3f} {p}{marks}\n{ci}"
    return f"{score.delta:+.3f} {ci} {p}{marks}"


def _flat(score: Score) -> dict[str, Any]:
    row = asdict(score)
    costs, per_seed, config, budget = row.pop("costs"), row.pop("per_seed"), row.pop("config"), row.pop("budget")
    return {**row, **{f"seed.{seed}": value for seed, value in per_seed.items()},
            **{f"config.{name}": _value(value) for name, value in config.items()},
            **{f"budget.{name}": value for name, value in (budget or {}).items()},
            **{f"cost.{name}": value for name, value in costs.items()}}


COSTS = ("examples_seen", "optimizer_steps", "teacher_forward", "teacher_backward", "teacher_tokens",
         "teacher_tokens_generated")
"""The cost counters every method records (0 when it spends none); see `TransferContext.costs`."""
_COST_HEADERS = {"examples_seen": "ex", "optimizer_steps": "steps", "teacher_forward": "T fwd",
                 "teacher_backward": "T bwd", "teacher_tokens": "T tok", "teacher_tokens_generated": "T gen",
                 "student_tokens_generated": "S gen", "reused": "reused", "wall_s": "wall s"}
COST_LEGEND = ("Per run (mean over seeds), summed over the tasks shown. ex: train examples seen; steps: optimizer "
               "steps; T fwd / T bwd: teacher forward / backward passes (one per example); T tok: tokens the "
               "teacher read; T gen: tokens the teacher generated; S gen: tokens the student sampled while training "
               "(on-policy methods); reused: cached extractions reused; wall s: "
               "wall-clock seconds. k = thousand, M = million.")


def cost_columns(rows: list[Score]) -> dict[tuple[str, str], dict[str, float]]:
    """Per (method, pair): the mean cost of one run, summed over the tasks shown, then wall time.

    The standard costs always appear (0 when a method spends none), `student_tokens_generated` when any run
    sampled (on-policy methods), `reused` when any run reused a cached extraction; the exports (csv, json) carry every other counter a method recorded.
    """
    names = list(COSTS) + [name for name in ("student_tokens_generated", "reused")
                           if any(s.costs.get(name) for s in rows)]
    out: dict[tuple[str, str], dict[str, float]] = {}
    for s in rows:
        totals = out.setdefault((s.method, s.pair), dict.fromkeys([*names, "wall_s"], 0.0))
        for name in names:
            totals[name] += s.costs.get(name, 0.0)
        totals["wall_s"] += s.wall_s or 0.0
    return out


def _compact(value: float) -> str:
    for limit, unit in ((1e9, "G"), (1e6, "M"), (1e4, "k")):
        if abs(value) >= limit:
            return f"{value / (limit if unit != 'k' else 1e3):.1f}{unit}"
    return f"{value:.1f}" if value != int(value) else f"{value:.0f}"


def render(rows: list[Score], fmt: str, cost: bool = False) -> Any:
    """A Rich renderable for "table", else the text of the md/csv/json/latex rendering; `cost` adds a cost table."""
    if fmt == "json":
        return json.dumps([asdict(s) for s in rows], indent=1)
    if fmt == "csv":
        flat = [_flat(s) for s in rows]
        fields = [f for f in Score.__dataclass_fields__ if f not in ("costs", "per_seed", "config", "budget")]
        order = ("seed.", "config.", "budget.", "cost.")
        extra = sorted({name for row in flat for name in row if name not in fields},
                       key=lambda name: (next(i for i, o in enumerate(order) if name.startswith(o)), len(name), name))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields + extra, lineterminator="\n")
        writer.writeheader()
        writer.writerows(flat)
        return buffer.getvalue()
    tasks = sorted({s.task for s in rows})
    keys = list(dict.fromkeys((s.method, s.pair) for s in rows))
    by_key = {(s.method, s.pair, s.task): s for s in rows}
    metrics = {t: next(s.metric for s in rows if s.task == t) for t in tasks}
    baseline = next((s.baseline for s in rows if s.baseline is not None), None)
    compared = baseline is not None or any(s.delta is not None for s in rows)
    several_pairs = len({s.pair for s in rows}) > 1
    short = short_pairs({s.pair for s in rows})
    caption = [legend(baseline), *notes(rows)]
    costs = cost_columns(rows) if cost else {}
    cost_names = list(next(iter(costs.values()))) if costs else []
    lead = ["method", "pair"] if several_pairs else ["method"]

    def names(method: str, pair: str) -> list[str]:
        return [method, short[pair]] if several_pairs else [method]

    if fmt in ("md", "latex"):
        headers = list(lead)
        for t in tasks:
            headers += [f"{t} ({metrics[t]})"] + ([f"Δ {t} vs {baseline}"] if compared else [])
        bold, escape = ((lambda t: f"**{t}**", str) if fmt == "md" else
                        (lambda t: rf"\textbf{{{t}}}", _latex_escape))
        body = []
        for method, pair in keys:
            out = [escape(n) for n in names(method, pair)]
            for t in tasks:
                s = by_key.get((method, pair, t))
                if s is None:
                    out += [""] * (2 if compared else 1)
                    continue
                mean = f"{s.mean:.3f}"
                out.append((bold(mean) if s.best else mean) + escape(score_text(s)))
                if compared:
                    out.append(escape(delta_text(s)))
            body.append(out)
        cost_headers = [*lead, *cost_names]
        cost_body = [[*map(escape, names(m, p)), *(_compact(costs[m, p][n]) for n in cost_names)] for m, p in keys]
        if fmt == "md":
            text = _md(headers, body, "Cells: " + "; ".join(caption) + ".")
            return text + ("\n\n" + _md(cost_headers, cost_body, COST_LEGEND) if cost else "")
        text = _latex([_latex_escape(h) for h in headers], body, "; ".join(caption))
        return text + ("\n\n" + _latex([_latex_escape(h) for h in cost_headers], cost_body, COST_LEGEND)
                       if cost else "")
    from rich import box
    from rich.console import Group
    from rich.markup import escape as rich_escape
    from rich.table import Table

    table = Table(title="pkt-bench leaderboard", caption="\n".join(caption), box=box.SIMPLE_HEAD,
                  caption_justify="left", pad_edge=False, collapse_padding=True)
    for header in lead:
        table.add_column(header, overflow="fold")
    for t in tasks:
        table.add_column(rich_escape(f"{t} ({metrics[t]})"), justify="right")
    for method, pair in keys:
        cells = [rich_escape(n) for n in names(method, pair)]
        for t in tasks:
            s = by_key.get((method, pair, t))
            if s is None:
                cells.append("")
                continue
            mean = f"{s.mean:.3f}" + (f" ± {s.std:.3f}" if s.std is not None else "")
            lines = [f"[bold green]{mean}[/]" if s.best else mean]
            ci = f"[{s.ci_low:.3f}, {s.ci_high:.3f}] " if s.ci_low is not None else ""
            lines.append(rich_escape(f"{ci}({s.seeds}×{s.items})"))
            if compared and (delta := delta_text(s, two_lines=True)):
                lines.append(rich_escape(delta))
            cells.append("\n".join(lines))
        table.add_row(*cells, end_section=compared)
    if not cost:
        return table
    cost_table = Table(title="costs", caption=COST_LEGEND, box=box.SIMPLE_HEAD, caption_justify="left",
                       pad_edge=False, collapse_padding=True)
    for header in lead:  # numbers never wrap, so the labels get the room that is left, at least 12 columns
        cost_table.add_column(header, overflow="fold", min_width=12 if header == "method" else None)
    for name in cost_names:
        cost_table.add_column(_COST_HEADERS.get(name, name), justify="right")
    for method, pair in keys:
        cost_table.add_row(*map(rich_escape, names(method, pair)),
                           *(_compact(costs[method, pair][n]) for n in cost_names))
    return Group(table, cost_table)


def _md(headers: list[str], rows: list[list[str]], caption: str) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows] + ["", caption])


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "×": r"$\times$", "Δ": r"$\Delta$", "<": r"$<$", "->": r"$\rightarrow$"}


def _latex_escape(text: str) -> str:
    return re.sub(r"->|[\\&%$#_{}~^±×Δ<]", lambda match: _LATEX_ESCAPES[match.group()], text)


def _latex(headers: list[str], rows: list[list[str]], caption: str) -> str:
    """A booktabs tabular (needs `\\usepackage{booktabs}`), the legend as a comment above it."""
    columns = "".join("l" if h in ("method", "pair") else "r" for h in headers)
    lines = [f"% {caption}", r"\begin{tabular}{" + columns + "}", r"\toprule",
             " & ".join(headers) + r" \\", r"\midrule"]
    lines += [" & ".join(row) + r" \\" for row in rows]
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"])
