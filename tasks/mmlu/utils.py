"""Helpers of the pkt_mmlu lm-eval task: the dataset (HF hub or local CSVs) with open-instruct's prompts."""

from __future__ import annotations

import csv

from pkt_bench import taskdata
from pkt_bench.api import UserError

HUB = ("cais/mmlu", "all")
LETTERS = "ABCD"
LOCAL_SPLITS = {"test": "test", "dev": "dev", "validation": "val"}


def header(subject: str) -> str:
    """The prompt's first line; open-instruct (after Hendrycks et al.) joins " " + each word, hence two spaces."""
    return f"The following are multiple choice questions (with answers) about {''.join(' ' + w for w in subject.split('_'))}.\n\n"


def question(doc: dict, answer: bool = False) -> str:
    """A question with its lettered choices, ending in "Answer:" (and the gold letter, for exemplars)."""
    text = doc["question"] + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, doc["choices"]))
    return text + "\nAnswer:" + (f" {LETTERS[doc['answer']]}\n\n" if answer else "")


def prompt(doc: dict, exemplars: list[dict]) -> str:
    return header(doc["subject"]) + "".join(question(e, answer=True) for e in exemplars) + question(doc)


def _read_csvs(data_dir: str, split: str) -> list[dict]:
    docs = []
    for path in taskdata.data_folder(data_dir, f"mmlu/{split}", f"*_{split}.csv"):
        subject = path.name.removesuffix(f"_{split}.csv")
        with path.open(encoding="utf-8", newline="") as rows:
            for number, row in enumerate(csv.reader(rows), 1):
                if len(row) != 6 or row[5] not in LETTERS:
                    raise UserError(f"{path}:{number}: expected 6 columns (question, A-D, answer letter)")
                docs.append({"question": row[0], "subject": subject, "choices": row[1:5],
                             "answer": LETTERS.index(row[5])})
    return docs


def dataset(data_dir: str | None = None, num_fewshot: int = 0, **_):
    """test (sorted by subject, then file order), dev and validation; each test document carries its `prompt`
    with the first `num_fewshot` dev questions of its subject as exemplars."""
    def build():
        if data_dir is None:
            hub = taskdata.hub(*HUB)
            splits = {split: hub[split].to_list() for split in LOCAL_SPLITS}
        else:
            splits = {split: _read_csvs(data_dir, local) for split, local in LOCAL_SPLITS.items()}
        splits["test"].sort(key=lambda doc: doc["subject"])  # stable: file order within a subject
        dev = {}
        for doc in splits["dev"]:
            dev.setdefault(doc["subject"], []).append(doc)
        splits["test"] = [{**doc, "prompt": prompt(doc, dev.get(doc["subject"], [])[:num_fewshot])}
                          for doc in splits["test"]]
        return taskdata.local(splits)

    return taskdata.cached(("mmlu", data_dir, num_fewshot), build)
