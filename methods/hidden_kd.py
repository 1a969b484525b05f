"""Hidden-state (layer-wise) distillation (`hidden-kd`): FitNets / TinyBERT-style hints, the baseline SemAlign's
reviewers asked for (plain layer-wise KD, e.g. Liang et al. 2022).

Student layer k (of L_S) is paired with teacher layer ℓ_T(k) by SemAlign's depth map (`pkt_bench.layers`). LoRA
on the student and one linear projection P_k: R^{D_T} -> R^{D_S} per pair (no bias) are trained together with the
shared loop and budget, loss

    L = CE(z_S, y) + α · mean_k MSE(h_S^(k), P_k h_T^(ℓ_T(k)))

with h the residual stream a layer outputs (before the final norm), the MSE averaged over the non-padding
tokens and the width, and the teacher's states computed on the fly without gradients. The hidden term is a
per-token mean scaled by the batch's response tokens, so the loop's division makes it a mean again.

Picks the references leave open: every student layer is paired (TinyBERT) rather than a single hint layer
(FitNets); one projection per pair (TinyBERT shares one; the residual scale changes with depth); α = 1; the
projections start at PyTorch's default init from the run's seed. The projections are trained by the same AdamW
(same learning rate and clipping) but are not part of the artifact, which is the student's adapter alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pkt_bench.api import Artifact, TransferContext, UserError
from pkt_bench.methods.kd import OnlineTeacher, check_teacher_guided
from pkt_bench.methods.lora import LoRA, LoRAConfig
from pkt_bench.registry import register_method


def hidden_objective(teacher: OnlineTeacher, n_teacher: int, n_student: int, d_teacher: int, d_student: int,
                     weight: float, seed: int, device):
    """The `hidden-kd` objective, an nn.Module whose projections the shared loop trains."""
    import torch
    import torch.nn.functional as F

    from pkt_bench.finetune import response_logits
    from pkt_bench.layers import depth_map, tap

    class HiddenDistillation(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pairs = [(k, t - 1) for k, t in enumerate(depth_map(n_teacher, n_student))]  # 0-based (S, T)
            torch.manual_seed(seed)
            self.projections = torch.nn.ModuleList(torch.nn.Linear(d_teacher, d_student, bias=False)
                                                   for _ in self.pairs).to(device)

        def forward(self, model, batch):
            keep = batch["attention_mask"].bool()
            _, states = teacher(batch, [t for _, t in self.pairs], logits=False)
            with tap(model, [s for s, _ in self.pairs]) as student:
                logits, targets = response_logits(model, batch)
            ce = F.cross_entropy(logits.float(), targets, reduction="sum")
            hidden = sum(F.mse_loss(student[s][1][keep].float(), projection(states[t][1][keep].float()))
                         for (s, t), projection in zip(self.pairs, self.projections)) / len(self.pairs)
            return ce + weight * hidden * len(targets)

    return HiddenDistillation()


@dataclass
class HiddenKDConfig(LoRAConfig):
    weight: float = field(default=1.0, metadata={"help": "α: weight of the hidden-state MSE beside the CE"})

    def __post_init__(self) -> None:
        if not self.weight >= 0:
            raise UserError(f"hidden-kd option 'weight' must be >= 0, got {self.weight}")


@register_method("hidden-kd")
class HiddenKD:
    description = "layer-wise distillation: student states at depth-paired layers regressed on projected teacher " \
                  "states, plus CE; same budget as lora"
    reference = "https://arxiv.org/abs/1909.10351"
    Config = HiddenKDConfig
    fine_tunes = True

    def __init__(self, config: HiddenKDConfig):
        self.config = config

    def check(self, pair) -> None:
        check_teacher_guided(self.config, pair)

    def transfer(self, ctx: TransferContext) -> Artifact:
        lora = LoRA(self.config)
        model, tokenizer = lora.initialize(ctx)
        teacher = ctx.pair.load("teacher")[0]
        t, s = teacher.config, model.get_base_model().config
        objective = hidden_objective(OnlineTeacher(teacher, ctx.costs), t.num_hidden_layers, s.num_hidden_layers,
                                     t.hidden_size, s.hidden_size, self.config.weight, ctx.seed,
                                     next(model.parameters()).device)
        ctx.finetune(model, tokenizer, objective=objective)
        return lora.save(ctx, model, tokenizer)
