"""Transfer formats: how a task's prompt/response examples are written out as the text every method trains on.

One spec-level option (`transfer_format`, CLI `--transfer-format`), the same for every method of a cell
comparison, so that they all read the same text:

- `paper`: the chat format both upstream repositories (ParaKnowTransfer and Neural_Incompatibility) use for seeds,
  alignment and training, `<|user|>\\n{prompt}\\n\\n<|assistant|>\\n` then `{response}\\n\\n` and EOS (turn
  contents stripped, as upstream). The markers are plain text, not special tokens, as they were for Llama-2.
- `task`: the task's own prompt format, the one its evaluation prompts use.
- `chat_template`: the tokenizer's chat template, one user turn, then the response and EOS (for instruct models
  whose EOS ends a turn). A template that writes BOS itself gets a second one from the tokenizer.
- `auto` (the default): `paper` for the benchmark tasks, whose transfer data the papers wrote in it; `task` for
  tasks that say otherwise (`transfer_format = "task"` on the task class; the pico probe, whose word-level
  tokenizer has no `<|user|>` and whose evaluation prompt is the bare fact).

Both chat formats write a task's chat exchange where its examples carry one (`Example.chat`): the code tasks
answer in a chat as their chat evaluations do, the program in a Python block (as LaTen's code splits do too), not
in MBPP's plain form, whose "[DONE]" no chat evaluation stops at.

Evaluation is not changed by this option: each task evaluates in its own protocol (`-T chat_template=true` for
the tokenizer's template). The papers evaluated with Open-Instruct; LaTen says in its chat (Tulu) format, whose
single newline before `<|assistant|>` differs from its training text's double one; Seeking does not say.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from pkt_bench.api import Example, UserError

FORMATS = ("paper", "task", "chat_template")
CHOICES = ("auto", *FORMATS)
USER, ASSISTANT = "<|user|>\n", "<|assistant|>\n"


def resolve(name: str, task: Any) -> str:
    """The format `name` means for `task` (`auto` resolved); what cell keys and records hold."""
    if name not in CHOICES:
        raise UserError(f"transfer_format must be one of {', '.join(CHOICES)}, got {name!r}")
    return getattr(task, "transfer_format", "paper") if name == "auto" else name


def identity(name: str, task: Any) -> dict[str, str]:
    """What the transfer text of a cell depends on besides the data: the resolved format and the task's
    `transfer_version`, which is left out at "1" so that keys made before it existed stay valid."""
    version = getattr(task, "transfer_version", "1")
    parity = name == "chat_template" and hasattr(task, "chat_context")  # prompts rendered as the evaluation's
    return {"transfer_format": name, **({"transfer_version": version} if version != "1" else {}),
            **({"transfer_prompts": "evaluation"} if parity else {})}


def check(name: str, tokenizer: Any) -> None:
    """Stop before anything runs when the tokenizer cannot render `name` (a resolved format)."""
    if name == "chat_template" and not getattr(tokenizer, "chat_template", None):
        raise UserError("the student's tokenizer has no chat template; pick --transfer-format paper or task")


def answer_stops(name: str, task_stops: Sequence[str]) -> list[str]:
    """Where an answer generated to a transfer prompt in the resolved format `name` ends (distillation's teacher
    answers): the task's own stop sequences in its own format (gsm8k: the single line its exemplars answer in);
    the next turn's marker in `paper`; nothing under `chat_template`, where the end of the turn is the model's EOS
    and generation stops there anyway. The task's stops do not carry over: an instruct teacher answers a
    chat-rendered GSM8K prompt in several lines, and cutting at the first newline kept only its first sentence."""
    if name == "task":
        return list(task_stops)
    return [USER.strip()] if name == "paper" else []


def render(example: Example, name: str, tokenizer: Any = None, task: Any = None) -> Example:
    """`example` written in the resolved format `name`; the id and document are kept. The chat formats write its
    `chat` exchange where it has one. In `chat_template`, an example with its document (`Example.doc`) of a task
    with a chat evaluation (`task.chat_context`) gets the prompt that evaluation sends for that document (system
    turn, user turn, and the opening of the answer it writes for the model), and the rest of the answer as its
    response: training and evaluation prompts are then the same text. Without, one user turn."""
    if name == "task":
        return example
    user, assistant = (example.chat or (example.prompt, example.response))
    if name == "paper":
        prompt, response = f"{USER}{user.strip()}\n\n{ASSISTANT}", f"{assistant.strip()}\n\n"
    elif example.doc is not None and hasattr(task, "chat_context"):
        prompt, opening, answer = task.chat_context(example.doc, tokenizer), task.chat_prefix(example.doc), assistant.strip()
        # the prompt ends with the opening as the template wrote it (transformers may strip its whitespace)
        written = next((v for v in (opening, opening.rstrip(), opening.strip()) if prompt.endswith(v)), None)
        if not opening:
            response = answer
        elif written is not None and answer.startswith(written.lstrip()):  # the answer as the chat writes it
            response = answer[len(written.lstrip()):]
        else:  # an answer that goes on after the opening (mmlu's letter after "The answer is:")
            response = answer if example.chat else example.response
    else:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": user.strip()}], tokenize=False,
                                               add_generation_prompt=True)
        response = assistant.strip()
    return dataclasses.replace(example, prompt=prompt, response=response, chat=None)
