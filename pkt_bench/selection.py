"""Learning-rate selection on a validation split, the same for every method that fine-tunes (`select:`).

    select: {lr: [1.0e-4, 3.0e-4, 1.0e-3], on: validation, examples: 50}

Each fine-tuning method's cell runs one whole transfer per learning rate (the run's budget with that `lr`; a
method's extraction is cached, so only what follows it repeats), scores each trial's artifact on the first
`examples` of the task's validation split (`validation_data()`: disjoint from every transfer role and from the
test items) and evaluates only the best trial's artifact on the test items. The validation score is the share of
validation prompts, written as the evaluation writes its prompts (the chat template with `-T chat_template=true`,
else the task's own format), whose greedy answer the task's scorer marks correct (`transferdata.judge`); ties go
to the earlier learning rate in the list. Every method gets the same learning rates, validation examples and
scorer; the record's `selection` keeps every trial (score, validation loss, steps), the winner, and the untouched
student's score on the same validation examples (where no trial reaches it, fine-tuning at these rates does not
pay on this task; scored once and shared through the results cache), and its costs count every trial.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pkt_bench.api import Artifact, UserError

if TYPE_CHECKING:
    from pkt_bench.api import TransferContext

DEFAULT_EXAMPLES = 50
STUDENT_SCORE = "score.json"


def normalize(select: dict[str, Any]) -> dict[str, Any]:
    """`select` checked, with its defaults filled ({} stays {}: no selection)."""
    if not select:
        return {}
    select = {("on" if key is True else key): value for key, value in select.items()}  # YAML 1.1 reads `on` as true
    unknown = {str(key) for key in select} - {"lr", "on", "examples"}
    if unknown:
        raise UserError(f"select takes lr:, on: and examples:, not {', '.join(sorted(unknown))}")
    rates = select.get("lr")
    if (not isinstance(rates, list) or not rates or len(set(rates)) != len(rates)
            or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 for r in rates)):
        raise UserError(f"select's lr must be a list of distinct positive learning rates, got {rates!r}")
    if select.get("on", "validation") != "validation":
        raise UserError(f"select's on: must be validation (the only split kept apart for it), got {select['on']!r}")
    examples = select.get("examples", DEFAULT_EXAMPLES)
    if isinstance(examples, bool) or not isinstance(examples, int) or examples <= 0:
        raise UserError(f"select's examples must be a positive integer, got {examples!r}")
    return {"lr": [float(r) for r in rates], "on": "validation", "examples": examples}


def check(select: dict[str, Any], task: Any, task_name: str) -> None:
    """Stop before anything runs when `task` has no validation split or no scorer for generated answers."""
    if select and not getattr(task, "validation_data", None):
        raise UserError(f"task {task_name!r} has no validation split to select a learning rate on; drop select:")
    if select and not task.validation_data():
        raise UserError(f"task {task_name!r} has no validation examples here (a LaTen transfer folder has none); "
                        f"drop select:")
    if select and not (hasattr(task, "check") or hasattr(task, "check_all")):
        raise UserError(f"task {task_name!r} cannot score generated answers, so select: has nothing to rank by")


def _written_as(task: Any) -> str:
    """How the evaluation writes this task's prompts: with the chat template (`-T chat_template=true`) or as is."""
    return "chat_template" if getattr(getattr(task, "config", None), "chat_template", False) else "task"


def validation_score(ctx: TransferContext, artifact: Artifact, examples: int, eval_batch_size: int,
                     engine_args: dict[str, Any]) -> tuple[float, list[str]]:
    """The share of the first `examples` validation prompts that `artifact` answers correctly, and their ids."""
    from pkt_bench.evaluate import make_target
    from pkt_bench.formats import render
    from pkt_bench.transferdata import generation_settings, judge

    gold = ctx.task.validation_data()[:examples]
    written_as = _written_as(ctx.task)
    from pkt_bench.context import student_tokenizer

    tokenizer = student_tokenizer(ctx.pair.student.path) if written_as == "chat_template" else None
    prompts = [render(example, written_as, tokenizer, ctx.task).prompt for example in gold]
    settings = generation_settings(ctx.task, written_as)
    target = make_target(artifact, ctx.backend, ctx.pair.device, ctx.pair.dtype, eval_batch_size, engine_args)
    try:
        answers = target.generator().generate(prompts, max_new_tokens=settings["max_new_tokens"],
                                              stop=[s for s in settings.get("stop", ()) if s])
    finally:
        target.close()
    right = judge(ctx.task, gold, answers)
    return sum(right) / len(right), [example.id for example in gold]


def student_score(ctx: TransferContext, examples: int, eval_batch_size: int, engine_args: dict[str, Any]) -> float:
    """The untouched student's validation score, made once per (pair, task, examples, engine) and shared through
    the results cache by every selecting cell (every method and seed)."""
    def build(folder: Path) -> None:
        score, _ = validation_score(ctx, Artifact(kind="model", path=ctx.pair.student.path), examples,
                                    eval_batch_size, engine_args)
        (folder / STUDENT_SCORE).write_text(json.dumps({"validation_score": score}))

    identity = {"examples": examples, "written_as": _written_as(ctx.task), "backend": ctx.backend,
                "eval_batch_size": eval_batch_size, "engine_args": engine_args}
    folder = ctx.cached("student-validation", identity, build)
    return json.loads((folder / STUDENT_SCORE).read_text())["validation_score"]


def select_lr(make_ctx, transfer, select: dict[str, Any], eval_batch_size: int,
              engine_args: dict[str, Any]) -> tuple[Artifact, TransferContext, dict[str, Any]]:
    """Run `transfer(ctx)` once per learning rate in `select` (`make_ctx(lr, trial)` builds each trial's context)
    and score each artifact on the validation split. Returns the winner's artifact, its context holding every
    trial's costs and fine-tune stats (each stat tagged with its lr), and the selection as recorded."""
    trials, contexts, artifacts, ids = [], [], [], []
    for index, lr in enumerate(select["lr"]):
        ctx = make_ctx(lr, index)
        artifact = transfer(ctx)
        with ctx.stage("select"):
            score, ids = validation_score(ctx, artifact, select["examples"], eval_batch_size, engine_args)
        after = [stats.get("validation_loss_after") for stats in ctx.training]
        trials.append({"lr": lr, "validation_score": score, "validation_loss_after": after[-1] if after else None,
                       "optimizer_steps": ctx.costs.get("optimizer_steps", 0)})
        contexts.append(ctx)
        artifacts.append(artifact)
    best = max(range(len(trials)), key=lambda i: (trials[i]["validation_score"], -i))  # ties: the earlier lr
    costs: dict[str, int] = {}
    for ctx in contexts:  # what selecting cost: every trial
        for name, value in ctx.costs.items():
            costs[name] = costs.get(name, 0) + value
    winner = contexts[best]
    with winner.stage("select"):
        student = student_score(winner, select["examples"], eval_batch_size, engine_args)
    winner.costs = costs
    winner.training = [{**stats, "lr": trial["lr"]} for trial, ctx in zip(trials, contexts) for stats in ctx.training]
    record = {"on": "validation", "examples": len(ids), "validation_ids": ids, "trials": trials,
              "winner": {"lr": trials[best]["lr"]}, "student": {"validation_score": student}}
    return artifacts[best], winner, record
