"""The reproduction report: verdict rules on synthetic rows, and the one command on a tiny probe sweep."""

import re

import pytest
from rich.console import Console

from pkt_bench.api import UserError
from pkt_bench.leaderboard import Score, scores
from pkt_bench.report import Claim, Controls, ReportConfig, check, most_on, overall, power, write_report
from pkt_bench.store import ResultStore
from pkt_bench.sweep import Sweep

TINY = """\
methods: [student, lora]
pairs: [{teacher: "${TINY_TEACHER:-pico-teacher}", student: pico-student}]
tasks: [probe]
seeds: [0, 1]
budget: {examples: 8, epochs: 1}
limit: 5
report:
  title: Tiny report
  baseline: student
  notes: |
    Weights: the pico pair, built in-process.
  claims:
    - paper: Made-up paper A
      claim: LoRA beats the student
      kind: beats_baseline
      methods: [lora]
      most_on: probe
    - paper: Made-up paper B
      claim: LoRA's gains are small and unstable
      kind: small_and_unstable
      methods: [lora]
      small: 0.05
"""


def row(method, task, delta, p, per_seed, baseline="lora", base_per_seed=None):
    score = Score(method, "T -> S", task, "acc", 0.5, None, len(per_seed), 100, per_seed=per_seed, baseline=baseline,
                  delta=delta, delta_low=delta - 0.1, delta_high=delta + 0.1, p_value=p)
    base = Score(baseline, "T -> S", task, "acc", 0.5, None, 3, 100, baseline=baseline,
                 per_seed=base_per_seed or {0: 0.5, 1: 0.5, 2: 0.5})
    return [score, base]


def graft_row(pair, task, delta, p):
    return Score("graft", pair, task, "acc", 0.5, None, 3, 100, baseline="lora", delta=delta, delta_low=delta - 0.1,
                 delta_high=delta + 0.1, p_value=p)


CONTROLS = Controls("graft", ["N -> S"])
SEEING = [graft_row("T -> S", "gsm8k", 0.4, 0.001), graft_row("N -> S", "gsm8k", 0.0, 1.0)]
BEATS = Claim("Seeking", "transfer beats LoRA, most on GSM8K", "beats_baseline", ["sensitivity"], most_on="gsm8k")
SMALL = Claim("NI", "small and unstable", "small_and_unstable", ["sensitivity"], small=0.05)


@pytest.mark.parametrize("delta, p, verdict", [(0.2, 0.01, "supported"), (-0.2, 0.01, "not supported"),
                                               (0.2, 0.2, "not significant"), (-0.01, 0.9, "not significant")])
def test_beats_baseline_rule(delta, p, verdict):
    found = check(Claim("x", "y", "beats_baseline", ["sensitivity"]), row("sensitivity", "mmlu", delta, p, {0: 1}))
    assert [f.verdict for f in found] == [verdict]


def test_most_on_a_task():
    rows = row("sensitivity", "gsm8k", 0.2, 0.01, {0: 1}) + row("sensitivity", "mmlu", 0.05, 0.01, {0: 1})
    found = check(BEATS, rows)
    assert {f.task: f.verdict for f in found} == {"gsm8k": "supported", "mmlu": "supported"}
    assert [(f.task, f.verdict) for f in most_on("gsm8k", found)] == [("most on gsm8k", "supported")]
    rows = row("sensitivity", "gsm8k", 0.02, 0.3, {0: 1}) + row("sensitivity", "humaneval", 0.05, 0.01, {0: 1})
    found = check(BEATS, rows)
    [most] = most_on("gsm8k", found)  # e.g. tasks from two grids of one pair
    assert most.verdict == "not supported" and "largest Δ on humaneval" in most.why
    assert most_on("mbpp", found) == []  # not evaluated: nothing to say
    verdict = overall(found + [most])
    assert verdict.startswith("mixed: ") and all(v in verdict for v in ("1 not significant", "1 supported",
                                                                        "1 not supported"))


