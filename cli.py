"""The `pkt-bench` command line: parses arguments and calls the core, nothing more.

Installed as `pkt_bench.cli`; any `UserError` becomes a one-line message on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from pkt_bench import __version__
from pkt_bench.api import UserError
from pkt_bench.registry import METHODS, TASKS, load_plugin
from pkt_bench.spec import RunSpec, SpecKeyError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Benchmark parametric knowledge transfer (PKT) methods from a teacher LLM to a student.")
out = Console()

AllowDirty = Annotated[bool, typer.Option("--allow-dirty", help="run from a pkt-bench checkout with uncommitted "
                                          "changes, storing the diff beside the records (else refused)")]
Plugins = Annotated[Optional[list[Path]], typer.Option("--plugin", help="a .py file that registers methods/tasks")]
Results = Annotated[Path, typer.Option("--results", envvar="PKT_BENCH_RESULTS", help="folder of result records")]
TASK_OPTION = "--task-option num_fewshot=0"
TaskOptions = Annotated[Optional[list[str]], typer.Option(
    "--task-option", "-T", help="task option KEY=VALUE (num_fewshot, chat_template, n_samples, temperature, "
                                "transfer_dir, ...; see `pkt-bench list tasks --details`); repeatable")]
TransferFormat = Annotated[Optional[str], typer.Option(
    help="text the methods train on: auto (paper for the benchmark tasks, task for the probe), paper "
         "(<|user|>/<|assistant|> as upstream), task (the task's prompt format) or chat_template (the tokenizer's)")]
TransferData = Annotated[Optional[str], typer.Option(
    help="whose answers the fine-tuning methods train on: gold (the task's, default), teacher or self (the "
         "teacher's or the student's own answers that the task's scorer marks correct)")]
AllowCode = Annotated[bool, typer.Option("--allow-code-execution", help="let code tasks (humaneval, mbpp) run "
                                         "model-written programs, each in its own sandboxed process")]


def _version(value: bool) -> None:
    if value:
        print(f"pkt-bench {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the version and exit")] = False) -> None:
    """Benchmark parametric knowledge transfer (PKT) methods from a teacher LLM to a student."""


def method_options() -> str:
    """Every method's options, for the --help of the commands that take `--option`."""
    lines = [f"{entry.name}: {', '.join(f.name for f in entry.config_fields())}" for entry in METHODS.entries()
             if entry.config_fields()]
    return "Method options (-o KEY=VALUE; defaults and help: pkt-bench list methods --details):\n\n" + \
        "\n\n".join(lines)


def _allow_dirty(allow: bool) -> None:
    """`--allow-dirty`: for this process and the workers it starts (`runner.check_checkout`)."""
    if allow:
        from pkt_bench.runner import ALLOW_DIRTY

        os.environ[ALLOW_DIRTY] = "1"


