"""The reproduction report: one command runs (or resumes) a sweep, then writes a markdown file with the tables
(95% CIs, Δ against a baseline), the plots, and the papers' claims checked against the numbers.

    pkt-bench report sweeps/reproduction.yaml --out docs/reproduction.md

The sweep config's `report:` section names the baseline and the claims:

    report:
      title: Reproduction of parametric knowledge transfer claims
      baseline: lora
      claims:
        - paper: Seeking Neural Nuggets (Zhong et al., 2023)
          claim: parametric transfer beats LoRA fine-tuning, most on GSM8K
          kind: beats_baseline
          methods: [sensitivity]
          most_on: gsm8k
        - paper: Neural Incompatibility (Tan et al., 2025)
          claim: the gains of parametric transfer are small and unstable
          kind: small_and_unstable
          methods: [sensitivity, laten]
          small: 0.05

Verdicts follow fixed rules on each (method, task) against the baseline, with Δ its mean difference on the same
items, p the paired test's p-value (McNemar's for 0/1 metrics, else the paired bootstrap's) and α = 0.05:

- `beats_baseline`: supported when Δ > 0 and p < α; not supported when Δ < 0 and p < α; else not significant.
  With `most_on: T`, across every task of the sweep with the same pair: supported when T has the method's
  largest Δ and T's gain is supported; not supported when another task has a larger Δ; not significant when T
  has the largest Δ but p >= α.
- `small_and_unstable`: a gain is *small* when Δ <= `small` (absolute, in metric units), *unstable* when the
  per-seed gains (the method's score at seed s minus the baseline's at seed s) change sign or spread at least
  as wide as their mean (std >= |mean|). Supported when small and (unstable or p >= α); not supported when
  Δ > `small`, p < α and stable; not significant when Δ > `small` and p >= α; partly supported otherwise
  (small but a stable, significant effect; or large and significant but unstable). A Δ below -`small` counts as
  small here (no gain), and the evidence names it a loss, not a gain.

  Per-seed gains that are all exactly zero are *no effect*, not unstable. Stability needs two seeds or more:
  with one, a significant Δ (the case where the verdict turns on it) is `needs seeds`, never "not supported" or
  "partly supported".

A claim that transfer fails (`small_and_unstable`) is only "supported" where the instrument was shown to see a
transfer: with `controls:` in the report section,

    controls:
      positive: graft                # a method known to move knowledge where teacher and student are related
      negative: [pico-kin-sham]      # pairs whose teacher never learnt what the task asks (built-in pair names
                                     # or "teacher -> student"); the positive control must stay there

the instrument *can see transfer* on a (pair, task) when the positive control's Δ there is > 0 with p < α and,
on that task, it is run on at least one negative pair and beats the baseline (Δ > 0, p < α) on none. Elsewhere,
and whenever no controls are given, "supported" becomes "no power": silence is not evidence that transfer fails.
On a (pair, task) where the instrument can see transfer, a method whose Δ is not > 0 with p < α is reported as
moving nothing there.

A claim's overall verdict is the verdict every (method, task) shares, or "mixed" with the counts.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console

from pkt_bench.api import UserError
from pkt_bench.leaderboard import ALPHA, Score, items_by_id, model_identity, render, scores
from pkt_bench.store import RESULTS, ResultStore, failure_reason
from pkt_bench.sweep import Grid, Sweep, SweepOutcome, run_sweep

KINDS = ("beats_baseline", "small_and_unstable")


@dataclass
class Claim:
    paper: str
    claim: str
    kind: str
    methods: list[str]
    most_on: str | None = None
    small: float = 0.05


@dataclass
class Finding:
    """One (method, task) checked against a claim."""

    method: str
    task: str
    score: Score
    verdict: str
    why: str


@dataclass
class Controls:
    """The instrument's controls (see the module docstring): a positive-control method and negative pairs."""

    positive: str
    negative: list[str] = field(default_factory=list)  # pair labels "teacher -> student"


@dataclass
class Power:
    """Whether the instrument can see transfer on one (pair, task), and why."""

    visible: bool
    why: str