@pytest.mark.parametrize("delta, p, seeds, verdict", [
    (0.02, 0.01, {0: 0.6, 1: 0.4, 2: 0.56}, "supported"),        # small, per-seed gains change sign
    (0.02, 0.30, {0: 0.52, 1: 0.52, 2: 0.52}, "supported"),      # small, stable, not significant
    (0.03, 0.01, {0: 0.53, 1: 0.53, 2: 0.53}, "partly supported"),  # small but a stable, significant gain
    (0.20, 0.01, {0: 0.7, 1: 0.72, 2: 0.68}, "not supported"),   # large, significant, stable
    (0.20, 0.20, {0: 0.7, 1: 0.72, 2: 0.68}, "not significant"),
    (0.20, 0.01, {0: 1.0, 1: 0.45, 2: 0.65}, "partly supported"),   # large and significant but unstable
    (0.20, 0.01, {0: 0.7}, "needs seeds"),    # large and significant, but one seed cannot show it stable
    (0.03, 0.01, {0: 0.53}, "needs seeds"),   # small and significant: stability decides, and one seed is silent
    (0.02, 0.30, {0: 0.52}, "supported"),     # small and not significant: stability does not matter
    (0.20, 0.20, {0: 0.7}, "not significant"),
])
def test_small_and_unstable_rule(delta, p, seeds, verdict):
    found = check(SMALL, row("sensitivity", "gsm8k", delta, p, seeds) + SEEING, CONTROLS)
    assert [f.verdict for f in found] == [verdict]


@pytest.mark.parametrize("controls, extra, why", [
    (None, SEEING, "no controls were run"),
    (CONTROLS, [], "graft did not run here"),
    (CONTROLS, [graft_row("T -> S", "gsm8k", 0.02, 0.4), SEEING[1]], "graft moves nothing here"),
    (CONTROLS, SEEING[:1], "no negative control ran on gsm8k"),
    (CONTROLS, [SEEING[0], graft_row("N -> S", "gsm8k", 0.2, 0.001)], "never saw the answers"),
])
def test_a_failure_claim_without_working_controls_has_no_power(controls, extra, why):
    found = check(SMALL, row("sensitivity", "gsm8k", 0.0, 1.0, {0: 0.5, 1: 0.5, 2: 0.5}) + extra, controls)
    [finding] = [f for f in found if f.score.pair == "T -> S"]
    assert finding.verdict == "no power" and why in finding.why


def test_zero_gains_are_no_effect_not_instability():
    found = check(SMALL, row("sensitivity", "gsm8k", 0.0, 1.0, {0: 0.5, 1: 0.5, 2: 0.5}) + SEEING, CONTROLS)
    [finding] = [f for f in found if f.score.pair == "T -> S"]
    assert finding.verdict == "supported" and "(no effect)" in finding.why and "unstable" not in finding.why


def test_power_per_pair_and_the_negative_pair_itself():
    seen = power(row("sensitivity", "gsm8k", 0.0, 1.0, {0: 0.5}) + SEEING, CONTROLS)
    assert seen[("T -> S", "gsm8k")].visible and "graft Δ +0.400" in seen[("T -> S", "gsm8k")].why
    assert not seen[("N -> S", "gsm8k")].visible


