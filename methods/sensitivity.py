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
"""

from __future__ import annotations

import json
import random
import re
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pkt_bench.api import Artifact, TransferContext, UserError
from pkt_bench.models import LINEAR_MODULES
from pkt_bench.registry import register_method

_LAYER = re.compile(r"\blayers\.(\d+)\.(?:.*\.)?(\w+)\.weight$")
EMBEDDINGS = ("embed_tokens", "lm_head")
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


def matrix_key(name: str) -> tuple[int | None, str] | None:
    """(layer index, module name) of a weight's parameter name; (None, name) for embeddings; None otherwise."""
    match = _LAYER.search(name)
    if match:
        return int(match.group(1)), match.group(2)
    module = name.removesuffix(".weight").rsplit(".", 1)[-1]
    return (None, module) if module in EMBEDDINGS else None


def sensitivity(model, tokenizer, seeds, max_length: int, targeted: Callable[[str], bool],
                layer_totals: list[float]) -> Iterator[tuple[str, object]]:
    """Yield (parameter name, S) for each targeted parameter once its S = Σ_seeds |θ ⊙ ∂L/∂θ| is complete.

    Works one decoder layer at a time (see the module docstring). `layer_totals[l]` receives the summed
    sensitivity of every parameter of layer l. Embeddings (untied or tied) are scored when targeted.
    """
    import torch

    from pkt_bench.finetune import encode

    decoder, head, embed = model.get_decoder(), model.get_output_embeddings(), model.get_input_embeddings()
    names = {id(p): n for n, p in model.named_parameters()}
    device = head.weight.device
    inputs = [[] for _ in seeds]  # [seed][layer] -> (hidden input, kwargs, other positional args)
    finals, batches = [], []
    model.requires_grad_(False)
    tied = head.weight is embed.weight
    embed_scores = {}  # parameter -> fp32 buffer of the targeted embedding matrices
    for param in {id(head.weight): head.weight, id(embed.weight): embed.weight}.values():
        if targeted(names[id(param)]):
            embed_scores[param] = torch.zeros(param.shape, dtype=torch.float32, device=param.device)

    def capture(module, args, kwargs, store):
        hidden = args[0] if args else kwargs["hidden_states"]
        store.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}, args[1:]))

    with torch.no_grad():
        for k, example in enumerate(seeds):
            ids, labels = encode(example, tokenizer, max_length)
            batches.append((torch.tensor([ids], device=device), torch.tensor([labels], device=device)))
            hooks = [layer.register_forward_pre_hook(lambda m, a, kw, s=inputs[k]: capture(m, a, kw, s),
                                                     with_kwargs=True) for layer in decoder.layers]
            hooks.append(decoder.norm.register_forward_pre_hook(lambda m, a, kw: finals.append(a[0] if a else
                                                                                                kw["hidden_states"]),
                                                                with_kwargs=True))
            try:
                decoder(input_ids=batches[-1][0], use_cache=False)
            finally:
                for hook in hooks:
                    hook.remove()
            if embed.weight in embed_scores and not torch.equal(embed(batches[-1][0]), inputs[k][0][0]):
                raise UserError("cannot score embed_tokens of this model: its first layer does not take the "
                                "embeddings as they are; set embeddings=false")

    def fold(params, grads, buffers, total):
        for param, grad in zip(params, grads):
            score = (param.detach().float() * grad.float()).abs_()
            if param in buffers:
                buffers[param].add_(score)
            else:
                total[0] += float(score.sum(dtype=torch.float64))

    grads, head_rows = [], []  # per seed: ∂L/∂(current layer's output); tied: the head's gradient on its tokens
    for (ids, labels), final in zip(batches, finals):
        hidden = final.detach().requires_grad_(True)
        wrt = [hidden] + ([head.weight] if head.weight in embed_scores else [])
        with torch.enable_grad():
            head.weight.requires_grad_(len(wrt) > 1)
            logits = head(decoder.norm(hidden)).float()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
            result = torch.autograd.grad(loss, wrt)
            head.weight.requires_grad_(False)
        grads.append(result[0])
        if len(result) > 1:
            fold([head.weight], result[1:], embed_scores, [0.0])
            if tied:
                head_rows.append(result[1][ids[0].unique()])
    if head.weight in embed_scores and not tied:
        yield names[id(head.weight)], embed_scores.pop(head.weight)

    for index in reversed(range(len(decoder.layers))):
        layer = decoder.layers[index]
        params = [p for p in layer.parameters()]
        buffers = {p: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params
                   if targeted(names[id(p)])}
        total = [0.0]
        for k in range(len(seeds)):
            hidden, kwargs, rest = inputs[k][index]
            inputs[k][index] = None
            hidden = hidden.detach().requires_grad_(True)
            with torch.enable_grad():
                layer.requires_grad_(True)
                out = layer(hidden, *rest, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                result = torch.autograd.grad(out, [hidden, *params], grads[k])
                layer.requires_grad_(False)
            grads[k] = result[0]
            fold(params, result[1:], buffers, total)
        layer_totals[index] = total[0] + sum(float(b.sum(dtype=torch.float64)) for b in buffers.values())
        for param, score in buffers.items():
            yield names[id(param)], score
        del buffers

    if embed.weight in embed_scores:
        score, weight = embed_scores.pop(embed.weight), embed.weight
        for k, (ids, _) in enumerate(batches):
            with torch.enable_grad():
                weight.requires_grad_(True)
                (grad,) = torch.autograd.grad(embed(ids), weight, grads[k])
                weight.requires_grad_(False)
            if tied:  # per sample the gradient is head's + embedding's: redo |θ·g| on this sample's token rows
                rows = ids[0].unique()
                w = weight.detach()[rows].float()
                score[rows] += (w * (head_rows[k] + grad[rows]).float()).abs() - (w * head_rows[k].float()).abs()
            else:
                fold([weight], [grad], {weight: score}, [0.0])
        yield names[id(weight)], score


def layer_map(layer_scores: list[float], n_student: int, how: str, seed: int = 0) -> list[int]:
    """Teacher layer for each student layer 0..n_student-1."""
    n_teacher = len(layer_scores)
    if n_teacher < n_student:
        raise UserError(f"the teacher has {n_teacher} layers, fewer than the student's {n_student}; "
                        f"pick a deeper teacher")
    if how == "uniform":
        return [round(i * (n_teacher - 1) / max(n_student - 1, 1)) for i in range(n_student)]
    if how == "random":
        return sorted(random.Random(f"{seed}:layers").sample(range(n_teacher), n_student))
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


def select(how: str, score, shape: tuple[int, int], rows: int, cols: int, seed: str) -> dict:
    """The block of a teacher matrix of `shape` to take for a rows x cols student matrix.

    Contiguous strategies give {"row": a, "col": b}; the others {"rows": [...], "cols": [...]}, sorted
    (embeddings keep every token row: {"row": 0, "col": b} or {"cols": [...]}).
    """
    n, m = shape
    rng = random.Random(seed)
    if how == "max-sum":
        a, b = max_block(score, rows, cols)
        return {"row": a, "col": b}
    if how == "random-block":
        return {"row": rng.randint(0, n - rows), "col": rng.randint(0, m - cols)}
    if how == "top-rows-cols":
        import torch

        return {"rows": sorted(torch.topk(score.double().sum(1), rows).indices.tolist()),
                "cols": sorted(torch.topk(score.double().sum(0), cols).indices.tolist())}
    return {"rows": sorted(rng.sample(range(n), rows)), "cols": sorted(rng.sample(range(m), cols))}


def cut(weight, block: dict, rows: int, cols: int):
    """The [rows, cols] part of `weight` that `block` (from `select`) names; no "rows": the first `rows`."""
    if "row" in block:
        return weight[block["row"] : block["row"] + rows, block["col"] : block["col"] + cols]
    return weight[block["rows"] if "rows" in block else slice(rows)][:, block["cols"]]


def factorize(block, rank: int, split: str, svd: str = "exact"):
    """(B [rows, r], A [r, cols]) with B·A the best rank-r approximation of `block`.

    "exact": from the eigenvectors of the smaller Gram matrix (XᵀX or XXᵀ) in float64, exact up to rounding and
    deterministic. "randomized": `torch.svd_lowrank` (Halko et al., 4 power iterations), an order of magnitude
    faster on large blocks; its error is near the optimum, but with a flat spectrum its factors are not the top-r
    singular vectors.
    """
    import torch

    if svd == "randomized":
        u, s, v = torch.svd_lowrank(block.float(), q=min(rank + 8, *block.shape), niter=4)
        u, s, v = u[:, :rank].double(), s[:rank].double(), v[:, :rank].double()
        return _split(u * s, s, v, split)
    x = block.double()
    if x.shape[0] >= x.shape[1]:
        v = torch.linalg.eigh(x.T @ x).eigenvectors[:, -rank:].flip(1)  # [cols, r], largest first
        us = x @ v  # U_r Σ_r
        s = us.norm(dim=0)
    else:
        u = torch.linalg.eigh(x @ x.T).eigenvectors[:, -rank:].flip(1)  # [rows, r]
        vs = x.T @ u  # V_r Σ_r
        s = vs.norm(dim=0)
        v, us = vs / torch.where(s > 0, s, 1.0), u * s
    return _split(us, s, v, split)


def _split(us, s, v, split: str):
    """(B, A) from U_rΣ_r, Σ_r and V_r: all of Σ in B ("paper") or √Σ on each side ("balanced")."""
    import torch

    if split == "balanced":
        root = s.sqrt()
        return (us / torch.where(root > 0, root, 1.0)).float(), (root[:, None] * v.T).float()
    return us.float(), v.T.float()


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor, so scores never need to be in memory together.

    safetensors (0.8) saves only complete dicts; its format is an 8-byte header length, a JSON header with each
    tensor's dtype, shape and byte range, then the bytes. Every tensor must be written once before `close`.
    """

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]]):
        import math

        header, offset = {}, 0
        for name, shape in shapes.items():
            size = 4 * math.prod(shape)
            header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.start, self.header, self.pending = 8 + len(text), header, set(header)
        self.file = path.open("wb")
        self.file.write(struct.pack("<Q", len(text)) + text)
        self.file.truncate(self.start + offset)

    def write(self, name: str, tensor) -> None:
        self.file.seek(self.start + self.header[name]["data_offsets"][0])
        self.file.write(tensor.detach().float().contiguous().cpu().numpy().tobytes())
        self.pending.discard(name)

    def close(self) -> None:
        self.file.close()
        assert not self.pending, f"scores never written: {sorted(self.pending)}"


@register_method("sensitivity")
@register_method("teacher-random", block="random-block")
@register_method("random-init", init="random")
@register_method("sensitivity-paper", embeddings=True,
                 description="sensitivity as Seeking's train.sh: embed_tokens and lm_head too (use --budget seeking)")
class Sensitivity:
    description = "sensitivity-based PKT: teacher blocks of max |θ·∂L/∂θ|, SVD into the student's LoRA init"
    reference = "https://arxiv.org/abs/2310.11451"
    Config = SensitivityConfig
    fine_tunes = True

    def __init__(self, config: SensitivityConfig):
        self.config = config

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
