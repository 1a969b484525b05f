import csv
import random
import io
import json
import statistics

import pytest
from rich.console import Console

from pkt_bench.api import UserError
from pkt_bench.leaderboard import delta_text, render, scores, short_names
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
    assert "| lora | 0.270 ± 0.061 (3×4) | 0.500 (1×4) |" in md  # seeds × items always shown
    assert "pair (teacher -> student): T -> S" in md  # one pair: said once, not on every row
    assert "**0.400**" in md and "**0.600**" in md
    console = Console(width=200, record=True)
    console.print(render(rows, "table"))
    text = console.export_text()
    assert "0.270 ± 0.061" in text and "(3×4)" in text and "sensitivity" in text and "gsm8k (acc)" in text


def test_method_variants_get_rows_of_their_own():
    rows = scores([rec("lora", "gsm8k", 0, 0.2), rec("lora", "gsm8k", 0, 0.3, config={"rank": 8})])
    assert sorted(s.method for s in rows) == ["lora", "lora (rank=8)"]  # what differs from lora's defaults


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
    from pkt_bench.stats import smallest_significant_delta

    x, y = ([[item["acc"] for item in r["items"]] for r in BETTER if r["method"] == m] for m in ("sensitivity", "lora"))
    assert sens.min_delta == smallest_significant_delta(x, y) and 0 < sens.min_delta < sens.delta
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
    variants = [with_items("lora", 0, 0.3, config={"rank": 4}), with_items("lora", 0, 0.4, config={"rank": 8})]
    with pytest.raises(UserError, match=r"baseline 'lora' is ambiguous: 2 variants \(lora \(rank=4\); lora "
                                        r"\(rank=8\)\); name one, e.g. --baseline 'lora \(rank=4\)'"):
        scores(variants, baseline="lora")


def test_latex_export_escapes_and_bolds_the_best():
    latex = render(scores(BETTER + [rec("random_init", "probe", 0, 0.1)], baseline="lora"), "latex")
    assert latex.startswith("% mean ± std") and "\\begin{tabular}{lrr}" in latex
    assert "random\\_init" in latex and "pair (teacher -> student): T -> S" in latex and "\\textbf{0." in latex
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


def full(method, budget=None, task="probe", seed=0, p_right=0.5, teacher="T", student="S", **options):
    """A record as the runner writes it: the method's whole config, and the whole budget where it fine-tunes."""
    from dataclasses import asdict

    from pkt_bench.registry import METHODS
    from pkt_bench.spec import Budget

    record = with_items(method, seed, p_right, config=asdict(METHODS.get(method).make_config(options)))
    record["task"] = record["cell"]["task"] = task
    record["teacher"], record["student"] = teacher, student
    if budget is not None:
        record["cell"]["budget"] = asdict(Budget(**budget))
    return record


SMALL, LARGE = {"examples": 32, "epochs": 2}, {"examples": 60, "epochs": 3}


def test_labels_name_exactly_the_options_and_budget_fields_that_differ():
    rows = scores([full("lora", SMALL), full("lora", SMALL, rank=4), full("pissa", SMALL), full("student"),
                   full("sensitivity", LARGE, n_seeds=8), full("lora", {**SMALL, "lr": 1e-4}, rank=4)])
    assert sorted({s.method for s in rows}) == [
        "lora (32×2, lr=0.0003)", "lora (rank=4, 32×2, lr=0.0001)", "lora (rank=4, 32×2, lr=0.0003)",
        "pissa (32×2, lr=0.0003)", "sensitivity (n_seeds=8, 60×3, lr=0.0003)", "student"]
    same_budget = scores([full("lora", SMALL), full("lora", SMALL, rank=4), full("pissa", SMALL)])
    assert sorted(s.method for s in same_budget) == ["lora", "lora (rank=4)", "pissa"]  # pissa's preset is its default
    md = render(same_budget, "md")
    assert "budget of every fine-tuning row: examples=32, epochs=2, batch_size=8" in md
    flat = list(csv.DictReader(io.StringIO(render(same_budget, "csv"))))
    assert {r["config.rank"] for r in flat} == {"16", "4"} and {r["budget.examples"] for r in flat} == {"32"}
    assert {r["name"] for r in flat} == {"lora", "pissa"}


def test_a_delta_across_budgets_is_refused_or_flagged():
    records = [full("lora", SMALL, p_right=0.3), full("sensitivity", LARGE, p_right=0.8), full("student")]
    rows = {s.name: s for s in scores(records, baseline="lora")}
    assert rows["sensitivity"].unequal_budget and rows["sensitivity"].delta is None  # refused, and says why
    assert delta_text(rows["sensitivity"]) == "other budget"
    assert "other budget: trained on another budget than the baseline, so no Δ" in render(list(rows.values()), "md")
    rows = {s.name: s for s in scores(records, baseline="lora", allow_unequal=True)}
    assert rows["sensitivity"].delta > 0 and "†" in delta_text(rows["sensitivity"])
    assert not rows["student"].unequal_budget and rows["student"].delta is not None  # no budget: nothing to match
    assert "†: Δ against a baseline trained on a different budget" in render(list(rows.values()), "md")


