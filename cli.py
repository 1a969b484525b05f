"""The `pkt-bench` command line: parses arguments and calls the core, nothing more.

Installed as `pkt_bench.cli`; any `UserError` becomes a one-line message on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from pkt_bench.api import UserError
from pkt_bench.registry import METHODS, TASKS, load_plugin
from pkt_bench.spec import RunSpec

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Benchmark parametric knowledge transfer (PKT) methods from a teacher LLM to a student.")
out = Console()

Plugins = Annotated[Optional[list[Path]], typer.Option("--plugin", help="a .py file that registers methods/tasks")]
Results = Annotated[Path, typer.Option("--results", envvar="PKT_BENCH_RESULTS", help="folder of result records")]


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


def _options(pairs: list[str] | None) -> dict[str, str]:
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"method option {pair!r} is not KEY=VALUE; write e.g. --option rank=8")
        options[key.strip()] = value
    return options


@app.command()
@user_errors
def run(
    method: Annotated[Optional[str], typer.Option("--method", "-m", help="transfer method (see `pkt-bench list methods`)")] = None,
    teacher: Annotated[Optional[str], typer.Option(help="teacher: HF id, local HF folder, or pico-teacher")] = None,
    student: Annotated[Optional[str], typer.Option(help="student: HF id, local HF folder, or pico-student")] = None,
    task: Annotated[Optional[list[str]], typer.Option("--task", "-t", help="task name; repeat for several")] = None,
    seed: Annotated[Optional[int], typer.Option(help="seed of data sampling, init and training")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML spec; flags override it")] = None,
    option: Annotated[Optional[list[str]], typer.Option("--option", "-o", help="method option KEY=VALUE; repeatable")] = None,
    examples: Annotated[Optional[int], typer.Option(help="budget: train examples")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="budget: epochs")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="budget: examples per micro-batch")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="budget: micro-batches per optimizer step")] = None,
    lr: Annotated[Optional[float], typer.Option(help="budget: peak learning rate")] = None,
    data_dir: Annotated[Optional[str], typer.Option(envvar="PKT_BENCH_DATA", help="local task data folder")] = None,
    backend: Annotated[Optional[str], typer.Option(help="generation backend: hf")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="auto, float32, bfloat16 or float16")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = None,
    limit: Annotated[Optional[int], typer.Option(help="evaluate only the first N items (recorded)")] = None,
    references: Annotated[Optional[bool], typer.Option("--references/--no-references", help="also evaluate student and teacher as is")] = None,
    results: Results = Path("results"),
    force: Annotated[bool, typer.Option(help="rerun cells whose record exists")] = False,
    plugin: Plugins = None,
):
    """Run one method end to end on each task and store one record per cell. With no flags: the offline probe."""
    _load_plugins(plugin)
    spec = RunSpec.from_yaml(config) if config else RunSpec()
    spec = spec.with_overrides(
        method=method, teacher=teacher, student=student, tasks=task, seed=seed, data_dir=data_dir, backend=backend,
        dtype=dtype, device=device, limit=limit, references=references,
        method_config={**spec.method_config, **_options(option)} if option else None,
        **{"budget.examples": examples, "budget.epochs": epochs, "budget.batch_size": batch_size,
           "budget.grad_accum": grad_accum, "budget.lr": lr},
    )
    from pkt_bench.runner import run as run_spec
    from pkt_bench.store import ResultStore

    run_spec(spec, ResultStore(results), force=force)


@app.command("list")
@user_errors
def list_(
    what: Annotated[str, typer.Argument(help="methods or tasks")],
    details: Annotated[bool, typer.Option(help="also show each method's options")] = False,
    plugin: Plugins = None,
):
    """List registered methods or tasks with a one-line description and reference."""
    _load_plugins(plugin)
    registries = {"methods": METHODS, "tasks": TASKS}
    if what not in registries:
        raise UserError(f"cannot list {what!r}; use `pkt-bench list methods` or `pkt-bench list tasks`")
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


@app.command()
@user_errors
def leaderboard(
    results: Results = Path("results"),
    task: Annotated[Optional[list[str]], typer.Option("--task", "-t", help="only these tasks")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table, md, csv or json")] = "table",
):
    """Show stored results: methods as rows, tasks as columns, mean ± std over seeds."""
    from pkt_bench.leaderboard import FORMATS, render, scores
    from pkt_bench.store import ResultStore

    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not results.is_dir():
        raise UserError(f"results folder {str(results)!r} does not exist; run `pkt-bench run` first or pass --results")
    rows = scores(ResultStore(results).records(), task)
    if not rows:
        print(f"no records in {results}" + (f" for tasks {', '.join(task)}" if task else ""), file=sys.stderr)
        return
    rendered = render(rows, fmt)
    if fmt == "table":
        out.print(rendered)
    else:
        print(rendered, end="" if fmt == "csv" else "\n")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