def test_report_command_on_a_tiny_probe_sweep(pico_pair, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    out = tmp_path / "docs" / "reproduction.md"
    quiet = Console(file=open("/dev/null", "w"))
    failed = write_report(Sweep.load(config), ResultStore(tmp_path / "results"), out, "pkt-bench report tiny.yaml",
                          console=quiet)
    assert failed == []
    text = out.read_text()
    assert text.startswith("# Tiny report") and "Made by `pkt-bench report tiny.yaml`" in text
    assert "4 cells, 4 run for this report and 0 reused" in text  # student and teacher once, lora per seed
    assert ("runs only the cells without a record; the config reads `TINY_TEACHER` from the environment, so on "
            "another machine export them first" in text)
    assert "export TINY_TEACHER=" not in text  # a machine's values (paths) are no part of a report
    assert "\nWeights: the pico pair, built in-process.\n" in text
    assert text.index("Weights: the pico pair") < text.index("## Claims at a glance")
    assert "| student | " in text and "Δ probe vs student" in text
    assert "pair (teacher -> student): pico-teacher -> pico-student" in text  # one pair: said once
    assert "seeds 0, 1; transfer data gold; budget for methods that fine-tune: 8 train examples × 1 epochs" in text
    assert re.search(r"pkt-bench commit [0-9a-f]{7,}", text)  # one commit, said once
    for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", text):
        assert (out.parent / image).read_bytes().startswith(b"\x89PNG")
    assert "scores-probe.png" in text and "cost-probe.png" in text
    verdicts = re.findall(r"\| (Made-up paper [AB]) \| [^|]+ \| \*\*([^*]+)\*\* \|", text)
    assert [paper for paper, _ in verdicts] == ["Made-up paper A", "Made-up paper B"]
    assert all(v in ("supported", "not supported", "not significant", "partly supported", "no power", "needs seeds")
               or v.startswith("mixed")
               for _, v in verdicts)
    assert "| lora | pico | probe |" in text and "| lora | pico-teacher -> pico-student | most on probe |" in text
    again = write_report(Sweep.load(config), ResultStore(tmp_path / "results"), out, "pkt-bench report tiny.yaml",
                         console=quiet)
    assert again == [] and "0 run for this report and 4 reused" in out.read_text()
    # --stored-only: a report of a sweep still running elsewhere, from the records it has so far; nothing runs
    store = ResultStore(tmp_path / "results")
    lora_1 = next(r for r in store.records() if r["method"] == "lora" and r["seed"] == 1)
    store.path(lora_1["key"]).unlink()
    partial = tmp_path / "partial.md"
    assert write_report(Sweep.load(config), store, partial, "pkt-bench report tiny.yaml", console=quiet, run=False) == []
    text = partial.read_text()
    assert "**Incomplete: 1 of 4 cells have no record yet** and are missing from the tables: probe seed 1: lora." in text
    costs = re.findall(r"\| (student|teacher|lora) \| probe \| (\d) \| ([\d.,]*) \| ([\d.,]*) \| ([\d.,]*) \| "
                       r"([\d.,]+) \| ([\d.,]+) \| ([\d.]+) \|  \| (\d*%?) \|", text)
    assert sorted((method, seed) for method, seed, *_ in costs) == [("lora", "0"), ("student", "0"), ("teacher", "0")]
    assert all(0 < float(evaluate) <= float(total) and float(rss) > 0 for *_, evaluate, total, rss, _ in costs)
    # the references have no student to compare with; lora's fine-tuned outputs are compared item by item
    shares = {method: same for method, *_, same in costs}
    assert shares["student"] == shares["teacher"] == "" and re.fullmatch(r"\d+%", shares["lora"])
    assert "0 run for this report and 3 reused" in text and not store.path(lora_1["key"]).exists()
    assert "| lora | " in text  # seed 0 is in the table


def test_missing_methods_fail_with_one_list_and_write_nothing(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(TINY.replace("methods: [student, lora]", "methods: [student, lora, laten9, distil9]"))
    out = tmp_path / "report.md"
    with pytest.raises(UserError, match="methods not registered: distil9, laten9"):
        write_report(Sweep.load(config), ResultStore(tmp_path / "results"), out, "x")
    assert not out.exists() and not (tmp_path / "results").exists()


def test_report_section_errors_name_the_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(TINY.replace("kind: small_and_unstable", "kind: smallish"))
    with pytest.raises(UserError, match=r"bad.yaml:20: claim kind must be one of"):
        ReportConfig.from_sweep(Sweep.load(config))
    config.write_text(TINY.replace("  notes: |\n    Weights: the pico pair, built in-process.\n", "  notes: [a, b]\n"))
    with pytest.raises(UserError, match=r"bad.yaml:\d+: report 'notes' must be a markdown string"):
        ReportConfig.from_sweep(Sweep.load(config))


def _record(method, teacher, student, seed, right):
    items = [{"id": str(i), "exact_match": float(i < right)} for i in range(50)]
    return {"cell": {"method": method, "task": "probe", "seed": seed, "teacher": teacher, "student": student},
            "method": method, "task": "probe", "seed": seed, "teacher": teacher, "student": student,
            "metrics": {"exact_match": right / 50}, "primary_metric": "exact_match", "items": items,
            "evaluation": {"chance": 0.025}, "wall_s": 1.0}


def test_the_pairs_section_has_methods_by_rung_with_deltas_and_a_plot(tmp_path):
    from pkt_bench.report import _ladder_section

    records = [_record(m, t, s, seed, right) for seed in (0, 1)
               for (t, s, m, right) in [("pico-kin-teacher", "pico-kin-same", "lora", 1),
                                        ("pico-kin-teacher", "pico-kin-same", "graft", 30),
                                        ("pico-teacher", "pico-student", "lora", 1)]]
    text = _ladder_section(records, "lora", tmp_path / "figs", tmp_path)
    assert "| method | pico-kin-same | pico |" in text and "(chance 0.025)" in text and "2.0 min of cell" not in text
    assert "| graft | 0.600 [" in text and "Δ +0.58*" in text and "| – |" in text
    assert (tmp_path / "figs" / "pairs-probe.png").read_bytes().startswith(b"\x89PNG")


def test_the_cost_table_shows_how_much_of_the_student_a_method_left_as_it_was():
    from pkt_bench.report import _cell_costs

    student = {**_record("student", "T", "S", 0, 20), "key": "s", "references": {}}
    same = {**_record("no-op", "T", "S", 0, 20), "key": "a", "references": {"student": {"key": "s"}}}
    half = {**_record("half", "T", "S", 0, 20), "key": "b", "references": {"student": {"key": "s"}}}
    half["items"] = [dict(item, output="changed") if i % 2 else item for i, item in enumerate(half["items"])]
    orphan = {**_record("orphan", "T", "S", 0, 20), "key": "c", "references": {"student": {"key": "elsewhere"}}}
    lines = _cell_costs([student, same, half, orphan], [])
    rows = {cells[1].strip(): cells[-2].strip() for line in lines[lines.index("") + 3:] if (cells := line.split("|"))[1:]}
    # identical items at the same score are the sign of a method that changed nothing; the share says how many
    assert rows == {"student": "", "no-op": "100%", "half": "50%", "orphan": ""}


def test_warnings_name_a_baseline_below_the_student_and_a_collapsed_multiple_choice_row():
    from pkt_bench.report import _warnings

    records = [_record("student", "T", "S", 0, 30), _record("lora", "T", "S", 0, 10), _record("lora", "T", "S", 1, 12)]
    records[1]["metrics"]["top_letter_share"] = 0.93
    lines = _warnings(scores(records, baseline="lora"), records, "lora")
    assert any("lora scores below the untouched student on probe** (0.220 against 0.600)" in line for line in lines)
    assert any("lora on probe is collapsed**: one letter takes 93%" in line for line in lines)
    fine = [_record("student", "T", "S", 0, 10), _record("lora", "T", "S", 0, 30)]
    assert _warnings(scores(fine, baseline="lora"), fine, "lora") == []


def test_pairs_are_named_by_their_name_or_folder_names_never_a_path(tmp_path):
    from pkt_bench.report import _named

    config = tmp_path / "named.yaml"
    config.write_text("methods: [lora]\npairs:\n  - {teacher: /models/big, student: /models/small, name: Big -> Small}"
                      "\n  - {teacher: /models/big, student: /models/tiny}\n")
    grid = Sweep.load(config).grids[0]
    assert grid.pair_name("/models/big", "/models/small") == "Big -> Small"
    assert grid.pair_name("/models/big", "/models/tiny") == "big → tiny"
    shown = _named(_record("lora", "/models/big", "/models/tiny", 0, 3))
    assert (shown["teacher"], shown["student"]) == ("big", "tiny")
    named = [_named(_record(m, "/models/big", "/models/small", 0, 3), "Big -> Small") for m in ("lora", "sensitivity")]
    assert {r.pair for r in scores(named, baseline="lora")} == {"Big -> Small"}  # rows and findings carry the name
    assert "pair_name" not in shown
    config.write_text("methods: [lora]\npairs: [{teacher: a, student: b, label: x}]\n")
    with pytest.raises(UserError, match="optional name"):
        Sweep.load(config)


def test_a_small_gains_claim_is_also_judged_against_the_student_where_the_baseline_is_below_it():
    from pkt_bench.report import judge

    # lora damages the student (0.20 against 0.60); sensitivity loses less (0.40): +0.20 over lora, -0.20 vs student
    records = [_record("student", "T", "S", 0, 30)] + [
        _record(method, "T", "S", seed, right) for seed in (0, 1) for method, right in (("lora", 10), ("sensitivity", 20))]
    config = ReportConfig("t", "lora", claims=[BEATS, SMALL])
    beats, small = judge(config, scores(records, baseline="lora"), records)
    assert [f.task for f in beats] == ["probe"]  # a claim against lora is judged against lora only
    assert sorted(f.task for f in small) == ["probe", "probe vs student"]
    against = next(f for f in small if f.task == "probe vs student")
    assert against.score.delta == pytest.approx(-0.2) and against.score.baseline == "student"
    assert against.verdict == "partly supported"  # small (no gain at all) but stable: the rule's "partly"
    assert "(a loss, not a gain: threshold 0.05)" in against.why  # -0.20 is no gain, but not a "small" change
    healthy = [_record("student", "T", "S", 0, 5)] + records[1:]
    assert [f.task for f in judge(config, scores(healthy, baseline="lora"), healthy)[1]] == ["probe"]


@pytest.mark.parametrize("delta, size", [(0.049, "small"), (-0.05, "small"), (-0.051, "a loss, not a gain"),
                                         (0.051, "not small")])
def test_the_small_gains_evidence_tells_a_small_change_from_a_loss(delta, size):
    [finding] = [f for f in check(SMALL, row("sensitivity", "gsm8k", delta, 0.3, {0: 0.5}) + SEEING, CONTROLS)
                 if f.score.pair == "T -> S"]
    assert f"({size}: threshold 0.05)" in finding.why


def test_the_report_shows_every_learning_rate_trial_and_marks_the_chosen_one():
    from pkt_bench.report import _selection_table

    selection = {"on": "validation", "examples": 50, "validation_ids": [], "winner": {"lr": 3e-4},
                 "trials": [{"lr": 1e-4, "validation_score": 0.5, "validation_loss_after": 0.71, "optimizer_steps": 16},
                            {"lr": 3e-4, "validation_score": 0.54, "validation_loss_after": 0.65, "optimizer_steps": 16},
                            {"lr": 1e-3, "validation_score": 0.54, "validation_loss_after": None,
                             "optimizer_steps": 16}]}
    lines = _selection_table([{"method": "lora", "task": "humaneval", "seed": 0,
                               "selection": {**selection, "student": {"validation_score": 0.56}}},
                              {"method": "student", "task": "humaneval", "seed": 0}])
    rows = [line for line in lines if line.startswith("| lora")]
    assert rows == ["| lora | humaneval | 0 | untouched student | 0.560 (of 50) |  |  |",
                    "| lora | humaneval | 0 | 0.0001 | 0.500 (of 50) | 0.7100 | 16 |",
                    "| lora | humaneval | 0 | **0.0003** | **0.540** (of 50) | 0.6500 | 16 |",
                    "| lora | humaneval | 0 | 0.001 | 0.540 (of 50) |  | 16 |"]
    assert _selection_table([{"method": "student", "task": "humaneval", "seed": 0}]) == []


def test_a_verdict_says_how_large_a_delta_its_items_could_have_shown():
    rows = row("sensitivity", "gsm8k", 0.02, 0.6, {0: 0.52})
    rows[0].test, rows[0].min_delta = "mcnemar", 0.1
    [found] = check(BEATS, rows)
    assert found.why.endswith("; smallest significant Δ here ±0.100")
    rows[0].min_delta = None
    [found] = check(SMALL, rows)
    assert found.why.endswith("; too few items differ for any Δ to reach significance")
    rows[0].test = "bootstrap"  # not a 0/1 metric: nothing said
    [found] = check(BEATS, rows)
    assert "significant Δ" not in found.why


def test_the_cost_table_has_a_column_for_every_stage_a_record_timed():
    from pkt_bench.report import _cell_costs

    selected = {**_record("lora", "T", "S", 0, 20), "key": "l", "references": {}, "wall_s": 60.0,
                "stages": {"extract": None, "transfer": {"wall_s": 10.0}, "fine-tune": {"wall_s": 30.0},
                           "select": {"wall_s": 15.0}, "evaluate": {"wall_s": 5.0}}}
    lines = _cell_costs([selected], [])
    header = next(line for line in lines if line.startswith("| method"))
    assert header.startswith("| method | task | seed | extract | transfer | fine-tune | evaluate | select | total s")
    row = next(line for line in lines if line.startswith("| lora"))
    assert row.startswith("| lora | probe | 0 |  | 10.0 | 30.0 | 5.0 | 15.0 | 60.0 |")
