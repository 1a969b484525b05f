"""MBPP through lm-eval and the sandbox: the reference code passes (a fixed subset here, all 500 in
benchmarks/mbpp_reference.py), wrong code fails, the paper's 3-shot prompt, and transfer data."""

from __future__ import annotations

import json

import pytest
from helpers import DATA, NO_DATA, REPO, cli

from pkt_bench.api import UserError

LATEN = REPO.parent / "shared" / "data" / "laten_splits"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=NO_DATA)
SUBSET = 100


def problems():
    return [json.loads(line) for line in (DATA / "mbpp" / "mbpp.jsonl").read_text().splitlines()]


def task(**options):
    from pkt_bench.registry import TASKS, make_task

    return make_task(TASKS.get("mbpp"), str(DATA), options, allow_code_execution=True)


def test_reference_code_passes_the_first_100_test_problems_through_the_cli(tmp_path):
    test = [p for p in problems() if 11 <= p["task_id"] <= 510]
    path = tmp_path / "ref.jsonl"
    path.write_text("".join(json.dumps({"id": p["task_id"], "completion": p["code"]}) + "\n" for p in test))
    done = cli("score", "--task", "mbpp", "--predictions", str(path), "--data-dir", str(DATA),
               "--allow-code-execution", "--limit", str(SUBSET))
    assert done.returncode == 0, done.stderr
    scored = json.loads(done.stdout)
    assert scored["metrics"] == {"pass@1": 1.0} and scored["limit"] == SUBSET
    assert [item["id"] for item in scored["items"]] == [str(i) for i in range(11, 11 + SUBSET)]


def test_wrong_code_fails_and_the_prompt_is_the_papers_3_shot(tmp_path):
    mbpp = task()
    test = mbpp.docs("test")
    path = tmp_path / "wrong.jsonl"
    path.write_text("".join(json.dumps({"id": d["task_id"], "completion": d["code"].replace("return", "return None #")})
                            + "\n" for d in test[:20]))
    result = mbpp.score(path, limit=20)
    assert result.metrics == {"pass@1": 0.0}
    prompt = result.details["example_prompt"]
    exemplars = {p["task_id"]: p for p in problems() if p["task_id"] in (2, 3, 4)}
    assert prompt.startswith(f"You are an expert Python programmer, and here is your task: {exemplars[2]['text']} "
                             f"Your code should pass these tests:\n\n")
    assert [prompt.find(exemplars[i]["code"] + "\n[DONE]\n\n") >= 0 for i in (2, 3, 4)] == [True] * 3
    assert prompt.endswith(f"{test[0]['text']} Your code should pass these tests:\n\n" + "\n".join(test[0]["test_list"])
                           + "\n[BEGIN]\n")


def test_transfer_data_leaves_out_and_refuses_test_problems():
    mbpp = task()
    sizes = {role: len(mbpp.transfer_data(role)) for role in ("seed", "align", "train")}
    assert sizes == {"seed": 32, "align": 40, "train": 299}  # 374 train problems, 3 repeat a test problem's text
    ids = {e.id for role in ("seed", "align", "train") for e in mbpp.transfer_data(role)}
    assert not ids & {"mbpp:602", "mbpp:704", "mbpp:872"}
    if not LATEN.is_dir():
        pytest.skip(f"no LaTen splits at {LATEN}")
    laten = task(transfer_dir=str(LATEN))
    with pytest.raises(UserError, match="hold a test item"):
        for role in ("seed", "align", "train"):
            laten.transfer_data(role)
    kept = task(transfer_dir=str(LATEN), drop_test_overlap="true")
    assert sum(len(kept.transfer_data(r)) for r in ("seed", "align", "train")) == 372 - 3


def test_chat_variant_opens_a_python_block_and_runs_the_code_before_its_fence(tmp_path):
    mbpp = task(chat_template="true")
    test = mbpp.docs("test")[:3]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"id": d["task_id"], "completion": d["code"] + "\n```\nAll done."}) + "\n"
                            for d in test))
    result = mbpp.score(path, limit=3)
    assert result.details["lm_eval_task"] == "pkt_mbpp_chat" and result.metrics == {"pass@1": 1.0}
    assert result.details["example_prompt"].endswith("\n".join(test[0]["test_list"]) + "\n\n\n```python\n")


def test_chat_transfer_answers_are_what_the_chat_evaluation_prompts_for_and_runs(tmp_path):
    """In a chat the transfer data are the chat evaluation's user turn answered with the code in a Python block;
    the code after the evaluation's opening fence, up to the closing one it stops at, passes the asserts."""
    from pkt_bench.formats import render

    mbpp = task(chat_template="true")
    for example in mbpp.transfer_data("train")[:20]:
        chat = render(example, "paper")
        assert "[DONE]" not in chat.response and chat.response.startswith("```python\n")
        assert chat.response.rstrip().endswith("```") and chat.prompt.startswith("<|user|>\nYou are an expert")
    test = mbpp.docs("test")[:3]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"id": d["task_id"], "completion": mbpp.utils.chat_answer(d)
                                        .removeprefix("```python\n")}) + "\n" for d in test))
    result = mbpp.score(path, limit=3)
    assert result.metrics == {"pass@1": 1.0}
    assert result.details["example_prompt"].count(mbpp.utils.chat_prompt(test[0])) == 1


def test_code_tasks_key_their_transfer_data_but_not_their_references(tiny_models):
    from pkt_bench.runner import plan
    from pkt_bench.spec import RunSpec

    def cell(method, name):
        spec = RunSpec(method=method, teacher=str(tiny_models["qwen2-teacher"]),
                       student=str(tiny_models["qwen2-student"]), tasks=[name], data_dir=str(DATA),
                       allow_code_execution=True, fit_context=True)
        return plan(spec)[0].describe()

    for name, version in (("mbpp", "2"), ("humaneval", "3")):
        assert cell("lora", name)["transfer_version"] == version
        assert "transfer_version" not in cell("student", name)
