"""Transfer data as a factor (gold / teacher / self) and prompt parity between training and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import DATA, NO_DATA, tiny_model

from pkt_bench import transferdata
from pkt_bench.api import Example, UserError
from pkt_bench.context import RunContext
from pkt_bench.formats import render
from pkt_bench.models import ModelPair
from pkt_bench.spec import Budget
from pkt_bench.stages import StageMeter


class Marked:
    """A task whose train prompts are "q0".."q39" with gold answer "a<i>"; `check` compares exactly."""

    version = "1"

    def __init__(self, n: int = 40):
        self.pool = [Example(f"q{i}", f"a{i}", f"train:{i}") for i in range(n)]

    def transfer_data(self, role):
        return self.pool if role == "train" else []

    def check(self, example, completion):
        return completion == example.response


class Scripted:
    """A generator that answers prompt "q<i>" right when `right(i)`, and records every batch it was asked."""

    name = "hf"

    def __init__(self, right):
        self.right, self.batches = right, []

    def generate(self, prompts, *, max_new_tokens, stop=()):
        self.batches.append(list(prompts))
        return [f"a{p[1:]}" if self.right(int(p[1:])) else "wrong" for p in prompts]


class Target:
    def __init__(self, generator):
        self._generator = generator

    def generator(self):
        return self._generator

    def close(self):
        pass


def context(tmp_path, pico_pair, task, source, seed=0):
    pair = ModelPair.resolve("pico-teacher", "pico-student", "cpu", "float32")
    return RunContext(pair, task, Budget(examples=10), seed, tmp_path / f"work{seed}", StageMeter(),
                           task_name="marked", cache_dir=tmp_path / "cache", transfer_format="task",
                           transfer_data=source)


def test_generated_data_keep_only_correct_answers_and_draw_further_prompts(tmp_path, pico_pair, monkeypatch):
    generator = Scripted(right=lambda i: i % 3 == 0)  # prompts 0, 3, 6, ...: a third are right
    monkeypatch.setattr("pkt_bench.evaluate.make_target", lambda *a, **k: Target(generator))
    ctx = context(tmp_path, pico_pair, Marked(), "teacher")
    examples = ctx.examples("train", 10)
    # the first ten right ones in the role's order: q0, q3, ..., q27; the 30 prompts q0..q29 suffice, and the
    # rounds asked for more than that (10 at first, then more by the share kept), never a prompt twice
    assert [e.prompt for e in examples] == [f"q{i}" for i in range(0, 30, 3)]
    assert [e.response for e in examples] == [f"a{i}" for i in range(0, 30, 3)]
    asked = [p for batch in generator.batches for p in batch]
    assert len(asked) == len(set(asked)) and asked == [f"q{i}" for i in range(len(asked))]
    assert len(generator.batches) >= 2 and len(asked) >= 30
    assert ctx.data["source"] == "teacher" and ctx.data["kept"] == 10 and ctx.data["wanted"] == 10
    assert ctx.data["tried"] == len(asked)
    assert ctx.costs["teacher_forward"] == len(asked)


def test_generated_data_are_built_once_for_every_seed_and_method(tmp_path, pico_pair, monkeypatch):
    generator = Scripted(right=lambda i: i % 2 == 0)
    monkeypatch.setattr("pkt_bench.evaluate.make_target", lambda *a, **k: Target(generator))
    first = context(tmp_path, pico_pair, Marked(), "self", seed=0).examples("train", 10)
    calls = len(generator.batches)
    again = context(tmp_path, pico_pair, Marked(), "self", seed=1)
    assert again.examples("train", 10) == first and len(generator.batches) == calls  # reused, not regenerated
    assert again.costs["reused"] == 1 and again.costs["student_forward"] > 0  # the cost is stated again
    assert again.data["hash"] == transferdata.record("self", first, tried=0)["hash"]
    other = context(tmp_path, pico_pair, Marked(), "teacher", seed=1)  # another source: its own data
    other.examples("train", 10)
    assert len(generator.batches) > calls
    assert len(list((tmp_path / "cache").glob("transfer-data-*"))) == 2


def test_two_methods_and_two_seeds_train_on_one_generated_set(tmp_path, pico_pair):
    from pkt_bench.runner import run
    from pkt_bench.spec import RunSpec
    from pkt_bench.store import ResultStore

    store = ResultStore(tmp_path / "results")
    records = [run(RunSpec(method=method, seed=seed, transfer_data="teacher", references=False,
                           budget=Budget(examples=24, epochs=1, batch_size=8)), store)[-1].record
               for method, seed in (("lora", 0), ("pissa", 0), ("lora", 1))]
    assert len(list(store.cache_dir.glob("transfer-data-*"))) == 1
    assert len({r["transfer_data"]["hash"] for r in records}) == 1
    assert all(r["transfer_data"]["source"] == "teacher" and r["transfer_data"]["kept"] == 24 for r in records)
    assert [r["costs"].get("reused", 0) for r in records] == [0, 1, 1]
    assert all(r["costs"]["teacher_forward"] == records[0]["transfer_data"]["tried"] for r in records)
    assert len({r["key"] for r in records}) == 3 and all(r["cell"]["transfer_data"] == "teacher" for r in records)


def test_too_few_correct_answers_train_on_what_there_is_and_say_so(tmp_path, pico_pair, monkeypatch, capsys):
    generator = Scripted(right=lambda i: i in (5, 7))
    monkeypatch.setattr("pkt_bench.evaluate.make_target", lambda *a, **k: Target(generator))
    ctx = context(tmp_path, pico_pair, Marked(12), "teacher")
    assert [e.id for e in ctx.examples("train", 10)] == ["train:5", "train:7"]
    assert ctx.data["tried"] == 12 and ctx.data["kept"] == 2
    assert "only 2 of 12 train prompts" in capsys.readouterr().err


def test_no_correct_answer_at_all_is_a_clear_error(tmp_path, pico_pair, monkeypatch):
    monkeypatch.setattr("pkt_bench.evaluate.make_target", lambda *a, **k: Target(Scripted(right=lambda i: False)))
    with pytest.raises(UserError, match="none of the student's answers to 12 train prompts"):
        context(tmp_path, pico_pair, Marked(12), "self").examples("train", 10)


def test_gold_records_its_sample_and_a_hash_that_changes_with_the_answers(tmp_path, pico_pair):
    ctx = context(tmp_path, pico_pair, Marked(), "gold", seed=3)
    examples = ctx.examples("train", 5)
    assert ctx.data == transferdata.record("gold", examples, tried=5)
    changed = [Example(e.prompt, e.response + "!", e.id) for e in examples]
    assert transferdata.record("gold", changed, tried=5)["hash"] != ctx.data["hash"]


def test_unknown_source_and_a_task_without_a_scorer_stop_before_running():
    with pytest.raises(UserError, match="transfer_data must be one of gold, teacher, self"):
        transferdata.check_source("teachers", Marked(), "marked")

    class NoScorer:
        pass

    with pytest.raises(UserError, match="no scorer for generated answers"):
        transferdata.check_source("self", NoScorer(), "plain")
    transferdata.check_source("gold", NoScorer(), "plain")


def test_cli_refuses_a_bad_source_and_distill_with_generated_data(tmp_path):
    from helpers import cli

    done = cli("run", "--method", "lora", "--transfer-data", "students", "--results", str(tmp_path))
    assert done.returncode == 2 and "--transfer-data must be one of gold, teacher, self" in done.stderr
    done = cli("run", "--method", "distill", "--transfer-data", "teacher", "--results", str(tmp_path))
    assert done.returncode == 2 and "writes its own training answers" in done.stderr


def test_the_source_is_in_fine_tuning_cells_keys_only(pico_pair):
    from pkt_bench.runner import plan
    from pkt_bench.spec import RunSpec

    def key(method, source):
        return plan(RunSpec(method=method, transfer_data=source))[0].describe()

    assert key("lora", "teacher")["transfer_data"] == "teacher"
    assert "transfer_data" not in key("lora", "gold")  # absent for gold: keys made before the factor hold
    assert "transfer_data" not in key("student", "teacher")


def test_code_answers_are_judged_by_running_their_tests():
    from pkt_bench.registry import TASKS, make_task

    if not DATA.is_dir():
        pytest.skip(NO_DATA)
    for name in ("humaneval", "mbpp"):
        task = make_task(TASKS.get(name), str(DATA), {"chat_template": True}, allow_code_execution=True)
        examples = task.transfer_data("train")[:3]
        gold = [e.chat[1].split("```python\n", 1)[1] if name == "mbpp" else e.response for e in examples]
        assert transferdata.judge(task, examples, gold) == [True] * 3, name
        wrong = ["    return None\n```" if name == "humaneval" else "```python\ndef f():\n    pass\n```"] * 3
        assert transferdata.judge(task, examples, wrong) == [False] * 3, name


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.mark.skipif(not DATA.is_dir(), reason=NO_DATA)
@pytest.mark.parametrize("name", ["gsm8k-0shot", "gsm8k", "humaneval", "mbpp", "mmlu"])
def test_transfer_prompts_in_the_chat_format_are_the_chat_evaluations_prompts(name, tmp_path):
    """The prompt the evaluation really sent for its first test item (a tiny model through lm-eval), with that
    item's text swapped for a transfer example's, is the transfer example's prompt."""
    from helpers import qwen2_tokenizer

    from pkt_bench.api import Artifact
    from pkt_bench.evaluate import make_target
    from pkt_bench.registry import TASKS, make_task

    tokenizer = qwen2_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    model = tiny_model("qwen2", 1, 32, 2, 1, 16, tokenizer, tmp_path / "tiny")
    task = make_task(TASKS.get(name), str(DATA), {"chat_template": True}, allow_code_execution=True)
    target = make_target(Artifact(kind="model", path=str(model)), "hf", "cpu", "float32", 1)
    try:
        sent = task.evaluate(target, 1).details["example_prompt"]
    finally:
        target.close()
    lm_task, test_doc = task._chat_task, task.docs("test")[0]
    example = task.transfer_data("train")[0]
    expected = sent.replace(lm_task.doc_to_text(test_doc), lm_task.doc_to_text(example.doc))
    expected = expected.replace(task.chat_prefix(test_doc).strip(), task.chat_prefix(example.doc).strip())
    assert expected != sent
    rendered = render(example, "chat_template", tokenizer, task)
    assert rendered.prompt == expected
    if name == "gsm8k-0shot":  # the instruction is the system turn, as at evaluation, not in the user turn
        assert rendered.prompt.startswith("<|system|>\nAnswer the following question.")
    answer = (example.chat[1] if example.chat else example.response).strip()
    assert (rendered.prompt + rendered.response).endswith(answer)  # the answer's opening is not written twice
    assert not rendered.response.startswith(task.chat_prefix(example.doc).strip() or "\0")


