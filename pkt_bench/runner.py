"""Running a spec: validate everything first, then each cell (method -> artifact -> evaluation -> record).

Every check that can fail on user input runs before the first cell, so bad input stops the run with nothing
written. A cell whose record exists is skipped unless `force`. With `references` on, the student and teacher of
the pair are evaluated on the same task and items too (once per pair, task, limit and evaluation settings: they
are cells of their own, at seed 0 whatever the run's seed, stored and reused by every method's and seed's
record), and each record states their scores and keys beside its own.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console

from pkt_bench.api import Task, UserError
from pkt_bench.context import RunContext
from pkt_bench.environment import environment
from pkt_bench.evaluate import NEUTRAL_ENGINE_ARGS, check_backend, make_target, resolve_backend
from pkt_bench.models import ModelPair, ModelRef, context_length
from pkt_bench.registry import METHODS, TASKS, Entry, make_task
from pkt_bench.spec import SCHEMA_VERSION, RunSpec, cell_key
from pkt_bench.taskdata import task_data_identity, task_options_identity
from pkt_bench.stages import StageMeter, release_memory
from pkt_bench.store import ResultStore

STAGES = ("extract", "transfer", "fine-tune", "evaluate")
REFERENCE_METHODS = ("student", "teacher")


@dataclass
class Cell:
    """One (method + config, pair, task, seed): `describe()` is what its key hashes."""

    method: Entry
    config: Any
    spec: RunSpec
    pair: ModelPair
    task_name: str
    task: Task
    backend_reason: str = ""  # why `spec.backend` (resolved from `auto`, or as asked)

    @property
    def transfer_format(self) -> str:
        """The spec's transfer format resolved for this task (`auto` -> `paper` or `task`)."""
        from pkt_bench.formats import resolve

        return resolve(self.spec.transfer_format, self.task)

    @property
    def selects(self) -> bool:
        """Whether this cell selects its learning rate on the validation split (`select:`, fine-tuning methods)."""
        return bool(self.spec.select) and self.method.cls.fine_tunes

    @property
    def seed(self) -> int:
        """The run's seed; 0 for a method with nothing random (`seeded = False`: the student and teacher as they
        are), so one evaluation of each serves every seed's records."""
        return self.spec.seed if getattr(self.method.cls, "seeded", True) else 0

    def describe(self) -> dict[str, Any]:
        cell = {
            "method": self.method.name, "method_config": dataclasses.asdict(self.config),
            "teacher": self.pair.teacher.identity, "student": self.pair.student.identity,
            "task": self.task_name, "task_version": self.task.version, "seed": self.seed,
            "data_dir": task_data_identity(self.task, self.spec.data_dir),
            "backend": self.spec.backend, "limit": self.spec.limit,
            "device_type": self.pair.device.split(":")[0], "dtype": self.pair.dtype,
            "task_options": task_options_identity(self.task),
            "eval_batch_size": self.spec.eval_batch_size,
        }
        if getattr(self.method.cls, "version", None):  # absent until a method's computation changes: older keys hold
            cell["method_version"] = self.method.cls.version
        engine = {k: v for k, v in self.spec.vllm_args.items() if k not in NEUTRAL_ENGINE_ARGS}
        if engine:  # only settings that can change results; absent otherwise, so older keys stay valid
            cell["vllm_args"] = engine
        if self.method.cls.fine_tunes:
            cell["budget"] = self.spec.budget.keyed()
        if getattr(self.method.cls, "uses_transfer_data", True):
            from pkt_bench.formats import identity

            cell.update(identity(self.transfer_format, self.task))
        if self.selects:  # the budget's lr is then each trial's starting point only: the trials are keyed
            cell["select"] = self.spec.select
        if self.method.cls.fine_tunes and self.spec.transfer_data != "gold":  # absent for gold: older keys hold
            # (a method that writes its own answers, distill, is refused anything else in plan())
            cell["transfer_data"] = self.spec.transfer_data
        return cell

    @property
    def key(self) -> str:
        return cell_key(self.describe())


