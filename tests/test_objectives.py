"""Tests that know the answer: each objective's value against one computed independently, in float64 from the
written-out formula, on inputs where a reversed direction, a dropped or doubled factor, a wrong position or
layer, or a sign flip changes the value. The model-level tests take their reference states and logits from
transformers' own outputs (`output_hidden_states`, `.logits`), not from pkt-bench's taps and heads."""

import copy

import pytest
import torch

from pkt_bench.methods.hidden_kd import hidden_objective, hint_loss
from pkt_bench.methods.kd import Distillation, OnlineTeacher, kd_loss
from pkt_bench.models import ModelPair


def softmax64(z):
    """Row-wise softmax in float64, written out."""
    z = z.double()
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def kd_reference(student, teacher, targets, beta, temperature, vocab):
    """(1 − β)·Σ −log p_S(y) + β·T²·Σ_rows Σ_v p_T(v)·(log p_T(v) − log p_S(v)), p at temperature T over `vocab`."""
    p_s_full = softmax64(student)
    ce = -sum(torch.log(p_s_full[i, y]) for i, y in enumerate(targets.tolist()))
    p_t, p_s = softmax64(teacher[:, :vocab] / temperature), softmax64(student[:, :vocab] / temperature)
    kl = (p_t * (torch.log(p_t) - torch.log(p_s))).sum()
    return (1 - beta) * ce + beta * temperature**2 * kl


def test_kd_loss_is_the_written_formula():
    generator = torch.Generator().manual_seed(0)
    # 3 rows, 5 columns, the last one padding past the shared vocabulary of 4 (large, so keeping it changes the KL)
    student = torch.randn(3, 5, generator=generator) * 2
    teacher = torch.randn(3, 5, generator=generator) * 3
    teacher[:, 4] = student[:, 4] = torch.tensor([6.0, -4.0, 5.0])
    student[:, 4] = torch.tensor([-3.0, 5.0, 0.0])
    targets = torch.tensor([0, 3, 1])
    # T = 3: at T = 2, T² and 2T are the same number
    loss, ce, kl = kd_loss(student, teacher, targets, beta=0.3, temperature=3.0, vocab=4)
    expected = kd_reference(student, teacher, targets, 0.3, 3.0, 4)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # the inputs tell the variants apart: the reversed KL, no T², T once more, β swapped, the padded column kept
    variants = [kd_reference(teacher, student, targets, 0.3, 3.0, 4), kd_reference(student, teacher, targets, 0.3, 1.0, 4),
                kd_reference(student, teacher, targets, 0.7, 3.0, 4), kd_reference(student, teacher, targets, 0.3, 3.0, 5)]
    assert all(abs(v.item() - expected.item()) > 1e-2 * abs(expected.item()) for v in variants)
    for wrong in (0.7 * ce + 0.3 * kl, 0.7 * ce + 0.3 * 6.0 * kl):  # T² dropped; 2T for T²
        assert abs(wrong.item() - expected.item()) > 1e-2


