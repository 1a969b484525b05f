"""`graft`: the oracle positive control of the kinship ladder (an instrument check, not a competitor).

When teacher and student descend from one *ancestor* (the student cut from it, the teacher trained further from
it), the teacher's knowledge since the ancestor is its change Δ = teacher − ancestor. `graft` adds α·Δ to the
student, cut to the student's shape at the indices the student inherited (its lineage: kept layers, hidden
dimensions, FFN units, heads and head dimensions):

    student[name] += α · (teacher − ancestor)[source(name)][kept indices]

It needs the ancestor's weights and the student's lineage (`lineage.json` in the student's folder, naming its
`parent` and the `kept` indices); on any other pair it stops with an error. Such families exist for real models:
releases cut from one base by structured pruning and distillation (NVIDIA's Minitron from Nemotron-4 15B,
Sheared-LLaMA from LLaMA2-7B), where the base, the pruned model and a further-trained base are all published.
Elsewhere (two independently pretrained sizes, like Qwen2.5 1.5B and 0.5B) there is no ancestor and no graft.

On the ladder it shows what a parametric transfer that works looks like: where `graft` moves held-out facts, the
probe can see transfer, and a method at chance there moved nothing; with the sham teacher (trained further
without the held-out facts) it must stay at chance. Options: α, the parts moved (linear matrices, norms,
embeddings) and where Δ is cut (`blocks=sensitivity`: at the teacher layers and blocks that sensitivity's
extraction chooses, instead of the lineage: how much of the transfer a method's choice of blocks could carry). `graft-lora` then fine-tunes LoRA (`lora`'s defaults) on the run's shared budget: a separate name, not
an option, because whether a method fine-tunes decides whether the budget is part of its cells' key.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pkt_bench.api import Artifact, TransferContext, UserError
from pkt_bench.registry import register_method

PARTS = ("linear", "norms", "embeddings")


@dataclass
class GraftConfig:
    alpha: float = field(default=1.0, metadata={"help": "scale α of the teacher's change since the ancestor; 0 "
                                                        "leaves the student unchanged"})
    parts: list[str] = field(default_factory=lambda: list(PARTS),
                             metadata={"help": "what moves: linear (attention and FFN matrices), norms, embeddings "
                                               "(embed_tokens, lm_head); comma-separated"})
    blocks: str = field(default="lineage", metadata={"help": "where Δ is cut: lineage (the indices the student "
                                                             "inherited) or sensitivity (the teacher layers and blocks "
                                                             "sensitivity's extraction chooses, with its default "
                                                             "options; linear matrices only)"})

    def __post_init__(self) -> None:
        if self.blocks not in ("lineage", "sensitivity"):
            raise UserError(f"option 'blocks' must be lineage or sensitivity, got {self.blocks!r}")
        unknown = [part for part in self.parts if part not in PARTS]
        if unknown or not self.parts:
            raise UserError(f"option 'parts' takes a comma-separated subset of {', '.join(PARTS)}, got "
                            f"{','.join(self.parts) or 'nothing'}")


def part(name: str) -> str:
    """Which part of `PARTS` a parameter belongs to."""
    if "embed_tokens" in name or name.startswith("lm_head"):
        return "embeddings"
    return "norms" if name.endswith("norm.weight") else "linear"


@register_method("graft")
class Graft:
    description = ("oracle positive control: student + α·(teacher − ancestor), cut at the student's lineage "
                   "(kin pairs only)")
    reference = "methods/graft.py"
    Config = GraftConfig
    fine_tunes = False

    def __init__(self, config: GraftConfig):
        self.config = config

    def check(self, pair) -> None:
        """Stop before anything runs unless the student has a lineage and the teacher comes from its parent."""
        ancestry(pair)

    def transfer(self, ctx: TransferContext) -> Artifact:
        student, tokenizer = self.grafted(ctx)
        path = ctx.workdir / "model"
        student.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return Artifact(kind="model", path=str(path))

    def grafted(self, ctx: TransferContext):
        """The student with α·Δ added, and its tokenizer."""
        import torch

        from pkt_bench.models import load_model
        from pkt_bench.pruning import Kept, cut, source

        ancestor_ref, kept = ancestry(ctx.pair)
        student, tokenizer = ctx.pair.load("student")
        if self.config.alpha == 0:
            return student, tokenizer
        with ctx.stage("extract"):
            teacher = ctx.pair.load("teacher")[0].state_dict()
            ancestor = load_model(ancestor_ref.path, ctx.pair.device, ctx.pair.dtype)[0].state_dict()
            kept = Kept.from_json(kept)
            chosen = self.sensitivity_blocks(ctx) if self.config.blocks == "sensitivity" else None
            with torch.no_grad():
                for name, param in student.named_parameters():
                    if part(name) not in self.config.parts:
                        continue
                    if chosen is None:
                        src, indices = source(name, kept)
                        delta = cut(teacher[src].float() - ancestor[src].float(), indices)
                    elif name in chosen:
                        src, take = chosen[name]
                        delta = take(teacher[src].float() - ancestor[src].float())
                    else:
                        continue
                    param.copy_((param.float() + self.config.alpha * delta).to(param.dtype))
        return student, tokenizer

    def sensitivity_blocks(self, ctx: TransferContext) -> dict:
        """Student parameter name -> (teacher parameter name, the function that cuts sensitivity's block out of a
        teacher-shaped matrix), from sensitivity's (cached) extraction with its default options."""
        import json
        from dataclasses import asdict

        from pkt_bench.methods.sensitivity import Sensitivity, SensitivityConfig, cut as cut_block, matrix_key

        method = Sensitivity(SensitivityConfig())
        identity = {k: v for k, v in asdict(method.config).items() if k not in ("dropout", "init")}
        folder = ctx.cached("sensitivity", identity | {"max_length": ctx.budget.max_length},
                            lambda out: method.extract(ctx, out))
        selection = json.loads((folder / "selection.json").read_text())["blocks"]
        student, _ = ctx.pair.load("student")
        chosen = {}
        for name, param in student.named_parameters():
            key = matrix_key(name)
            label = key and (f"layers.{key[0]}.{key[1]}" if key[0] is not None else key[1])
            if label in selection:
                block, (rows, cols) = selection[label], param.shape
                teacher_name = name if key[0] is None else name.replace(  # block["teacher"]: "layers.J.q_proj"
                    f"layers.{key[0]}.", f"layers.{block['teacher'].split('.')[1]}.", 1)
                chosen[name] = (teacher_name, lambda w, b=block, r=rows, c=cols: cut_block(w, b, r, c))
        return chosen