@dataclass
class ReportConfig:
    title: str
    baseline: str
    claims: list[Claim] = field(default_factory=list)
    controls: Controls | None = None
    notes: str = ""  # markdown under the header: the weights' provenance, published scores, protocol choices

    @classmethod
    def from_sweep(cls, sweep: Sweep) -> ReportConfig:
        data = dict(sweep.report)

        def fail(key: str, message: str) -> UserError:
            return UserError(f"{sweep.where(f'report.{key}')}: {message}")

        known = ("title", "baseline", "claims", "controls", "notes")
        for key in data:
            if key not in known:
                raise fail(key, f"unknown report key '{key}'; known keys: {', '.join(known)}")
        title = data.get("title", "pkt-bench reproduction report")
        baseline = data.get("baseline", "lora")
        notes = data.get("notes", "")
        if not isinstance(title, str) or not isinstance(baseline, str):
            raise fail("baseline", "report 'title' and 'baseline' must be strings")
        if not isinstance(notes, str):
            raise fail("notes", "report 'notes' must be a markdown string (use a YAML block: notes: |)")
        for grid in sweep.grids:
            references = ["student", "teacher"] if grid.base.references else []
            if baseline not in [m for m, _ in grid.methods] + references:
                raise fail("baseline", f"baseline {baseline!r} is not among the methods of {grid.name!r}; add it there")
        claims = []
        for i, entry in enumerate(data.get("claims") or []):
            where = f"claims[{i}]"
            if not isinstance(entry, dict):
                raise fail(where, "a claim is a mapping (paper:, claim:, kind:, methods:, ...)")
            try:
                claim = Claim(**entry)
            except TypeError as error:
                raise fail(where, f"bad claim ({error}); keys: paper, claim, kind, methods, most_on, small") from None
            if claim.kind not in KINDS:
                raise fail(f"{where}.kind", f"claim kind must be one of {', '.join(KINDS)}, got {claim.kind!r}")
            if not isinstance(claim.methods, list) or not claim.methods:
                raise fail(f"{where}.methods", "a claim's 'methods' must be a non-empty list of method names")
            swept = {m for g in sweep.grids for m, _ in g.methods}
            absent = [m for m in claim.methods if m not in swept]
            if absent:
                raise fail(f"{where}.methods", f"methods {', '.join(absent)} are in no grid; add them to methods:")
            claims.append(claim)
        return cls(title, baseline, claims, _controls(data.get("controls"), sweep, fail), notes.strip())


def _controls(data: Any, sweep: Sweep, fail) -> Controls | None:
    if data is None:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("positive"), str) or set(data) - {"positive", "negative"}:
        raise fail("controls", "'controls' is a mapping with positive: METHOD and negative: [PAIR, ...]")
    if data["positive"] not in {m for g in sweep.grids for m, _ in g.methods}:
        raise fail("controls.positive", f"the positive control {data['positive']!r} is in no grid; add it to methods:")
    negative = data.get("negative") or []
    if not isinstance(negative, list) or not all(isinstance(p, str) for p in negative):
        raise fail("controls.negative", "'negative' is a list of pairs (built-in names or \"teacher -> student\")")
    from pkt_bench import pico

    rungs = {rung.name: f"{rung.teacher} -> {rung.student}" for rung in pico.LADDER}
    return Controls(data["positive"], [rungs.get(pair, pair) for pair in negative])


def power(rows: list[Score], controls: Controls | None) -> dict[tuple[str, str], Power]:
    """Per (pair, task) of `rows`: whether the instrument can see transfer there (rules in the module docstring)."""
    keys = {(s.pair, s.task) for s in rows}
    if controls is None:
        return {key: Power(False, "no controls were run") for key in keys}
    positive = {(s.pair, s.task): s for s in rows if _base(s.method) == controls.positive and s.delta is not None}
    out = {}
    for pair, task in keys:
        negatives = [s for (p, t), s in positive.items() if t == task and p in controls.negative]
        leaked = [s for s in negatives if s.delta > 0 and s.p_value < ALPHA]
        pos = positive.get((pair, task))
        if pair in controls.negative:
            out[(pair, task)] = Power(False, "a negative-control pair")
        elif pos is None:
            out[(pair, task)] = Power(False, f"{controls.positive} did not run here")
        elif not (pos.delta > 0 and pos.p_value < ALPHA):
            out[(pair, task)] = Power(False, f"{controls.positive} moves nothing here (Δ {pos.delta:+.3f}, {_p(pos)})")
        elif not negatives:
            out[(pair, task)] = Power(False, f"no negative control ran on {task}")
        elif leaked:
            out[(pair, task)] = Power(False, f"{controls.positive} beats the baseline with a teacher that never saw "
                                             f"the answers ({leaked[0].pair}: Δ {leaked[0].delta:+.3f}, {_p(leaked[0])})")
        else:
            out[(pair, task)] = Power(True, f"{controls.positive} Δ {pos.delta:+.3f} ({_p(pos)}), at the baseline's "
                                            f"level with the negative control{'s' if len(negatives) > 1 else ''}")
    return out


def _base(label: str) -> str:
    """A method or task name without what tells its variants apart (`lora (rank=4)`, `gsm8k [1a2b3c]`)."""
    return re.split(r" [\[(]", label)[0]