def test_a_bare_baseline_name_resolves_to_the_default_variant_and_says_so():
    records = [full("lora", SMALL, p_right=0.3), full("lora", SMALL, p_right=0.6, rank=4),
               full("sensitivity", SMALL, p_right=0.8)]
    said = []
    rows = {s.method: s for s in scores(records, baseline="lora", note=said.append)}
    assert rows["sensitivity"].baseline == "lora" and rows["lora (rank=4)"].delta is not None
    assert said == ["baseline 'lora' is 'lora', the variant with lora's default options (others: lora (rank=4))"]
    by_label = {s.method: s for s in scores(records, baseline="lora (rank=4)")}
    assert by_label["lora"].delta == pytest.approx(-rows["lora (rank=4)"].delta)


def test_short_pair_names_stay_unique():
    assert short_names(["pico-teacher", "Qwen/Qwen2.5-0.5B", "/m/a/qwen", "/m/b/qwen", "./x/"]) == {
        "pico-teacher": "pico-teacher", "Qwen/Qwen2.5-0.5B": "Qwen2.5-0.5B", "/m/a/qwen": "a/qwen",
        "/m/b/qwen": "b/qwen", "./x/": "x"}


def test_the_default_tables_fit_80_columns():
    teacher, student = "Qwen/Qwen2.5-Coder-1.5B-Instruct", "/data/models/qwen2.5-coder-0.5b-instruct"
    records = [full(m, SMALL if m not in ("student", "teacher") else None, task=t, seed=seed, p_right=p,
                    teacher=teacher, student=s) for t in ("gsm8k", "mmlu", "humaneval") for seed in (0, 1, 2)
               for m, p in (("student", 0.2), ("teacher", 0.9), ("lora", 0.4), ("sensitivity", 0.5))
               for s in (student, "/other/qwen2.5-coder-0.5b-instruct")]
    for r in records:  # every counter, `reused` too: the widest cost table
        r["wall_s"], r["costs"] = 1234.5, {"examples_seen": 32, "teacher_tokens": 1_234_567, "teacher_forward": 64,
                                           "reused": 1}
    rows = scores(records, baseline="lora")
    console = Console(width=80, record=True)
    console.print(render(rows, "table", cost=True))
    text = console.export_text()
    assert max(map(len, text.splitlines())) <= 80 and "…" not in text
    lora = next(s for s in rows if s.method == "lora" and s.task == "mmlu")
    assert f"{lora.mean:.3f} ± {lora.std:.3f}" in text and f"{lora.ci_low:.3f}" in text
    assert "3.7M" in text and "3703.5" in text and "wall s" in text and "reused" in text and "T tok" in text and "tokens the teacher read" in text  # costs: own table, legend
    assert "P1 = Qwen/Qwen2.5-Coder-1.5B-Instruct" in text and student in text  # long pairs: named in a legend


def test_a_collapsed_multiple_choice_model_is_visible_in_its_cell():
    """MMLU records carry the share of the most predicted letter; the table shows it beside the score."""
    collapsed = rec("student", "mmlu", 0, 0.25)
    collapsed["metrics"]["top_letter_share"] = 0.952
    fine = rec("lora", "mmlu", 0, 0.40)
    fine["metrics"]["top_letter_share"] = 0.31
    md = render(scores([collapsed, fine, rec("lora", "gsm8k", 0, 0.2)]), "md")
    assert "0.250 (1×4) top letter 95%" in md and "**0.400** (1×4) top letter 31%" in md
    assert "**0.200** (1×4) |" in md  # tasks without letters show none


def test_one_model_under_two_paths_is_one_pair_named_as_first_recorded():
    """Records of a sweep resumed on another machine name the models by other paths but carry the same content
    identity: one pair in the table, under the name of the earliest record; a name shared by two identities
    (a folder whose files changed) is told apart by the digest."""
    def at(record, teacher, identity, created):
        record = {**record, "teacher": teacher, "created_at": created}
        record["cell"] = {**record["cell"], "teacher": identity, "student": "s@1"}
        return record

    records = [at(rec("lora", "gsm8k", 0, 0.2), "/a/qwen-1.5b", "qwen-1.5b@abc", "2026-01-01"),
               at(rec("lora", "gsm8k", 1, 0.3), "/b/models/qwen-1.5b", "qwen-1.5b@abc", "2026-01-02"),
               at(rec("student", "gsm8k", 0, 0.1), "/b/models/qwen-1.5b", "qwen-1.5b@abc", "2026-01-03")]
    rows = scores(records, baseline="lora")
    assert {s.pair for s in rows} == {"/a/qwen-1.5b -> S"}
    assert next(s for s in rows if s.method == "lora").seeds == 2
    changed = at(rec("lora", "gsm8k", 2, 0.9), "/a/qwen-1.5b", "qwen-1.5b@def", "2026-01-04")
    pairs = {s.pair for s in scores([*records, changed])}
    assert pairs == {"/a/qwen-1.5b@abc -> S", "/a/qwen-1.5b@def -> S"}


def test_the_budget_note_leaves_out_fields_kept_out_of_keys():
    """gradient_checkpointing is at its default in every key whatever ran, so the note must not state it."""
    from pkt_bench.leaderboard import notes

    budget = {"examples": 64, "epochs": 2, "gradient_checkpointing": False}
    records = [{**rec("lora", "gsm8k", seed, 0.2), "cell": {**CELL, "method": "lora", "task": "gsm8k", "seed": seed,
                                                            "budget": budget}} for seed in (0, 1)]
    line = next(n for n in notes(scores(records)) if n.startswith("budget of every fine-tuning row"))
    assert "examples=64" in line and "gradient_checkpointing" not in line
