"""Sensitivity-based parametric knowledge transfer ("Seeking Neural Nuggets", Zhong et al., ICLR 2024).

1. *Sensitivity*: for each scored teacher weight θ, S = Σ over seed samples |θ ⊙ ∂L/∂θ|, with L the mean
   cross-entropy over one sample's response tokens (a batch of one; the absolute value per sample, then the sum).
2. *Layer map*: the L_student teacher layers with the highest total sensitivity (every parameter of the layer,
   norms included, as in the reference), kept in their original order, go to student layers 0..L_student-1
   ("top"); "uniform" spaces them evenly, "random" draws them (sorted).
3. *Block*: in each teacher matrix, the student-shaped part to take. "max-sum" (the paper's): the contiguous
   window with the largest summed sensitivity, by 2-D prefix sums in float64, ties to the smallest (row, col).
   Ablations: "top-rows-cols" (the rows and the columns of largest summed sensitivity, in original order),
   "random-block" (a contiguous window at random offsets), "random-rows-cols". Embedding matrices keep every
   token row and choose only hidden columns.
4. *Factorization*: rank-r truncated SVD of the block W ≈ U_r Σ_r V_rᵀ (from the smaller Gram matrix), then B = U_r Σ_r, A = V_rᵀ ("paper")
   or B = U_r Σ_r^½, A = Σ_r^½ V_rᵀ ("balanced").
5. *Injection*: the student's LoRA starts at (A, B) and its base weight becomes W − (α/r)·B·A (the *residual*),
   so at step 0 the student computes exactly its pretrained function; then the shared fine-tuning loop.

Memory: scores are computed one decoder layer at a time. A no-grad forward pass stores each layer's input for
every seed; then, from the top layer down, each layer is re-run on its stored inputs and differentiated for one
sample at a time (`torch.autograd.grad`), its parameters' |θ ⊙ g| folded into that layer's fp32 buffers. A
layer's buffers are handed on (block search, `sensitivity.safetensors`) and freed before the next layer, so the
peak is the teacher's weights plus the stored layer inputs plus one layer's gradients and scores, at the price
of a second forward pass.

Files of an extraction (`pkt-bench extract --out DIR`; `run` keeps the same folder in the results' cache, keyed
by content hash, and reuses it for every run that changes only fine-tuning: seed, budget, dropout, init):
`adapter/` (PEFT adapter holding the init A, B), `residual/` (a PEFT adapter whose merge is the base change
−(α/r)·B·A: merge it into the student, then load `adapter/` on top, to start where `run` starts),
`selection.json` (layer map, layer scores and each matrix's block), `sensitivity.safetensors` (S of every scored
teacher matrix by parameter name; absent when no choice needs scores), `seeds.jsonl` (the texts scored).

Presets: `teacher-random` takes a random block instead of the most sensitive one (the Seeking paper's Figure 3
control); `random-init` keeps the extraction only for its scale: A and B are Gaussian with the Frobenius norms of
the sensitivity init, per matrix, so the student starts at its own function with no teacher direction in it.
`sensitivity-paper` is the configuration of Seeking's `train.sh` (embed_tokens and lm_head transferred too); with
`--budget seeking` its fine-tuning is the paper's recipe as well.

Files: `score.py` (the scores and their file), `blocks.py` (layer map, blocks, factors), this file (the method).

Checked against the upstream code (ParaKnowTransfer) on the same tokens: sensitivity maps bit-identical, the same
layers, every block offset equal, LoRA factors within fp16 rounding. Deviations left (effects measured in the
issue-12 review on tiny trained Llama pairs unless stated):

- *Seeds*: `n_seeds` from the task's seed role, topped up from its train data when the role is short (upstream
  draws its 32 from its 1000 train examples, unseeded); `seeds_scored` in the record's costs and selection.json
  says how many were scored; too few in both stops the run. Effect not measured.
- *Text*: the run's `transfer_format` (`paper` on the benchmarks: `<|user|>…<|assistant|>\n{response}\n\n` + EOS).
  Upstream scores `{response}` + EOS without the trailing blank line its training text has; effect not measured.
  The task's own format instead of `paper` moved 13 of 58 block offsets.
- *Embeddings*: off by default (`embeddings=true` or `sensitivity-paper` as upstream); Σ goes to
  `lora_embedding_B` (upstream's split, as for the linear layers). Effect of leaving them off not measured.
- *Precision*: scored in the model's dtype (bf16 on CUDA) with fp32 accumulators, upstream in fp32 on CPU; on tiny
  pairs the bf16 extraction keeps fp32's layer map and ≥ 90% of every block's area (tested). The SVD runs in
  float64 and the factors stay fp32 (upstream: fp32 SVD, factors cast to fp16).
- *Budget*: the shared budget (batch 8, cutoff 1024: 375 optimizer steps on 1000 × 3) unless `--budget seeking`
  (global batch 64, cutoff 2048: 47 steps). Effect not measured.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pkt_bench.api import Artifact, TransferContext, UserError
from pkt_bench.models import LINEAR_MODULES, check_adapter_options
from pkt_bench.registry import register_method

from .blocks import cut, factorize, layer_map, max_block, select
from .score import EMBEDDINGS, SafetensorsWriter, matrix_key, sensitivity

__all__ = ["Sensitivity", "SensitivityConfig", "cut", "factorize", "layer_map", "matrix_key", "max_block", "select",
           "sensitivity"]

LAYER_MAPS = ("top", "uniform", "random")
BLOCKS = ("max-sum", "top-rows-cols", "random-block", "random-rows-cols")
SPLITS = ("paper", "balanced")
INITS = ("svd", "random")


@dataclass
class SensitivityConfig:
    n_seeds: int = field(default=32, metadata={"help": "seed samples that score the teacher's weights"})
    rank: int = field(default=16, metadata={"help": "LoRA rank r = rank of the truncated SVD"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / r"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input during training"})
    target_modules: list[str] = field(default_factory=lambda: list(LINEAR_MODULES),
                                      metadata={"help": "matrices scored, cut and injected (comma-separated)"})
    embeddings: bool = field(default=False, metadata={"help": "also transfer embed_tokens and lm_head (merged "
                                                              "for evaluation; vLLM serves no LoRA on them)"})
    layer_map: str = field(default="top", metadata={"help": "top: most sensitive layers in order; uniform: evenly "
                                                            "spaced; random: drawn at random"})
    block: str = field(default="max-sum", metadata={"help": "max-sum (paper), top-rows-cols, random-block or "
                                                            "random-rows-cols"})
    split: str = field(default="paper", metadata={"help": "paper: B = UΣ, A = Vᵀ; balanced: B = U√Σ, A = √ΣVᵀ"})
    svd: str = field(default="exact", metadata={"help": "exact: top-r singular vectors (Gram eigenvectors, float64); "
                                                        "randomized: svd_lowrank, faster, near-optimal error"})
    init: str = field(default="svd", metadata={"help": "svd: the teacher blocks' factors (the method); random: "
                                                       "random A, B with the same Frobenius norms per matrix (the "
                                                       "random-init control), drawn with the run's seed"})
    extract_seed: int = field(default=0, metadata={"help": "draws the seed samples and random choices; the run's "
                                                           "--seed only changes fine-tuning, so seeds share one "
                                                           "extraction"})

    def __post_init__(self) -> None:
        for name, known in (("layer_map", LAYER_MAPS), ("block", BLOCKS), ("split", SPLITS), ("init", INITS),
                            ("svd", ("exact", "randomized"))):
            if getattr(self, name) not in known:
                raise UserError(f"option {name!r} must be one of {', '.join(known)}, got {getattr(self, name)!r}")
        if self.n_seeds <= 0 or self.rank <= 0:
            raise UserError("options 'n_seeds' and 'rank' must be positive integers")
        if not self.target_modules and not self.embeddings:
            raise UserError("nothing to transfer: give target_modules or set embeddings=true")

    @property
    def needs_scores(self) -> bool:
        return self.layer_map == "top" or not self.block.startswith("random")


@register_method("sensitivity")
@register_method("teacher-random", block="random-block",
                 description="control of sensitivity: a random teacher block of the same size instead of the most "
                             "sensitive one (the Seeking paper's Figure 3)")
@register_method("random-init", init="random",
                 description="control of sensitivity: its residual init with random A, B of the same Frobenius norms "
                             "per matrix (the scale without the teacher's directions)")
@register_method("sensitivity-paper", embeddings=True,
                 description="sensitivity as Seeking's train.sh: embed_tokens and lm_head too (use --budget seeking)")
class Sensitivity:
    description = "sensitivity-based PKT: teacher blocks of max |θ·∂L/∂θ|, SVD into the student's LoRA init"
    reference = "https://arxiv.org/abs/2310.11451"
    Config = SensitivityConfig
    fine_tunes = True

    def __init__(self, config: SensitivityConfig):
        self.config = config

    def check(self, pair) -> None:
        check_adapter_options(self.config, [pair.teacher, pair.student])  # blocks are cut from both

    def transfer(self, ctx: TransferContext) -> Artifact:
        identity = {k: v for k, v in asdict(self.config).items() if k != "init"}  # dropout: in the saved config
        folder = ctx.cached("sensitivity", identity | {"max_length": ctx.budget.max_length},
                            lambda out: self.extract(ctx, out))
        for name in ("selection.json", "seeds.jsonl"):  # beside the artifact, so the record's folder says what moved
            shutil.copy(folder / name, ctx.workdir / name)
        student, tokenizer = ctx.pair.load("student")
        model = self.inject(student, folder, ctx.seed)
        ctx.finetune(model, tokenizer)
        return ctx.save_merged(model, tokenizer)  # the base changed (residual), so the artifact is the whole model

    def inject(self, student, folder: Path, seed: int = 0):
        """The student with the init adapter on top, trainable, and the residual base W − (α/r)·B·A.

        With init "random", A and B are first replaced by Gaussian matrices of the same Frobenius norms.
        """
        import torch
        from peft import LoraConfig, PeftModel

        if self.config.embeddings:
            untie(student)
        config = LoraConfig.from_pretrained(folder / "adapter")
        config.lora_dropout = self.config.dropout
        model = PeftModel.from_pretrained(student, folder / "adapter", config=config, is_trainable=True)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, module in _modules(model, list(config.target_modules)):
                if self.config.init == "random":
                    for factor in (*module.lora_A.values(), *module.lora_B.values(),
                                   *module.lora_embedding_A.values(), *module.lora_embedding_B.values()):
                        factor = factor.weight if hasattr(factor, "weight") else factor
                        noise = torch.randn(factor.shape, generator=generator, dtype=torch.float32)
                        factor.copy_(noise * (factor.float().norm() / noise.norm()))
                base = module.base_layer.weight
                base.copy_((base.float() - module.get_delta_weight("default").float()).to(base.dtype))
        return model

    def seeds(self, ctx: TransferContext) -> list:
        """`n_seeds` seed samples: the task's seed role, topped up from its train data when the role is short (the
        Seeking paper's 32 seeds are a subset of its 1000 train examples); an error when both are short."""
        c = self.config
        seeds = ctx.examples("seed", c.n_seeds, seed=c.extract_seed)
        if len(seeds) < c.n_seeds:
            taken = {(e.prompt, e.response) for e in seeds}
            more = [e for e in ctx.examples("train", seed=c.extract_seed) if (e.prompt, e.response) not in taken]
            seeds += more[: c.n_seeds - len(seeds)]
        if len(seeds) < c.n_seeds:
            raise UserError(f"n_seeds={c.n_seeds} but task {ctx.task_name!r} has only {len(seeds)} seed and train "
                            f"examples; lower -o n_seeds")
        ctx.costs["seeds_scored"] = len(seeds)
        return seeds

    def extract(self, ctx: TransferContext, out: Path) -> None:
        """Score, map, cut and factorize; write the extraction files into `out` (see the module docstring)."""
        import torch
        from peft import LoraConfig, get_peft_model

        c = self.config
        seeds = self.seeds(ctx)
        with (out / "seeds.jsonl").open("w") as handle:
            for seed in seeds:
                handle.write(json.dumps({"id": seed.id, "prompt": seed.prompt, "response": seed.response}) + "\n")
        student, _ = ctx.pair.load("student")
        if c.embeddings:
            untie(student)
        targets = list(c.target_modules) + (list(EMBEDDINGS) if c.embeddings else [])
        model = get_peft_model(student, LoraConfig(r=c.rank, lora_alpha=c.alpha, lora_dropout=c.dropout,
                                                   target_modules=targets, task_type="CAUSAL_LM"))
        wanted = {key: module for key, module in _modules(model, targets)}
        shapes = {key: tuple(module.base_layer.weight.shape) for key, module in wanted.items()}
        with ctx.stage("extract"):
            teacher, tokenizer = ctx.pair.load("teacher")
            teacher_weights = {matrix_key(n): p for n, p in teacher.named_parameters() if matrix_key(n)}
            teacher_tied = teacher.get_output_embeddings().weight is teacher.get_input_embeddings().weight
            if c.embeddings and teacher_tied:
                teacher_weights[(None, "lm_head")] = teacher.get_output_embeddings().weight
            n_teacher = teacher.config.num_hidden_layers
            student_modules = {name for _, name in shapes}
            for (layer, name), weight in teacher_weights.items():
                small = shapes.get((0 if layer is not None else None, name))
                if name in student_modules and small and (weight.shape[0] < small[0] or weight.shape[1] < small[1]):
                    where = f"of layer {layer} " if layer is not None else ""
                    raise UserError(f"teacher {name} {where}is {weight.shape[0]}x{weight.shape[1]}, smaller than the "
                                    f"student's {small[0]}x{small[1]}; sensitivity transfer only cuts blocks out of "
                                    f"a larger teacher")
            blocks, totals = {}, [0.0] * n_teacher

            def choose(key, score):
                layer, name = key
                rows, cols = shapes[(0 if layer is not None else None, name)]
                if layer is None:  # embeddings: keep every token row, choose hidden columns only
                    block = select(c.block, score[:rows] if score is not None else None, (rows,
                                   teacher_weights[key].shape[1]), rows, cols, f"{c.extract_seed}:{name}")
                    return {"row": 0, "col": block["col"]} if "row" in block else {"cols": block["cols"]}
                return select(c.block, score, tuple(teacher_weights[key].shape), rows, cols,
                              f"{c.extract_seed}:{layer}.{name}")

            scored = {n: p for n, p in teacher.named_parameters()
                      if matrix_key(n) and matrix_key(n)[1] in student_modules}
            if c.needs_scores:
                ctx.costs["teacher_forward"] = ctx.costs.get("teacher_forward", 0) + 2 * len(seeds)
                ctx.costs["teacher_backward"] = ctx.costs.get("teacher_backward", 0) + len(seeds)
                writer = SafetensorsWriter(out / "sensitivity.safetensors", {n: tuple(p.shape) for n, p in scored.items()})
                try:
                    for name, score in sensitivity(teacher, tokenizer, seeds, ctx.budget.max_length,
                                                   lambda n: n in scored, totals):
                        writer.write(name, score)
                        key = matrix_key(name)
                        blocks[key] = choose(key, score)
                        if key == (None, "embed_tokens") and teacher_tied:  # one matrix, one score, two blocks
                            blocks[(None, "lm_head")] = choose((None, "lm_head"), score)
                        del score
                finally:
                    writer.close()
            else:
                blocks = {key: choose(key, None) for key in teacher_weights if key[1] in student_modules}
            mapping = layer_map(totals, model.config.num_hidden_layers, c.layer_map, c.extract_seed)
        selection = {"seeds_scored": len(seeds), "layer_map": mapping, "layer_scores": totals if c.needs_scores else None,
                     "block_strategy": c.block, "blocks": {}}
        with torch.no_grad():
            for (layer, name), module in wanted.items():
                source = (mapping[layer] if layer is not None else None, name)
                rows, cols = shapes[(layer, name)]
                block = cut(teacher_weights[source].detach(), blocks[source], rows, cols)
                if "default" in module.lora_embedding_A:  # PEFT embeddings: delta = (B·A)ᵀ, A [r, vocab], B [d, r]
                    big_b, big_a = factorize(block.T, c.rank, c.split, c.svd)  # [d, vocab], Σ on B as upstream
                    module.lora_embedding_A["default"].copy_(big_a)
                    module.lora_embedding_B["default"].copy_(big_b)
                else:
                    big_b, big_a = factorize(block, c.rank, c.split, c.svd)
                    module.lora_A["default"].weight.copy_(big_a)
                    module.lora_B["default"].weight.copy_(big_b)
                label = f"layers.{layer}.{name}" if layer is not None else name
                selection["blocks"][label] = {"teacher": f"layers.{source[0]}.{name}" if layer is not None else name,
                                              **blocks[source]}
            del teacher, teacher_weights
            model.save_pretrained(out / "adapter", save_embedding_layers=False)
            for module in wanted.values():  # the residual adapter: same A, B negated, so merging it subtracts B·A
                for factor in (module.lora_embedding_B, module.lora_B):
                    if "default" in factor:
                        part = factor["default"]
                        (part.weight if hasattr(part, "weight") else part).neg_()
            model.save_pretrained(out / "residual", save_embedding_layers=False)
        (out / "selection.json").write_text(json.dumps(selection, indent=1))


def _modules(model, targets: list[str]) -> Iterator[tuple[tuple[int | None, str], object]]:
    """((layer, module name), PEFT LoRA layer) for every adapted matrix of a PEFT model."""
    for name, module in model.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
            key = matrix_key(name + ".weight")
            if key and key[1] in targets:
                yield key, module


def untie(model) -> None:
    """Give lm_head its own copy of the embedding matrix, so a residual on one leaves the other as it was."""
    import torch

    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is embed.weight:
        head.weight = torch.nn.Parameter(embed.weight.detach().clone())
        model.config.tie_word_embeddings = False
