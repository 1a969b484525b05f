import dataclasses
import textwrap

import pytest

from pkt_bench.api import UserError
from pkt_bench.models import ModelPair, ModelRef
from pkt_bench.registry import METHODS, TASKS
from pkt_bench.runner import Cell
from pkt_bench.spec import Budget, RunSpec


@pytest.fixture
def pair():
    return ModelPair(ModelRef("t", "/t", "t@1"), ModelRef("s", "/s", "s@1"), "cpu", "float32")


def key(pair, method="lora", config=None, **spec_fields):
    entry = METHODS.get(method)
    spec = RunSpec(method=method, **spec_fields)
    return Cell(entry, entry.make_config(config or {}), spec, pair, "probe", TASKS.get("probe").cls()).key


def test_key_is_stable_and_changes_with_what_changes_results(pair):
    assert key(pair) == key(pair)
    assert key(pair) == key(pair, config={"rank": 16})  # the default, spelled out, is the same cell
    assert key(pair) != key(pair, config={"rank": 8})
    assert key(pair) != key(pair, seed=1)
    assert key(pair) != key(pair, budget=Budget(epochs=2))
    assert key(pair) != key(pair, limit=10)
    other = dataclasses.replace(pair, dtype="bfloat16")
    assert key(pair) != key(other)


def test_budget_is_part_of_the_key_only_for_methods_that_fine_tune(pair):
    assert key(pair, "student") == key(pair, "student", budget=Budget(epochs=2))
    assert key(pair, "lora") != key(pair, "lora", budget=Budget(epochs=2))


@pytest.mark.parametrize("field", ["examples", "epochs", "batch_size", "grad_accum", "max_length"])
@pytest.mark.parametrize("value", [0, -3])
def test_zero_or_negative_budget_is_refused(field, value):
    with pytest.raises(UserError, match=f"budget {field} must be a positive integer"):
        Budget(**{field: value})


def test_budget_counts_optimizer_steps_with_a_short_last_group():
    assert Budget(batch_size=8, epochs=3, grad_accum=1).optimizer_steps(60) == 24  # 8 batches x 3
    assert Budget(batch_size=8, epochs=3, grad_accum=5).optimizer_steps(60) == 5  # 24 micro-batches / 5, up


def test_yaml_spec_loads_and_flags_override(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent("""
        method: lora
        method_config: {rank: 4}
        tasks: probe
        seed: 3
        budget: {epochs: 2, lr: 0.001}
    """))
    spec = RunSpec.from_yaml(path)
    assert (spec.tasks, spec.seed, spec.budget.epochs, spec.budget.lr, spec.method_config) == (
        ["probe"], 3, 2, 0.001, {"rank": 4})
    spec = spec.with_overrides(seed=5, teacher=None, **{"budget.epochs": 1, "budget.lr": None})
    assert (spec.seed, spec.budget.epochs, spec.budget.lr, spec.teacher) == (5, 1, 0.001, "pico-teacher")


@pytest.mark.parametrize("text, line, words", [
    ("method: lora\ntasks: [probe\nseed: 1\n", 3, "malformed YAML"),
    ("method: lora\n  seed: 1\n", 2, "malformed YAML"),
    ("method: lora\n\nsede: 1\n", 3, "unknown spec key 'sede'"),
    ("method: lora\nseed: one\n", 2, "'seed' must be a int"),
    ("method: lora\nbudget:\n  epochs: 0\n", 2, "budget epochs must be a positive integer"),
    ("- lora\n", 1, "must be a mapping"),
])
def test_malformed_yaml_names_the_line(tmp_path, text, line, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as error:
        RunSpec.from_yaml(path)
    assert f"{path}:{line}:" in str(error.value) and words in str(error.value)
