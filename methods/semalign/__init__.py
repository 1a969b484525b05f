"""SemAlign (Gu et al., "Beyond Neural Incompatibility", arXiv 2510.24208, Findings of ACL 2026): PKT through
activations. The teacher's layer writes, carried into the student's space through the *semantic bases* of a
shared vocabulary, supervise the student's layers while its LoRA trains with the shared loop and budget.

1. *Semantic bases* (`bases.py`): per model, the unit-norm columns of the LM head's pseudo-inverse; computed once
   per model and cached.
2. *Layer attribution* (`attribution.py`): Layer Gradient × Activation on the teacher with the task's seed
   examples; cached per (pair, task, examples).
3. *Pairing* (`pairing.py`, with the depth map of `pkt_bench.layers`): v1 trains the student layer k† that first
   reaches the critical teacher layer, against the depth map's teacher layer ℓ_T(k†) (or, with `interpolate`, the
   teacher interpolated at depth k†); the v2 reconstruction gives every student layer one teacher layer (the
   best-scoring one within ±1 of the depth map).
4. *Decompose / recompose* (`bases.py`): teacher write -> cosine coefficients on the teacher's bases -> the same
   coefficients on the student's bases.
5. *Training* (`objectives.py`): `objective=v1` (the default, the one version with published equations: cosine
   layer and output terms on the attributed layer, at the MLP's output over the supervised positions) or
   `objective=v2-reconstruction` (our reconstruction of the later version from its abstracts: frontier stages,
   relation-geometry or Fisher layer loss, KL at the output).

Every choice the paper leaves open, and the pick made here, is in README.md beside this file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pkt_bench.api import Artifact, TransferContext, UserError
from pkt_bench.methods.lora import LoRA, LoRAConfig
from pkt_bench.registry import register_method

EXTRACT_VERSION = 1  # bump when an extraction's output changes for the same inputs
OBJECTIVES = ("v1", "v2-reconstruction")
INTERFACES = ("mlp", "attention", "write")  # objectives.INTERFACES maps them to the parts of a layer
BASES, SCORES = "bases.safetensors", "scores.json"
PAPER_MODULES = ["up_proj", "down_proj", "v_proj", "o_proj"]


@dataclass
class SemAlignConfig(LoRAConfig):
    target_modules: list[str] = field(default_factory=lambda: list(PAPER_MODULES), metadata={
        "help": "module names that get an adapter (the paper: up_proj, down_proj, v_proj, o_proj)"})
    objective: str = field(default="v1", metadata={
        "help": "v1 (arXiv v1, the published equations: cosine terms on the attributed layer) or v2-reconstruction "
                "(RECONSTRUCTED from the arXiv v2 / ACL 2026 abstracts: frontier stages, layer loss + KL)"})
    interface: str = field(default="", metadata={
        "help": "what a layer writes, as aligned: mlp (the MLP's output before its residual addition), attention "
                "(the attention block's), or write (the layer's whole residual write, output − input); empty: the "
                "objective's own (v1: mlp; v2-reconstruction: write)"})
    positions: str = field(default="", metadata={
        "help": "where the layer term runs: response (the supervised positions) or all (every non-padding token); "
                "empty: the objective's own (v1: response; v2-reconstruction: all)"})
    layer_loss: str = field(default="geometry", metadata={
        "help": "v2-reconstruction's layer loss: geometry (from the arXiv v2 abstract, relation geometry) or fisher "
                "(from the ACL abstract, Fisher surrogate)"})
    critical_layers: int = field(default=1, metadata={"help": "v1: teacher layers taken by attribution score (top-k)"})
    interpolate: bool = field(default=False, metadata={
        "help": "v1: supervise with the teacher interpolated at the student's exact depth k† (between the layers "
                "around L_T·k†/L_S) instead of the depth map's layer ℓ_T(k†), the pair v1 trains"})
    temperature: float = field(default=1.0, metadata={"help": "v2-reconstruction: temperature of the output KL"})
    attribution_examples: int = field(default=0, metadata={
        "help": "seed examples the attribution averages over; 0: all of them"})
    teacher_targets: str = field(default="online", metadata={
        "help": "online (the teacher runs on every micro-batch) or, for v1, precomputed (once per example ahead of "
                "training, then the teacher is freed)"})

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            hint = " (renamed v2-reconstruction: it is rebuilt from abstracts)" if self.objective == "final" else ""
            raise UserError(f"semalign option 'objective' must be v1 or v2-reconstruction, got "
                            f"{self.objective!r}{hint}")
        v1 = self.objective == "v1"
        self.interface = self.interface or ("mlp" if v1 else "write")
        self.positions = self.positions or ("response" if v1 else "all")
        if self.interface not in INTERFACES:
            raise UserError(f"semalign option 'interface' must be one of {', '.join(INTERFACES)}, got "
                            f"{self.interface!r}")
        if self.positions not in ("response", "all"):
            raise UserError(f"semalign option 'positions' must be response or all, got {self.positions!r}")
        if self.layer_loss not in ("geometry", "fisher"):
            raise UserError(f"semalign option 'layer_loss' must be geometry or fisher, got {self.layer_loss!r}")
        if self.teacher_targets not in ("online", "precomputed"):
            raise UserError(f"semalign option 'teacher_targets' must be online or precomputed, got "
                            f"{self.teacher_targets!r}")
        if self.teacher_targets == "precomputed" and self.objective != "v1":
            raise UserError("semalign teacher_targets=precomputed needs objective=v1: v2-reconstruction's output KL "
                            "needs the teacher's logits over the whole vocabulary for every token")
        if self.critical_layers < 1 or self.attribution_examples < 0 or not self.temperature > 0:
            raise UserError("semalign needs critical_layers >= 1, attribution_examples >= 0 and temperature > 0")


def batches(examples, tokenizer, budget, device) -> list[dict]:
    """The examples as the loop encodes them, right-padded in micro-batches of the budget's size."""
    import torch

    from pkt_bench.finetune import encode

    rows = [encode(e, tokenizer, budget.max_length) for e in examples]
    out = []
    for start in range(0, len(rows), budget.batch_size):
        chunk = rows[start : start + budget.batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r, _ in chunk], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in chunk], device=device)
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@register_method("semalign")
class SemAlign:
    description = ("SemAlign v1: teacher layer writes, recomposed on the student's semantic bases, supervise its LoRA "
                   "(objective=v2-reconstruction: the later version, reconstructed from its abstracts)")
    reference = "https://arxiv.org/abs/2510.24208"
    Config = SemAlignConfig
    fine_tunes = True

    def __init__(self, config: SemAlignConfig):
        self.config = config

    def check(self, pair) -> None:
        from pkt_bench.methods.kd import check_teacher_guided

        check_teacher_guided(self.config, pair)

    def transfer(self, ctx: TransferContext) -> Artifact:
        from safetensors.torch import load_file

        from pkt_bench.methods.kd import OnlineTeacher, shared_vocab

        from .bases import transfer_matrix
        from .objectives import Cosine, Frontier, OnlineTargets, StoredTargets, train_only
        from .pairing import critical_pairs, window_sources

        c = self.config
        vocab = shared_vocab(ctx.pair)
        with ctx.stage("extract"):
            scores = self.scores(ctx)
            bases = {which: load_file(self.bases(ctx, which, vocab) / BASES)["bases"]
                     for which in ("teacher", "student")}
        lora = LoRA(c)
        model, tokenizer = lora.initialize(ctx)
        device = next(model.parameters()).device
        teacher = OnlineTeacher(ctx.pair.load("teacher")[0], ctx.costs)
        matrix = transfer_matrix(bases["teacher"].to(device), bases["student"].to(device))
        del bases
        n_student = model.get_base_model().config.num_hidden_layers
        train = ctx.examples("train", ctx.budget.examples)
        if c.objective == "v1":
            pairs = critical_pairs(scores, n_student, c.critical_layers, c.interpolate)
            train_only(model, {k - 1 for k in pairs})
            targets = OnlineTargets(teacher, pairs, matrix, c.interface)
            if c.teacher_targets == "precomputed":
                with ctx.stage("extract"):
                    targets = StoredTargets(targets, batches(train, tokenizer, ctx.budget, device))
                del teacher  # the stored targets hold all the student needs from it
            objective = Cosine(targets, pairs, c.interface, c.positions)
        else:
            pairs = window_sources(scores, n_student)
            head = model.get_base_model().get_output_embeddings().weight.detach()
            objective = Frontier(teacher, pairs, matrix, c.layer_loss, head, vocab, c.temperature,
                                 ctx.budget.optimizer_steps(len(train)), ctx.budget.grad_accum, c.interface,
                                 c.positions)
        ctx.finetune(model, tokenizer, train, objective=objective)
        artifact = lora.save(ctx, model, tokenizer)
        (Path(artifact.path) / "semalign.json").write_text(json.dumps(
            {"scores": scores, "pairs": {k: list(source) for k, source in pairs.items()}}, indent=1))
        return artifact

    def scores(self, ctx: TransferContext) -> list[float]:
        """The teacher's layer attribution scores (index 0 = layer 1), cached."""
        identity = {"examples": self.config.attribution_examples, "max_length": ctx.budget.max_length,
                    "version": EXTRACT_VERSION}
        folder = ctx.cached("semalign-attribution", identity, lambda out: self.attribute(ctx, out))
        return json.loads((folder / SCORES).read_text())["scores"]

    def attribute(self, ctx: TransferContext, out: Path) -> None:
        from .attribution import layer_scores

        seeds = ctx.examples("seed", self.config.attribution_examples or None, seed=0)
        if not seeds:
            raise UserError(f"task {ctx.task_name!r} hands out no seed examples; SemAlign's attribution needs them")
        teacher, tokenizer = ctx.pair.load("teacher")
        scores = layer_scores(teacher, tokenizer, seeds, ctx.budget.max_length, ctx.costs)
        (out / SCORES).write_text(json.dumps({"scores": scores, "examples": [e.id for e in seeds]}, indent=1))

    def bases(self, ctx: TransferContext, which: str, vocab: int) -> Path:
        """The folder holding `which` model's semantic bases [D, vocab], computed once per model."""
        ref = getattr(ctx.pair, which)
        return ctx.cached("semalign-bases", {"model": ref.identity, "rows": vocab, "version": EXTRACT_VERSION},
                          lambda out: self.build_bases(ctx, which, vocab, out))

    @staticmethod
    def build_bases(ctx: TransferContext, which: str, vocab: int, out: Path) -> None:
        from safetensors.torch import save_file

        from .bases import semantic_bases

        model, _ = ctx.pair.load(which)
        head = model.get_output_embeddings().weight.detach()[:vocab]  # rows past the tokenizer: padding
        save_file({"bases": semantic_bases(head).contiguous().cpu()}, str(out / BASES))