def response_rows(model, batch):
    """transformers' own logits at the positions that predict a response token, and those tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    return logits[:, :-1][keep], targets[keep]


def a_batch(tokenizer):
    """Two rows, right-padded, loss on the responses only."""
    rows = [("w1 w2 w3", " w4 w5 w6"), ("w7 w8", " w9")]
    ids, labels = [], []
    for prompt, response in rows:
        p, r = tokenizer(prompt).input_ids, tokenizer(response, add_special_tokens=False).input_ids
        ids.append(p + r)
        labels.append([-100] * len(p) + r)
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    return {"input_ids": torch.tensor([row + [pad] * (width - len(row)) for row in ids]),
            "labels": torch.tensor([row + [-100] * (width - len(row)) for row in labels]),
            "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_kd_objective_on_models_matches_the_formula_on_their_own_logits(tiny_models, family):
    pair = ModelPair.resolve(str(tiny_models[f"{family}-teacher"]), str(tiny_models[f"{family}-student"]))
    (teacher, tokenizer), (student, _) = pair.load("teacher"), pair.load("student")
    batch = a_batch(tokenizer)
    vocab = len(tokenizer) - 3  # a shared vocabulary narrower than the heads: the KL must leave the rest out
    with torch.no_grad():
        t_logits, targets = response_rows(teacher, batch)
        s_logits, _ = response_rows(student, batch)
    expected = kd_reference(s_logits, t_logits, targets, 0.3, 3.0, vocab)
    assert abs(kd_reference(s_logits, t_logits, targets, 0.3, 3.0, None).item() - expected.item()) > 1e-4
    objective = Distillation(OnlineTeacher(teacher, {}), 0.3, 3.0, vocab)
    assert objective(student, batch).item() == pytest.approx(expected.item(), rel=1e-4)
    n = len(targets)
    ce = kd_reference(s_logits, t_logits, targets, 0.0, 3.0, vocab).item()
    kl = kd_reference(s_logits, t_logits, targets, 1.0, 3.0, vocab).item() / 9.0
    assert objective.first_terms == pytest.approx({"ce": ce / n, "kl": kl / n, "beta": 0.3, "temperature": 3.0},
                                                  rel=1e-3)  # the KL per token is small here (fp32 rounding)


def test_hint_loss_is_the_written_formula():
    generator = torch.Generator().manual_seed(1)
    student = [torch.randn(3, 2, generator=generator) + 4, torch.randn(3, 2, generator=generator) * 50]  # [N, D_S]
    teacher = [torch.randn(3, 3, generator=generator) - 2, torch.randn(3, 3, generator=generator) * 9]  # [N, D_T]
    maps = [torch.nn.Linear(2, 3, bias=False) for _ in student]  # student -> teacher space
    with torch.no_grad():
        for w in maps:
            w.weight.copy_(torch.randn(3, 2, generator=generator))

    def normalized(h):
        h = h.double()
        return h / torch.sqrt((h**2).mean(-1, keepdim=True) + 1e-6)

    def expected(flip=1.0):
        terms = [((normalized(s) @ w.weight.double().T - flip * normalized(t)) ** 2).mean()
                 for s, t, w in zip(student, teacher, maps)]
        return sum(terms) / len(terms)

    assert hint_loss(student, teacher, maps).item() == pytest.approx(expected().item(), rel=1e-5)
    assert abs(expected(-1.0) - expected()).item() > 0.1  # the target's sign matters on these inputs
    raw = sum(((s.double() @ w.weight.double().T - t.double()) ** 2).mean() for s, t, w in zip(student, teacher, maps)) / 2
    assert abs(raw - expected()).item() > 0.1  # and the normalization does


def layer_outputs(model):
    """Each decoder layer's output (the residual stream, before the final norm), from transformers' own
    `output_hidden_states` of a copy whose final norm is the identity."""
    bare = copy.deepcopy(model)
    bare.get_decoder().norm = torch.nn.Identity()
    return lambda batch: bare(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              output_hidden_states=True).hidden_states[1:]


def test_the_hidden_kd_objective_on_models_matches_the_formula_on_their_own_states(tiny_models):
    pair = ModelPair.resolve(str(tiny_models["qwen2-teacher"]), str(tiny_models["qwen2-student"]))
    (teacher, tokenizer), (student, _) = pair.load("teacher"), pair.load("student")
    batch = a_batch(tokenizer)
    objective = hidden_objective(OnlineTeacher(teacher, {}), 3, 2, 64, 32, 0.7, 0, "cpu")
    with torch.no_grad():
        t_states, s_states = layer_outputs(teacher)(batch), layer_outputs(student)(batch)
        s_logits, targets = response_rows(student, batch)
        keep = batch["attention_mask"].bool()
        ce = -torch.log(softmax64(s_logits)[torch.arange(len(targets)), targets]).sum()

        def n(h):
            h = h[keep].double()
            return h / torch.sqrt((h**2).mean(-1, keepdim=True) + 1e-6)

        # ℓ_T(k) = ⌊k·L_T/L_S⌋: student layer 1 <- teacher layer 1, student 2 <- teacher 3 (1-based)
        pairs = [(0, 0), (1, 2)]
        mse = sum(((n(s_states[s]) @ w.weight.double().T - n(t_states[t])) ** 2).mean()
                  for (s, t), w in zip(pairs, objective.maps)) / 2
        expected = ce + 0.7 * mse * len(targets)
        assert objective(student, batch).item() == pytest.approx(expected.item(), rel=1e-4)
    assert objective.first_terms["hidden_mse"] == pytest.approx(mse.item(), rel=1e-4)
    assert objective.first_terms["ce"] == pytest.approx(ce.item() / len(targets), rel=1e-4)
    # the scale of the hint term against the CE at step 0, as the record states it
    assert objective.first_terms["weight"] == 0.7
    assert objective.first_terms["weighted_hidden_over_ce"] == pytest.approx(
        0.7 * mse.item() / (ce.item() / len(targets)), rel=1e-4)


def test_a_method_version_enters_the_key_only_where_a_method_declares_one(pico_pair):
    """hidden-kd's computation changed (version 2: the student mapped into the teacher's space, normalized states):
    its records from version 1 must not be reused; methods without a version keep their older keys."""
    from pkt_bench.runner import plan
    from pkt_bench.spec import RunSpec

    hidden = plan(RunSpec(method="hidden-kd"))[0].describe()
    assert hidden["method_version"] == "2"
    assert "method_version" not in plan(RunSpec(method="lora"))[0].describe()


def transfer64(teacher, student):
    """M = S_T S_Sᵀ in float64: S = pinv(W) of each LM head W [V, D], columns at unit norm (zero columns kept 0)."""
    def bases(model):
        s = torch.linalg.pinv(model.get_output_embeddings().weight.detach().double())
        return s / s.norm(dim=0, keepdim=True).clamp_min(1e-30)
    return bases(teacher) @ bases(student).T


def sublayer_outputs(model, batch, part):
    """What each layer's `part` (mlp or self_attn) returns, caught by wrapping its forward (not by a hook)."""
    caught = {}
    for i, layer in enumerate(model.get_decoder().layers):
        module = getattr(layer, part)
        original = module.forward

        def wrapped(*args, _i=i, _original=original, **kwargs):
            out = _original(*args, **kwargs)
            caught[_i] = out[0] if isinstance(out, tuple) else out
            return out
        module.forward = wrapped
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for layer in model.get_decoder().layers:
            del getattr(layer, part).forward
    return caught


