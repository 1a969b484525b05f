"""MMLU through lm-eval: open-instruct's prompt (0- and 5-shot), gold and wrong letters through the scorer on all
14042 questions, item order, and transfer data that refuses LaTen's test-question repeats."""

from __future__ import annotations

import csv
import json

import pytest
from helpers import DATA, NO_DATA, REPO

from pkt_bench.api import UserError

LATEN = REPO.parent / "shared" / "data" / "laten_splits"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=NO_DATA)
LETTERS = "ABCD"


def task(name="mmlu", **options):
    from pkt_bench.registry import TASKS, make_task

    return make_task(TASKS.get(name), str(DATA), options)


def rows(subject, split):
    with (DATA / "mmlu" / split / f"{subject}_{split}.csv").open(encoding="utf-8", newline="") as f:
        return list(csv.reader(f))


def predictions(path, docs, shift):
    path.write_text("".join(json.dumps({"id": i, "completion": f"The answer is: {LETTERS[(d['answer'] + shift) % 4]}"})
                            + "\n" for i, d in enumerate(docs)))
    return path


def test_gold_letters_score_one_on_all_14042_questions(tmp_path):
    mmlu = task()
    docs = mmlu.docs("test")
    result = mmlu.score(predictions(tmp_path / "gold.jsonl", docs, 0))
    gold_share = max(sum(d["answer"] == k for d in docs) for k in range(4)) / len(docs)
    assert result.metrics == {"acc": 1.0, "top_letter_share": gold_share} and len(result.items) == len(docs) == 14042
    assert result.details["items_chosen"] == "all 14042 test items"
    first = rows("abstract_algebra", "test")[0]  # sorted subject order, then file order
    assert result.items[0] == {"id": "0", "target": first[5], "prediction": first[5],
                               "loglikelihoods": [0.0 if L == first[5] else -1e9 for L in LETTERS], "acc": 1.0}
    assert result.details["example_prompt"] == (
        "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
        f"{first[0]}\nA. {first[1]}\nB. {first[2]}\nC. {first[3]}\nD. {first[4]}\nAnswer:")


def test_wrong_letters_score_zero_and_a_completion_needs_a_letter(tmp_path):
    mmlu = task()
    result = mmlu.score(predictions(tmp_path / "wrong.jsonl", mmlu.docs("test"), 1), limit=500)
    assert result.metrics["acc"] == 0.0 and len(result.items) == 500 // 57 * 57
    (tmp_path / "none.jsonl").write_text('{"id": 0, "completion": "I do not know"}\n')
    with pytest.raises(UserError, match="none.jsonl:1: no answer letter A-D"):
        mmlu.score(tmp_path / "none.jsonl", limit=1)


def test_five_shot_prompt_takes_the_subjects_first_dev_questions(tmp_path):
    mmlu = task("mmlu-5shot")
    assert mmlu.config.num_fewshot == 5
    docs = mmlu.docs("test")
    index = next(i for i, d in enumerate(docs) if d["subject"] == "anatomy")
    result = mmlu.score(predictions(tmp_path / "p.jsonl", docs, 0), limit=index + 1)
    shots = "".join(f"{r[0]}\nA. {r[1]}\nB. {r[2]}\nC. {r[3]}\nD. {r[4]}\nAnswer: {r[5]}\n\n"
                    for r in rows("anatomy", "dev")[:5])
    q = rows("anatomy", "test")[0]
    assert docs[index]["prompt"] == ("The following are multiple choice questions (with answers) about  anatomy.\n\n"
                                     f"{shots}{q[0]}\nA. {q[1]}\nB. {q[2]}\nC. {q[3]}\nD. {q[4]}\nAnswer:")
    assert result.metrics["acc"] == 1.0 and str(index) in {item["id"] for item in result.items}
    with pytest.raises(UserError, match="num_fewshot must be 0 to 5"):
        task(num_fewshot="6")