# -- learning-rate selection on the validation split ---------------------------------------------------------------

def _probe_with_validation():
    """The probe with its last 12 transfer facts kept apart as a validation split (registered once)."""
    from pkt_bench.registry import TASKS, register_task
    from pkt_bench.tasks.probe import Probe

    if "probe-val" not in TASKS.names():
        @register_task("probe-val")
        class ProbeVal(Probe):
            description = "the probe with a validation split (tests)"

            def transfer_data(self, role):
                return super().transfer_data(role)[:-12]

            def validation_data(self):
                return super().transfer_data("train")[-12:]


def test_selection_gives_every_method_the_same_trials_and_evaluates_the_best(tmp_path, pico_pair, monkeypatch):
    from pkt_bench import selection
    from pkt_bench.runner import run
    from pkt_bench.spec import RunSpec
    from pkt_bench.store import ResultStore

    _probe_with_validation()
    scored = []
    real = selection.validation_score

    def spy(ctx, artifact, examples, batch, engine):
        score, ids = real(ctx, artifact, examples, batch, engine)
        scored.append((ctx.budget.lr, score, artifact.path))
        return score, ids

    monkeypatch.setattr(selection, "validation_score", spy)
    select = {"lr": [1.0e-5, 3.0e-3, 3.0e-2], "on": "validation", "examples": 10}
    records = {}
    for method in ("lora", "pissa"):
        spec = RunSpec(method=method, tasks=["probe-val"], select=select, references=False,
                       budget=Budget(examples=48, epochs=2, batch_size=8))
        records[method] = run(spec, ResultStore(tmp_path / "results"))[-1].record
    for method, record in records.items():
        chosen = record["selection"]
        assert [t["lr"] for t in chosen["trials"]] == select["lr"]  # the same trials for every method
        assert chosen["examples"] == 10 and len(chosen["validation_ids"]) == 10
        best = max(chosen["trials"], key=lambda t: t["validation_score"])
        assert chosen["winner"]["lr"] == best["lr"] == record["budget"]["lr"]
        assert [s["lr"] for s in record["fine_tune"]] == select["lr"]  # every trial's training is recorded
        assert record["costs"]["optimizer_steps"] == 3 * record["fine_tune"][0]["optimizer_steps"]
        assert record["cell"]["select"] == select
    assert records["lora"]["selection"]["validation_ids"] == records["pissa"]["selection"]["validation_ids"]
    student = [score for _, score, path in scored if Path(path) == pico_pair / "student"]
    assert len(student) == 1  # the untouched student, scored once and shared by both cells through the cache
    assert all(r["selection"]["student"] == {"validation_score": student[0]} for r in records.values())
    assert len(scored) == 7 and len({path for *_, path in scored}) == 7  # one artifact per trial, and the student
    from pkt_bench.registry import TASKS, make_task

    validation = make_task(TASKS.get("probe-val"), None, {}, False).validation_data()
    assert records["lora"]["selection"]["validation_ids"] == [e.id for e in validation][:10]