def _resolution(score: Score) -> str:
    """How large a Δ these items could have shown as significant (McNemar's test, the discordance observed)."""
    if score.test != "mcnemar":
        return ""
    if score.min_delta is None:
        return "; too few items differ for any Δ to reach significance"
    return f"; smallest significant Δ here ±{score.min_delta:.3f}"


def _p(score: Score) -> str:
    return "p<0.001" if score.p_value < 0.001 else f"p={score.p_value:.3f}"


def check(claim: Claim, rows: list[Score], controls: Controls | None = None) -> list[Finding]:
    """The claim's findings on these rows (one per method variant and task with a Δ against the baseline)."""
    seen = power(rows, controls)
    baselines = {(s.pair, s.task): s for s in rows if s.method == s.baseline}
    findings = []
    for s in rows:
        if _base(s.method) not in claim.methods or s.delta is None:
            continue
        significant = s.p_value < ALPHA
        if claim.kind == "beats_baseline":
            verdict = ("supported" if significant and s.delta > 0 else "not supported" if significant and s.delta < 0
                       else "not significant")
            why = f"Δ {s.delta:+.3f} [{s.delta_low:+.3f}, {s.delta_high:+.3f}], {_p(s)}"
        else:
            gains = _seed_gains(s, baselines[(s.pair, s.task)])
            no_effect = bool(gains) and all(g == 0 for g in gains)
            unstable = len(gains) > 1 and not no_effect and (
                min(gains) < 0 < max(gains) or statistics.stdev(gains) >= abs(statistics.fmean(gains)))
            small = s.delta <= claim.small
            if significant and len(gains) < 2:
                verdict = "needs seeds"
            elif small:
                verdict = "supported" if unstable or not significant else "partly supported"
            else:
                verdict = ("not significant" if not significant else "partly supported" if unstable
                           else "not supported")
            seeds = ", ".join(f"{g:+.3f}" for g in gains)
            spread = ("no effect" if no_effect else "unstable" if unstable else "stable" if len(gains) > 1
                      else "one seed")
            size = ("not small" if not small else "small" if s.delta >= -claim.small
                    else "a loss, not a gain")  # Δ below -threshold: no gain, though not a small change
            why = (f"Δ {s.delta:+.3f} ({size}: threshold {claim.small}), {_p(s)}; "
                   f"per-seed gains {seeds or 'n/a'} ({spread})")
            if verdict == "supported" and not seen[(s.pair, s.task)].visible:
                verdict, why = "no power", f"{why}; no power: {seen[(s.pair, s.task)].why}"
        findings.append(Finding(s.method, s.task, s, verdict, why + _resolution(s)))
    return findings


def judge(config: ReportConfig, rows: list[Score], records: list[dict[str, Any]]) -> list[list[Finding]]:
    """Each claim's findings on a grid's rows. Where the baseline scores below the untouched student on a task, a
    claim that gains are small (`small_and_unstable`) is also judged against the student there (findings on
    "<task> vs student"): a method can lose less than a damaging baseline and still change nothing."""
    findings = [check(claim, rows, config.controls) for claim in config.claims]
    mean = {(s.method, s.task): s.mean for s in rows}
    below = {s.task for s in rows if s.method == config.baseline and ("student", s.task) in mean
             and s.mean < mean[("student", s.task)]}
    if below:
        against = [dataclasses.replace(s, task=f"{s.task} vs student")
                   for s in scores(records, baseline="student", allow_unequal=True) if s.task in below]
        for i, claim in enumerate(config.claims):
            if claim.kind == "small_and_unstable":
                findings[i] += check(claim, against, config.controls)
    return findings


def _seed_gains(s: Score, baseline: Score) -> list[float]:
    """The method's score at each seed minus the baseline's at that seed (its mean where it lacks the seed)."""
    return [score - baseline.per_seed.get(seed, baseline.mean) for seed, score in sorted(s.per_seed.items())]


def most_on(task: str, findings: list[Finding]) -> list[Finding]:
    """Whether each method's largest gain, over the tasks its pair was evaluated on, is on `task`."""
    by_method: dict[tuple[str, str], list[Finding]] = defaultdict(list)
    for f in findings:
        by_method[(f.method, f.score.pair)].append(f)
    out = []
    for (method, _), own in by_method.items():
        target = next((f for f in own if _base(f.task) == task), None)
        if target is None:
            continue  # the pair was not evaluated on that task: nothing to say
        top = max(own, key=lambda f: f.score.delta)
        if top is not target:
            verdict, why = "not supported", f"largest Δ on {top.task} ({top.score.delta:+.3f}), not {task}"
        else:
            verdict = "supported" if target.verdict == "supported" else "not significant"
            why = f"largest Δ of {len(own)} tasks is on {task} ({target.score.delta:+.3f}, {_p(target.score)})"
        out.append(Finding(method, f"most on {task}", target.score, verdict, why))
    return out


