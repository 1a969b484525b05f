"""Locate: LaTen's static neuron-level attribution, and what it selects to move.

The attribution is the *log-probability increase* of Yu & Ananiadou (EMNLP 2024, "Neuron-Level Knowledge
Attribution in Large Language Models"): one forward pass, no gradients. For an example whose text ends in the
answer token w, every quantity is read at the last input position t (the one that predicts w), and a
residual-stream vector v is scored through the *logit lens*

    log p(w | v) = log softmax(W_U · (g ⊙ v / s))_w

with W_U the unembedding, g the final RMSNorm's gain and s one scale per example taken from the last layer's
output h at t (`lens_norm`: "upstream", the default, s = sqrt(sqrt(Var(h) + 1e-5) + 1e-6), what the LaTen code
does; "rms", s = sqrt(mean(h²) + eps), the original attribution method's true RMSNorm). The lens always runs in
fp32, whatever the model's dtype: in bf16 the FFN neuron ranking had a Spearman correlation of only 0.16-0.53
with fp32's, and attention channels were ranked at chance. With x_l the input of layer l, a_l its
attention output, r_l = x_l + a_l and f_l its FFN output:

- layer scores: attention log p(w | x_l + a_l) - log p(w | x_l), FFN log p(w | r_l + f_l) - log p(w | r_l);
- FFN neuron i: log p(w | r_l + m_i·u_i) - log p(w | r_l), with m = SiLU(W_gate n) ⊙ (W_up n) the FFN
  coefficients at t and u_i column i of W_down;
- attention channel j (an input column of W_o, j = h·head_dim + e): log p(w | x_l + z_j·W_o[:, j]) - log p(w | x_l),
  with z_j = α_h[t, t]·v_t[kv(h)·head_dim + e] (`attn_values` "self": the self-position value only, as upstream)
  or the whole o_proj input at t (`attn_values` "all": the sum over positions);
- v_proj row r (kv head k, channel e): the same with the sum of z_j·W_o[:, j] over the heads j that read it,
  since under GQA one value row feeds `heads / kv_heads` o_proj columns. Without GQA a v row and an o column
  are one channel and score the same.

Since s is fixed per example, the lens is linear in v: the logits of r + m_i·u_i are W_U(g⊙r)/s + (m_i/s)·C[:, i]
with C = W_U·diag(g)·W_down, a matrix that does not depend on the input. The default ("factorized") scoring
builds C (and its W_o counterpart) once per layer, block by block, and shares it among every example of every
group; the same scores as evaluating the lens on each candidate vector ("direct"), to fp32 rounding.

Scores of several examples add up. A *selection* keeps the top L_student layers by score (separately for FFN and
attention, in layer order) and, in each, the top-n neurons by score, in rank order; the counts come from the
student's widths times the transfer rate ρ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pkt_bench.api import Example, UserError

ANSWER_TAIL = '." )\n,]'
"""Characters stripped from the end of a response so that its last token is the answer (the final number, the
letter, the last code character), as upstream does."""

MODULES = {  # name -> (path inside a decoder layer, neuron kind, weight axis that indexes the neurons)
    "up_proj": ("mlp.up_proj", "ffn", 0),  # row i: neuron i's input ("key") vector
    "down_proj": ("mlp.down_proj", "ffn", 1),  # column i: neuron i's output ("value") vector
    "v_proj": ("self_attn.v_proj", "v", 0),  # row r: value channel r (kv space)
    "o_proj": ("self_attn.o_proj", "o", 1),  # column j: attention channel j (heads x head_dim space)
}
_LENS_BLOCK = 2**26  # logits computed per block of at most this many entries
_SAFE_SHIFT = 60.0  # |logit - shift| below this: exp stays within fp32's normal range, summed over any vocabulary


@dataclass
class Widths:
    """The widths a selection counts in: layers, hidden size, FFN neurons, o_proj columns, v_proj rows."""

    layers: int
    hidden: int
    ffn: int
    o: int
    v: int
    kv_heads: int

    @classmethod
    def of(cls, config) -> Widths:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                   config.num_attention_heads * head_dim, kv_heads * head_dim, kv_heads)


def counts(student: Widths, teacher: Widths, rate: float) -> dict[str, int]:
    """Neurons moved per layer: ⌊student width · ρ⌋ of each kind, taken from both models."""
    n = {kind: int(getattr(student, kind) * rate) for kind in ("ffn", "o", "v")}
    for kind, label in (("ffn", "FFN neurons"), ("o", "o_proj columns"), ("v", "v_proj rows")):
        if n[kind] == 0:
            raise UserError(f"transfer_rate {rate} selects no {label} (student width {getattr(student, kind)}); "
                            f"raise -o transfer_rate")
        if n[kind] > getattr(teacher, kind):
            raise UserError(f"transfer_rate {rate} takes {n[kind]} {label} per layer but the teacher has only "
                            f"{getattr(teacher, kind)}; lower -o transfer_rate or pick a wider teacher")
    return n


@dataclass
class Attribution:
    """Scores of one model, summed over examples. Layer scores [L]; neuron scores [L, width]."""

    attn_layers: torch.Tensor
    ffn_layers: torch.Tensor
    ffn: torch.Tensor
    o: torch.Tensor
    v: torch.Tensor

    def __add__(self, other: Attribution) -> Attribution:
        return Attribution(*(a + b for a, b in zip(self.tensors(), other.tensors())))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.attn_layers, self.ffn_layers, self.ffn, self.o, self.v


@dataclass
class Selection:
    """What moves, for one model: layers in order, and per selected layer its neurons in rank order."""

    ffn_layers: list[int]
    attn_layers: list[int]
    ffn: torch.Tensor  # [L_student, n_ffn] FFN neuron indices
    o: torch.Tensor  # [L_student, n_o] o_proj column indices
    v: torch.Tensor  # [L_student, n_v] v_proj row indices

    def layers(self, kind: str) -> list[int]:
        return self.ffn_layers if kind == "ffn" else self.attn_layers


def answer_ids(example: Example, tokenizer) -> list[int]:
    """Tokens of prompt + response cut after the answer (the tokenizer's own special tokens, as in evaluation)."""
    ids = tokenizer(example.prompt + example.response.rstrip(ANSWER_TAIL)).input_ids
    if len(ids) < 2:
        raise UserError(f"example {example.id!r} has fewer than two tokens; LaTen attributes its last token")
    return ids


class _Capture:
    """Forward hooks that keep, per layer, the internals at the last position (no model code is patched)."""

    def __init__(self, model, attn_values: str):
        self.layers = model.base_model.layers
        self.attn_values = attn_values
        self.seen: dict[tuple[str, int], torch.Tensor] = {}
        self.handles = []
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            self._pre(layer, "x", i)
            self._post(attn, "a", i)
            self._post(attn.v_proj, "v", i)
            self._pre(attn.o_proj, "z", i)
            self._post(mlp, "f", i)
            self._pre(mlp.down_proj, "m", i)
        self._post(self.layers[-1], "h", len(self.layers) - 1)

    def _pre(self, module, name, i):
        def hook(_, args, kwargs):
            value = args[0] if args else kwargs["hidden_states"]
            self.seen[name, i] = value[0, -1].detach().float()

        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _post(self, module, name, i):
        def hook(_, args, output):
            value = output[0] if isinstance(output, tuple) else output
            self.seen[name, i] = value[0, -1].detach().float()
            if name == "a" and self.attn_values == "self":  # eager attention hands out its weights: keep α_h[t, t]
                self.seen["alpha", i] = output[1][0, :, -1, -1].detach().float()

        self.handles.append(module.register_forward_hook(hook))

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def z(self, i: int, heads: int, kv_heads: int) -> torch.Tensor:
        """Per-channel attention value at t [heads·head_dim]."""
        if self.attn_values == "all":
            return self.seen["z", i]
        alpha, v = self.seen["alpha", i], self.seen["v", i]  # [heads], [kv_heads·head_dim]
        per_head = v.view(kv_heads, -1).repeat_interleave(heads // kv_heads, dim=0)  # [heads, head_dim]
        return (alpha[:, None] * per_head).flatten()


class Lens:
    """log p(w | v) for residual-stream vectors of one model at one example's position t, in fp32."""

    def __init__(self, unembed: torch.Tensor, gain: torch.Tensor, eps: float, final: torch.Tensor, how: str):
        self.unembed, self.gain = unembed, gain  # [V, d] and [d], fp32
        if how == "rms":
            self.scale = torch.sqrt(final.pow(2).mean() + eps)
        else:  # upstream: sqrt of a standard deviation
            self.scale = torch.sqrt(torch.sqrt(final.var(unbiased=False) + 1e-5) + 1e-6)

    @classmethod
    def of(cls, model, final: torch.Tensor, how: str) -> Lens:
        norm = model.base_model.norm
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
        return cls(_unembed(model), norm.weight.detach().float(), eps, final, how)

    def logits(self, vectors: torch.Tensor) -> torch.Tensor:
        """[N, d] -> [N, V] lens logits."""
        return (vectors.to(self.unembed.device) * self.gain / self.scale) @ self.unembed.T

    def __call__(self, vectors: torch.Tensor, w: int) -> torch.Tensor:
        """[N, d] -> [N] log-probabilities of token w."""
        out = []
        for chunk in vectors.split(max(1, _LENS_BLOCK // self.unembed.shape[0])):
            logits = self.logits(chunk)  # [n, V]
            out.append(logits[:, w] - logits.logsumexp(-1))
        return torch.cat(out).to(vectors.device)


def _unembed(model) -> torch.Tensor:
    """The unembedding in fp32 (a bf16 lens ranks neurons by rounding noise)."""
    return model.get_output_embeddings().weight.detach().float()


@dataclass
class Probe:
    """What one example leaves for scoring: its answer token w, its lens, and per layer x, a, f, m, z at t."""

    w: int
    lens: Lens
    seen: list[dict[str, torch.Tensor]]


def _layer_scores(probe: Probe, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(attention layer score, FFN layer score, log p(w | x), log p(w | r)) of layer i."""
    x, a, f = (probe.seen[i][name] for name in ("x", "a", "f"))
    r = x + a
    base_x, with_a, base_r, with_f = probe.lens(torch.stack([x, x + a, r, r + f]), probe.w)
    return with_a - base_x, with_f - base_r, base_x, base_r


def _direct(layer, probe: Probe, i: int, heads: int, kv_heads: int) -> dict[str, torch.Tensor]:
    """Layer i's neuron scores by their definition: the lens over every candidate vector r + m_i·u_i, x + z_j·o_j."""
    s = probe.seen[i]
    _, _, base_x, base_r = _layer_scores(probe, i)
    w_down = layer.mlp.down_proj.weight.detach().float()  # [d, f]
    ffn = probe.lens(s["r"] + s["m"][:, None] * w_down.T, probe.w) - base_r
    w_o = layer.self_attn.o_proj.weight.detach().float()  # [d, heads·head_dim]
    channels = (w_o * s["z"]).T  # [heads·head_dim, d]: z_j · W_o[:, j]
    o = probe.lens(s["x"] + channels, probe.w) - base_x
    per_value = channels.view(kv_heads, heads // kv_heads, -1, channels.shape[1]).sum(1)  # [kv, head_dim, d]
    v = probe.lens(s["x"] + per_value.flatten(0, 1), probe.w) - base_x
    return {"ffn": ffn, "o": o, "v": v}


def _increase(base: torch.Tensor, columns: torch.Tensor, coefficients: torch.Tensor, probe: Probe,
              reference: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    """log p(w | v + c_k·u_k) - log p(w | v) for every k, from the base logits W_U(g⊙v/s) [V], the columns
    C[:, k] = W_U(g⊙u_k), stored as rows [n, V] so that every reduction runs along contiguous memory, the
    coefficients c_k [n] (or one for all) and `peak` = max_v |C[k, v]| [n], shared by every probe of a block.

    The log-sum-exp is shifted by max_v base_v instead of each row's own maximum (no pass to find it): a row's
    logits then lie within ±|a_k|·peak_k of the shift (a = c/s), so where that is below `_SAFE_SHIFT` its exponentials
    neither overflow nor underflow and the sum is exact to fp32 rounding; other rows take the usual log-sum-exp.
    """
    a = (coefficients / probe.lens.scale).expand(columns.shape[0])  # [n]
    top = base.max()
    sums = torch.addcmul(base - top, columns, a[:, None]).exp_().sum(1)  # [n]
    out = base[probe.w] + a * columns[:, probe.w] - (sums.log_() + top)
    wide = a.abs() * peak >= _SAFE_SHIFT
    if bool(wide.any()):
        logits = torch.addcmul(base, columns[wide], a[wide, None])
        out[wide] = logits[:, probe.w] - logits.logsumexp(1)
    return out - reference


def _factorized(layer, probes: list[Probe], i: int, heads: int, kv_heads: int) -> list[dict[str, torch.Tensor]]:
    """Layer i's neuron scores for every probe, through C = W_U·diag(g)·W (W = W_down, W_o).

    The lens is linear up to its fixed per-example scale s, so the logits of r + m_k·u_k are
    W_U(g⊙r)/s + (m_k/s)·C[:, k]: C does not depend on the input, and each block of its columns is built once
    and shared by every probe. A v_proj row's vector is a sum over the o_proj columns of its heads, so its logits
    are the same sum over those columns of C. Without GQA a v row is one o column and takes its score.
    """
    first = probes[0].lens
    unembed, gain = first.unembed, first.gain
    device = unembed.device
    block = max(1, _LENS_BLOCK // unembed.shape[0])
    out = []
    for probe in probes:
        s = probe.seen[i]
        _, _, base_x, base_r = _layer_scores(probe, i)
        out.append({"base": probe.lens.logits(torch.stack([s["x"], s["r"]])), "lp": (base_x, base_r),
                    "ffn": torch.empty(s["m"].shape[0], device=device),
                    "o": torch.empty(s["z"].shape[0], device=device)})
    w_down = layer.mlp.down_proj.weight.detach()  # [d, f]
    for cols in torch.arange(w_down.shape[1], device=w_down.device).split(block):
        columns = (w_down[:, cols].to(device, torch.float32).T * gain) @ unembed.T  # [n, V]: rows of C
        peak = columns.abs().amax(1)
        for probe, o in zip(probes, out):
            o["ffn"][cols.to(device)] = _increase(o["base"][1], columns, probe.seen[i]["m"][cols.to(device)],
                                                  probe, o["lp"][1], peak)
    w_o = layer.self_attn.o_proj.weight.detach()  # [d, heads·head_dim]
    group = heads // kv_heads
    head_dim = w_o.shape[1] // heads
    # o column of (head h, channel e) = h·head_dim + e; v row r = (kv head k, e) reads heads k·group .. k·group+group-1
    rows = torch.arange(kv_heads * head_dim)
    reading = ((rows // head_dim * group)[:, None] + torch.arange(group)) * head_dim + (rows % head_dim)[:, None]
    for o in out:
        o["v"] = torch.empty(len(rows), device=device)
    for chunk in rows.split(max(1, block // group)):
        cols = reading[chunk].flatten().to(w_o.device)  # [n·group], grouped per v row
        columns = (w_o[:, cols].to(device, torch.float32).T * gain) @ unembed.T  # [n·group, V]
        cols = cols.to(device)
        peak = columns.abs().amax(1)
        for probe, o in zip(probes, out):
            z = probe.seen[i]["z"][cols]
            o["o"][cols] = _increase(o["base"][0], columns, z, probe, o["lp"][0], peak)
            if group > 1:
                summed = (columns * z[:, None]).view(len(chunk), group, -1).sum(1)  # [n, V]: W_U(g⊙Σ_h z_j·o_j)
                o["v"][chunk.to(device)] = _increase(o["base"][0], summed, z.new_ones(()), probe, o["lp"][0],
                                                     summed.abs().amax(1))
    for o in out:
        if group == 1:
            o["v"] = o["o"].clone()
    return [{kind: o[kind] for kind in ("ffn", "o", "v")} for o in out]


FORMS = ("factorized", "direct")


@torch.no_grad()
def attribute_groups(model, tokenizer, groups: dict[str, Sequence[Example]], lens_norm: str, attn_values: str, *,
                     form: str = "factorized", layers: Sequence[int] | None = None,
                     costs: dict[str, int] | None = None, who: str = "teacher") -> dict[str, Attribution]:
    """Scores of `model` per group of examples, summed over each group's examples (one forward pass each).

    Every example is scored in fp32 whatever the model's dtype. `form` "factorized" (the default) shares each
    layer's C = W_U·diag(g)·W among all examples of all groups; "direct" evaluates the lens on every candidate
    vector, the definition, kept as the reference the factorized form is tested and timed against. `layers`
    limits the neuron scores to some layers (the others stay 0; for timing). `costs` receives `<who>_forward`
    and `<who>_tokens`.
    """
    assert form in FORMS, form
    device = next(model.parameters()).device
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    previous = config._attn_implementation
    if attn_values == "self":
        model.set_attn_implementation("eager")  # the only implementation that hands out attention weights
    capture = _Capture(model, attn_values)
    norm = model.base_model.norm
    unembed, gain = _unembed(model), norm.weight.detach().float().to(device)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    n_layers = len(capture.layers)
    probes: dict[str, list[Probe]] = {}
    try:
        for name, examples in groups.items():
            probes[name] = []
            for example in examples:
                ids = answer_ids(example, tokenizer)
                model(input_ids=torch.tensor([ids[:-1]], device=device))
                lens = Lens(unembed, gain, eps, capture.seen["h", n_layers - 1], lens_norm)
                seen = [{key: capture.seen[key, i] for key in ("x", "a", "f", "m")} for i in range(n_layers)]
                for i, s in enumerate(seen):
                    s["r"], s["z"] = s["x"] + s["a"], capture.z(i, heads, kv_heads)
                probes[name].append(Probe(ids[-1], lens, seen))
                if costs is not None:
                    costs[f"{who}_forward"] = costs.get(f"{who}_forward", 0) + 1
                    costs[f"{who}_tokens"] = costs.get(f"{who}_tokens", 0) + len(ids) - 1
    finally:
        capture.remove()
        model.set_attn_implementation(previous)
    flat = [probe for group in probes.values() for probe in group]
    widths = Widths.of(config)
    totals = {name: Attribution(torch.zeros(n_layers), torch.zeros(n_layers), torch.zeros(n_layers, widths.ffn),
                                torch.zeros(n_layers, widths.o), torch.zeros(n_layers, widths.v)) for name in groups}
    owner = [name for name, group in probes.items() for _ in group]
    for i, layer in enumerate(capture.layers):
        if layers is None or i in layers:
            if form == "factorized":
                neurons = _factorized(layer, flat, i, heads, kv_heads)
            else:
                neurons = [_direct(layer, probe, i, heads, kv_heads) for probe in flat]
        for k, probe in enumerate(flat):
            total = totals[owner[k]]
            attn_score, ffn_score, _, _ = _layer_scores(probe, i)
            total.attn_layers[i] += attn_score.cpu()
            total.ffn_layers[i] += ffn_score.cpu()
            if layers is None or i in layers:
                for kind in ("ffn", "o", "v"):
                    getattr(total, kind)[i] += neurons[k][kind].cpu()
    return totals


def attribute(model, tokenizer, examples: Sequence[Example], lens_norm: str, attn_values: str,
              form: str = "factorized") -> Attribution:
    """Scores of `model` summed over `examples` (one forward pass each)."""
    return attribute_groups(model, tokenizer, {"": examples}, lens_norm, attn_values, form=form)[""]


def top(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n highest scores, highest first (ties: lower index first)."""
    return torch.sort(scores, descending=True, stable=True).indices[:n]


def top_layers(scores: torch.Tensor, n_layers: int) -> list[int]:
    """The `n_layers` highest-scoring layers, in layer order (the layer map: k-th of them -> student layer k)."""
    if len(scores) < n_layers:
        raise UserError(f"the teacher has {len(scores)} layers, fewer than the student's {n_layers}; "
                        f"pick a deeper teacher")
    return sorted(top(scores, n_layers).tolist())


def select(attribution: Attribution, n_layers: int, n: dict[str, int]) -> Selection:
    """Top `n_layers` layers (in order) per kind, and the top neurons of each, in rank order."""
    ffn_layers = top_layers(attribution.ffn_layers, n_layers)
    attn_layers = top_layers(attribution.attn_layers, n_layers)
    return Selection(
        ffn_layers, attn_layers,
        torch.stack([top(attribution.ffn[layer], n["ffn"]) for layer in ffn_layers]),
        torch.stack([top(attribution.o[layer], n["o"]) for layer in attn_layers]),
        torch.stack([top(attribution.v[layer], n["v"]) for layer in attn_layers]),
    )


def weight(model, layer: int, module: str):
    return model.base_model.layers[layer].get_submodule(MODULES[module][0]).weight


def vectors(model, selection: Selection, module: str) -> torch.Tensor:
    """The selected neurons' vectors of one module type, [L_student, n, d] fp32, rows and columns alike."""
    _, kind, axis = MODULES[module]
    indices = getattr(selection, kind)
    picked = []
    for k, layer in enumerate(selection.layers(kind)):
        matrix = weight(model, layer, module).detach()
        rows = matrix.index_select(axis, indices[k].to(matrix.device))
        picked.append(rows if axis == 0 else rows.T)
    return torch.stack(picked).float().cpu()
