"""Sweeps: the grid methods × pairs × tasks × seeds from one YAML file, run locally or on Ray, resumable.

A sweep config (see sweeps/reproduction.yaml):

    methods: [student, teacher, lora, {method: lora, method_config: {rank: 16}}]
    pairs: [{teacher: pico-teacher, student: pico-student}]
    tasks: [probe]
    seeds: [0, 1, 2]
    budget: {examples: 64, epochs: 3}   # and the other shared RunSpec keys: limit, data_dir, backend, dtype,
                                        # device, references
    resources: {cpus: 1, gpus: 0}       # what one cell needs (the Ray executor schedules by it)
    grids:                              # optional: several grids, each overriding the keys above
      - {name: qwen, pairs: [{teacher: "${QWEN_TEACHER}", student: "${QWEN_STUDENT}"}], tasks: [gsm8k]}

`transfer_data:` (gold, teacher, self) applies to the methods that train on the task's data; a method that writes
its own training answers (distill) runs on gold in every grid.

Strings may name environment variables, `${VAR}` or `${VAR:-default}`, so that a checked-in config works with
other folders. A `report:` section is kept for `pkt_bench.report`.

Every cell is one `RunSpec` with one method, one task and one seed, and its key is the runner's: rerunning the
config (or `pkt-bench run` of the same cell) finds the stored record and skips the cell, so a sweep resumes
where it stopped. Everything that can fail on user input is checked before the first cell runs. The reference
cells (student and teacher as they are) run once per pair and task at seed 0, before every other cell of the same
pair and task, whatever its seed, because those read their scores. Cells run seed by seed, and grid by grid within
a seed, so an interrupted run leaves whole columns. Folders that methods share across cells (extractions, teacher generations) live in the
results folder's cache, so every seed and budget that does not change them reuses them.

Executors: `local` runs the cells one after another in this process, or in `max_parallel` worker processes;
`ray` makes each cell a Ray task with the grid's `resources` (`ray.init()` joins the cluster named by
RAY_ADDRESS, else starts a local instance); `pkt_bench.rayexec` says where its workers write (a node's own folder,
records sent back to the driver, by default; or a shared results folder), and what a lost node or an interrupted
driver costs.
"""

from __future__ import annotations

import dataclasses
import os
import re
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pkt_bench.api import UserError
from pkt_bench.spec import RunSpec, SpecKeyError, read_yaml
from pkt_bench.store import ResultStore

EXECUTORS = ("local", "ray")
_PER_CELL = ("method", "method_config", "teacher", "student", "tasks", "seed")
SHARED_KEYS = tuple(f.name for f in dataclasses.fields(RunSpec) if f.name not in _PER_CELL)
GRID_KEYS = ("name", "methods", "pairs", "tasks", "seeds", "resources", *SHARED_KEYS)
TOP_KEYS = (*GRID_KEYS, "grids", "report")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True)
class Resources:
    """What one cell needs; the Ray executor asks for it, the local executor runs cells as it can."""

    cpus: float = 1
    gpus: float = 0


@dataclass
class SweepCell:
    """One cell of the grid: a `RunSpec` with one method, one task and one seed, and the key of its record."""

    spec: RunSpec
    key: str
    resources: Resources

    @property
    def label(self) -> str:
        return self.named(f"{self.spec.teacher} -> {self.spec.student}")

    def named(self, pair: str) -> str:
        """The cell as "method(config) on task (seed N; `pair`)"; `label` names the pair by its two models."""
        config = ",".join(f"{k}={v}" for k, v in self.spec.method_config.items())
        method = f"{self.spec.method}({config})" if config else self.spec.method
        return f"{method} on {self.spec.tasks[0]} (seed {self.spec.seed}; {pair})"