@dataclass
class CellOutcome:
    key: str
    record: dict[str, Any]
    skipped: bool


def plan(spec: RunSpec) -> list[Cell]:
    """The cells `spec` runs, one per task, after every check that can fail on user input."""
    method = METHODS.get(spec.method)
    config = method.make_config(spec.method_config)
    task_entries = [TASKS.get(name) for name in spec.tasks]
    check_backend(spec.backend, spec.vllm_args)
    tasks = [(entry.name, make_task(entry, spec.data_dir, spec.task_options, spec.allow_code_execution))
             for entry in task_entries]
    pair = ModelPair.resolve(spec.teacher, spec.student, spec.device, spec.dtype)
    if hasattr(method.cls, "check"):  # a method's own option checks against the pair (LoRA: rank, modules)
        method.cls(config).check(pair)
    context = min(filter(None, (context_length(pair.teacher), context_length(pair.student))), default=None)
    for task_name, task in tasks:
        if hasattr(task, "check_pair"):
            task.check_pair(pair)
        # new tokens the evaluation generates, and the transfer answers (distillation's teacher) where declared
        needed = max(filter(None, (getattr(task, "eval_new_tokens", None),
                                   getattr(task, "generation", {}).get("max_new_tokens"))), default=None)
        if context and needed and needed >= context and not spec.fit_context:
            raise UserError(f"task {task_name!r} generates up to {needed} tokens, but the pair's context holds "
                            f"{context}; pick a pair with a longer context, or pass --fit-context to cut generation "
                            f"to half the context (recorded)")
    for _, task in tasks:  # the data last: from the hub it may take a network round (and fail after retries)
        if hasattr(task, "check_data"):
            task.check_data()
    from pkt_bench.formats import resolve

    _check_format({resolve(spec.transfer_format, task) for _, task in tasks}, pair)
    if spec.transfer_data != "gold" and method.cls.fine_tunes:
        if getattr(method.cls, "makes_train_data", False):
            raise UserError(f"method {method.name!r} writes its own training answers, so --transfer-data "
                            f"{spec.transfer_data} does not apply to it; use --transfer-data gold (or lora with "
                            f"--transfer-data teacher for the teacher's correct answers)")
        from pkt_bench.transferdata import check_source

        for task_name, task in tasks:
            check_source(spec.transfer_data, task, task_name)
    if spec.select and method.cls.fine_tunes:
        from pkt_bench.selection import check as check_selection

        for task_name, task in tasks:
            check_selection(spec.select, task, task_name)
    backend, backend_reason = resolve_backend(spec.backend, pair)  # after every other check: it may import vLLM
    if spec.backend == "auto":
        check_backend(backend, spec.vllm_args)  # engine settings, now that auto has picked
        spec = dataclasses.replace(spec, backend=backend)
    return [Cell(method, config, spec, pair, task_name, task, backend_reason) for task_name, task in tasks]


def _check_format(formats: set[str], pair: ModelPair) -> None:
    if "chat_template" in formats:
        _check_chat_template(pair.student)


@functools.cache  # once per student and process: a sweep plans many cells of one pair
def _check_chat_template(student: ModelRef) -> None:
    from transformers import AutoTokenizer

    from pkt_bench.formats import check

    check("chat_template", AutoTokenizer.from_pretrained(student.path))


def check_records(cells: list[Cell], store: ResultStore, force: bool) -> None:
    """Every stored record this run would read is readable (else one line naming the file), before any cell."""
    for cell in cells:
        ref_cells = [Cell(METHODS.get(n), METHODS.get(n).make_config({}), cell.spec, cell.pair, cell.task_name,
                          cell.task) for n in REFERENCE_METHODS if cell.spec.references and n != cell.method.name]
        store.get(cell.key, unreadable_ok=force)
        for ref in ref_cells:
            store.get(ref.key, unreadable_ok=force)