@register_method("graft-lora")
class GraftLoRA(Graft):
    description = "graft, then LoRA fine-tuning (lora's defaults) on the shared budget"
    fine_tunes = True

    def transfer(self, ctx: TransferContext) -> Artifact:
        from pkt_bench.methods.lora import LoRA, LoRAConfig
        from pkt_bench.models import ModelRef

        student, tokenizer = self.grafted(ctx)
        folder = ctx.workdir / "grafted"
        student.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        grafted = ModelRef(ctx.pair.student.name, str(folder), ctx.pair.student.identity)
        lora_ctx = dataclasses.replace(ctx, pair=dataclasses.replace(ctx.pair, student=grafted))  # shares costs
        model, tokenizer = LoRA(LoRAConfig()).initialize(lora_ctx)
        lora_ctx.finetune(model, tokenizer)
        artifact = ctx.save_merged(model, tokenizer)
        shutil.rmtree(folder)
        return artifact


def ancestry(pair):
    """(the ancestor's `ModelRef`, the student's kept indices) of a pair whose teacher and student descend from one
    ancestor; a `UserError` otherwise. A lineage names its parent by `parent_path` (relative to the model's folder)
    when that folder exists, else by `parent` (any model name)."""
    from pkt_bench.models import lineage, resolve_model

    student, teacher = lineage(pair.student), lineage(pair.teacher)
    if not student or not student.get("parent") or "kept" not in student:
        raise UserError(f"graft needs a student with a lineage (a lineage.json naming the model it was cut from and "
                        f"the indices it kept); {pair.student.name!r} has none: pick a kin pair, e.g. "
                        f"--pair pico-kin-pruned (`pkt-bench list pairs`)")
    ancestor = _parent(pair.student.path, student)
    if not teacher or teacher.get("operation") != "continue" or _parent(pair.teacher.path, teacher) != ancestor:
        raise UserError(f"graft needs a teacher trained further from the student's ancestor "
                        f"{student['parent']!r}; {pair.teacher.name!r} is not: pick a kin pair, e.g. "
                        f"--pair pico-kin-pruned (`pkt-bench list pairs`)")
    return resolve_model(ancestor), student["kept"]


def _parent(path: str, lineage: dict) -> str | None:
    relative = lineage.get("parent_path")
    if relative and (Path(path) / relative).is_dir():
        return str((Path(path) / relative).resolve())
    return lineage.get("parent")