def overall(findings: list[Finding]) -> str:
    if not findings:
        return "not run"
    counts = Counter(f.verdict for f in findings)
    if len(counts) == 1:
        return findings[0].verdict
    return "mixed: " + ", ".join(f"{n} {verdict}" for verdict, n in counts.most_common())


def write_report(sweep: Sweep, store: ResultStore, out: Path, command: str, *, executor: str = "local",
                 max_parallel: int | None = None, plugins: tuple[str, ...] = (),
                 console: Console | None = None, run: bool = True) -> list[str]:
    """Run or resume the sweep, then write the report to `out` (plots beside it); return the failed cells.
    With `run=False`, write it from the records stored so far (a sweep still running elsewhere, or stopped), the
    cells without one named as pending."""
    config = ReportConfig.from_sweep(sweep)
    if run:
        outcome = run_sweep(sweep, store, executor=executor, max_parallel=max_parallel, plugins=plugins,
                            console=console)
    else:
        cells = sweep.plan()
        outcome = SweepOutcome(cells, sum(store.path(c.key).exists() for c in cells), 0, {})
    failed = _failed(outcome, store)
    figures = out.parent / out.stem
    sections, summary = [], defaultdict(list)
    for grid in sweep.grids:
        stored = ((c, store.get(c.key)) for c in grid.cells)
        records = [_named(r, grid.pair_names.get((c.spec.teacher, c.spec.student)))
                   for c, r in stored if r is not None]
        if not records:
            n = sum(c.key in failed for c in grid.cells)
            why = (f"{n} of its {len(grid.cells)} cells failed" if n == len(grid.cells) else
                   f"{len(grid.cells) - n} of its {len(grid.cells)} cells are pending" + (f" and {n} failed" if n else ""))
            sections.append(f"## {grid.name}\n\nNo records yet: {why}.\n" + "\n".join(
                f"- {_cell_name(c, sweep)}: {failed[c.key]}" for c in grid.cells if c.key in failed) + "\n")
            continue
        has_baseline = any(r["method"] == config.baseline for r in records)
        # the leaderboard resolves the baseline name; a Δ across budgets is shown marked, never hidden
        rows = scores(records, baseline=config.baseline if has_baseline else None, allow_unequal=True)
        findings = judge(config, rows, records)
        for i, found in enumerate(findings):
            summary[i] += found
        devices = sorted({f"{r['cell'].get('device_type')}, {r['cell'].get('dtype')}" for r in records})
        sections.append(_grid_section(grid, rows, findings, config, figures, out.parent, devices, records,
                                      [(c, failed[c.key]) for c in grid.cells if c.key in failed]))
    for i, claim in enumerate(config.claims):
        if claim.kind == "beats_baseline" and claim.most_on:
            summary[i] += most_on(claim.most_on, summary[i])
    every = [_named(r) for r in (store.get(c.key) for c in outcome.cells) if r is not None]
    if len({(model_identity(r, "teacher"), model_identity(r, "student")) for r in every}) > 1:
        sections.append(_ladder_section(every, config.baseline, figures, out.parent))
    notes = [config.notes + "\n"] if config.notes else []
    text = "\n".join([_header(config, sweep, store, outcome, command, failed), *notes, _summary(config, summary), *sections,
                      _method_notes()])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return list(outcome.failed)


def _named(record: dict[str, Any], pair_name: str | None = None) -> dict[str, Any]:
    """A record as the report shows it: models by folder name (a machine's paths are no part of a report), and the
    pair by the `name:` its grid gave it, where it has one (the leaderboard's `pair_name`)."""
    named = {**record, "teacher": Path(record["teacher"]).name, "student": Path(record["student"]).name}
    return {**named, "pair_name": pair_name} if pair_name else named


def _commits(records: list[dict[str, Any]]) -> str:
    """The pkt-bench commits records were made from, compactly: the one, or how many and the most used."""
    counts = Counter((r["environment"].get("git_commit") or "unknown")[:12] for r in records)
    if len(counts) <= 1:
        return f"commit {next(iter(counts), 'n/a')}"
    top, n = counts.most_common(1)[0]
    dirty = sum(v for k, v in counts.items() if k.endswith("-dirty"))
    return (f"{len(counts)} commits, {top} for {n} of {len(records)} records"
            + (f"; {dirty} from uncommitted code (diffs beside the records)" if dirty else ""))


