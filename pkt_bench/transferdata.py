"""Transfer data as a controlled factor: whose answers the train role holds (`--transfer-data`).

- `gold`: the task's own train answers, as the papers wrote them (the default: faithful). A fine-tuned instruct
  student also learns their style, which is not the knowledge a transfer method claims to move.
- `teacher`: the teacher's own answers to the train prompts (greedy, in the run's transfer format), kept only
  where the task's scorer marks them correct (GSM8K's last number, the code tasks' tests run in the sandbox,
  MMLU's letter), drawn from further train prompts until the budget's example count is met.
- `self`: the same with the student's own correct answers (self-training): the data carry the student's style
  and none of the teacher's knowledge, so a method's gain over `lora` on them comes through the parameters.

Generated data are made once per (model, task, transfer format, count, generation settings) and shared through
the results cache by every method and seed: the prompts are walked in the train role's fixed order (seed 0), not
the run's seed. The record's `transfer_data` says which data, how many prompts were tried and kept, and a hash of
the examples. Only the train role changes; the seed and align roles (what extraction and alignment read) stay
gold. `distill` is the named baseline that trains on the teacher's answers to the budget's own prompts, right or
wrong; `lora` with `teacher` data trains on its correct answers only.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pkt_bench.api import SOURCES, Artifact, Example, UserError

if TYPE_CHECKING:
    from pkt_bench.api import TransferContext

EXAMPLES = "examples.jsonl"
SUMMARY = "summary.json"


def check_source(source: str, task: Any, task_name: str) -> None:
    """Stop before anything runs when `source` is unknown or `task` cannot judge generated answers."""
    if source not in SOURCES:
        raise UserError(f"transfer_data must be one of {', '.join(SOURCES)}, got {source!r}")
    if source != "gold" and not (hasattr(task, "check") or hasattr(task, "check_all")):
        raise UserError(f"task {task_name!r} has no scorer for generated answers, so --transfer-data {source} "
                        f"cannot keep the correct ones; use --transfer-data gold")


def record(source: str, examples: Sequence[Example], *, tried: int, model: str | None = None,
           wanted: int | None = None) -> dict[str, Any]:
    """What a record says about the train role: its source, the prompts tried and examples kept, and a hash of
    the examples (prompt and response, in order)."""
    digest = hashlib.sha256(json.dumps([[e.prompt, e.response] for e in examples]).encode()).hexdigest()[:16]
    return {"source": source, **({"model": model} if model else {}), "wanted": len(examples) if wanted is None
            else wanted, "tried": tried, "kept": len(examples), "hash": digest}


def generation_settings(task: Any, transfer_format: str) -> dict[str, Any]:
    """How a model answers a transfer prompt in `transfer_format`: in the chat format, the chat evaluation's own
    stop sequences and token budget (`task.chat_generation`); otherwise the task's `generation` with the stops
    of the format (`formats.answer_stops`)."""
    from pkt_bench.formats import answer_stops

    if transfer_format == "chat_template" and getattr(task, "chat_generation", None):
        return dict(task.chat_generation)
    settings = dict(getattr(task, "generation", {"max_new_tokens": 256, "stop": []}))
    settings["stop"] = answer_stops(transfer_format, settings.get("stop", ()))
    return settings


def judge(task: Any, examples: Sequence[Example], completions: Sequence[str]) -> list[bool]:
    """Whether each completion answers its (gold) example correctly, by the task's own scorer."""
    if hasattr(task, "check_all"):
        return list(task.check_all(list(examples), list(completions)))
    return [bool(task.check(example, completion)) for example, completion in zip(examples, completions)]


def generated(ctx: TransferContext, source: str, count: int) -> list[Example]:
    """`count` train examples answered by the teacher (`source` "teacher") or the student ("self") and judged
    correct, in the run's transfer format; built once and reused from the results cache."""
    settings = generation_settings(ctx.task, ctx.transfer_format)
    model = ctx.pair.teacher if source == "teacher" else ctx.pair.student
    backend = "vllm" if ctx.backend.startswith("vllm") else ctx.backend
    folder = ctx.cached("transfer-data", {"source": source, "count": count, **settings, "backend": backend},
                        lambda out: _build(ctx, source, count, settings, backend, out))
    rows = [json.loads(line) for line in (folder / EXAMPLES).read_text().splitlines()]
    examples = [Example(row["prompt"], row["response"], row["id"]) for row in rows]
    summary = json.loads((folder / SUMMARY).read_text())
    ctx.data = record(source, examples, tried=summary["tried"], model=model.identity, wanted=count)
    if not examples:
        raise UserError(f"none of the {who(source)}'s answers to {summary['tried']} train prompts of "
                        f"{ctx.task_name!r} was correct, so there are no {source} transfer data for this pair and "
                        f"task; use --transfer-data gold (or the other source)")
    if len(examples) < count:
        print(f"pkt-bench: warning: only {len(examples)} of {summary['tried']} train prompts got a correct "
              f"{source} answer, short of the {count} examples the budget asks for; training on those",
              file=sys.stderr)
    return examples


def _build(ctx: TransferContext, source: str, count: int, settings: dict[str, Any], backend: str, out) -> None:
    """Answer train prompts in rounds, each sized by the share kept so far, until `count` are correct or the
    train role runs out; write the kept examples (in the role's order) and the counts."""
    from transformers import AutoTokenizer

    from pkt_bench.evaluate import make_target

    pool = ctx.task.transfer_data("train")  # fixed order (seed 0): the same data for every seed
    model = ctx.pair.teacher if source == "teacher" else ctx.pair.student
    stops = [s for s in settings.get("stop", ()) if s]
    kept: list[Example] = []
    tried, written_all = 0, []
    with ctx.stage("extract"):
        target = make_target(Artifact(kind="model", path=model.path), backend, ctx.pair.device, ctx.pair.dtype)
        try:
            generator = target.generator()
            while len(kept) < count and tried < len(pool):
                share = max(len(kept) / tried, 0.05) if tried else 1.0
                batch = pool[tried : tried + max(8, math.ceil(1.2 * (count - len(kept)) / share))]
                rendered = ctx.render(batch)
                answers = generator.generate([e.prompt for e in rendered], max_new_tokens=settings["max_new_tokens"],
                                             stop=stops)
                tried += len(batch)
                written_all += answers
                for gold, written, answer, right in zip(batch, rendered, answers,
                                                        judge(ctx.task, batch, answers)):
                    if right and len(kept) < count:  # the answer as written, closed as the model would close it
                        kept.append(Example(written.prompt, answer + (stops[0] if stops else ""), gold.id))
        finally:
            target.close()
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    spent = {f"{who(source)}_forward": tried,
             f"{who(source)}_tokens_generated": sum(len(tokenizer(a, add_special_tokens=False).input_ids)
                                            for a in written_all)}
    for name, value in spent.items():
        ctx.costs[name] = ctx.costs.get(name, 0) + value
    with (out / EXAMPLES).open("w") as handle:
        for example in kept:
            handle.write(json.dumps({"id": example.id, "prompt": example.prompt, "response": example.response}) + "\n")
    (out / SUMMARY).write_text(json.dumps({"tried": tried, "kept": len(kept)}))


def who(source: str) -> str:
    """The model that answers for a generated source."""
    return "teacher" if source == "teacher" else "student"


def code_of(completion: str) -> str:
    """The program in a completion: the body of its first Python block where it opens one, else the text up to
    a closing fence (a chat answer whose block the prompt opened)."""
    block = re.search(r"```(?:python)?[ \t]*\n(.*?)(?:```|$)", completion, re.S)
    return block.group(1) if block else completion.split("```")[0]