def run(spec: RunSpec, store: ResultStore, *, force: bool = False, console: Console | None = None,
        verbose: bool = False) -> list[CellOutcome]:
    """Run the cells of `spec`. Library log lines go to `<results>/logs/run-<time>-<pid>.log` (and to stderr
    with `verbose`), so that ours are not buried; each cell shows one progress line naming its stage."""
    console = console or Console(stderr=True, soft_wrap=True)
    _quiet_libraries()
    cells = plan(spec)
    store.check_writable()
    check_records(cells, store, force)
    check_checkout()
    method, pair = cells[0].method, cells[0].pair
    log = store.root / "logs" / f"run-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    console.print(f"[bold]pkt-bench run[/]: method [cyan]{method.name}[/] on {', '.join(c.task_name for c in cells)}; "
                  f"teacher {pair.teacher.name} -> student {pair.student.name} ({pair.device}, {pair.dtype}); seed "
                  f"{spec.seed}; library logs: {'stderr and ' if verbose else ''}{log}")
    console.print(f"  backend {cells[0].spec.backend}: {cells[0].backend_reason}")
    with library_logs(log, verbose):
        return _run_cells(cells, cells[0].spec, store, force, console)  # the spec with its backend resolved


ALLOW_DIRTY = "PKT_BENCH_ALLOW_DIRTY"
"""Set to 1 (`--allow-dirty` does) to run from a checkout with uncommitted changes; each record then points at
the diff, stored beside the records."""


def check_checkout() -> None:
    """Refuse to run from a pkt-bench checkout whose tracked files have uncommitted changes: its records would name
    a commit that did not make them. `--allow-dirty` runs anyway and stores the diff with the records."""
    from pkt_bench.environment import checkout, uncommitted

    folder = checkout()
    changed = uncommitted(folder) if folder is not None else []
    if changed and os.environ.get(ALLOW_DIRTY) != "1":
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise UserError(f"the pkt-bench checkout {folder} has uncommitted changes to {', '.join(changed[:3])}{more}; "
                        f"a record made from them could not be rerun: commit them, or pass --allow-dirty to store "
                        f"the diff beside each record")


def _run_cells(cells: list[Cell], spec: RunSpec, store: ResultStore, force: bool,
               console: Console) -> list[CellOutcome]:
    method, pair = cells[0].method, cells[0].pair
    outcomes = []
    for cell in cells:
        task_name, task = cell.task_name, cell.task
        if method.cls.fine_tunes:
            b = spec.budget
            n = min(b.examples, len(task.transfer_data("train")))
            console.print(f"  budget on {task_name}: {n} train examples x {b.epochs} epochs, batch {b.batch_size} x "
                          f"accum {b.grad_accum} -> {b.optimizer_steps(n)} optimizer steps at lr {b.lr:g}, cutoff "
                          f"{b.max_length}; transfer format {cell.transfer_format}")
        references = {}
        if spec.references:
            for name in REFERENCE_METHODS:
                if name != method.name:
                    entry = METHODS.get(name)
                    ref_cell = Cell(entry, entry.make_config({}), spec, pair, task_name, task, cell.backend_reason)
                    ref = _run_cell(ref_cell, store, False, console, {}, overwrite_unreadable=force)
                    references[name] = {"key": ref.key, "primary_metric": ref.record["primary_metric"],
                                        "score": ref.record["metrics"][ref.record["primary_metric"]]}
        outcomes.append(_run_cell(cell, store, force, console, references))
    return outcomes


