"""Layer attribution on the teacher: Layer Gradient × Activation (Captum's LayerGradientXActivation).

score_ℓ = mean over examples of Σ_{tokens, channels} |∂L/∂a_ℓ ⊙ a_ℓ|, with a_ℓ the hidden state layer ℓ outputs
and L the mean cross-entropy on the example's answer tokens. The paper names the attribution method only; the
loss, the aggregation (sum of absolute values) and the examples (the task's seed split, LaTen's extract split)
are the notes' picks.
"""

from __future__ import annotations

import torch

from pkt_bench.api import Example
from pkt_bench.finetune import encode, response_logits
from pkt_bench.layers import decoder_layers, tap


def layer_scores(model, tokenizer, examples: list[Example], max_length: int, costs: dict[str, int]) -> list[float]:
    """One score per layer of `model` (index 0 = layer 1); counts one forward and one backward per example."""
    layers = list(range(len(decoder_layers(model))))
    device = next(model.parameters()).device
    totals = torch.zeros(len(layers), dtype=torch.float64)
    for example in examples:
        ids, labels = (torch.tensor([row], device=device) for row in encode(example, tokenizer, max_length))
        batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
        with tap(model, layers) as seen:
            logits, targets = response_logits(model, batch)
        loss = torch.nn.functional.cross_entropy(logits.float(), targets)
        outputs = [seen[i][1] for i in layers]
        grads = torch.autograd.grad(loss, outputs)
        totals += torch.tensor([(g.float() * a.float()).abs().sum().item() for g, a in zip(grads, outputs)],
                               dtype=torch.float64)
        for name, value in (("teacher_forward", 1), ("teacher_backward", 1),
                            ("teacher_tokens", int(batch["attention_mask"].sum()))):
            costs[name] = costs.get(name, 0) + value
    return (totals / max(len(examples), 1)).tolist()