def _failed(outcome: SweepOutcome, store: ResultStore) -> dict[str, str]:
    """Cell key -> why it has no record, for every planned cell that failed (in this run or an earlier one, as
    the store's failure notes say) or whose process ended without its record; cells running now are left out.
    The reasons name the results folder and the models as the report does, never by this machine's paths."""
    failed = {}
    for cell in outcome.cells:
        note = store.failure(cell.key)
        reason = failure_reason(note) if note else None
        if reason is None and cell.label in outcome.failed:
            reason = f"failed: {outcome.failed[cell.label]}"
        if reason is not None and not store.path(cell.key).exists():
            places = {str(store.root.resolve()): RESULTS,
                      **{str(Path(p)): Path(p).name for p in (cell.spec.teacher, cell.spec.student)}}
            for place in sorted(places, key=len, reverse=True):  # the longest first: a folder inside another
                reason = reason.replace(place, places[place])
            failed[cell.key] = reason
    return failed


def _cell_name(cell: Any, sweep: Sweep) -> str:
    """A sweep cell as the report names it: method, task, seed and the pair's name (no machine path)."""
    grid = next((g for g in sweep.grids if cell in g.cells), sweep.grids[0])
    return cell.named(grid.pair_name(cell.spec.teacher, cell.spec.student))


def _header(config: ReportConfig, sweep: Sweep, store: ResultStore, outcome: Any, command: str,
            failures: dict[str, str]) -> str:
    stored = [r for c in outcome.cells if (r := store.get(c.key)) is not None]
    machines = sorted({_machine(r["environment"]) for r in stored})
    failed = ""
    if failures:
        failed = (f"\n**Incomplete: {len(failures)} cells failed** and have no record (each grid's cost table "
                  f"lists them): " + "; ".join(f"{_cell_name(c, sweep)} ({failures[c.key]})" for c in outcome.cells
                                               if c.key in failures) + "\n")
    pending = [c for c in outcome.cells if not store.path(c.key).exists() and c.key not in failures]
    if pending:
        methods: dict[tuple[str, int], list[str]] = defaultdict(list)
        from pkt_bench.registry import METHODS

        for c in pending:
            trains = METHODS.get(c.spec.method).cls.fine_tunes  # only these read transfer_data and select
            data = ", ".join(([] if c.spec.transfer_data == "gold" or not trains else [f"{c.spec.transfer_data} data"])
                             + (["lr selected"] if c.spec.select and trains else []))
            methods[(c.spec.tasks[0], c.spec.seed)].append(c.spec.method + (f" ({data})" if data else ""))
        failed += (f"\n**Incomplete: {len(pending)} of {len(outcome.cells)} cells have no record yet** and are "
                   f"missing from the tables: " + "; ".join(f"{task} seed {seed}: {', '.join(names)}"
                                                            for (task, seed), names in methods.items()) + ".\n")
    return f"""# {config.title}

Made by `{command}` on {datetime.now(timezone.utc).strftime('%Y-%m-%d')} from the sweep config
`{sweep.path}`: {len(outcome.cells)} cells, {outcome.ran} run for this report and {outcome.stored_before} reused from
`{store.root}`. Records made on: {'; '.join(machines) or 'n/a'} (pkt-bench {_commits(stored)}).
Rerunning the command (without `--stored-only`) runs only the cells without a record{_reads(sweep)}.
{failed}"""


def _reads(sweep: Sweep) -> str:
    """What a rerun on another machine must export first: the environment variables the config reads."""
    if not sweep.variables:
        return ""
    return (f"; the config reads {', '.join(f'`{v}`' for v in sweep.variables)} from the environment, so on "
            f"another machine export them first, to its own copies")


def _machine(env: dict[str, Any]) -> str:
    hw = env.get("hardware", {})
    gpu = ", ".join(hw.get("cuda", [])) or "no GPU"
    return f"{hw.get('cpu_count')} CPU cores, {hw.get('memory_gb')} GB RAM, {gpu}"


def _summary(config: ReportConfig, summary: dict[int, list[Finding]]) -> str:
    if not config.claims:
        return ""
    lines = ["## Claims at a glance", "", "| paper | claim | verdict |", "|---|---|---|"]
    lines += [f"| {c.paper} | {c.claim} | **{overall(summary[i])}** |" for i, c in enumerate(config.claims)]
    lines += ["", "Per-task evidence sits beside each table below; the rules are at the end."]
    for i, claim in enumerate(config.claims):
        across = [f for f in summary[i] if f.task.startswith("most on ")]
        if across:
            lines += ["", f"{claim.paper}, across tasks:", "", "| method | pair | claim | verdict | evidence |",
                      "|---|---|---|---|---|"]
            lines += [f"| {f.method} | {f.score.pair} | {f.task} | {f.verdict} | {f.why} |" for f in across]
    return "\n".join(lines + [""])


