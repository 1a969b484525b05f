"""Offline distillation: the teacher's knowledge passed through data instead of parameters.

The teacher answers the train prompts (greedy, through the run's generation backend, with the task's transfer
generation settings and the stop sequences of the run's transfer format, `formats.answer_stops`); the student's
LoRA then learns those answers with the shared loop and the same budget as
`lora`. With `filter_correct`, only answers the task judges correct are kept (tasks with gold answers define
`check(example, completion)`), and the kept fraction is recorded. The teacher's answers are cached by content
hash (teacher, prompts, decoding settings), so reruns and other seeds reuse them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from pkt_bench.api import Artifact, Example, TransferContext, UserError
from pkt_bench.formats import answer_stops
from pkt_bench.methods.lora import LoRA, LoRAConfig
from pkt_bench.registry import register_method
from pkt_bench.transferdata import record

GENERATIONS = "generations.jsonl"


@dataclass
class DistillConfig(LoRAConfig):
    filter_correct: bool = field(default=False, metadata={"help": "keep only the teacher answers the task judges "
                                                                   "correct (tasks with gold answers)"})
    max_new_tokens: int = field(default=0, metadata={"help": "tokens the teacher may generate per answer; 0: the "
                                                             "task's own setting"})


@register_method("distill")
class Distill:
    description = "offline distillation: LoRA on the teacher's own answers to the train prompts, same budget"
    reference = "https://arxiv.org/abs/1606.07947"
    Config = DistillConfig
    fine_tunes = True
    makes_train_data = True  # its answers are the teacher's to the budget's prompts: --transfer-data does not apply

    def __init__(self, config: DistillConfig):
        self.config = config

    def check(self, pair) -> None:
        LoRA(self.config).check(pair)

    def transfer(self, ctx: TransferContext) -> Artifact:
        c = self.config
        if c.filter_correct and not hasattr(ctx.task, "check"):
            raise UserError(f"task {ctx.task_name!r} has no gold answers to filter the teacher's by; "
                            f"drop -o filter_correct=true")
        train = ctx.examples("train", ctx.budget.examples)
        generation = dict(getattr(ctx.task, "generation", {"max_new_tokens": 256, "stop": []}))
        generation["stop"] = answer_stops(ctx.transfer_format, generation.get("stop", ()))
        if c.max_new_tokens:
            generation["max_new_tokens"] = c.max_new_tokens
        prompts = hashlib.sha256(json.dumps([e.prompt for e in train]).encode()).hexdigest()
        folder = ctx.cached("distill", {"prompts": prompts, **generation, "backend": ctx.backend},
                            lambda out: self.generate(ctx, train, generation, out))
        answers = [json.loads(line)["completion"] for line in (folder / GENERATIONS).read_text().splitlines()]
        data = [Example(e.prompt, answer, e.id) for e, answer in zip(train, answers)
                if not c.filter_correct or ctx.task.check(e, answer)]
        ctx.costs["teacher_answers"], ctx.costs["teacher_answers_kept"] = len(train), len(data)
        ctx.data = {**record("teacher", data, tried=len(train), model=ctx.pair.teacher.identity),
                    "by": "distill", "filter_correct": c.filter_correct}
        if not data:
            raise UserError("no teacher answer passed the correctness filter; drop -o filter_correct=true")
        lora = LoRA(c)
        model, tokenizer = lora.initialize(ctx)
        ctx.finetune(model, tokenizer, data)
        return lora.save(ctx, model, tokenizer)

    @staticmethod
    def generate(ctx: TransferContext, train: list[Example], generation: dict, out) -> None:
        """The teacher's greedy answers to the train prompts, one JSON line each, in `out`."""
        from transformers import AutoTokenizer

        from pkt_bench.evaluate import make_target

        teacher = Artifact(kind="model", path=ctx.pair.teacher.path)
        backend = "vllm" if ctx.backend.startswith("vllm") else ctx.backend
        with ctx.stage("extract"):
            target = make_target(teacher, backend, ctx.pair.device, ctx.pair.dtype)
            try:
                answers = target.generator().generate([e.prompt for e in train],
                                                      max_new_tokens=generation["max_new_tokens"],
                                                      stop=generation.get("stop", ()))
            finally:
                target.close()  # the teacher's memory is back before the student loads
        tokenizer = AutoTokenizer.from_pretrained(ctx.pair.teacher.path)
        spent = {"teacher_forward": len(train),  # the canonical counters, so cost tables compare it with PKT
                 "teacher_tokens": sum(len(tokenizer(e.prompt).input_ids) for e in train),
                 "teacher_tokens_generated": sum(len(tokenizer(a, add_special_tokens=False).input_ids) for a in answers)}
        for name, value in spent.items():
            ctx.costs[name] = ctx.costs.get(name, 0) + value
        with (out / GENERATIONS).open("w") as handle:
            for example, answer in zip(train, answers):
                handle.write(json.dumps({"id": example.id, "prompt": example.prompt, "completion": answer}) + "\n")