def test_each_selection_trial_gets_a_workdir_that_exists(tmp_path, pico_pair):
    """A method may write beside its artifact before anything else (sensitivity copies its selection there): each
    trial's workdir must exist as the cell's does (the real-pair grid failed on it)."""
    from dataclasses import dataclass

    from pkt_bench.api import Artifact
    from pkt_bench.registry import METHODS, register_method
    from pkt_bench.runner import run
    from pkt_bench.spec import RunSpec
    from pkt_bench.store import ResultStore

    _probe_with_validation()
    if "writes-first" not in METHODS.names():
        @dataclass
        class Options:
            pass

        @register_method("writes-first")
        class WritesFirst:
            """Writes a note into its workdir, then hands over the student (tests)."""

            description = "test plugin"
            reference = ""
            Config = Options
            fine_tunes = True

            def __init__(self, config):
                pass

            def transfer(self, ctx):
                (ctx.workdir / "note.json").write_text("{}")
                return Artifact(kind="model", path=ctx.pair.student.path)

    spec = RunSpec(method="writes-first", tasks=["probe-val"], references=False,
                   select={"lr": [1.0e-4, 3.0e-4], "on": "validation", "examples": 4})
    record = run(spec, ResultStore(tmp_path / "results"))[-1].record
    assert [t["lr"] for t in record["selection"]["trials"]] == [1.0e-4, 3.0e-4]