def _grid_section(grid: Grid, rows: list[Score], findings: list[list[Finding]], config: ReportConfig,
                  figures: Path, relative_to: Path, devices: list[str], records: list[dict[str, Any]],
                  failed: list[tuple[Any, str]]) -> str:
    from pkt_bench.plots import plot

    b = grid.base.budget
    pairs = "; ".join(grid.pair_name(t, s) for t, s in grid.pairs)
    seeds = sorted({r["seed"] for r in records if r["method"] not in ("student", "teacher")})
    planned = ", ".join(map(str, grid.seeds))
    have = (f"seeds {planned}" if seeds == grid.seeds else
            f"seeds with records: {', '.join(map(str, seeds))} of {planned}" if seeds else
            f"no method records yet (seeds {planned} planned)")
    parts = [f"## {grid.name}: {pairs}", "",
             f"Tasks {', '.join(grid.tasks)}, evaluated on {_items(grid.base.limit)}; {have}; transfer data "
             f"{grid.base.transfer_data}; budget for methods that fine-tune: {b.examples} "
             f"train examples × {b.epochs} epochs, batch {b.batch_size} × accum {b.grad_accum}, lr {b.lr:g}, "
             f"max length {b.max_length}; ran on {' and '.join(devices)}.", "",
             render(rows, "md"), ""]
    parts += _warnings(rows, records, config.baseline)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", grid.name).strip("-") or "grid"
    for path in plot(rows, figures / slug):
        parts.append(f"![{path.stem}]({path.relative_to(relative_to).as_posix()})")
    parts.append("")
    parts += _cell_costs(records, failed)
    parts += _selection_table(records)
    parts += _controls_table(rows, config)
    for claim, found in zip(config.claims, findings):
        parts += [f"**{claim.paper}: \"{claim.claim}\"** on this grid: **{overall(found)}**", ""]
        if found:
            parts += ["| method | pair | task | verdict | evidence |", "|---|---|---|---|---|"]
            parts += [f"| {f.method} | {_rung(f.score.pair)} | {f.task} | {f.verdict} | {f.why} |" for f in found]
        else:
            parts.append(f"Not run here: none of {', '.join(claim.methods)} has a Δ against {config.baseline}.")
        parts.append("")
    return "\n".join(parts)


COLLAPSED = 0.5
"""An MMLU row whose most chosen letter takes more than this share of the answers is flagged as collapsed."""


def _warnings(rows: list[Score], records: list[dict[str, Any]], baseline: str) -> list[str]:
    """What a reader must know before reading Δ: a baseline below the untouched student (a method that beats it
    may only lose less), and collapsed multiple-choice answers."""
    lines = []
    mean = {(s.method, s.task): s.mean for s in rows}
    for task in sorted({s.task for s in rows}):
        base, student = mean.get((baseline, task)), mean.get(("student", task))
        if base is not None and student is not None and base < student:
            lines.append(f"- **{baseline} scores below the untouched student on {task}** ({base:.3f} against "
                         f"{student:.3f}): a method that beats {baseline} here may only lose less than it; compare "
                         f"with the student row too.")
    collapsed = defaultdict(list)
    for r in records:
        share = r["metrics"].get("top_letter_share")
        if share is not None and share > COLLAPSED:
            collapsed[(r["method"], r["task"])].append(share)
    for (method, task), shares in sorted(collapsed.items()):
        lines.append(f"- **{method} on {task} is collapsed**: one letter takes {max(shares):.0%} of its answers "
                     f"(top_letter_share above {COLLAPSED}); its accuracy measures that letter's share, not knowledge.")
    return lines + [""] if lines else []


