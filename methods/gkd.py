"""On-policy distillation (`gkd`): Generalized Knowledge Distillation (Agarwal et al., ICLR 2024, "On-Policy
Distillation of Language Models: Learning from Self-Generated Mistakes"), the baseline the LaTen authors added in
their rebuttal (TRL's `GKDTrainer` with lmbda = 1, beta = 0, LoRA r16/α16, max_new_tokens 32; `laten.md` §9).

The student learns from the teacher's next-token distributions on sequences the student wrote itself. At each
micro-batch, with probability λ (TRL's `lmbda`; 1, every batch, as the rebuttal), the student, with its LoRA as
trained so far, samples an answer to each train prompt: at most `max_new_tokens` tokens (32, the rebuttal's), cut
after its first end-of-sequence token, drawn from softmax(z_S / τ) alone (τ = 0.9, TRL's GKDConfig default; top-k
and top-p off as TRL sets them, and the model's own generation_config, e.g. Qwen's top_p 0.8 and repetition penalty,
not applied). Teacher and student then read prompt + answer, and the loss per answer token is TRL's generalized
Jensen-Shannon divergence between p_T and p_S at temperature 1 (TRL's loss takes none):

    β = 0:      KL(p_T ‖ p_S)                                 forward KL, the rebuttal's choice and the default
    β = 1:      KL(p_S ‖ p_T)                                 reverse KL
    0 < β < 1:  β·KL(p_T ‖ M) + (1 − β)·KL(p_S ‖ M),  M = β·p_T + (1 − β)·p_S

over the vocabulary both heads share, with no cross-entropy term. As in TRL ("batchmean"), a micro-batch's loss is
the mean over its answer tokens; the shared loop averages over response tokens, so that mean is weighted by the
micro-batch's count of train-answer tokens (the loop's unit). With 1 − λ, the micro-batch keeps the train answers
(the transfer data) instead and the same divergence runs on them (TRL's supervised batches).

Runs in the shared loop and budget, as every fine-tuning method here (the choice the issue left open: TRL's
trainer brings its own loop, schedule and batching, which would change the budget, not the method). Departures
from the rebuttal, stated: its lr 1e-5, 5 epochs, batch 1 × 16, cosine schedule with 10 warm-up steps and
max_seq_length 64 are replaced by the run's budget; its prompts (a `qwen2.5-32b-gsm-kd-prompt.jsonl` not shipped)
by the run's transfer prompts. LoRA dropout defaults to 0 because TRL's GKDConfig disables dropout
(`disable_dropout=True`). Not built: TRL's `seq_kd` (teacher-written answers; `distill` is that baseline).

Costs: the teacher reads every prompt + answer once per example per epoch (`teacher_forward`, `teacher_tokens`);
the student's sampled tokens are `student_tokens_generated`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from pkt_bench.api import Artifact, TransferContext, UserError
from pkt_bench.methods.kd import OnlineTeacher, check_teacher_guided, shared_vocab
from pkt_bench.methods.lora import LoRA, LoRAConfig
from pkt_bench.registry import register_method


def generalized_jsd(student_logits, teacher_logits, beta: float):
    """Σ over rows of TRL's generalized JSD between softmax(z_T) and softmax(z_S), in fp32 ([N, V] each); TRL's
    trainer calls its loss at temperature 1 (its `temperature` is the sampling one, `Sampling` here)."""
    import math

    import torch
    import torch.nn.functional as F

    student = F.log_softmax(student_logits.float(), dim=-1)
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)

    def kl(p_log, q_log):  # Σ p (log p − log q)
        return F.kl_div(q_log, p_log, log_target=True, reduction="sum")

    if beta == 0:
        return kl(teacher, student)
    if beta == 1:
        return kl(student, teacher)
    mixture = torch.logsumexp(torch.stack([teacher + math.log(beta), student + math.log(1 - beta)]), dim=0)
    return beta * kl(teacher, mixture) + (1 - beta) * kl(student, mixture)


@dataclass
class Sampling:
    """How the student writes its on-policy answers."""
    max_new_tokens: int
    temperature: float
    eos_ids: tuple[int, ...]
    pad_id: int


def sample_answers(model, prompts: list[list[int]], sampling: Sampling) -> list[list[int]]:
    """The student's sampled answer to each prompt (token ids), cut after the first end-of-sequence token.

    One left-padded `generate` call in eval mode (no dropout), pure temperature sampling: the generation config
    is built here, and the model's own is swapped out for the call, because `generate` would otherwise fill every
    setting left at its default (top_p 1, repetition_penalty 1) from the model's generation_config.
    """
    import torch
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), sampling.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.tensor(prompt)
        mask[i, width - len(prompt):] = 1
    config = GenerationConfig(do_sample=True, temperature=sampling.temperature, top_k=0, top_p=1.0,
                              max_new_tokens=sampling.max_new_tokens, eos_token_id=list(sampling.eos_ids),
                              pad_token_id=sampling.pad_id)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    own, base.generation_config = base.generation_config, GenerationConfig()
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    finally:
        base.generation_config = own
        model.train(training)
    answers = []
    for row in out[:, width:].tolist():
        end = next((j + 1 for j, token in enumerate(row) if token in sampling.eos_ids), len(row))
        answers.append(row[:end])
    return answers


def on_policy_batch(model, batch, sampling: Sampling) -> dict:
    """The micro-batch rewritten with the student's own answers: each row's prompt (its tokens before the first
    label) + a sampled answer, right-padded, labels on the answer only (the loop's batch layout)."""
    from pkt_bench.finetune import _collate

    rows = []
    for ids, labels, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                 batch["attention_mask"].tolist()):
        length = sum(mask)
        start = next((t for t in range(length) if labels[t] != -100), length)
        rows.append(ids[:start])
    answers = sample_answers(model, rows, sampling)
    return _collate([(p + a, [-100] * len(p) + a) for p, a in zip(rows, answers)], sampling.pad_id,
                    batch["input_ids"].device)