def test_transfer_data_never_holds_a_test_question():
    mmlu = task()
    sampled = [e for role in ("seed", "align", "train") for e in mmlu.transfer_data(role)]
    assert len(sampled) == 1100 and len({e.id for e in sampled}) == 1100 and not mmlu.leaked(sampled)
    assert {e.response for e in sampled} == {" A", " B", " C", " D"}
    if not LATEN.is_dir():
        pytest.skip(f"no LaTen splits at {LATEN}")
    laten = task(transfer_dir=str(LATEN))
    with pytest.raises(UserError, match=r"example\(s\) in .*mmlu hold a test item.*drop_test_overlap=true"):
        for role in ("seed", "align", "train"):
            laten.transfer_data(role)
    kept = task(transfer_dir=str(LATEN), drop_test_overlap="true")
    examples = [e for role in ("seed", "align", "train") for e in kept.transfer_data(role)]
    assert len(examples) == 1100 - 18  # LaTen's MMLU splits repeat 18 test questions (same choices)
    assert {e.response for e in examples} == {" A", " B", " C", " D"}


def test_distillation_hooks_check_the_letter():
    mmlu = task()
    example = mmlu.transfer_data("seed")[0]
    other = "A" if example.response.strip() != "A" else "B"
    assert mmlu.check(example, example.response) and not mmlu.check(example, f" {other}")


def test_chat_variant_scores_the_letter_after_the_answer_is(tmp_path):
    mmlu = task(chat_template="true")
    result = mmlu.score(predictions(tmp_path / "p.jsonl", mmlu.docs("test"), 0), limit=3)
    assert result.metrics["acc"] == 1.0 and result.details["lm_eval_task"] == "pkt_mmlu_chat"
    assert result.details["example_prompt"].endswith("\nAnswer:\n\nThe answer is:")  # user turn, assistant turn


def test_limit_takes_the_same_number_of_questions_from_every_subject(tmp_path):
    """--limit on mmlu is stratified: the first N // 57 questions of each subject in file order, and the record
    says so; -T stratified_limit=false gives the first N in subject order (abstract algebra first)."""
    mmlu = task()
    docs = mmlu.docs("test")
    gold = predictions(tmp_path / "gold.jsonl", docs, 0)
    result = mmlu.score(gold, limit=1000)
    subjects = sorted({d["subject"] for d in docs})
    assert len(subjects) == 57 and len(result.items) == 17 * 57
    chosen = [docs[int(item["id"])] for item in result.items]
    assert {s: sum(d["subject"] == s for d in chosen) for s in subjects} == dict.fromkeys(subjects, 17)
    first_of = {s: next(i for i, d in enumerate(docs) if d["subject"] == s) for s in subjects}
    assert sorted(int(item["id"]) for item in result.items) == [first_of[s] + k for s in subjects for k in range(17)]
    assert [item["target"] for item in result.items] == [LETTERS[d["answer"]] for d in chosen]
    assert result.details["items_chosen"].startswith("stratified: the first 17 test question(s) of each of 57")
    plain = task(stratified_limit=False).score(gold, limit=1000)
    assert [item["id"] for item in plain.items] == [str(i) for i in range(1000)]
    assert {docs[i]["subject"] for i in range(1000)} < set(subjects)
    assert plain.details["items_chosen"] == "the first 1000 of 14042 test items"
    few = mmlu.score(gold, limit=20)
    assert len(few.items) == 20 and len({docs[int(item["id"])]["subject"] for item in few.items}) == 20


def test_record_shows_the_share_of_the_most_predicted_letter(tmp_path):
    """A model that answers B to everything is visible: top_letter_share 1.0 beside its accuracy."""
    mmlu = task()
    docs = mmlu.docs("test")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"id": i, "completion": "B"}) + "\n" for i in range(len(docs))))
    collapsed = mmlu.score(tmp_path / "b.jsonl", limit=570)
    assert collapsed.metrics["top_letter_share"] == 1.0
    chosen = [docs[int(item["id"])] for item in collapsed.items]
    assert collapsed.metrics["acc"] == pytest.approx(sum(d["answer"] == 1 for d in chosen) / len(chosen))
    assert collapsed.primary_metric == "acc"
