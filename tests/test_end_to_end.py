"""The embedded default, through the command line, as a newcomer runs it."""

import json
import re

import pytest
from helpers import REPO, cli, tree_digest

from pkt_bench.spec import Budget
from pkt_bench.tasks.probe import Probe


def records(results):
    return {r["method"]: r for r in (json.loads(p.read_text()) for p in (results / "records").glob("*.json"))}


@pytest.fixture(scope="module")
def default_run(pico_pair, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    done = cli("run", "--method", "lora", "--results", str(results))
    assert done.returncode == 0, done.stderr
    return results, done


def test_default_run_plants_knowledge_only_in_the_teacher(default_run):
    results, done = default_run
    stored = records(results)
    assert set(stored) == {"student", "teacher", "lora"}
    assert stored["teacher"]["metrics"]["exact_match"] >= 0.9
    assert stored["student"]["metrics"]["exact_match"] <= 2 * stored["student"]["evaluation"]["chance"]
    assert all(r["evaluation"]["chance"] == 1 / Probe().config.values_per_relation for r in stored.values())
    held_out = [item["id"] for item in stored["teacher"]["items"]]
    assert len(held_out) == len(Probe().world.held_out)
    assert all([i["id"] for i in r["items"]] == held_out for r in stored.values())  # the same facts for all
    assert "method lora on probe" in done.stderr and "pico-teacher -> student pico-student" in done.stderr


def test_record_holds_references_budget_costs_stages_and_environment(default_run):
    results, _ = default_run
    lora = records(results)["lora"]
    for name in ("student", "teacher"):
        reference = records(results)[name]
        assert lora["references"][name] == {"key": reference["key"], "primary_metric": "exact_match",
                                            "score": reference["metrics"]["exact_match"]}
    n_train = len(Probe().transfer_data("train"))
    # every field, but one added later (schedule) stays out of keys at its default, so older records hold
    assert "schedule" not in lora["cell"]["budget"]
    assert {**lora["cell"]["budget"], "schedule": "linear"} == Budget().__dict__
    assert lora["costs"] == {"examples_seen": 3 * n_train, "optimizer_steps": Budget().optimizer_steps(n_train)}
    assert set(lora["stages"]) == {"extract", "transfer", "fine-tune", "evaluate"}
    assert lora["stages"]["extract"] is None and lora["stages"]["fine-tune"]["wall_s"] > 0
    assert lora["stages"]["fine-tune"]["peak_rss_mb"] > 50
    assert lora["environment"]["versions"]["torch"] and lora["environment"]["hardware"]["cpu_count"]
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", lora["environment"]["git_commit"] or "0" * 40)
    assert (results / "records" / f"{lora['key']}.json").exists()
    assert (results / "artifacts" / lora["key"] / "adapter" / "adapter_config.json").exists()
    assert "budget" not in records(results)["teacher"]["cell"]


def test_second_run_skips_and_force_reruns_only_the_asked_cell(default_run):
    results, _ = default_run
    before = tree_digest(results)
    again = cli("run", "--method", "lora", "--results", str(results))
    assert again.returncode == 0 and again.stderr.count("record exists, skipped") == 3
    assert tree_digest(results) == before
    lora_before = records(results)["lora"]
    forced = cli("run", "--method", "lora", "--results", str(results), "--force")
    assert forced.returncode == 0 and forced.stderr.count("record exists, skipped") == 2
    lora_after = records(results)["lora"]
    assert lora_after["key"] == lora_before["key"] and lora_after["created_at"] >= lora_before["created_at"]
    assert lora_after["metrics"] == lora_before["metrics"]  # seeded: the rerun reproduces the result
    assert not list((results / "records").glob(".*.tmp")) and not list((results / "artifacts").glob("*.partial"))


def test_leaderboard_formats_from_stored_records(default_run):
    results, _ = default_run
    rows = json.loads(cli("leaderboard", "--results", str(results), "--format", "json").stdout)
    by_method = {row["method"]: row for row in rows}
    stored = records(results)
    assert set(by_method) == {"student", "teacher", "lora"}
    assert all(by_method[m]["mean"] == stored[m]["metrics"]["exact_match"] for m in by_method)
    assert by_method["teacher"]["best"]
    md = cli("leaderboard", "--results", str(results), "--format", "md").stdout
    assert f"**{stored['teacher']['metrics']['exact_match']:.3f}**" in md
    table = cli("leaderboard", "--results", str(results), env={"COLUMNS": "160"}).stdout
    assert "probe (exact_match)" in table and "teacher" in table
    assert cli("leaderboard", "--results", str(results), "--task", "mmlu").stdout == ""


def test_example_plugin_from_the_readme_runs_end_to_end(default_run):
    results, _ = default_run
    example = (REPO / "examples" / "attention_lora.py").read_text()
    assert example in (REPO / "README.md").read_text()  # the README shows exactly the file we run
    done = cli("run", "--plugin", "examples/attention_lora.py", "--method", "attention-lora", "-o", "rank=4",
               "--results", str(results))
    assert done.returncode == 0, done.stderr
    record = records(results)["attention-lora"]
    config = json.loads((results / "artifacts" / record["key"] / "adapter" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"} and config["r"] == 4
    assert record["costs"]["optimizer_steps"] == records(results)["lora"]["costs"]["optimizer_steps"]