def _cell_costs(records: list[dict[str, Any]], failed: list[tuple[Any, str]]) -> list[str]:
    """Each cell's wall time, per stage and in all, its peak resident memory (and CUDA's, where used), and how much
    of the student's behaviour it left as it was; then each failed cell (a `SweepCell`) with the reason."""
    from pkt_bench.runner import STAGES

    # the runner's stages, then any other a record timed (a learning-rate selection's `select`), so rows add up
    names = [*STAGES, *sorted({n for r in records for n, v in (r.get("stages") or {}).items() if v} - set(STAGES))]
    by_key = {r.get("key"): r for r in records}
    lines = ["Cost of each cell (wall time in seconds per stage; peak memory over the cell; *as student*: the share of "
             "items whose record, output and score, is identical to the student reference's, so a method that left "
             "the student as it was shows near 100% whatever its score):", "",
             "| method | task | seed | " + " | ".join(names) +
             " | total s | peak RSS GiB | peak CUDA GiB | as student |",
             "|---|---|---|" + "---|" * (len(names) + 4)]
    for r in sorted(records, key=lambda r: (r["task"], r["seed"], r["method"])):
        stages = {name: s for name, s in (r.get("stages") or {}).items() if s}
        seconds = [f"{stages[name]['wall_s']:,.1f}" if name in stages else "" for name in names]
        rss = max((s.get("peak_rss_mb") or 0 for s in stages.values()), default=0) / 1024
        cuda = max((s.get("peak_cuda_mb") or 0 for s in stages.values()), default=0) / 1024
        student = by_key.get((r.get("references") or {}).get("student", {}).get("key"))
        same = f"{_same_items(r, student):.0%}" if student is not None else ""
        lines.append(f"| {r['method']} | {r['task']} | {r['seed']} | " + " | ".join(seconds) +
                     f" | {r.get('wall_s') or 0:,.1f} | {rss:.1f} | {f'{cuda:.1f}' if cuda else ''} | {same} |")
    for cell, reason in sorted(failed, key=lambda f: (f[0].spec.tasks[0], f[0].spec.seed, f[0].spec.method)):
        reason = reason.replace("|", "\\|")  # a table cell
        lines.append(f"| {cell.spec.method} | {cell.spec.tasks[0]} | {cell.spec.seed} | **{reason}** |"
                     + " |" * (len(names) + 3))
    return [*lines, ""]


