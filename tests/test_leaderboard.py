import csv
import random
import io
import json
import statistics

import pytest
from rich.console import Console

from pkt_bench.api import UserError
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
    assert "| lora | T -> S | 0.270 ± 0.061 (3×4) | 0.500 (1×4) |" in md  # seeds × items always shown
    assert "**0.400**" in md and "**0.600**" in md
    console = Console(width=200, record=True)
    console.print(render(rows, "table"))
    text = console.export_text()
    assert "0.270 ± 0.061 (3×4)" in text and "sensitivity" in text and "gsm8k (acc)" in text


def test_method_variants_get_rows_of_their_own():
    rows = scores([rec("lora", "gsm8k", 0, 0.2), rec("lora", "gsm8k", 0, 0.3, config={"rank": 8})])
    assert len(rows) == 2 and len({s.method for s in rows}) == 2
    assert all(s.method.startswith("lora [") for s in rows)


def with_items(method, seed, p_right, n_items=40, config=None):
    """A record whose per-item outcomes are drawn with probability `p_right` (fixed RNG)."""
    rng = random.Random(f"{method}{seed}")
    record = rec(method, "probe", seed, 0.0, config=config)
    record["items"] = [{"id": f"f{i}", "acc": float(rng.random() < p_right)} for i in range(n_items)]
    record["metrics"]["acc"] = statistics.fmean(item["acc"] for item in record["items"])
    return record


BETTER = [with_items("lora", s, 0.3) for s in range(3)] + [with_items("sensitivity", s, 0.8) for s in range(3)]


def test_cis_and_delta_against_a_baseline():
    rows = {s.method: s for s in scores(BETTER, baseline="lora")}
    sens, lora = rows["sensitivity"], rows["lora"]
    assert sens.ci_low < sens.mean < sens.ci_high and sens.seeds == 3 and sens.items == 40
    assert sens.delta == pytest.approx(sens.mean - lora.mean)  # same items, so Δ is the difference of means
    assert sens.delta_low > 0 and sens.significant and sens.p_value < 0.01 and sens.test == "mcnemar"
    assert lora.delta is None and lora.baseline == "lora"
    md = render(list(rows.values()), "md")
    assert "baseline" in md and "Δ probe vs lora" in md and " *" in md
    flipped = {s.method: s for s in scores(BETTER, baseline="sensitivity")}["lora"]
    assert flipped.delta == pytest.approx(-sens.delta) and flipped.delta_high < 0


def test_delta_is_taken_on_shared_items_only():
    short = with_items("sensitivity", 0, 0.8, n_items=10)
    row = {s.method: s for s in scores(BETTER[:3] + [short], baseline="lora")}["sensitivity"]
    lora = [r for r in BETTER if r["method"] == "lora"]
    expected = short["metrics"]["acc"] - statistics.fmean(r["items"][i]["acc"] for r in lora for i in range(10))
    assert row.delta == pytest.approx(expected)


def test_baseline_errors_are_for_users():
    with pytest.raises(UserError, match="baseline 'pissa' has no records here; pick one of: lora, sensitivity"):
        scores(BETTER, baseline="pissa")
    variants = BETTER + [with_items("lora", 0, 0.3, config={"rank": 4})]
    with pytest.raises(UserError, match="baseline 'lora' has 2 variants"):
        scores(variants, baseline="lora")


def test_latex_export_escapes_and_bolds_the_best():
    latex = render(scores(BETTER + [rec("random_init", "probe", 0, 0.1)], baseline="lora"), "latex")
    assert latex.startswith("% mean ± std") and "\\begin{tabular}{llrr}" in latex
    assert "random\\_init" in latex and "T $\\rightarrow$ S" in latex and "\\textbf{0." in latex
    assert "$\\Delta$ probe vs lora" in latex and latex.rstrip().endswith("\\end{tabular}")


def test_task_options_split_columns_not_method_rows():
    def with_options(method, task, value, options):
        record = rec(method, task, 0, value)
        record["cell"] = {**record["cell"], "task_options": options, "task_version": "1"}
        return record

    rows = scores([with_options("lora", "gsm8k", 0.2, {"num_fewshot": 8}),
                   with_options("lora", "humaneval", 0.3, {"n_samples": 1})])
    assert [(s.method, s.task) for s in rows] == [("lora", "gsm8k"), ("lora", "humaneval")]  # one row
    rows = scores([with_options("lora", "gsm8k", 0.2, {"num_fewshot": 8}),
                   with_options("lora", "gsm8k", 0.1, {"num_fewshot": 0})])
    assert len(rows) == 2 and {s.method for s in rows} == {"lora"}
    assert len({s.task for s in rows}) == 2 and all(s.task.startswith("gsm8k [") for s in rows)
    assert all(s.seeds == 1 for s in rows)  # 0-shot and 8-shot never pool as seeds of one cell


def test_a_collapsed_multiple_choice_model_is_visible_in_its_cell():
    """MMLU records carry the share of the most predicted letter; the table shows it beside the score."""
    collapsed = rec("student", "mmlu", 0, 0.25)
    collapsed["metrics"]["top_letter_share"] = 0.952
    fine = rec("lora", "mmlu", 0, 0.40)
    fine["metrics"]["top_letter_share"] = 0.31
    md = render(scores([collapsed, fine, rec("lora", "gsm8k", 0, 0.2)]), "md")
    assert "0.250 (1×4) top letter 95%" in md and "**0.400** (1×4) top letter 31%" in md
    assert "**0.200** (1×4) |" in md  # tasks without letters show none
