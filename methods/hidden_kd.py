"""Hidden-state (layer-wise) distillation (`hidden-kd`): FitNets (Romero et al. 2015) / TinyBERT (Jiao et al. 2020)
hints, the baseline SemAlign's reviewers asked for (plain layer-wise KD).

Student layer k (of L_S) is paired with teacher layer ℓ_T(k) by SemAlign's depth map (`pkt_bench.layers`). LoRA
on the student and one linear map W_k: R^{D_S} -> R^{D_T} per pair (no bias) are trained together with the shared
loop and budget, loss

    L = CE(z_S, y) + α · mean_k MSE(W_k n(h_S^(k)), n(h_T^(ℓ_T(k))))

The map runs from the student into the teacher's space, as FitNets' regressor and TinyBERT's W_h do: the student's
state must carry what predicts the teacher's. (Mapped the other way, from the wider teacher into the student's
space and trained jointly, the map can fit the student's own states from the teacher's and constrain the student
little.) h is the residual stream a layer outputs (before the final norm); n(h) = h / RMS(h), each token's state
divided by its root mean square over the width (RMSNorm without a gain, ε = 1e-6), so the raw streams' large
outlier dimensions and their growth with depth do not set the loss's scale: the normalized target has mean square
1 per dimension. The MSE averages over the non-padding tokens (prompt included, as TinyBERT) and the teacher's
width; the teacher's states are computed on the fly without gradients. The hidden term is a per-token mean scaled
by the batch's response tokens, so the loop's division makes it a mean again; the record keeps both terms per
token at the first micro-batch (`training[].loss_terms_at_first_step`), to read α against.

Picks the references leave open: every student layer is paired (TinyBERT) rather than a single hint layer
(FitNets); one map per pair (TinyBERT shares one; the streams change with depth); the RMS normalization (neither
normalizes; the Qwen/Llama residual streams carry outlier dimensions in the hundreds); α = 1; the maps start at
PyTorch's default init from the run's seed. The maps are trained by the same AdamW (same learning rate and
clipping) but are not part of the artifact, which is the student's adapter alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pkt_bench.api import Artifact, TransferContext, UserError
from pkt_bench.methods.kd import OnlineTeacher, check_teacher_guided
from pkt_bench.methods.lora import LoRA, LoRAConfig
from pkt_bench.registry import register_method

EPS = 1e-6


def rms_normalized(states):
    """n(h) = h / sqrt(mean(h²) + ε) over the last (width) axis, in fp32."""
    import torch

    states = states.float()
    return states * torch.rsqrt(states.pow(2).mean(-1, keepdim=True) + EPS)


def hint_loss(student_states: list, teacher_states: list, maps: list):
    """mean_k MSE(W_k n(h_S^(k)), n(h_T^(k))) over paired [N, D_S] and [N, D_T] states (the kept tokens)."""
    import torch.nn.functional as F

    terms = [F.mse_loss(w(rms_normalized(s)), rms_normalized(t)) for s, t, w in zip(student_states, teacher_states, maps)]
    return sum(terms) / len(terms)


def hidden_objective(teacher: OnlineTeacher, n_teacher: int, n_student: int, d_teacher: int, d_student: int,
                     weight: float, seed: int, device):
    """The `hidden-kd` objective, an nn.Module whose maps the shared loop trains."""
    import torch
    import torch.nn.functional as F

    from pkt_bench.finetune import response_logits
    from pkt_bench.layers import depth_map, tap

    class HiddenDistillation(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pairs = [(k, t - 1) for k, t in enumerate(depth_map(n_teacher, n_student))]  # 0-based (S, T)
            torch.manual_seed(seed)
            self.maps = torch.nn.ModuleList(torch.nn.Linear(d_student, d_teacher, bias=False)
                                            for _ in self.pairs).to(device)
            self.first_terms: dict[str, float] = {}

        def forward(self, model, batch):
            keep = batch["attention_mask"].bool()
            _, states = teacher(batch, [t for _, t in self.pairs], logits=False)
            with tap(model, [s for s, _ in self.pairs]) as student:
                logits, targets = response_logits(model, batch)
            ce = F.cross_entropy(logits.float(), targets, reduction="sum")
            hidden = hint_loss([student[s][1][keep] for s, _ in self.pairs],
                               [states[t][1][keep] for _, t in self.pairs], list(self.maps))
            if not self.first_terms:
                n = max(len(targets), 1)
                self.first_terms = {"ce": ce.item() / n, "hidden_mse": hidden.item(), "weight": weight,
                                    "weighted_hidden_over_ce": weight * hidden.item() / max(ce.item() / n, 1e-12)}
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
    description = "layer-wise distillation (FitNets/TinyBERT): student states at depth-paired layers, mapped into " \
                  "the teacher's space, regressed on its RMS-normalized states, plus CE; same budget as lora"
    reference = "https://arxiv.org/abs/1909.10351"
    Config = HiddenKDConfig
    fine_tunes = True
    version = "2"  # 1: the teacher mapped into the student's space, on raw residual streams

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
