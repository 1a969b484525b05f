"""Sweeps: config parsing with file:line errors, grid expansion, resume, and the local executor."""

import json

import pytest
from helpers import REPO, cli, tree_digest
from rich.console import Console

from pkt_bench.api import UserError
from pkt_bench.report import ReportConfig, write_report
from pkt_bench.runner import plan
from pkt_bench.store import ResultStore
from pkt_bench.sweep import Sweep, run_sweep

TINY = """\
methods: [student, lora]
tasks: [probe]
seeds: [0, 1]
budget: {examples: 8, epochs: 1}
limit: 5
"""


def write(folder, text, name="sweep.yaml"):
    path = folder / name
    path.write_text(text)
    return path


def quiet():
    return Console(file=open("/dev/null", "w"))


@pytest.fixture(scope="module")
def swept(pico_pair, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    config = write(folder, TINY)
    store = ResultStore(folder / "results")
    outcome = run_sweep(Sweep.load(config), store, console=quiet())
    return config, store, outcome


def test_grid_runs_every_cell_references_first(swept):
    _, store, outcome = swept
    methods = [c.spec.method for c in outcome.cells]
    assert sorted(methods) == ["lora", "lora", "student", "teacher"]  # references once, at seed 0
    assert set(methods[:2]) == {"student", "teacher"}  # every lora cell reads the references' scores
    assert outcome.ran == 4 and outcome.stored_before == 0 and not outcome.failed
    records = {r["key"]: r for r in store.records()}
    assert set(records) == {c.key for c in outcome.cells}
    lora = [r for r in records.values() if r["method"] == "lora"]
    assert sorted(r["seed"] for r in lora) == [0, 1]
    assert all(set(r["references"]) == {"student", "teacher"} for r in lora)
    references = {r["method"]: r["key"] for r in records.values() if r["method"] != "lora"}
    assert all({name: ref["key"] for name, ref in r["references"].items()} == references for r in lora)
    assert {records[key]["seed"] for key in references.values()} == {0}
    assert all(r["cell"]["budget"]["examples"] == 8 and len(r["items"]) == 5 for r in lora)


def test_cell_keys_are_the_runners(swept):
    config, _, outcome = swept
    for cell in outcome.cells:
        assert [c.key for c in plan(cell.spec)] == [cell.key]  # `pkt-bench run` of that cell finds the record
    spec = next(c.spec for c in outcome.cells if c.spec.method == "lora")
    assert spec.budget.examples == 8 and spec.limit == 5 and spec.tasks == ["probe"]


def test_rerun_runs_only_missing_cells(swept, tmp_path):
    config, store, _ = swept
    before = tree_digest(store.root)
    again = run_sweep(Sweep.load(config), store, console=quiet())
    assert again.ran == 0 and again.stored_before == 4
    assert tree_digest(store.root) == before
    more = write(tmp_path, TINY.replace("seeds: [0, 1]", "seeds: [0, 1, 2]"))
    grown = run_sweep(Sweep.load(more), store, console=quiet())
    assert grown.stored_before == 4 and grown.ran == 1  # seed 2 of lora; the references are stored
    assert {r["seed"] for r in store.records()} == {0, 1, 2}


def test_only_runs_the_named_methods_and_their_references(pico_pair, tmp_path):
    config = write(tmp_path, TINY.replace("methods: [student, lora]", "methods: [student, lora, pissa]"))
    store = ResultStore(tmp_path / "results")
    with pytest.raises(UserError, match="--only names methods the sweep does not run: kd"):
        run_sweep(Sweep.load(config), store, console=quiet(), only=("kd",))
    first = run_sweep(Sweep.load(config), store, console=quiet(), only=("pissa",))
    assert sorted(c.spec.method for c in first.cells) == ["pissa", "pissa", "student", "teacher"]
    assert first.ran == 4 and sorted(r["method"] for r in store.records()) == ["pissa", "pissa", "student", "teacher"]
    rest = run_sweep(Sweep.load(config), store, console=quiet())  # the rest later; nothing runs twice
    assert rest.stored_before == 4 and rest.ran == 2


def test_grid_runs_only_the_named_grid_and_its_references(pico_pair, tmp_path):
    config = write(tmp_path, TINY + """\
grids:
  - name: first
    methods: [lora]
    seeds: [0]
  - name: second
    methods: [lora, pissa]
    seeds: [1]
""")
    store = ResultStore(tmp_path / "results")
    with pytest.raises(UserError, match="--grid names grids the sweep does not have: third; its grids: first; second"):
        run_sweep(Sweep.load(config), store, console=quiet(), grids=("third",))
    second = run_sweep(Sweep.load(config), store, console=quiet(), grids=("second",), only=("pissa",))
    assert sorted((r["method"], r["seed"]) for r in store.records()) == [("pissa", 1), ("student", 0), ("teacher", 0)]
    assert second.ran == 3
    with pytest.raises(UserError, match="--seed names seeds the sweep does not run: 7; its seeds: 0, 1"):
        run_sweep(Sweep.load(config), store, console=quiet(), seeds=(7,))
    first = run_sweep(Sweep.load(config), store, console=quiet(), seeds=(0,), only=("lora",))
    assert first.ran == 1 and ("lora", 0) in {(r["method"], r["seed"]) for r in store.records()}
    rest = run_sweep(Sweep.load(config), store, console=quiet(), grids=("first", "second"))
    assert rest.stored_before == 4 and rest.ran == 1  # lora at seed 1


def test_grids_override_top_level_keys_and_expand_env_vars(tmp_path, monkeypatch):
    monkeypatch.setenv("PKT_TEST_STUDENT", "pico-student")
    sweep = Sweep.load(write(tmp_path, """\
methods: [lora, {method: lora, method_config: {rank: 4}}]
seeds: [0, 1, 2]
budget: {examples: 8}
grids:
  - name: small
    pairs: [{teacher: "${PKT_TEST_TEACHER:-pico-teacher}", student: "${PKT_TEST_STUDENT}"}]
    tasks: probe
  - name: no references
    references: false
    seeds: [5]
    resources: {gpus: 1}
"""))
    small, bare = sweep.grids
    assert small.pairs == [("pico-teacher", "pico-student")] and small.tasks == ["probe"]
    assert small.methods == [("lora", {}), ("lora", {"rank": 4})] and small.base.budget.examples == 8
    assert bare.seeds == [5] and not bare.base.references and bare.resources.gpus == 1
    assert bare.base.budget.examples == 8  # top-level keys reach every grid


@pytest.mark.parametrize("text, message", [
    ("methods: [lora]\nseeds: [0]\nbugdet: {examples: 8}\n", r"sweep.yaml:3: unknown sweep key 'bugdet'"),
    ("methods: [lora]\ngrids:\n  - tasks: [probe]\n    seed: 1\n", r"sweep.yaml:4: unknown sweep key 'seed'"),
    ("methods: [lora]\nseeds: [0, 0]\n", r"sweep.yaml:2: 'seeds' must be a non-empty list of distinct integers"),
    ("methods: []\n", r"sweep.yaml:1: 'methods' must be a non-empty list"),
    ("methods: [lora]\nbudget:\n  epochs: 0\n", r"sweep.yaml:2: budget epochs must be a positive integer"),
    ("methods: [lora]\ngrids:\n  - limit: -1\n", r"sweep.yaml:3: spec key 'limit' must be a positive integer"),
    ("methods: [lora]\npairs:\n  - {teacher: pico-teacher}\n", r"sweep.yaml:2: 'pairs' must be a non-empty list"),
    ("methods: [lora]\npairs: [{teacher: '${PKT_NOT_SET_ANYWHERE}', student: s}]\n",
     r"sweep.yaml:2: environment variable PKT_NOT_SET_ANYWHERE is not set"),
    ("methods: [lora\n", r"sweep.yaml:2: malformed YAML"),
])
def test_bad_configs_name_file_and_line(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        Sweep.load(write(tmp_path, text))


def test_unregistered_methods_are_listed_together_before_anything_runs(tmp_path):
    config = write(tmp_path, "methods: [student, laten9, lora, distil9]\ntasks: [probe]\n")
    done = cli("sweep", str(config), "--results", str(tmp_path / "results"))
    assert done.returncode == 2
    assert "methods not registered: distil9, laten9; registered: " in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "results").exists()


def test_ray_pins_the_device_so_driver_and_workers_agree(swept):
    config, _, _ = swept
    sweep = Sweep.load(config)
    pinned = sweep.plan(pin_device=True)
    assert {c.spec.device for c in pinned} == {"cpu"}
    assert [c.key for c in pinned] == [c.key for c in sweep.plan()]  # on a CPU machine auto is cpu


def fail_lora(monkeypatch, times):
    """Make lora's cells raise on their first `times` runs (as a cell that runs out of memory); returns the seeds
    of every lora run, in order."""
    import pkt_bench.runner

    real, calls = pkt_bench.runner._run_cell, []

    def flaky(cell, *args, **kwargs):
        if cell.method.name == "lora":
            calls.append(cell.spec.seed)
            if len(calls) <= times:
                raise RuntimeError(f"out of memory (simulated, attempt {len(calls)})")
        return real(cell, *args, **kwargs)

    monkeypatch.setattr(pkt_bench.runner, "_run_cell", flaky)
    return calls


def test_a_failing_cell_is_reported_and_the_rest_go_on(swept, tmp_path, monkeypatch):
    broken = write(tmp_path, TINY.replace("seeds: [0, 1]", "seeds: [7]"))
    calls = fail_lora(monkeypatch, times=2)
    fresh = ResultStore(tmp_path / "results")
    sweep = Sweep.load(broken)
    outcome = run_sweep(sweep, fresh, console=quiet())
    assert calls == [7, 7]  # retried once, then reported
    assert outcome.ran == 2 and list(outcome.failed.values()) == ["RuntimeError: out of memory (simulated, attempt 2)"]
    assert {r["method"] for r in fresh.records()} == {"student", "teacher"}
    assert all(json.loads(p.read_text()) for p in fresh.records_dir.glob("*.json"))
    [lora] = [c for c in outcome.cells if c.spec.method == "lora"]
    note = fresh.failure(lora.key)
    assert [a["error"] for a in note["attempts"]] == [f"RuntimeError: out of memory (simulated, attempt {n})"
                                                      for n in (1, 2)]
    # a report written later, from the records alone, names the failure in the header and in the grid's table
    out = tmp_path / "report.md"
    write_report(sweep, fresh, out, "test", run=False)
    text = out.read_text()
    reason = "failed, 2 attempts: RuntimeError: out of memory (simulated, attempt 2)"
    assert f"**Incomplete: 1 cells failed**" in text and f"({reason})" in text
    assert f"| lora | probe | 7 | **{reason}** |" in text
    assert "cells have no record yet" not in text  # a failed cell is not called pending
    [incomplete] = [line for line in text.splitlines() if line.startswith("**Incomplete")]
    assert "lora on probe (seed 7; " in incomplete and str(tmp_path) not in incomplete  # the cell by name, no path


def test_a_cell_that_fails_once_is_retried_and_its_failure_note_removed(swept, tmp_path, monkeypatch):
    config = write(tmp_path, TINY.replace("seeds: [0, 1]", "seeds: [8]"))
    calls = fail_lora(monkeypatch, times=1)
    fresh = ResultStore(tmp_path / "results")
    outcome = run_sweep(Sweep.load(config), fresh, console=quiet())
    assert calls == [8, 8] and outcome.ran == 3 and not outcome.failed
    assert {r["method"] for r in fresh.records()} == {"student", "teacher", "lora"}
    assert not list((fresh.root / "failures").glob("*.json"))  # the record replaced the note


def test_reference_evaluations_are_reused_by_other_methods_and_seeds(swept):
    """A new method at a new seed reads the stored student and teacher records: no reference runs again."""
    from pkt_bench.runner import run
    from pkt_bench.spec import RunSpec

    _, store, _ = swept
    references = {r["method"]: r["key"] for r in store.records() if r["method"] in ("student", "teacher")}
    before = len(list(store.records()))
    spec = RunSpec.from_dict({"method": "pissa", "seed": 3, "budget": {"examples": 8, "epochs": 1}, "limit": 5})
    [outcome] = run(spec, store, console=quiet())
    assert not outcome.skipped and outcome.record["seed"] == 3
    assert {name: ref["key"] for name, ref in outcome.record["references"].items()} == references
    assert len(list(store.records())) == before + 1


def test_the_checked_in_reproduction_config_parses(monkeypatch):
    for name in ("PKT_QWEN_TEACHER", "PKT_QWEN_STUDENT", "PKT_BENCH_DATA"):
        monkeypatch.setenv(name, f"/models/{name}")
    sweep = Sweep.load(REPO / "sweeps" / "reproduction.yaml")
    methods = ["student", "teacher", "lora", "sensitivity", "laten", "distill", "pissa", "random-init"]
    assert all([m for m, _ in g.methods] == methods and g.seeds == [0, 1, 2] for g in sweep.grids)
    assert {p for g in sweep.grids for p in g.pairs} == {("pico-teacher", "pico-student"),
                                                         ("/models/PKT_QWEN_TEACHER", "/models/PKT_QWEN_STUDENT")}
    assert sweep.variables == {name: f"/models/{name}" for name in ("PKT_QWEN_TEACHER", "PKT_QWEN_STUDENT",
                                                                    "PKT_BENCH_DATA")}  # what the report asks to export
    assert [c.kind for c in ReportConfig.from_sweep(sweep).claims] == ["beats_baseline", "small_and_unstable"]


def test_the_cpu_grid_parses_and_runs_seed_0_column_by_column_references_first(monkeypatch):
    """sweeps/reproduction-cpu.yaml: the Qwen pair's grid at CPU size, chat template at training and evaluation."""
    import dataclasses

    from pkt_bench.spec import RunSpec

    if "transfer_format" not in {f.name for f in dataclasses.fields(RunSpec)}:
        pytest.skip("needs the transfer_format spec key (faithfulness issue)")
    data = REPO.parent / "shared" / "data" / "eval"
    if not data.is_dir():
        pytest.skip(f"no task data at {data}")
    monkeypatch.setenv("PKT_QWEN_TEACHER", "pico-teacher")
    monkeypatch.setenv("PKT_QWEN_STUDENT", "pico-student")
    monkeypatch.setenv("PKT_BENCH_DATA", str(data))
    # pico stands in for the Qwen pair: skip the checks only a real instruct pair passes (context, chat template)
    monkeypatch.setattr("pkt_bench.runner.context_length", lambda ref: None)
    monkeypatch.setattr("pkt_bench.runner._check_format", lambda formats, pair: None)
    sweep = Sweep.load(REPO / "sweeps" / "reproduction-cpu.yaml")
    methods = ["student", "teacher", "lora", "sensitivity", "distill", "pissa", "random-init", "teacher-random", "laten",
               "semalign", "kd", "hidden-kd", "gkd"]
    main = [g for g in sweep.grids if g.base.transfer_data == "self" and not g.base.select]  # every method
    compared = [g for g in sweep.grids if g.base.transfer_data != "self"]  # the data factor: lora, sensitivity
    selected = [g for g in sweep.grids if g.base.select]  # lr selection on the default data: lora, sensitivity
    assert [(g.tasks[0], g.base.select["lr"]) for g in selected] == [("gsm8k-0shot", [1e-4, 3e-4, 1e-3]),
                                                                      ("humaneval", [1e-4, 3e-4, 1e-3])]
    assert all([m for m, _ in g.methods] == ["lora", "sensitivity"] and g.seeds == [0] for g in selected)
    assert all([m for m, _ in g.methods] == methods and g.seeds == [0, 1, 2] for g in main)
    assert [g.tasks for g in main] == [["gsm8k-0shot"], ["humaneval"], ["mbpp"], ["mmlu"]]
    assert [g.base.limit for g in main] == [100, None, 100, 1000]
    assert [(g.tasks[0], g.base.transfer_data) for g in compared] == [
        ("gsm8k-0shot", "gold"), ("humaneval", "gold"), ("gsm8k-0shot", "teacher"), ("humaneval", "teacher")]
    assert all([m for m, _ in g.methods] == ["lora", "sensitivity"] and g.seeds == [0] for g in compared)
    base = sweep.grids[0].base
    assert base.task_options == {"chat_template": True} and base.transfer_format == "chat_template"
    assert (base.budget.examples, base.budget.epochs, base.budget.optimizer_steps(64)) == (64, 2, 16)
    cells = sweep.plan()
    grids = {c.key: i for i, g in reversed(list(enumerate(sweep.grids))) for c in g.cells}  # first grid asking
    order = [(c.spec.seed, grids[c.key], c.spec.method not in ("student", "teacher")) for c in cells]
    assert order == sorted(order)  # seed 0, grid by grid (each column's references first), then seeds 1, 2
    assert order[0] == (0, 0, False) and order[-1][0] == 2
    assert sum(1 for *_, method in order if not method) == 2 * 4  # once per task, not per seed or data source
    assert len({c.key for c in cells}) == len(cells) == 8 + 11 * 4 * 3 + 2 * 4 + 2 * 2
    assert [c.kind for c in ReportConfig.from_sweep(sweep).claims] == ["beats_baseline", "small_and_unstable"]