def user_errors(command):
    """Turn a UserError into one line on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as error:
            print(f"pkt-bench: error: {error}", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper


def _load_plugins(plugins: list[Path] | None) -> None:
    for plugin in plugins or []:
        load_plugin(plugin)


def _names(values: list[str] | None) -> list[str] | None:
    """Repeated flags and comma lists alike (`--task gsm8k,mmlu`, as lm-eval takes them)."""
    if not values:
        return None
    for value in values:
        if any(not name.strip() for name in value.split(",")):
            raise UserError(f"empty name in {value!r}; separate names with single commas, e.g. probe,gsm8k")
    return [name.strip() for value in values for name in value.split(",")]


def _flag_errors(spec: RunSpec, **flags: object) -> RunSpec:
    """`spec.with_overrides(**flags)`, its errors naming the flag the user typed rather than the spec key."""
    try:
        return spec.with_overrides(**flags)
    except SpecKeyError as error:
        if flags.get(error.key) is None:
            raise
        flag = "--task" if error.key == "tasks" else "--" + error.key.replace("_", "-")
        raise UserError(str(error).replace(f"spec key '{error.key}'", flag)) from None
    except UserError as error:
        typed = [k.removeprefix("budget.") for k, v in flags.items() if k.startswith("budget.") and v is not None]
        for name in typed:
            if str(error).startswith(f"budget {name} "):
                raise UserError("--" + name.replace("_", "-") + str(error)[len(f"budget {name}"):]) from None
        raise


def _options(pairs: list[str] | None, example: str = "--option rank=8") -> dict[str, str]:
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"option {pair!r} is not KEY=VALUE; write e.g. {example}")
        options[key.strip()] = value
    return options


@app.command(epilog=method_options())
@user_errors
def run(
    method: Annotated[Optional[str], typer.Option("--method", "-m", help="transfer method (see `pkt-bench list methods`)")] = None,
    teacher: Annotated[Optional[str], typer.Option(help="teacher: HF id, local HF folder, or pico-teacher")] = None,
    student: Annotated[Optional[str], typer.Option(help="student: HF id, local HF folder, or pico-student")] = None,
    pair: Annotated[Optional[str], typer.Option(help="a built-in teacher/student pair, e.g. pico-kin-width (see "
                                                     "`pkt-bench list pairs`)")] = None,
    task: Annotated[Optional[list[str]], typer.Option("--task", "-t", help="task name (any case); repeat or "
                                                                           "comma-separate for several")] = None,
    seed: Annotated[Optional[int], typer.Option(help="seed of data sampling, init and training")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML spec; flags override it")] = None,
    option: Annotated[Optional[list[str]], typer.Option("--option", "-o", help="method option KEY=VALUE; repeatable")] = None,
    examples: Annotated[Optional[int], typer.Option(help="budget: train examples")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="budget: epochs")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="budget: examples per micro-batch")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="budget: micro-batches per optimizer step")] = None,
    lr: Annotated[Optional[float], typer.Option(help="budget: peak learning rate")] = None,
    budget: Annotated[Optional[str], typer.Option(help="budget preset setting every budget field: seeking, laten or "
                                                       "semalign (the papers' recipes); the budget flags above override it")] = None,
    transfer_format: TransferFormat = None,
    transfer_data: TransferData = None,
    data_dir: Annotated[Optional[str], typer.Option(envvar="PKT_BENCH_DATA", help="local task data folder")] = None,
    backend: Annotated[Optional[str], typer.Option(help="generation backend: auto (default, or "
                                                   "$PKT_BENCH_BACKEND: vllm where installed and serving the pair, else "
                                                   "hf), hf, "
                                                   "vllm (adapters merged), vllm-lora (adapters as LoRA requests)")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="auto, float32, bfloat16 or float16")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = None,
    limit: Annotated[Optional[int], typer.Option(help="evaluate only the first N test items (recorded); it limits "
                                                      "evaluation only: training takes the budget (--examples)")] = None,
    task_option: TaskOptions = None,
    allow_code_execution: AllowCode = False,
    eval_batch_size: Annotated[Optional[int], typer.Option(help="prompts per batch when evaluating (recorded)")] = None,
    vllm_arg: Annotated[Optional[list[str]], typer.Option(
        "--vllm-arg", help="vLLM engine setting KEY=VALUE, as lm-eval's --model_args (gpu_memory_utilization, "
                           "tensor_parallel_size, max_model_len, ...); repeatable; recorded")] = None,
    fit_context: Annotated[bool, typer.Option("--fit-context", help="run a generation task on a pair whose context "
                                              "cannot hold its protocol, generating at most half the context")] = False,
    references: Annotated[Optional[bool], typer.Option("--references/--no-references", help="also evaluate student and teacher as is")] = None,
    results: Results = Path("results"),
    force: Annotated[bool, typer.Option(help="rerun cells whose record exists")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="also show the libraries' log lines (vLLM, "
                                          "lm-eval, transformers); they always go to <results>/logs/")] = False,
    plugin: Plugins = None,
    allow_dirty: AllowDirty = False,
):
    """Run one method end to end on each task and store one record per cell. With no flags: the offline probe."""
    from pkt_bench.evaluate import engine_args

    _load_plugins(plugin)
    _allow_dirty(allow_dirty)
    if pair:
        if teacher or student:
            raise UserError("give either --pair or --teacher/--student, not both")
        from pkt_bench.models import resolve_pair

        teacher, student = resolve_pair(pair)
    spec = RunSpec.from_yaml(config) if config else RunSpec()
    spec = _flag_errors(
        spec, method=method, teacher=teacher, student=student, tasks=_names(task), seed=seed, data_dir=data_dir, backend=backend,
        dtype=dtype, device=device, limit=limit, references=references, eval_batch_size=eval_batch_size,
        budget=budget, transfer_format=transfer_format, transfer_data=transfer_data,
        allow_code_execution=allow_code_execution or None, fit_context=fit_context or None,
        vllm_args={**spec.vllm_args, **engine_args(_options(vllm_arg, "--vllm-arg max_model_len=4096"))}
        if vllm_arg else None,
        method_config={**spec.method_config, **_options(option)} if option else None,
        task_options={**spec.task_options, **_options(task_option, TASK_OPTION)} if task_option else None,
        **{"budget.examples": examples, "budget.epochs": epochs, "budget.batch_size": batch_size,
           "budget.grad_accum": grad_accum, "budget.lr": lr},
    )
    from pkt_bench.runner import run as run_spec
    from pkt_bench.store import ResultStore

    run_spec(spec, ResultStore(results), force=force, verbose=verbose)


@app.command(epilog=method_options())
@user_errors
def extract(
    method: Annotated[str, typer.Option("--method", "-m", help="a method with an extraction stage")],
    out: Annotated[Path, typer.Option(help="new folder for the extracted files")],
    teacher: Annotated[Optional[str], typer.Option(help="teacher: HF id, local HF folder, or pico-teacher")] = None,
    student: Annotated[Optional[str], typer.Option(help="student: HF id, local HF folder, or pico-student")] = None,
    task: Annotated[Optional[str], typer.Option("--task", "-t", help="task whose transfer data drives the extraction")] = None,
    option: Annotated[Optional[list[str]], typer.Option("--option", "-o", help="method option KEY=VALUE; repeatable")] = None,
    seed: Annotated[Optional[int], typer.Option(help="seed (random choices use the method's extract_seed)")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="tokens per example, cut beyond")] = None,
    transfer_format: TransferFormat = None,
    data_dir: Annotated[Optional[str], typer.Option(envvar="PKT_BENCH_DATA", help="local task data folder")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="auto, float32, bfloat16 or float16")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = None,
    task_option: TaskOptions = None,
    plugin: Plugins = None,
):
    """Run only a method's extraction stage (what it takes from the teacher) and write its files to --out."""
    _load_plugins(plugin)
    spec = _flag_errors(
        RunSpec(), method=method, teacher=teacher, student=student, tasks=[task] if task else None, seed=seed,
        data_dir=data_dir, dtype=dtype, device=device, method_config=_options(option) if option else None,
        transfer_format=transfer_format,
        task_options=_options(task_option, TASK_OPTION) if task_option else None,
        **{"budget.max_length": max_length},
    )
    from pkt_bench.runner import extract as run_extract

    run_extract(spec, out)