def extract(spec: RunSpec, out: Path, console: Console | None = None) -> dict[str, int]:
    """Run only the extraction stage of `spec.method` on its first task, writing its files into `out`.

    `out` must not exist or be empty; the files are built in a temp folder beside it and renamed into place.
    Returns the costs of the extraction.
    """
    console = console or Console(stderr=True, soft_wrap=True)
    _quiet_libraries()
    method = METHODS.get(spec.method)
    if not hasattr(method.cls, "extract"):
        having = [e.name for e in METHODS.entries() if hasattr(e.cls, "extract")]
        raise UserError(f"method {method.name!r} has no extraction stage; methods with one: {', '.join(having)}")
    config = method.make_config(spec.method_config)
    if len(spec.tasks) != 1:
        raise UserError(f"extract takes exactly one --task, got {len(spec.tasks)}")
    task_entry = TASKS.get(spec.tasks[0])
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{str(out)!r} exists and is not an empty folder; pick a new --out or remove it")
    pair = ModelPair.resolve(spec.teacher, spec.student, spec.device, spec.dtype)
    if hasattr(method.cls, "check"):
        method.cls(config).check(pair)
    task = make_task(task_entry, spec.data_dir, spec.task_options, spec.allow_code_execution)
    from pkt_bench.formats import resolve

    transfer_format = resolve(spec.transfer_format, task)
    _check_format({transfer_format}, pair)
    console.print(f"[bold]pkt-bench extract[/]: method [cyan]{method.name}[/] on {task_entry.name}; teacher "
                  f"{pair.teacher.name} -> student {pair.student.name} ({pair.device}, {pair.dtype}); transfer "
                  f"format {transfer_format}")
    from transformers import set_seed

    set_seed(spec.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        ctx = RunContext(pair, task, spec.budget, spec.seed, partial, StageMeter(), task_name=task_entry.name,
                              data_dir=spec.data_dir, transfer_format=transfer_format)
        method.cls(config).extract(ctx, partial)
        if out.exists():
            out.rmdir()
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    console.print(f"  wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
    return ctx.costs


def _environment(store: ResultStore) -> dict[str, Any]:
    """`environment()`, and where the commit is '-dirty', the uncommitted diff stored with the records."""
    found = environment()
    if (found.get("git_commit") or "").endswith("-dirty"):
        from pkt_bench.environment import checkout, uncommitted_diff

        found["git_diff"] = store.put_diff(uncommitted_diff(checkout()))
    return found


def made_by() -> str:
    """The command that made a record: this process's own (`pkt-bench run ...`, `pkt-bench sweep FILE ...`), or the
    sweep file a worker process was given (`PKT_BENCH_MADE_BY`, set by the sweep driver)."""
    given = os.environ.get("PKT_BENCH_MADE_BY")
    if given:
        return given
    import shlex

    return shlex.join(["pkt-bench", *sys.argv[1:]])


@contextmanager
def library_logs(path: Path, verbose: bool) -> Iterator[None]:
    """Route the libraries' log records (vLLM, lm-eval, transformers, ...) to the file `path`, created at the
    first record, and to stderr only when `verbose`."""
    import logging

    import transformers

    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # vLLM's records then reach the root logger, not stdout
    path.parent.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.FileHandler(path, delay=True)]
    if verbose:
        handlers.append(logging.StreamHandler(sys.stderr))
    root, level = logging.getLogger(), logging.getLogger().level
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    transformers.logging.disable_default_handler()
    transformers.logging.enable_propagation()
    try:
        yield
    finally:
        transformers.logging.disable_propagation()
        transformers.logging.enable_default_handler()
        root.setLevel(level)
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()


@contextmanager
def progress_line(console: Console, label: str) -> Iterator[Callable[[str | None], None]]:
    """One transient Rich line, `label: stage` with the time elapsed, while a cell runs (terminals only)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        task = progress.add_task(label)
        yield lambda stage: progress.update(task, description=f"{label}: {stage}" if stage else label)


def _quiet_libraries() -> None:
    """Our own lines say what runs; the libraries' loading bars and info messages only bury them."""
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _run_cell(cell: Cell, store: ResultStore, force: bool, console: Console,
              references: dict[str, Any], overwrite_unreadable: bool = False) -> CellOutcome:
    key = cell.key
    label = f"{cell.method.name} on {cell.task_name} (seed {cell.seed})"
    existing = None if force else store.get(key, unreadable_ok=overwrite_unreadable)
    if existing is not None and not force:
        console.print(f"  {label}: record exists, skipped ({store.path(key)}); --force reruns it")
        return CellOutcome(key, existing, skipped=True)

    from transformers import set_seed

    set_seed(cell.seed)
    workdir = store.partial_artifact_dir(key)  # unique to this process: concurrent runs of a cell never collide
    try:
        with progress_line(console, label) as show:
            return _measure(cell, store, console, references, key, label, workdir, StageMeter(on_stage=show))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _measure(cell: Cell, store: ResultStore, console: Console, references: dict[str, Any], key: str, label: str,
             workdir: Path, meter: StageMeter) -> CellOutcome:
    """Transfer, evaluate and store one cell, measuring its stages with `meter`."""
    def context(budget, folder: Path) -> RunContext:
        folder.mkdir(parents=True, exist_ok=True)  # a selection trial's own folder, as the cell's exists
        return RunContext(cell.pair, cell.task, budget, cell.seed, folder, meter,
                               task_name=cell.task_name, data_dir=cell.spec.data_dir, cache_dir=store.cache_dir,
                               backend=cell.spec.backend, transfer_format=cell.transfer_format,
                               transfer_data=cell.spec.transfer_data if cell.method.cls.fine_tunes else "gold")

    method = cell.method.cls(cell.config)
    started = time.perf_counter()
    selection = None
    with meter.stage("transfer"):
        if cell.selects:  # one transfer per learning rate, the best on the validation split goes on
            from pkt_bench.selection import select_lr

            artifact, ctx, selection = select_lr(
                lambda lr, i: context(dataclasses.replace(cell.spec.budget, lr=lr), workdir / f"trial-{i}"), method.transfer,
                cell.spec.select, cell.spec.eval_batch_size, cell.spec.vllm_args)
        else:
            ctx = context(cell.spec.budget, workdir)
            artifact = method.transfer(ctx)
    release_memory()  # the trained model's pages go back before the evaluation loads the artifact
    with meter.stage("evaluate"):
        target = make_target(artifact, cell.spec.backend, cell.pair.device, cell.pair.dtype,
                             cell.spec.eval_batch_size, cell.spec.vllm_args)
        try:
            result = cell.task.evaluate(target, cell.spec.limit)
        finally:
            target.close()  # the engine's memory is back before the next cell loads a model
        if getattr(target, "engine_settings", None):  # vLLM's: CPU threads, KV cache, eager
            result.details["engine_settings"] = target.engine_settings
    if artifact.path.startswith(str(workdir)):  # keep the artifact beside its record, under the final name
        final_dir = store.place_artifact(key, workdir)
        artifact = dataclasses.replace(artifact, path=str(final_dir) + artifact.path[len(str(workdir)):])
    stages = {name: None for name in STAGES} | meter.as_dict()
    record = {
        "schema_version": SCHEMA_VERSION, "key": key, "cell": cell.describe(),
        "method": cell.method.name, "task": cell.task_name, "seed": cell.seed,
        "teacher": cell.pair.teacher.name, "student": cell.pair.student.name,
        "transfer_format": cell.transfer_format if getattr(cell.method.cls, "uses_transfer_data", True) else None,
        "transfer_data": ctx.data or None,  # the train role the fine-tune read: source, counts, hash
        "metrics": result.metrics, "primary_metric": result.primary_metric, "items": result.items,
        "evaluation": {**result.details, "backend_choice": cell.backend_reason},
        "references": references,
        "costs": {"examples_seen": 0, "optimizer_steps": 0, **ctx.costs},
        "stages": stages, "wall_s": round(time.perf_counter() - started, 3), "fine_tune": ctx.training,
        "artifact": dataclasses.asdict(artifact), "environment": _environment(store),
        "budget": dataclasses.asdict(ctx.budget) if cell.method.cls.fine_tunes else None,  # every field, as used
        **({"selection": selection} if selection else {}),
        "made_by": made_by(),
        **({"vllm_args": cell.spec.vllm_args} if cell.spec.vllm_args else {}),  # every setting, neutral ones too
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = store.put(record)
    score = result.metrics[result.primary_metric]
    refs = "".join(f"; {name} {ref['score']:.3f}" for name, ref in references.items())
    console.print(f"  {label}: {result.primary_metric} [bold]{score:.3f}[/] on {len(result.items)} items{refs}; "
                  f"{record['costs']['optimizer_steps']} optimizer steps, {record['wall_s']:.1f}s -> {path}")
    return CellOutcome(key, record, skipped=False)
