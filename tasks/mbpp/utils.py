"""Helpers of the pkt_mbpp lm-eval task: the dataset split by task_id and the program each completion is
judged by."""

from __future__ import annotations

from pkt_bench import lmeval, taskdata

HUB = ("google-research-datasets/mbpp", "full")
SPLITS = {"prompt": range(1, 11), "test": range(11, 511), "validation": range(511, 601), "train": range(601, 975)}
"""MBPP's standard splits by task_id (Austin et al. 2021; the upstream README)."""
EXEMPLARS = (2, 3, 4)
"""The problems of the paper's 3-shot prompt."""


def dataset(data_dir: str | None = None, **_):
    """prompt, test, validation and train: `DIR/mbpp/mbpp.jsonl` (all 974 problems) split by task_id with a data
    folder, else the hub's google-research-datasets/mbpp (full)."""
    def build():
        if data_dir is None:
            return taskdata.hub(*HUB)
        docs = taskdata.read_jsonl(taskdata.data_file(data_dir, "mbpp/mbpp.jsonl"))
        return taskdata.local({split: sorted((d for d in docs if d["task_id"] in ids), key=lambda d: d["task_id"])
                               for split, ids in SPLITS.items()})

    return taskdata.cached(("mbpp", data_dir), build)


def prompt(doc: dict) -> str:
    """The task and its three asserts, then "[BEGIN]" (the exemplars' code ends with "[DONE]")."""
    tests = "\n".join(doc["test_list"])
    return f"You are an expert Python programmer, and here is your task: {doc['text']} Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"


def chat_prompt(doc: dict) -> str:
    """The user turn of the chat protocol (lm-eval's mbpp_instruct): the task and its three asserts."""
    tests = "\n".join(doc["test_list"])
    return f"You are an expert Python programmer, and here is your task:\n{doc['text']}\nYour code should pass these tests:\n{tests}"


def chat_answer(doc: dict) -> str:
    """The reference program as the chat protocol's answer: a Python block, which its evaluation opens for the
    model and stops at the end of."""
    return f"```python\n{doc['code']}\n```"


def paper_exemplars(docs):
    return docs.filter(lambda doc: doc["task_id"] in EXEMPLARS)


def program(doc: dict, completion: str) -> str:
    """The completion, the problem's setup code, then its asserts."""
    return f"{completion}\n\n{doc['test_setup_code']}\n" + "\n".join(doc["test_list"]) + "\n"


execute, execute_chat, process_results = lmeval.code_hooks(program)  # named in the task YAMLs