class OnPolicyDistillation:
    """The `gkd` objective for the shared loop: the generalized JSD per answer token of a batch the student
    sampled (with probability λ, else the train answers), scaled to the micro-batch's train-answer token count."""

    def __init__(self, teacher: OnlineTeacher, beta: float, lmbda: float, sampling: Sampling, vocab: int,
                 costs: dict[str, int], seed: int):
        self.teacher, self.beta, self.lmbda, self.sampling, self.vocab = teacher, beta, lmbda, sampling, vocab
        self.costs = costs
        self.coin = random.Random(seed)  # its own stream: the loop's torch RNG drives the sampling
        self.first_terms: dict[str, float] = {}

    def __call__(self, model, batch):
        from pkt_bench.finetune import response_logits

        gold = int((batch["labels"][:, 1:] != -100).sum())
        on_policy = self.coin.random() < self.lmbda
        if on_policy:
            batch = on_policy_batch(model, batch, self.sampling)
        teacher_logits, _ = self.teacher(batch)
        logits, targets = response_logits(model, batch)
        n = max(len(targets), 1)
        if on_policy:
            self.costs["student_tokens_generated"] = self.costs.get("student_tokens_generated", 0) + len(targets)
        jsd = generalized_jsd(logits[:, : self.vocab], teacher_logits[:, : self.vocab], self.beta)
        if not self.first_terms:
            self.first_terms = {"jsd": jsd.item() / n, "beta": self.beta, "on_policy": on_policy,
                                "answer_tokens": len(targets), "train_answer_tokens": gold}
        return jsd / n * gold


@dataclass
class GKDConfig(LoRAConfig):
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input (TRL's GKD disables dropout)"})
    beta: float = field(default=0.0, metadata={"help": "β of the generalized JSD: 0 forward KL(teacher ‖ student), "
                                                       "1 reverse KL, between: the JSD through M"})
    lmbda: float = field(default=1.0, metadata={"help": "λ: share of micro-batches the student samples itself "
                                                        "(on-policy); the rest keep the train answers"})
    max_new_tokens: int = field(default=32, metadata={"help": "tokens per sampled answer (the rebuttal's 32)"})
    temperature: float = field(default=0.9, metadata={"help": "sampling temperature of the student's answers (TRL)"})

    def __post_init__(self) -> None:
        if not (0 <= self.beta <= 1 and 0 <= self.lmbda <= 1 and self.max_new_tokens >= 1 and self.temperature > 0):
            raise UserError(f"gkd needs 0 <= beta <= 1, 0 <= lmbda <= 1, max_new_tokens >= 1 and temperature > 0, "
                            f"got beta={self.beta}, lmbda={self.lmbda}, max_new_tokens={self.max_new_tokens}, "
                            f"temperature={self.temperature}")


@register_method("gkd")
class GKD:
    description = "on-policy distillation (GKD, the LaTen rebuttal's baseline): LoRA on the generalized JSD to the " \
                  "teacher on answers the student samples itself, same budget as lora"
    reference = "https://arxiv.org/abs/2306.13649"
    Config = GKDConfig
    fine_tunes = True

    def __init__(self, config: GKDConfig):
        self.config = config

    def check(self, pair) -> None:
        check_teacher_guided(self.config, pair)

    def transfer(self, ctx: TransferContext) -> Artifact:
        c = self.config
        vocab = shared_vocab(ctx.pair)
        lora = LoRA(c)
        model, tokenizer = lora.initialize(ctx)
        teacher = OnlineTeacher(ctx.pair.load("teacher")[0], ctx.costs)
        eos = {tokenizer.eos_token_id} | set(_as_list(model.get_base_model().generation_config.eos_token_id))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        sampling = Sampling(c.max_new_tokens, c.temperature, tuple(sorted(t for t in eos if t is not None)), pad)
        ctx.finetune(model, tokenizer, objective=OnPolicyDistillation(teacher, c.beta, c.lmbda, sampling, vocab,
                                                                      ctx.costs, ctx.seed))
        return lora.save(ctx, model, tokenizer)


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