@app.command("list")
@user_errors
def list_(
    what: Annotated[str, typer.Argument(help="methods, tasks or pairs")],
    details: Annotated[bool, typer.Option(help="also show each method's options")] = False,
    plugin: Plugins = None,
):
    """List registered methods or tasks with a one-line description and reference, or the built-in pairs."""
    _load_plugins(plugin)
    registries = {"methods": METHODS, "tasks": TASKS}
    if what == "pairs":
        from pkt_bench.pico import LADDER

        table = Table("pair (--pair)", "teacher -> student", "what it varies", header_style="bold")
        for rung in LADDER:
            table.add_row(rung.name, f"{rung.teacher} -> {rung.student}", rung.varies)
        out.print(table)
        return
    if what not in registries:
        raise UserError(f"cannot list {what!r}; use `pkt-bench list methods`, `list tasks` or `list pairs`")
    table = Table(show_header=True, header_style="bold")
    for column in ("name", "description", "reference"):
        table.add_column(column, overflow="fold")
    for entry in registries[what].entries():
        description = entry.description
        if details:
            options = [f"  {f.name} = {entry.make_config({}).__dict__[f.name]!r}: {f.metadata.get('help', '')}"
                       for f in entry.config_fields()]
            description = "\n".join([description, *options])
        table.add_row(entry.name, description, entry.reference)
    out.print(table)