@dataclass
class Grid:
    """One grid of a sweep: every method × pair × task × seed, with the shared spec keys in `base`."""

    name: str
    methods: list[tuple[str, dict[str, Any]]]
    pairs: list[tuple[str, str]]
    tasks: list[str]
    seeds: list[int]
    base: RunSpec
    resources: Resources
    cells: list[SweepCell] = field(default_factory=list)  # filled by `Sweep.plan`, reference cells included
    pair_names: dict[tuple[str, str], str] = field(default_factory=dict)  # (teacher, student) -> `name:` given

    def pair_name(self, teacher: str, student: str) -> str:
        """How reports name a pair: its `name:`, else "teacher → student" by folder name, never a machine path."""
        return self.pair_names.get((teacher, student)) or f"{Path(teacher).name} → {Path(student).name}"


@dataclass
class Sweep:
    path: Path
    grids: list[Grid]
    report: dict[str, Any]
    lines: dict[str, int]
    variables: dict[str, str] = field(default_factory=dict)  # environment variables the config read -> value used

    def where(self, key: str) -> str:
        """`file:line` of a dotted key of the config (or of its nearest enclosing key)."""
        while key and key not in self.lines:
            parent = re.sub(r"(\.[^.\[]+|\[\d+\])$", "", key)  # drop the last ".name" or "[i]"
            key = "" if parent == key else parent
        return f"{self.path}:{self.lines.get(key, 1)}"

    @classmethod
    def load(cls, path: str | Path) -> Sweep:
        path = Path(path)
        data, lines = read_yaml(path, "sweep")
        sweep = cls(path, [], {}, lines)
        if not isinstance(data, dict):
            raise UserError(f"{path}:1: a sweep must be a mapping (methods:, pairs:, tasks:, seeds:, ...)")
        data = sweep._expand(data, "")
        sweep._check_keys(data, "", TOP_KEYS)
        grids = data.get("grids") or [{}]
        if not isinstance(grids, list) or not all(isinstance(g, dict) for g in grids):
            raise UserError(f"{sweep.where('grids')}: 'grids' must be a list of mappings (methods:, tasks:, ...)")
        top = {k: v for k, v in data.items() if k not in ("grids", "report")}
        for i, grid in enumerate(grids):
            sweep._check_keys(grid, f"grids[{i}]", GRID_KEYS)
            sweep.grids.append(sweep._grid({**top, **grid}, lambda key, i=i, grid=grid: (
                f"grids[{i}].{key}" if key in grid else key), default_name=f"grid {i + 1}"))
        report = data.get("report") or {}
        if not isinstance(report, dict):
            raise UserError(f"{sweep.where('report')}: 'report' must be a mapping (baseline:, claims:)")
        sweep.report = report
        return sweep

    def _expand(self, value: Any, key: str) -> Any:
        """Replace `${VAR}` / `${VAR:-default}` in every string with the environment's value."""
        if isinstance(value, dict):
            return {k: self._expand(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [self._expand(v, f"{key}[{i}]") for i, v in enumerate(value)]
        if not isinstance(value, str):
            return value

        def substitute(match: re.Match) -> str:
            name, default = match.group(1), match.group(2)
            if name in os.environ or default is not None:
                self.variables[name] = os.environ.get(name, default)
                return self.variables[name]
            raise UserError(f"{self.where(key)}: environment variable {name} is not set (used by '{key}'); "
                            f"export {name}=... or give a default as ${{{name}:-VALUE}}")

        return _ENV.sub(substitute, value)

    def _check_keys(self, data: dict[str, Any], prefix: str, known: tuple[str, ...]) -> None:
        for key in data:
            if key not in known:
                where = self.where(f"{prefix}.{key}" if prefix else str(key))
                raise UserError(f"{where}: unknown sweep key '{key}'; known keys: {', '.join(known)}")

    def _grid(self, data: dict[str, Any], key_of: Callable[[str], str], default_name: str) -> Grid:
        def fail(key: str, message: str) -> UserError:
            return UserError(f"{self.where(key_of(key))}: {message}")

        methods = data.get("methods")
        if not isinstance(methods, list) or not methods:
            raise fail("methods", "'methods' must be a non-empty list of method names (or {method:, method_config:})")
        parsed_methods = []
        for entry in methods:
            if isinstance(entry, str):
                entry = {"method": entry}
            if (not isinstance(entry, dict) or not isinstance(entry.get("method"), str)
                    or set(entry) - {"method", "method_config"} or not isinstance(entry.get("method_config", {}), dict)):
                raise fail("methods", f"a method is a name or {{method: NAME, method_config: {{...}}}}, got {entry!r}")
            parsed_methods.append((entry["method"], entry.get("method_config") or {}))
        pairs = data.get("pairs", [{"teacher": RunSpec.teacher, "student": RunSpec.student}])
        if not isinstance(pairs, list) or not pairs or not all(
                isinstance(p, dict) and {"teacher", "student"} <= set(p) <= {"teacher", "student", "name"}
                and all(isinstance(v, str) for v in p.values()) for p in pairs):
            raise fail("pairs", "'pairs' must be a non-empty list of {teacher: MODEL, student: MODEL} (with an "
                                "optional name: for reports)")
        tasks = data.get("tasks", ["probe"])
        tasks = [tasks] if isinstance(tasks, str) else tasks
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
            raise fail("tasks", f"'tasks' must be a non-empty list of task names, got {tasks!r}")
        seeds = data.get("seeds", [0])
        seeds = [seeds] if isinstance(seeds, int) and not isinstance(seeds, bool) else seeds
        if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
            raise fail("seeds", f"'seeds' must be a non-empty list of distinct integers, got {seeds!r}")
        resources = data.get("resources") or {}
        if (not isinstance(resources, dict) or set(resources) - {"cpus", "gpus"}
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in resources.values())):
            raise fail("resources", f"'resources' must be a mapping with cpus: and gpus: (numbers >= 0), got {resources!r}")
        name = data.get("name", default_name)
        if not isinstance(name, str):
            raise fail("name", f"'name' must be a string, got {name!r}")
        try:
            base = RunSpec.from_dict({k: v for k, v in data.items() if k in SHARED_KEYS})
        except SpecKeyError as error:
            raise fail(error.key, str(error)) from None
        return Grid(name, parsed_methods, [(p["teacher"], p["student"]) for p in pairs], tasks, seeds, base,
                    Resources(**resources), pair_names={(p["teacher"], p["student"]): p["name"] for p in pairs
                                                        if "name" in p})

    def plan(self, pin_device: bool = False) -> list[SweepCell]:
        """Every cell of every grid, each once, by seed, then grid by grid, each grid's reference cells before its
        methods; fills `grid.cells`.

        Raises `UserError` before anything runs: all unregistered methods and tasks at once, then whatever the
        runner's checks find (models, pairs, options). With `pin_device`, a device left on auto becomes cuda
        for cells that ask for GPUs and cpu for the others, so keys computed here match the workers'.
        """
        from pkt_bench.registry import METHODS, TASKS
        from pkt_bench.runner import REFERENCE_METHODS
        from pkt_bench.runner import plan as plan_cells

        for registry, wanted in ((METHODS, {m for g in self.grids for m, _ in g.methods}),
                                 (TASKS, {t for g in self.grids for t in g.tasks})):
            missing = sorted(wanted - set(registry.names()))
            if missing:
                raise UserError(f"{self.path}: {registry.kind}s not registered: {', '.join(missing)}; registered: "
                                f"{', '.join(registry.names())}; add them (or --plugin FILE.py) or drop them")
        cells: dict[str, SweepCell] = {}
        rank: dict[str, int] = {}  # the grid that first asked for a cell
        for index, grid in enumerate(self.grids):
            grid.cells = []
            base = grid.base
            if pin_device and base.device == "auto":
                base = dataclasses.replace(base, device="cuda" if grid.resources.gpus > 0 else "cpu")
            methods = list(grid.methods)
            if base.references:
                methods += [(name, {}) for name in REFERENCE_METHODS if (name, {}) not in methods]
            for name, config in methods:
                # a reference cell records no references of its own, so reference cells never wait on each other
                is_reference = name in REFERENCE_METHODS and config == {}
                # a method that writes its own training answers (distill) takes no transfer_data: gold for it
                own_data = getattr(METHODS.get(name).cls, "makes_train_data", False)
                for teacher, student in grid.pairs:
                    spec = dataclasses.replace(base, method=name, method_config=config, teacher=teacher,
                                               student=student, tasks=grid.tasks, seed=grid.seeds[0],
                                               references=base.references and not is_reference,
                                               transfer_data="gold" if own_data else base.transfer_data)
                    for cell in plan_cells(spec):
                        seeded = getattr(cell.method.cls, "seeded", True)  # the student and teacher: seed 0 only
                        for seed in grid.seeds if seeded else [0]:
                            # the cell's spec: `backend: auto` resolved, as the worker resolves it
                            one = dataclasses.replace(cell.spec, tasks=[cell.task_name], seed=seed)
                            key = dataclasses.replace(cell, spec=one).key
                            cells.setdefault(key, SweepCell(one, key, grid.resources))
                            rank.setdefault(key, index)
                            grid.cells.append(cells[key])
        # every method at the first seed before any at the next, and grid by grid within a seed: an interrupted run
        # has whole columns of the table at one seed rather than parts of every column at several. A grid's
        # reference cells (seed 0) run before its methods, whose records read their scores.
        return sorted(cells.values(), key=lambda c: (c.spec.seed, rank[c.key], not _is_reference(c)))


def _is_reference(cell: SweepCell) -> bool:
    from pkt_bench.runner import REFERENCE_METHODS

    return cell.spec.method in REFERENCE_METHODS and not cell.spec.method_config


@dataclass
class SweepOutcome:
    cells: list[SweepCell]
    stored_before: int
    ran: int
    failed: dict[str, str]  # cell label -> error


def run_cell(spec: RunSpec, results: str, plugins: tuple[str, ...] = (), threads: int | None = None) -> dict[str, Any]:
    """Run one sweep cell in this process (a worker or the driver): what it stored, or the error as text."""
    import io

    try:
        from pkt_bench.registry import load_plugin
        from pkt_bench.runner import run

        for plugin in plugins:
            load_plugin(plugin)
        if threads:
            import torch

            torch.set_num_threads(threads)
        outcome = run(spec, ResultStore(results), console=Console(file=io.StringIO()))[-1]
        record = outcome.record
        return {"key": outcome.key, "skipped": outcome.skipped, "metric": record["primary_metric"],
                "score": record["metrics"][record["primary_metric"]], "wall_s": record.get("wall_s")}
    except Exception:  # a failed cell must not stop the others; the driver reports it
        return {"error": traceback.format_exc()}


def run_sweep(sweep: Sweep, store: ResultStore, *, executor: str = "local", max_parallel: int | None = None,
              plugins: tuple[str, ...] = (), console: Console | None = None,
              only: tuple[str, ...] = (), grids: tuple[str, ...] = (), seeds: tuple[int, ...] = (),
              storage: str = "node") -> SweepOutcome:
    """Plan the sweep, then run every cell without a record; cells that fail are reported, the rest go on.

    `max_parallel`: worker processes of the local executor (None: one cell at a time, here); for Ray, the
    most cells in flight (None: as many as the cluster's resources allow). `only`: run just these methods' cells
    (and the reference cells of their tasks), in the planned order; the rest wait for a later run. `grids`: the
    same, by grid name (`name:` in the YAML); `seeds`: the same, by seed (reference cells run at seed 0 whatever
    it names). A cell must pass every filter given. `storage`: where Ray workers write (`pkt_bench.rayexec`).
    """
    console = console or Console(stderr=True, soft_wrap=True)
    if executor not in EXECUTORS:
        raise UserError(f"unknown executor {executor!r}; use one of {', '.join(EXECUTORS)}")
    if max_parallel is not None and max_parallel < 1:
        raise UserError(f"--max-parallel must be at least 1, got {max_parallel}")
    if executor == "ray":
        from pkt_bench import rayexec

        rayexec.import_ray()
        if storage not in rayexec.STORAGES:
            raise UserError(f"unknown --ray-storage {storage!r}; use node (nothing shared: records come back to the "
                            f"driver) or shared (the results folder is on storage every node reaches)")
    cells = sweep.plan(pin_device=executor == "ray")
    if grids:
        unknown = sorted(set(grids) - {g.name for g in sweep.grids})
        if unknown:
            raise UserError(f"--grid names grids the sweep does not have: {', '.join(unknown)}; its grids: "
                            + "; ".join(g.name for g in sweep.grids))
    if only:
        unknown = sorted(set(only) - {c.spec.method for c in cells})
        if unknown:
            raise UserError(f"--only names methods the sweep does not run: {', '.join(unknown)}")
    if seeds:
        unknown = sorted(set(seeds) - {c.spec.seed for c in cells})
        if unknown:
            raise UserError(f"--seed names seeds the sweep does not run: {', '.join(map(str, unknown))}; its seeds: "
                            + ", ".join(map(str, sorted({c.spec.seed for c in cells}))))
    if only or grids or seeds:
        in_grids = {id(c) for g in sweep.grids if not grids or g.name in grids for c in g.cells}
        chosen = [c for c in cells if id(c) in in_grids and (not only or c.spec.method in only)
                  and (not seeds or c.spec.seed in seeds)]
        wanted = {(c.spec.teacher, c.spec.student, c.spec.tasks[0]) for c in chosen}
        cells = [c for c in cells if c in chosen or (_is_reference(c) and (c.spec.teacher, c.spec.student,
                                                                           c.spec.tasks[0]) in wanted)]
    todo = [c for c in cells if not store.path(c.key).exists()]
    todo_keys = {c.key for c in todo}
    outcome = SweepOutcome(cells, len(cells) - len(todo), 0, {})
    shape = ", ".join(f"{g.name}: {len(g.methods)} methods × {len(g.pairs)} pairs × {len(g.tasks)} tasks × "
                      f"{len(g.seeds)} seeds" for g in sweep.grids)
    console.print(f"[bold]pkt-bench sweep[/] {sweep.path}: {len(cells)} cells ({shape}; references included), "
                  f"{outcome.stored_before} stored, {len(todo)} to run; executor {executor}"
                  + (f" × {max_parallel}" if max_parallel else "") + f"; results in {store.root}")
    if not todo:
        return outcome
    from pkt_bench.runner import check_checkout

    check_checkout()  # once here, before any worker starts
    store.check_writable()
    results = str(store.root.resolve())
    plugins = tuple(str(Path(p).resolve()) for p in plugins)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        totals, stored = Counter(c.spec.method for c in cells), Counter(c.spec.method for c in cells if c.key not in todo_keys)
        overall = progress.add_task("[bold]all cells", total=len(cells), completed=outcome.stored_before)
        bars = {m: progress.add_task(f"  {m}", total=totals[m], completed=stored[m]) for m in totals}

        retry: list[SweepCell] = []  # cells that failed their first attempt, to run again after their phase
        tried: set[str] = set()  # keys of cells that had their retry in this run

        def done(cell: SweepCell, result: dict[str, Any]) -> None:
            if "error" in result:
                error = result["error"].strip().splitlines()[-1][:300]
                store.note_attempt(cell.key, cell.label, error)
                if cell.key not in tried:
                    tried.add(cell.key)
                    retry.append(cell)
                    progress.console.print(f"[yellow]failed, will retry once[/] {escape(cell.label)}:\n"
                                           f"{escape(result['error'])}", highlight=False)
                    return
                outcome.failed[cell.label] = error
                progress.console.print(f"[red]failed again[/] {escape(cell.label)}:\n{escape(result['error'])}",
                                       highlight=False)
            else:
                outcome.ran += 1
                progress.console.print(f"{cell.label}: {result['metric']} {result['score']:.3f}"
                                       f" ({result['wall_s'] or 0:.1f}s)", markup=False, highlight=False)
                if result["key"] != cell.key:
                    progress.console.print(f"[yellow]warning[/]: {escape(cell.label)} was stored under key "
                                           f"{result['key']}, planned {cell.key} (the worker resolved device or "
                                           f"dtype differently); set device: and dtype: in the config")
            progress.advance(overall)
            progress.advance(bars[cell.spec.method])

        ref_keys: dict[tuple, list[str]] = {}
        for c in cells:
            if _is_reference(c):
                ref_keys.setdefault((c.spec.teacher, c.spec.student, c.spec.tasks[0]), []).append(c.key)

        def references(cell: SweepCell) -> list[dict[str, Any]]:
            """The stored records of the reference cells `cell` reads (a Ray worker without the driver's disk)."""
            keys = ref_keys.get((cell.spec.teacher, cell.spec.student, cell.spec.tasks[0]), [])
            return [r for r in (store.get(k) for k in keys if k != cell.key) if r is not None]

        # one cell at a time, the planned order already has each grid's references before its methods; workers
        # in parallel need every reference stored before the first method starts
        sequential = executor == "local" and not max_parallel
        phases = [todo] if sequential else [[c for c in todo if _is_reference(c)],
                                             [c for c in todo if not _is_reference(c)]]
        from pkt_bench.runner import made_by

        # every record names the driver's command, whichever process (here, spawned, a Ray worker) makes it
        previous = os.environ.get("PKT_BENCH_MADE_BY")
        os.environ["PKT_BENCH_MADE_BY"] = made_by()
        try:
            for phase in phases:
                while phase:  # a cell that fails is retried once, after the others of its phase
                    if executor == "ray":
                        rayexec.execute(phase, results, plugins, max_parallel, done, storage, references)
                    else:
                        _local(phase, store, results, plugins, max_parallel, done)
                    phase, retry[:] = list(retry), []
        finally:
            if previous is None:
                os.environ.pop("PKT_BENCH_MADE_BY", None)
            else:
                os.environ["PKT_BENCH_MADE_BY"] = previous
    failed = f", [red]{len(outcome.failed)} failed[/]" if outcome.failed else ""
    console.print(f"sweep done: {outcome.ran} cells run, {outcome.stored_before} were stored{failed}")
    return outcome


def _local(cells: list[SweepCell], store: ResultStore, results: str, plugins: tuple[str, ...],
           max_parallel: int | None, done: Callable[[SweepCell, dict[str, Any]], None]) -> None:
    """One cell after another here, or `max_parallel` spawned worker processes sharing the CPU cores. A cell run
    here is noted as started first, so if this process dies in it (the OOM killer) a later report still names it.
    `results` is the store's folder as workers reach it."""
    if not max_parallel:
        for cell in cells:
            store.note_attempt(cell.key, cell.label)
            done(cell, run_cell(cell.spec, results))
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    threads = max(1, (os.cpu_count() or 1) // max_parallel)
    with ProcessPoolExecutor(max_parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_cell, cell.spec, results, plugins, threads): cell for cell in cells}
        for future in as_completed(futures):
            try:
                result = future.result()
            except BrokenProcessPool:  # a worker died (killed, out of memory): every unfinished cell ends here
                result = {"error": "BrokenProcessPool: a worker process died (killed, or out of memory?) while this "
                                   "cell ran or waited for a worker"}
            done(futures[future], result)