def writes(model, batch, interface):
    """Each layer's write at `interface` [B, T, D], in float64, from transformers' own outputs."""
    if interface == "write":
        states = layer_outputs(model)(batch)
        inputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       output_hidden_states=True).hidden_states[:1] + tuple(states[:-1])
        return [(o - i).double() for i, o in zip(inputs, states)]
    caught = sublayer_outputs(model, batch, {"mlp": "mlp", "attention": "self_attn"}[interface])
    return [caught[i].double() for i in sorted(caught)]


def cos_rows(a, b):
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def supervised(batch):
    """[B, T] bool: positions whose next token is a response token."""
    keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
    keep[:, :-1] = batch["labels"][:, 1:] != -100
    return keep


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_semalign_v1_is_the_written_formula_on_the_models_own_sublayer_outputs(tiny_models, family):
    """v1: L = N·[1 − mean over supervised positions of cos(h_S^(k), R̃)] + Σ_rows [1 − z_y / ‖z‖], h the MLP's
    output before the residual addition, R̃ = (h_T / ‖h_T‖) M from the depth map's teacher layer."""
    from pkt_bench.methods.semalign.objectives import Cosine, OnlineTargets

    pair = ModelPair.resolve(str(tiny_models[f"{family}-teacher"]), str(tiny_models[f"{family}-student"]))
    (teacher, tokenizer), (student, _) = pair.load("teacher"), pair.load("student")
    batch = a_batch(tokenizer)
    m = transfer64(teacher, student)
    with torch.no_grad():
        logits, targets = response_rows(student, batch)
        z = logits.double()
        output = (1 - z[torch.arange(len(targets)), targets] / z.norm(dim=-1)).sum()

        def expected(interface="mlp", keep=supervised(batch), k=2, a=3, b=None, lam=0.0):
            h_t, h_s = writes(teacher, batch, interface), writes(student, batch, interface)
            target = h_t[a - 1] if b is None else (1 - lam) * h_t[a - 1] + lam * h_t[b - 1]
            goal = (target / target.norm(dim=-1, keepdim=True)) @ m
            return len(targets) * (1 - cos_rows(h_s[k - 1][keep], goal[keep]).mean()) + output

        def value(pairs, interface="mlp", positions="response"):
            online = OnlineTeacher(teacher, {})
            return Cosine(OnlineTargets(online, pairs, m.float(), interface), pairs, interface, positions)(
                student, batch).item()

        right = expected()
        assert value({2: (3, 3, 0.0)}) == pytest.approx(right.item(), rel=1e-5)
        assert value({2: (2, 3, 0.25)}) == pytest.approx(expected(a=2, b=3, lam=0.25).item(), rel=1e-5)
        assert value({2: (3, 3, 0.0)}, "write", "all") == pytest.approx(
            expected("write", batch["attention_mask"].bool()).item(), rel=1e-5)
        assert value({2: (2, 3, 0.25)}, "write", "all") == pytest.approx(  # both interpolated terms are writes
            expected("write", batch["attention_mask"].bool(), a=2, b=3, lam=0.25).item(), rel=1e-5)
        unsupervised = {**batch, "labels": torch.full_like(batch["labels"], -100)}  # every response cut off
        nothing = Cosine(OnlineTargets(OnlineTeacher(teacher, {}), {2: (3, 3, 0.0)}, m.float(), "mlp"),
                         {2: (3, 3, 0.0)}, "mlp", "response")(student, unsupervised)
        assert nothing.item() == 0.0
        # the inputs tell apart: the whole layer's write, the attention's, every token, another student or
        # teacher layer, the interpolation weight reversed, the target's sign
        variants = [expected("write"), expected("attention"), expected(keep=batch["attention_mask"].bool()),
                    expected(k=1), expected(a=2), expected(a=2, b=3, lam=0.75)]
        assert all(abs(v - right).item() > 1e-4 * right.item() for v in variants), [(v - right).item() for v in variants]
        flipped = len(targets) * (1 + cos_rows(writes(student, batch, "mlp")[1][supervised(batch)],
                                               ((lambda t: t / t.norm(dim=-1, keepdim=True))(
                                                   writes(teacher, batch, "mlp")[2]) @ m)[supervised(batch)]).mean()) + output
        assert abs(flipped - right).item() > 1e-3 * right.item()