Executor = Annotated[str, typer.Option(help="local (this machine) or ray (each cell a Ray task)")]
MaxParallel = Annotated[Optional[int], typer.Option(
    help="local: worker processes (default: one cell at a time); ray: most cells in flight")]


@app.command()
@user_errors
def sweep(
    config: Annotated[Path, typer.Argument(help="sweep YAML: methods x pairs x tasks x seeds (see sweeps/)")],
    executor: Executor = "local",
    max_parallel: MaxParallel = None,
    results: Results = Path("results"),
    plugin: Plugins = None,
    allow_dirty: AllowDirty = False,
    only: Annotated[Optional[list[str]], typer.Option(help="run only this method's cells (and their tasks' "
                                                           "reference cells); repeatable")] = None,
    grid: Annotated[Optional[list[str]], typer.Option(help="run only this grid's cells (its `name:` in the YAML; "
                                                           "and their tasks' reference cells); repeatable")] = None,
    seed: Annotated[Optional[list[int]], typer.Option(help="run only this seed's cells (and their tasks' reference "
                                                           "cells); repeatable")] = None,
    ray_storage: Annotated[str, typer.Option(help="ray: where workers write; node (each node its own folder, "
                                                  "records sent back to this driver) or shared (the results "
                                                  "folder is on storage every node reaches)")] = "node",
):
    """Run a grid of cells from a YAML file; rerunning it runs only the cells without a record."""
    _load_plugins(plugin)
    _allow_dirty(allow_dirty)
    from pkt_bench.store import ResultStore
    from pkt_bench.sweep import Sweep, run_sweep

    outcome = run_sweep(Sweep.load(config), ResultStore(results), executor=executor, max_parallel=max_parallel,
                        plugins=tuple(str(p) for p in plugin or ()), only=tuple(only or ()),
                        grids=tuple(grid or ()), seeds=tuple(seed or ()), storage=ray_storage)
    if outcome.failed:
        raise typer.Exit(1)


@app.command()
@user_errors
def score(
    task: Annotated[str, typer.Option("--task", "-t", help="the task whose scorer to use")],
    predictions: Annotated[Path, typer.Option(help="JSONL file, one {\"id\": ..., \"completion\": ...} per line")],
    data_dir: Annotated[Optional[str], typer.Option(envvar="PKT_BENCH_DATA", help="local task data folder")] = None,
    task_option: TaskOptions = None,
    allow_code_execution: AllowCode = False,
    limit: Annotated[Optional[int], typer.Option(help="score only the first N items (the file must cover them)")] = None,
    plugin: Plugins = None,
):
    """Score completions produced elsewhere with a task's scorer; print its metrics and per-item results as JSON."""
    _load_plugins(plugin)
    from pkt_bench.evaluate import score_predictions

    if limit is not None and limit <= 0:
        raise UserError(f"--limit must be a positive integer, got {limit}")
    scored = score_predictions(task, predictions, data_dir, _options(task_option, TASK_OPTION), allow_code_execution,
                               limit)
    print(json.dumps(scored, indent=1))


BASELINE_HELP = ("row to compare against on the same items (Δ, CI, p): a method name (its only variant, else the one "
                 "with default options) or a row label as shown, e.g. 'lora (rank=4)'")
AllowUnequal = Annotated[bool, typer.Option("--allow-unequal", help="show Δ also for rows trained on another "
                                                                    "budget than the baseline, marked †")]


