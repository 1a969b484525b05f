"""Sensitivity-based parametric knowledge transfer ("Seeking Neural Nuggets", Zhong et al., ICLR 2024).

1. *Sensitivity*: for each scored teacher weight θ, S = Σ over seed samples |θ ⊙ ∂L/∂θ|, with L the mean
   cross-entropy over one sample's response tokens (a batch of one). Post-accumulate-grad hooks fold each
   gradient into one running score buffer and free it, so no full set of gradients is ever held.
2. *Layer map*: the L_student teacher layers with the highest total sensitivity, kept in their original order,
   go to student layers 0..L_student-1 ("top"); "uniform" spaces them evenly instead.
3. *Block*: in each teacher matrix, the contiguous student-shaped window with the largest summed sensitivity,
   found with 2-D prefix sums in float64 (ties go to the smallest row, then column offset).
4. *Factorization*: rank-r truncated SVD of the block, B = U_r Σ_r, A = V_rᵀ.
5. *Injection*: the student's LoRA starts at (A, B) and its base weight becomes W - (α/r)·B·A, so at step 0 the
   student computes exactly its pretrained function; then the shared fine-tuning loop.

Not yet here (issue 4): the `extract` command with its files, the extraction cache, the ablation block
strategies, embeddings/lm_head as targets.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from pkt_bench.api import Artifact, TransferContext, UserError
from pkt_bench.models import LINEAR_MODULES
from pkt_bench.registry import register_method

_LAYER = re.compile(r"\blayers\.(\d+)\.(?:.*\.)?(\w+)$")


@dataclass
class SensitivityConfig:
    n_seeds: int = field(default=32, metadata={"help": "seed samples that score the teacher's weights"})
    rank: int = field(default=16, metadata={"help": "LoRA rank r = rank of the truncated SVD"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / r"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input during training"})
    target_modules: list[str] = field(default_factory=lambda: list(LINEAR_MODULES),
                                      metadata={"help": "matrices scored, cut and injected (comma-separated)"})
    layer_map: str = field(default="top", metadata={"help": "top: most sensitive layers in order; uniform: evenly spaced"})

    def __post_init__(self) -> None:
        if self.layer_map not in ("top", "uniform"):
            raise UserError(f"option 'layer_map' must be top or uniform, got {self.layer_map!r}")
        if self.n_seeds <= 0 or self.rank <= 0:
            raise UserError("options 'n_seeds' and 'rank' must be positive integers")


def target_modules(model, targets: list[str]) -> dict[tuple[int, str], object]:
    """(layer index, module name) -> the nn.Linear of each targeted matrix."""
    found = {}
    for name, module in model.named_modules():
        match = _LAYER.search(name)
        if match and match.group(2) in targets and hasattr(module, "weight"):
            found[(int(match.group(1)), match.group(2))] = module
    return found


def sensitivity(model, tokenizer, seeds, targets: list[str], max_length: int) -> dict[tuple[int, str], object]:
    """Σ_samples |θ ⊙ ∂L/∂θ| for every targeted matrix, accumulated in place during backward."""
    import torch

    from pkt_bench.finetune import encode

    modules = target_modules(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    scores, hooks = {}, []
    for key, module in modules.items():
        weight = module.weight
        scores[key] = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        weight.requires_grad_(True)

        def fold(param, score=scores[key]):
            score.add_((param.detach().float() * param.grad.float()).abs_())
            param.grad = None

        hooks.append(weight.register_post_accumulate_grad_hook(fold))
    device = next(model.parameters()).device
    try:
        for example in seeds:
            ids, labels = encode(example, tokenizer, max_length)
            loss = model(input_ids=torch.tensor([ids], device=device), labels=torch.tensor([labels], device=device)).loss
            loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
        for p in model.parameters():
            p.requires_grad_(False)
    return scores


def layer_map(layer_scores: list[float], n_student: int, how: str) -> list[int]:
    """Teacher layer for each student layer 0..n_student-1."""
    n_teacher = len(layer_scores)
    if n_teacher < n_student:
        raise UserError(f"the teacher has {n_teacher} layers, fewer than the student's {n_student}; "
                        f"pick a deeper teacher")
    if how == "uniform":
        return [round(i * (n_teacher - 1) / max(n_student - 1, 1)) for i in range(n_student)]
    ranked = sorted(range(n_teacher), key=lambda layer: -layer_scores[layer])[:n_student]
    return sorted(ranked)


def max_block(score, rows: int, cols: int) -> tuple[int, int]:
    """Offsets (a, b) of the rows x cols window of `score` with the largest sum (2-D prefix sums, float64)."""
    import torch

    n, m = score.shape
    prefix = torch.nn.functional.pad(score.double().cumsum(0).cumsum(1), (1, 0, 1, 0))  # [n+1, m+1]
    sums = prefix[rows:, cols:] - prefix[: n - rows + 1, cols:] - prefix[rows:, : m - cols + 1] \
        + prefix[: n - rows + 1, : m - cols + 1]  # [n-rows+1, m-cols+1]: sum of the window starting at (a, b)
    best = int(torch.argmax(sums))  # first maximum in row-major order: smallest row, then column
    return divmod(best, sums.shape[1])


@register_method("sensitivity")
class Sensitivity:
    description = "sensitivity-based PKT: teacher blocks of max |θ·∂L/∂θ|, SVD into the student's LoRA init"
    reference = "https://arxiv.org/abs/2310.11451"
    Config = SensitivityConfig
    fine_tunes = True

    def __init__(self, config: SensitivityConfig):
        self.config = config

    def transfer(self, ctx: TransferContext) -> Artifact:
        model, tokenizer = self.initialize(ctx)
        ctx.finetune(model, tokenizer)
        merged = model.merge_and_unload()  # the base changed (residual), so the artifact is the whole model
        merged.save_pretrained(ctx.workdir / "model")
        tokenizer.save_pretrained(ctx.workdir / "model")
        return Artifact(kind="model", path=str(ctx.workdir / "model"))

    def initialize(self, ctx: TransferContext):
        """Score, map, cut, factorize and inject: the student's PEFT model at step 0, and its tokenizer."""
        import torch
        from peft import LoraConfig, get_peft_model

        c = self.config
        seeds = ctx.examples("seed", c.n_seeds)
        with ctx.stage("extract"):
            teacher, tokenizer = ctx.pair.load("teacher")
            scores = sensitivity(teacher, tokenizer, seeds, c.target_modules, ctx.budget.max_length)
            ctx.costs["teacher_forward"] = ctx.costs["teacher_backward"] = len(seeds)
            n_teacher = teacher.config.num_hidden_layers
            totals = [0.0] * n_teacher  # total sensitivity per teacher layer
            for (layer, _), score in scores.items():
                totals[layer] += float(score.sum())
            weights = {key: module.weight.detach() for key, module in target_modules(teacher, c.target_modules).items()}
        student, student_tokenizer = ctx.pair.load("student")
        mapping = layer_map(totals, student.config.num_hidden_layers, c.layer_map)
        model = get_peft_model(student, LoraConfig(r=c.rank, lora_alpha=c.alpha, lora_dropout=c.dropout,
                                                   target_modules=list(c.target_modules), task_type="CAUSAL_LM"))
        selection = {"layer_map": mapping, "blocks": {}}
        with torch.no_grad():
            for (layer, name), module in target_modules(model, c.target_modules).items():
                source = (mapping[layer], name)
                rows, cols = module.base_layer.weight.shape
                big_rows, big_cols = weights[source].shape
                if big_rows < rows or big_cols < cols:
                    raise UserError(f"teacher {name} of layer {mapping[layer]} is {big_rows}x{big_cols}, smaller than "
                                    f"the student's {rows}x{cols}; sensitivity transfer only cuts blocks out of a "
                                    f"larger teacher")
                a, b = max_block(scores[source], rows, cols)
                block = weights[source][a : a + rows, b : b + cols].float()  # [rows, cols]
                u, s, v = torch.svd_lowrank(block, q=min(c.rank + 8, rows, cols), niter=4)
                lora_b, lora_a = u[:, : c.rank] * s[: c.rank], v[:, : c.rank].T  # [rows, r], [r, cols]
                module.lora_A["default"].weight.copy_(lora_a)
                module.lora_B["default"].weight.copy_(lora_b)
                base = module.base_layer.weight
                base.copy_((base.float() - module.scaling["default"] * lora_b @ lora_a).to(base.dtype))
                selection["blocks"][f"layers.{layer}.{name}"] = {"teacher_layer": mapping[layer], "row": a, "col": b}
        del teacher, weights, scores
        (ctx.workdir / "selection.json").write_text(json.dumps(selection, indent=1))
        with (ctx.workdir / "seeds.jsonl").open("w") as handle:
            for seed in seeds:
                handle.write(json.dumps({"id": seed.id, "prompt": seed.prompt, "response": seed.response}) + "\n")
        return model, student_tokenizer
