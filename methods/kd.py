"""Online logit distillation (`kd`): the baseline of the Seeking paper's Figure 1(a), Hinton et al. 2015.

LoRA on the student, trained on the task's train data with the shared loop and budget (as `lora`), loss per
response token

    L = (1 − β)·CE(z_S, y) + β·T²·KL(softmax(z_T / T) ‖ softmax(z_S / T))

where z_T are the teacher's logits on the same tokens, computed on the fly without gradients (teacher and
student are held at once), and the KL runs over the shared vocabulary (the first len(tokenizer) logits: a head
padded past the tokenizer, as Qwen's, keeps its padding out). T² keeps the KL's gradient on the scale of the CE's
(Hinton et al.). With β = 0 the loss is `lora`'s, term for term. The teacher runs once per example per epoch, and
is counted so (`teacher_forward`, `teacher_tokens`); the record keeps both terms per token at the first
micro-batch (`training[].loss_terms_at_first_step`).

Defaults, with their sources (Seeking gives none for its KD baseline): β = 0.5 and T = 2 are the defaults of the
DistilBERT / DistilGPT-2 training script (Sanh et al. 2019, `transformers/examples/research_projects/distillation`:
`--alpha_ce 0.5 --alpha_clm 0.5 --temperature 2.0`, the same T² scaling). Hinton et al. set no single value (T up to
20 on MNIST, and a considerably lower weight on the hard-label term). LLM distillation baselines (MiniLLM, DistiLLM,
GKD) use T = 1, the convention for generative students: `-o temperature=1`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pkt_bench.api import Artifact, TransferContext, UserError
from pkt_bench.methods.lora import LoRA, LoRAConfig
from pkt_bench.registry import register_method


def shared_vocab(pair) -> int:
    """The size of the vocabulary teacher and student share; a one-line UserError when they share none."""
    from transformers import AutoConfig, AutoTokenizer

    from pkt_bench.models import check_family

    check_family(pair.teacher, pair.student)  # same model type and the same tokenizer vocabulary
    size = len(AutoTokenizer.from_pretrained(pair.student.path))
    for ref in (pair.teacher, pair.student):
        rows = AutoConfig.from_pretrained(ref.path).vocab_size
        if rows < size:
            raise UserError(f"the LM head of {ref.name!r} has {rows} rows, fewer than the {size} tokens of the shared "
                            f"tokenizer; pick models whose heads cover their tokenizer")
    return size


def kl_divergence(teacher_logits, student_logits, temperature: float = 1.0):
    """Σ over rows of KL(softmax(z_T / T) ‖ softmax(z_S / T)), in fp32. Both [N, V]."""
    import torch.nn.functional as F

    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="sum")


class OnlineTeacher:
    """The frozen teacher run on each training batch without gradients; it counts its passes and tokens."""

    def __init__(self, model, costs: dict[str, int]):
        self.model = model.requires_grad_(False).eval()
        self.costs = costs

    def __call__(self, batch, layers: list[int] = (), logits: bool = True, part: str = "layer"):
        """(logits [N, V] at the response positions, or None without `logits`; {layer: (input, output)} of `part`
        of the 0-based `layers`, as `pkt_bench.layers.tap` records them)."""
        import torch

        from pkt_bench.finetune import response_logits
        from pkt_bench.layers import tap

        with torch.no_grad(), tap(self.model, list(layers), part) as seen:
            if logits:
                logits, _ = response_logits(self.model, batch)
            else:
                self.model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                         use_cache=False)
                logits = None
        for name, value in (("teacher_forward", len(batch["input_ids"])),
                            ("teacher_tokens", int(batch["attention_mask"].sum()))):
            self.costs[name] = self.costs.get(name, 0) + value
        return logits, dict(seen)


class Distillation:
    """The `kd` objective for the shared loop: (1 − β)·CE + β·T²·KL, summed over the batch's response tokens."""

    def __init__(self, teacher: OnlineTeacher, beta: float, temperature: float, vocab: int):
        self.teacher, self.beta, self.temperature, self.vocab = teacher, beta, temperature, vocab
        self.first_terms: dict[str, float] = {}

    def __call__(self, model, batch):
        from pkt_bench.finetune import response_logits

        teacher_logits, _ = self.teacher(batch)  # first: its activations are gone before the student's graph exists
        logits, targets = response_logits(model, batch)
        loss, ce, kl = kd_loss(logits, teacher_logits, targets, self.beta, self.temperature, self.vocab)
        if not self.first_terms:
            n = max(len(targets), 1)
            self.first_terms = {"ce": ce.item() / n, "kl": kl.item() / n, "beta": self.beta,
                                "temperature": self.temperature}
        return loss


def kd_loss(student_logits, teacher_logits, targets, beta: float, temperature: float, vocab: int):
    """(L, CE, KL), each summed over the rows: L = (1 − β)·CE(z_S, y) + β·T²·KL(softmax(z_T / T) ‖ softmax(z_S / T)),
    the KL over the first `vocab` columns. Logits [N, V], targets [N]."""
    import torch.nn.functional as F

    ce = F.cross_entropy(student_logits.float(), targets, reduction="sum")
    kl = kl_divergence(teacher_logits[:, :vocab], student_logits[:, :vocab], temperature)
    return (1 - beta) * ce + beta * temperature**2 * kl, ce, kl


@dataclass
class KDConfig(LoRAConfig):
    beta: float = field(default=0.5, metadata={"help": "β: weight of the KL term; 1 − β on the cross-entropy"})
    temperature: float = field(default=2.0, metadata={"help": "T: softmax temperature of both models in the KL"})

    def __post_init__(self) -> None:
        if not 0 <= self.beta <= 1 or not self.temperature > 0:
            raise UserError(f"kd needs 0 <= beta <= 1 and temperature > 0, got beta={self.beta}, "
                            f"temperature={self.temperature}")


def check_teacher_guided(config: LoRAConfig, pair) -> None:
    """Before any cell, for every method whose LoRA learns from the teacher's outputs (kd, hidden-kd, semalign):
    LoRA's options against the student, and a vocabulary both LM heads cover."""
    LoRA(config).check(pair)
    shared_vocab(pair)


@register_method("kd")
class KD:
    description = "online distillation: LoRA on (1-β)·CE + β·T²·KL(teacher ‖ student), same budget as lora"
    reference = "https://arxiv.org/abs/1503.02531"
    Config = KDConfig
    fine_tunes = True

    def __init__(self, config: KDConfig):
        self.config = config

    def check(self, pair) -> None:
        check_teacher_guided(self.config, pair)

    def transfer(self, ctx: TransferContext) -> Artifact:
        c = self.config
        vocab = shared_vocab(ctx.pair)
        lora = LoRA(c)
        model, tokenizer = lora.initialize(ctx)
        teacher = OnlineTeacher(ctx.pair.load("teacher")[0], ctx.costs)
        ctx.finetune(model, tokenizer, objective=Distillation(teacher, c.beta, c.temperature, vocab))
        return lora.save(ctx, model, tokenizer)
