import csv
import io
import json
import statistics

from rich.console import Console

from pkt_bench.leaderboard import render, scores
from pkt_bench.spec import SCHEMA_VERSION

CELL = {"method_config": {}, "backend": "hf", "limit": None}


def rec(method, task, seed, value, n_items=4, config=None):
    cell = {**CELL, "method": method, "task": task, "seed": seed, "method_config": config or {}}
    return {"schema_version": SCHEMA_VERSION, "key": f"{method}{task}{seed}", "method": method, "task": task,
            "seed": seed, "teacher": "T", "student": "S", "cell": cell, "primary_metric": "acc",
            "metrics": {"acc": value}, "items": [{}] * n_items}


RECORDS = [rec("lora", "gsm8k", 0, 0.20), rec("lora", "gsm8k", 1, 0.30), rec("lora", "gsm8k", 2, 0.31),
           rec("student", "gsm8k", 0, 0.10), rec("sensitivity", "gsm8k", 0, 0.40), rec("lora", "mmlu", 0, 0.5),
           rec("student", "mmlu", 0, 0.6)]


def test_mean_std_over_seeds_and_best_per_column():
    rows = {(s.method, s.task): s for s in scores(RECORDS)}
    lora = rows[("lora", "gsm8k")]
    assert lora.seeds == 3 and abs(lora.mean - statistics.fmean([0.2, 0.3, 0.31])) < 1e-12
    assert abs(lora.std - statistics.stdev([0.2, 0.3, 0.31])) < 1e-12
    assert rows[("student", "gsm8k")].std is None
    assert {k for k, s in rows.items() if s.best} == {("student", "mmlu"), ("sensitivity", "gsm8k")}
    assert [s.method for s in scores(RECORDS)][:2] == ["student", "student"]  # baselines first


def test_task_filter():
    assert {s.task for s in scores(RECORDS, ["mmlu"])} == {"mmlu"}


def test_all_formats_print_the_same_numbers():
    rows = scores(RECORDS)
    as_json = json.loads(render(rows, "json"))
    as_csv = list(csv.DictReader(io.StringIO(render(rows, "csv"))))
    assert len(as_json) == len(as_csv) == 5
    for j, c in zip(as_json, as_csv):
        assert (j["method"], j["task"]) == (c["method"], c["task"])
        assert float(c["mean"]) == j["mean"] and c["best"] == str(j["best"])
    md = render(rows, "md")
    assert "| lora | T -> S | 0.270 ± 0.061 (n=3) | 0.500 |" in md
    assert "**0.400**" in md and "**0.600**" in md
    console = Console(width=200, record=True)
    console.print(render(rows, "table"))
    text = console.export_text()
    assert "0.270 ± 0.061 (n=3)" in text and "sensitivity" in text and "gsm8k (acc)" in text


def test_method_variants_get_rows_of_their_own():
    rows = scores([rec("lora", "gsm8k", 0, 0.2), rec("lora", "gsm8k", 0, 0.3, config={"rank": 8})])
    assert len(rows) == 2 and len({s.method for s in rows}) == 2
    assert all(s.method.startswith("lora [") for s in rows)