def test_selection_input_errors_name_what_is_wrong():
    from pkt_bench.spec import RunSpec

    for bad, message in (({"lr": []}, "distinct positive learning rates"), ({"lr": [1e-4, 1e-4]}, "distinct"),
                         ({"lr": [1e-4], "on": "test"}, "must be validation"), ({"lr": [1e-4], "examples": 0},
                                                                                 "positive integer"),
                         ({"lr": [1e-4], "metric": "loss"}, "takes lr:, on: and examples:")):
        with pytest.raises(UserError, match=message):
            RunSpec.from_dict({"select": bad})

    assert RunSpec.from_dict({"select": {True: "validation", "lr": [1e-4]}}).select["on"] == "validation"  # YAML 1.1 `on:`
    with pytest.raises(UserError, match="no validation split"):
        from pkt_bench.runner import plan

        plan(RunSpec(method="lora", select={"lr": [1e-4]}))  # the probe has none


@pytest.mark.skipif(not DATA.is_dir(), reason=NO_DATA)
@pytest.mark.parametrize("name", ["gsm8k-0shot", "humaneval", "mbpp", "mmlu"])
def test_validation_splits_are_disjoint_from_every_role_and_the_test_items(name):
    from pkt_bench.registry import TASKS, make_task

    task = make_task(TASKS.get(name), str(DATA), {}, allow_code_execution=True)
    validation = task.validation_data()
    assert len(validation) >= 50
    roles = {e.id for role in ("seed", "align", "train") for e in task.transfer_data(role)}
    assert not roles & {e.id for e in validation}
    assert not task.leaked(validation)
    prompts = {e.prompt for role in ("seed", "align", "train") for e in task.transfer_data(role)}
    assert not prompts & {e.prompt for e in validation}
