"""GSM8K through lm-eval: open-instruct's prompt and answer rule, gold and wrong answers through `pkt-bench score`,
transfer data without test items, bad prediction files, and the pico pair end to end."""

from __future__ import annotations

import json

import pytest
from helpers import DATA, NO_DATA, REPO, cli

from pkt_bench.api import UserError

LATEN = REPO.parent / "shared" / "data" / "laten_splits"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=NO_DATA)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def gsm8k():
    from pkt_bench.registry import TASKS, make_task

    return make_task(TASKS.get("gsm8k"), str(DATA), {})


def gold(doc):
    return doc["answer"].split("####")[-1].strip()


def test_gold_answers_score_one_through_the_cli(gsm8k, tmp_path):
    docs = gsm8k.docs("test")
    rows = [{"id": i, "completion": f" Some steps. So the answer is {gold(doc)}."} for i, doc in enumerate(docs)]
    done = cli("score", "--task", "gsm8k", "--predictions", str(write_jsonl(tmp_path / "gold.jsonl", rows)),
               "--data-dir", str(DATA))
    assert done.returncode == 0, done.stderr
    scored = json.loads(done.stdout)
    assert scored["metrics"] == {"exact_match": 1.0} and len(scored["items"]) == len(docs) == 1319
    assert any("," in gold(doc) for doc in docs)  # thousands separators were on the path and matched
    assert scored["items"][0] == {"id": "0", "target": "18", "output": " Some steps. So the answer is 18.",
                                  "extracted": "18", "exact_match": 1.0}


def test_wrong_answers_score_zero_with_the_8_shot_prompt_of_open_instruct(gsm8k, tmp_path):
    docs = gsm8k.docs("test")
    rows = [{"id": i, "completion": f" So the answer is {int(float(gold(d).replace(',', ''))) + 1}."}
            for i, d in enumerate(docs)]
    result = gsm8k.score(write_jsonl(tmp_path / "wrong.jsonl", rows))
    assert result.metrics == {"exact_match": 0.0}
    prompt = result.details["example_prompt"]
    assert prompt.startswith("Answer the following questions.\n\nQuestion: There are 15 trees in the grove.")
    assert prompt.count("\nAnswer:") == 9 and prompt.count("So the answer is") == 8
    assert prompt.endswith(f"So the answer is 8.\n\nQuestion: {docs[0]['question'].strip()}\nAnswer:")
    assert result.details["generation_kwargs"] == {"until": ["\n"], "max_gen_toks": 512, "do_sample": False}


def test_zero_shot_preset_prompt(tmp_path):
    from pkt_bench.registry import TASKS, make_task

    task = make_task(TASKS.get("gsm8k-0shot"), str(DATA), {})
    assert task.config.num_fewshot == 0
    question = task.docs("test")[0]["question"].strip()
    result = task.score(write_jsonl(tmp_path / "p.jsonl", [{"id": i, "completion": "1"} for i in range(2)]), limit=2)
    assert result.details["example_prompt"] == f"Answer the following question.\n\nQuestion: {question}\nAnswer:"
    assert len(result.items) == 2


def test_last_number_rule_of_open_instruct():
    from pkt_bench.tasks.gsm8k import utils

    assert utils.last_number("5 + 4 = 9 apples, 1,234 pears. So the answer is 1,234.") == "1234"
    assert utils.last_number("It costs 3.50 dollars") == "3.50"
    assert utils.last_number("no number here") == "no number here"
    assert utils.target({"answer": "steps\n#### 70,000"}) == "70000"