def test_semalign_v2_reconstruction_is_the_written_formula_on_the_models_own_writes(tiny_models):
    """The reconstruction at its first stage: ‖G(Δ_S) − G(R̃)‖²_F / n² per sequence on every non-padding token,
    times N, plus Σ_rows KL(p_T ‖ p_S); G(X) = H X̂ X̂ᵀ H written out with the centring matrix H."""
    from pkt_bench.methods.semalign.objectives import Frontier

    pair = ModelPair.resolve(str(tiny_models["llama-teacher"]), str(tiny_models["llama-student"]))
    (teacher, tokenizer), (student, _) = pair.load("teacher"), pair.load("student")
    batch = a_batch(tokenizer)
    m, vocab = transfer64(teacher, student), len(tokenizer)
    head = student.get_output_embeddings().weight.detach()
    with torch.no_grad():
        s_logits, targets = response_rows(student, batch)
        t_logits, _ = response_rows(teacher, batch)

        def kl_at(temperature):
            p_t = softmax64(t_logits[:, :vocab] / temperature)
            p_s = softmax64(s_logits[:, :vocab] / temperature)
            return (p_t * (torch.log(p_t) - torch.log(p_s))).sum()

        kl = kl_at(1.0)

        def g(x):
            n = len(x)
            unit = x / x.norm(dim=-1, keepdim=True)
            h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n
            return h @ unit @ unit.T @ h

        def expected(source=1, uncentred=False, interface="write", kept=batch["attention_mask"].bool(), output=kl):
            d_s, d_t = writes(student, batch, interface)[0], writes(teacher, batch, interface)[source - 1]
            goal = (d_t / d_t.norm(dim=-1, keepdim=True)) @ m
            terms = []
            for row, keep in enumerate(kept):
                x, y = d_s[row][keep], goal[row][keep]
                gx, gy = (g(x), g(y)) if not uncentred else (
                    (lambda u: u @ u.T)(x / x.norm(dim=-1, keepdim=True)),
                    (lambda u: u @ u.T)(y / y.norm(dim=-1, keepdim=True)))
                terms.append(((gx - gy) ** 2).sum() / len(x) ** 2)
            return len(targets) * sum(terms) / len(terms) + output

        def frontier(temperature=1.0, interface="write", positions="all"):
            return Frontier(OnlineTeacher(teacher, {}), {1: (1, 1, 0.0), 2: (3, 3, 0.0)}, m.float(), "geometry",
                            head, vocab, temperature, 2, 1, interface, positions)(student, batch).item()

        right = expected()
        assert frontier() == pytest.approx(right.item(), rel=1e-4)
        variants = [expected(source=2), expected(uncentred=True), expected() - 2 * kl]
        assert all(abs(v - right).item() > 1e-3 * right.item() for v in variants)
        # its options: the MLP's output on the supervised positions, the output KL at another temperature
        assert frontier(interface="mlp", positions="response") == pytest.approx(
            expected(interface="mlp", kept=supervised(batch)).item(), rel=1e-4)
        assert frontier(temperature=2.0) == pytest.approx(expected(output=kl_at(2.0)).item(), rel=1e-4)
        assert abs(kl_at(2.0) - kl).item() > 1e-3 * right.item()