def _selection_table(records: list[dict[str, Any]]) -> list[str]:
    """The learning-rate trials of cells that selected one (`select:`): each trial's validation score and loss,
    and the one evaluated on the test items."""
    chosen = [r for r in records if r.get("selection")]
    if not chosen:
        return []
    lines = ["Learning-rate selection (each trial a whole fine-tune, scored on the validation split; the chosen one, "
             "in bold, is the one evaluated on the test items):", "",
             "| method | task | seed | lr | validation score | validation loss after | optimizer steps |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(chosen, key=lambda r: (r["task"], r["seed"], r["method"])):
        selection = r["selection"]
        if "student" in selection:
            lines.append(f"| {r['method']} | {r['task']} | {r['seed']} | untouched student | "
                         f"{selection['student']['validation_score']:.3f} (of {selection['examples']}) |  |  |")
        for trial in selection["trials"]:
            mark = "**" if trial["lr"] == selection["winner"]["lr"] else ""
            loss = trial.get("validation_loss_after")
            lines.append(f"| {r['method']} | {r['task']} | {r['seed']} | {mark}{trial['lr']:g}{mark} | "
                         f"{mark}{trial['validation_score']:.3f}{mark} (of {selection['examples']}) | "
                         f"{'' if loss is None else f'{loss:.4f}'} | {trial.get('optimizer_steps', '')} |")
    return [*lines, ""]


def _same_items(record: dict[str, Any], student: dict[str, Any]) -> float:
    """The share of `record`'s items identical to the student's item of the same id."""
    ours, theirs = items_by_id(record), items_by_id(student)
    return sum(item == theirs.get(i) for i, item in ours.items()) / max(len(ours), 1)


def _controls_table(rows: list[Score], config: ReportConfig) -> list[str]:
    """Per (pair, task): whether the instrument can see transfer, and which methods move nothing where it can."""
    if config.controls is None:
        return []
    lines = [f"**Controls** (positive: {config.controls.positive}; negative pairs: "
             f"{', '.join(config.controls.negative) or 'none'}):", "",
             "| pair | task | instrument | why | methods that move nothing here |", "|---|---|---|---|---|"]
    for (pair, task), seen in sorted(power(rows, config.controls).items()):
        idle = sorted(s.method for s in rows if (s.pair, s.task) == (pair, task) and s.delta is not None
                      and s.method not in (s.baseline, "student", "teacher")
                      and not (s.delta > 0 and s.p_value < ALPHA)) if seen.visible else []
        lines.append(f"| {pair} | {task} | {'sees transfer' if seen.visible else 'no power'} | {seen.why} | "
                     f"{', '.join(idle) or ('none' if seen.visible else 'n/a')} |")
    return lines + [""]


def _rung_order(pair: str) -> int:
    """A built-in pair's place on the kinship ladder; other pairs after it."""
    from pkt_bench import pico

    labels = [f"{r.teacher} -> {r.student}" for r in pico.LADDER]
    return labels.index(pair) if pair in labels else len(labels)


def _rung(pair: str) -> str:
    """A built-in pair's name for its "teacher -> student" label; other labels as they are."""
    from pkt_bench import pico

    return {f"{r.teacher} -> {r.student}": r.name for r in pico.LADDER}.get(pair, pair)


def _ladder_section(records: list[dict[str, Any]], baseline: str, figures: Path, relative_to: Path) -> str:
    """Every method on every pair of the sweep, per task: one table (mean, 95% CI, Δ vs the baseline) and one plot
    of the score against the pair, in the sweep's pair order (for the probe: the kinship ladder, most related first)."""
    parts = ["## Across pairs", ""]
    minutes = sum(r.get("wall_s") or 0 for r in records) / 60
    made = sorted(r["created_at"] for r in records if r.get("created_at"))
    span = f", made between {made[0]} and {made[-1]}" if made else ""
    parts += [f"Cells: {len(records)}, {minutes:.1f} min of cell wall time in all (transfer and evaluation; building "
              f"models is not in it){span}. Each cell: mean over seeds [95% CI]; Δ vs {baseline} on the same items, "
              f"* when p < {ALPHA}. Pairs from the most related to the least.", ""]
    for task in sorted({r["task"] for r in records}):
        own = [r for r in records if r["task"] == task]
        rows = scores(own, baseline=baseline)
        pairs = sorted(dict.fromkeys(s.pair for s in rows), key=_rung_order)
        methods = list(dict.fromkeys(s.method for s in rows))
        table = {(s.method, s.pair): s for s in rows}
        parts += [f"**{task}**" + (f" (chance {own[0]['evaluation']['chance']:.3f})"
                                   if "chance" in own[0].get("evaluation", {}) else ""), "",
                  "| method | " + " | ".join(_rung(p) for p in pairs) + " |", "|---|" + "---|" * len(pairs)]
        for method in methods:
            cells = []
            for pair in pairs:
                s = table.get((method, pair))
                if s is None:
                    cells.append("–")
                    continue
                ci = f" [{s.ci_low:.2f}, {s.ci_high:.2f}]" if s.ci_low is not None else ""
                delta = (f" Δ {s.delta:+.2f}{'*' if s.p_value < ALPHA else ''}"
                         if s.delta is not None and s.method != s.baseline else "")
                cells.append(f"{s.mean:.3f}{ci}{delta}")
            parts.append(f"| {method} | " + " | ".join(cells) + " |")
        path = _ladder_plot(rows, pairs, methods, task, figures)
        parts += ["", f"![{path.stem}]({path.relative_to(relative_to).as_posix()})", ""]
    return "\n".join(parts)


def _ladder_plot(rows: list[Score], pairs: list[str], methods: list[str], task: str, figures: Path) -> Path:
    from pkt_bench.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(pairs)), 4.5))
    for method in methods:
        points = [(i, s) for i, pair in enumerate(pairs) for s in rows if (s.method, s.pair) == (method, pair)]
        if not points:
            continue
        xs, ys = [i for i, _ in points], [s.mean for _, s in points]
        errors = [[s.mean - (s.ci_low if s.ci_low is not None else s.mean) for _, s in points],
                  [(s.ci_high if s.ci_high is not None else s.mean) - s.mean for _, s in points]]
        ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=method)
    ax.set_xticks(range(len(pairs)), [_rung(p) for p in pairs], rotation=20, ha="right")
    ax.set_ylabel(f"{task}: {rows[0].metric} (mean over seeds, 95% CI)")
    ax.set_title(f"{task}: each method on each pair")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    figures.mkdir(parents=True, exist_ok=True)
    path = figures / f"pairs-{re.sub(r'[^A-Za-z0-9_.-]+', '_', task)}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _items(limit: int | None) -> str:
    if limit is None:
        return "all items"
    return (f"--limit {limit} items (each task's choice, stated in every record's `evaluation.items_chosen`: the "
            f"first {limit}, or for mmlu the same number from every subject)")


def _method_notes() -> str:
    doc = __doc__.split("Verdicts follow", 1)[1]
    return ("## How the numbers and verdicts are made\n\nCells: mean ± std over seeds, with the 95% bootstrap CI "
            "over items × seeds (`pkt_bench/stats.py`). Δ: the paired difference to the baseline on the same items,"
            " its 95% paired-bootstrap CI, and the p-value of McNemar's test (0/1 metrics) or the paired bootstrap."
            f"\n\nVerdicts follow{doc}")


def report_command(config: Path, out: Path, results: Path, executor: str, max_parallel: int | None) -> str:
    """The command line that remakes (and resumes) a report, as the report states it."""
    parts = ["pkt-bench", "report", str(config), "--out", str(out)]
    if results != Path("results"):
        parts += ["--results", str(results)]
    if executor != "local":
        parts += ["--executor", executor]
    if max_parallel:
        parts += ["--max-parallel", str(max_parallel)]
    return shlex.join(parts)