def test_transfer_data_sampled_from_train_and_from_laten_splits(gsm8k, tmp_path):
    roles = {role: gsm8k.transfer_data(role) for role in ("seed", "align", "train")}
    assert {role: len(examples) for role, examples in roles.items()} == {"seed": 20, "align": 80, "train": 1000}
    ids = [e.id for examples in roles.values() for e in examples]
    assert len(set(ids)) == 1100 and all(i.startswith("train:") for i in ids)
    example = roles["train"][0]
    assert example.prompt.startswith("Answer the following question.\n\nQuestion: ") and example.prompt.endswith("\nAnswer:")
    assert example.response.startswith(" ") and "<<" not in example.response and "So the answer is" in example.response
    assert gsm8k.transfer_data("seed") == roles["seed"]  # fixed, whatever the run

    if not LATEN.is_dir():
        pytest.skip(f"no LaTen splits at {LATEN}")
    from pkt_bench.registry import TASKS, make_task

    laten = make_task(TASKS.get("gsm8k"), str(DATA), {"transfer_dir": str(LATEN)})
    assert [len(laten.transfer_data(r)) for r in ("seed", "align", "train")] == [20, 80, 1000]
    first = laten.transfer_data("seed")[0]
    assert first.id == "gsm_5238" and first.prompt.endswith("\nAnswer:") and not first.response.startswith("Answer:")

    leaky = tmp_path / "gsm"
    leaky.mkdir()
    for role in ("extract", "align", "train"):
        (leaky / f"gsm_{role}_split.jsonl").write_text((LATEN / "gsm" / f"gsm_{role}_split.jsonl").read_text())
    question = gsm8k.docs("test")[3]["question"]
    with (leaky / "gsm_align_split.jsonl").open("a") as out:
        out.write(json.dumps({"id": "planted", "messages": [
            {"role": "user", "content": f"Answer the following question.\n\nQuestion: {question}"},
            {"role": "assistant", "content": "Answer: So the answer is 1."}]}) + "\n")
    planted = make_task(TASKS.get("gsm8k"), str(DATA), {"transfer_dir": str(tmp_path)})
    with pytest.raises(UserError, match="1 align example.*first 'planted'.*drop_test_overlap"):
        planted.transfer_data("align")
    dropped = make_task(TASKS.get("gsm8k"), str(DATA), {"transfer_dir": str(tmp_path), "drop_test_overlap": "true"})
    assert len(dropped.transfer_data("align")) == 80


@pytest.mark.parametrize("lines, message", [
    (['{"completion": "1"}'], r"p.jsonl:1: no \"id\""),
    (['{"id": 0, "completion": "1"}', '{"id": 5000, "completion": "1"}'], "p.jsonl:2: unknown id 5000"),
    (['{"id": 0, "completion": "1"}', '{"id": 1, "completion": '], "p.jsonl:2: malformed line"),
    (['{"id": 0, "completion": "1"}', '{"id": 0, "completion": "2"}'], "p.jsonl:2: id 0 appears twice"),
    (['{"id": 0, "completion": "1"}'], "no completion for 1 of 2 items, first id '1'"),
])
def test_bad_prediction_files_are_named_with_their_line(gsm8k, tmp_path, lines, message):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=message):
        gsm8k.score(path, limit=2)


def test_bad_input_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"id": 0, "completion": "1"}\nnot json\n')
    done = cli("score", "--task", "gsm8k", "--predictions", str(bad), "--data-dir", str(DATA))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [f"pkt-bench: error: {bad}:2: malformed line, not JSON "
                                                f"(Expecting value)"]
    partial = tmp_path / "partial"
    (partial / "gsm8k").mkdir(parents=True)
    (partial / "gsm8k" / "test.jsonl").symlink_to(DATA / "gsm8k" / "test.jsonl")
    done = cli("score", "--task", "gsm8k", "--predictions", str(bad), "--data-dir", str(partial))
    assert done.returncode == 2 and "has no gsm8k/train.jsonl" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_pico_pair_runs_gsm8k_end_to_end(pico_pair, tmp_path):
    results = tmp_path / "results"
    done = cli("run", "--task", "gsm8k", "--limit", "5", "--data-dir", str(DATA), "--examples", "8", "--epochs", "1",
               "--fit-context", "--results", str(results))  # pico's context cannot hold the protocol: cut, as asked
    assert done.returncode == 0, done.stderr
    records = {r["method"]: r for r in (json.loads(p.read_text()) for p in (results / "records").glob("*.json"))}
    assert set(records) == {"student", "teacher", "lora"}
    for record in records.values():
        assert [item["id"] for item in record["items"]] == ["0", "1", "2", "3", "4"]
        assert record["primary_metric"] == "exact_match" and 0 <= record["metrics"]["exact_match"] <= 1
        assert record["cell"]["limit"] == 5 and record["cell"]["backend"] == "hf"
        assert record["cell"]["task_options"]["num_fewshot"] == 8 and record["cell"]["eval_batch_size"] == 16
        assert record["evaluation"]["max_gen_toks_cut_to"] == 32  # pico's 64-token context holds no 512
    assert records["lora"]["costs"]["examples_seen"] == 8


def test_distillation_hooks_check_a_completion_against_the_transfer_answer(gsm8k):
    example = gsm8k.transfer_data("seed")[0]
    answer = example.response.rsplit("So the answer is ", 1)[1].rstrip(".")
    assert gsm8k.check(example, f" Steps. So the answer is {answer}.") and not gsm8k.check(example, " So 0.")
    assert gsm8k.generation == {"max_new_tokens": 512, "stop": ["\n"]}
