"""Helpers of the pkt_gsm8k lm-eval task: the dataset (HF hub or local files) and open-instruct's answer rules."""

from __future__ import annotations

import re

from pkt_bench import taskdata

HUB = ("openai/gsm8k", "main")
ZERO_SHOT = "Answer the following question.\n\n"
"""The instruction before a zero-shot question (the YAML's description, plural, is the few-shot one)."""


def dataset(data_dir: str | None = None, **_):
    """train and test splits: `DIR/gsm8k/{train,test}.jsonl` with a data folder, else the hub's openai/gsm8k."""
    def build():
        if data_dir is None:
            return taskdata.hub(*HUB)
        return taskdata.local({split: taskdata.read_jsonl(taskdata.data_file(data_dir, f"gsm8k/{split}.jsonl"))
                               for split in ("train", "test")})

    return taskdata.cached(("gsm8k", data_dir), build)


def question(doc: dict) -> str:
    return f"Question: {doc['question'].strip()}\nAnswer:"


def _digits(text: str) -> str:
    """Thousands separators removed: "1,000" -> "1000"."""
    return re.sub(r"(\d),(\d)", r"\1\2", text)


def target(doc: dict) -> str:
    """The gold answer: the text after "####", without thousands separators."""
    return _digits(doc["answer"].split("####")[-1].strip())


def last_number(text: str) -> str:
    """open-instruct's prediction: the last number in the output (the whole output when it has none)."""
    numbers = re.findall(r"[-+]?\d*\.\d+|\d+", _digits(text))
    return numbers[-1] if numbers else text


def last_number_filter(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    return [[last_number(r) for r in rs] for rs in resps]


def chain_of_thought(answer: str) -> str:
    """A train answer in the exemplars' style: calculator notes dropped, one line, "So the answer is N."."""
    reasoning, final = answer.split("####")
    steps = " ".join(line.strip() for line in re.sub(r"<<[^>]*>>", "", reasoning).splitlines() if line.strip())
    return f"{steps} So the answer is {final.strip()}."