def _rows(results: Path, task: list[str] | None, baseline: str | None, allow_unequal: bool) -> list:
    """The leaderboard rows of a results folder; no folder or no records is a UserError (exit 2)."""
    from pkt_bench.leaderboard import scores
    from pkt_bench.store import ResultStore

    if results.exists() and not results.is_dir():
        raise UserError(f"--results {str(results)!r} is a file, not a results folder; pass the folder records are in")
    if not results.is_dir():
        raise UserError(f"results folder {str(results)!r} does not exist; run `pkt-bench run` first or pass --results")
    tasks = _names(task)
    records = list(ResultStore(results).records())
    if tasks:  # task names in any case, as `run` takes them
        known = {r["task"].lower(): r["task"] for r in records}
        tasks = [known.get(t.lower(), t) for t in tasks]
    rows = scores(records, tasks, baseline, allow_unequal, note=lambda line: print(f"pkt-bench: {line}",
                                                                                     file=sys.stderr))
    if not rows:
        raise UserError(f"no records in {results}" + (f" for tasks {', '.join(tasks)}" if tasks else "")
                        + "; run `pkt-bench run` first or pass --results")
    return rows


@app.command()
@user_errors
def leaderboard(
    results: Results = Path("results"),
    task: Annotated[Optional[list[str]], typer.Option("--task", "-t", help="only these tasks")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table, md, csv, json or latex")] = "table",
    baseline: Annotated[Optional[str], typer.Option(help=BASELINE_HELP)] = None,
    allow_unequal: AllowUnequal = False,
    cost: Annotated[bool, typer.Option("--cost", help="add a cost table: examples, optimizer steps, teacher passes "
                                                      "and tokens, wall seconds (per run, summed over tasks)")] = False,
):
    """Show stored results: methods as rows, tasks as columns, mean ± std over seeds with 95% bootstrap CIs."""
    from pkt_bench.leaderboard import FORMATS, render

    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    rows = _rows(results, task, baseline, allow_unequal)
    rendered = render(rows, fmt, cost)
    if fmt == "table":
        out.print(rendered)
    else:
        print(rendered, end="" if fmt == "csv" else "\n")


@app.command()
@user_errors
def report(
    config: Annotated[Path, typer.Argument(help="sweep YAML with a report: section (see sweeps/reproduction.yaml)")],
    out: Annotated[Path, typer.Option(help="markdown file to write; plots go to a folder beside it")] = Path(
        "docs/reproduction.md"),
    executor: Executor = "local",
    max_parallel: MaxParallel = None,
    results: Results = Path("results"),
    plugin: Plugins = None,
    stored_only: Annotated[bool, typer.Option(help="run nothing: write the report from the records stored so far, "
                                                   "naming the cells still without one")] = False,
    allow_dirty: AllowDirty = False,
):
    """Run or resume a sweep, then write a markdown report: tables with CIs, plots, the papers' claims checked."""
    _load_plugins(plugin)
    _allow_dirty(allow_dirty)
    from pkt_bench.report import report_command, write_report
    from pkt_bench.store import ResultStore
    from pkt_bench.sweep import Sweep

    failed = write_report(Sweep.load(config), ResultStore(results), out,
                          report_command(config, out, results, executor, max_parallel), executor=executor,
                          max_parallel=max_parallel, plugins=tuple(str(p) for p in plugin or ()), run=not stored_only)
    print(out)
    if failed:
        raise typer.Exit(1)


@app.command()
@user_errors
def plot(
    results: Results = Path("results"),
    out: Annotated[Path, typer.Option(help="folder for the PNG files")] = Path("plots"),
    baseline: Annotated[Optional[str], typer.Option(help=BASELINE_HELP + "; the cost plots show the gain over it")] = None,
    allow_unequal: AllowUnequal = False,
    task: Annotated[Optional[list[str]], typer.Option("--task", "-t", help="only these tasks")] = None,
    cost: Annotated[str, typer.Option(help="x axis of cost plots: wall_s or a recorded cost (teacher_forward, ...)")] = "wall_s",
):
    """Write PNGs: per task, methods' scores with 95% CIs; with --baseline, cost against gain over it."""
    from pkt_bench.plots import plot as write_plots

    rows = _rows(results, task, baseline, allow_unequal)
    for path in write_plots(rows, out, cost):
        print(path)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # unwind: `finally` removes partials
    app()


if __name__ == "__main__":
    main()
