import json

import pytest
import torch
from helpers import cli, tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pkt_bench.api import Example, UserError
from pkt_bench.context import RunContext
from pkt_bench.methods.laten import LaTen, LaTenConfig, align, locate
from pkt_bench.models import ModelPair
from pkt_bench.registry import METHODS
from pkt_bench.spec import Budget
from pkt_bench.stages import StageMeter
from pkt_bench.tasks.probe import Probe


def load(folder, **kwargs):
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval(), AutoTokenizer.from_pretrained(folder)


def fact():
    return Probe().transfer_data("seed")[0]


def lens_log_prob(model, h, vector, w):
    """log p(w | vector) written out for one vector: final RMSNorm with h's scale, then the unembedding."""
    scale = torch.sqrt(h.pow(2).mean() + model.model.norm.variance_epsilon)
    return torch.log_softmax(model.lm_head(model.model.norm.weight * vector / scale), -1)[w].item()


def test_lens_reads_the_last_layer_output_as_the_model_does(pico_pair):
    model, tokenizer = load(pico_pair / "teacher")
    ids = locate.answer_ids(fact(), tokenizer)
    seen = {}
    model.model.layers[-1].register_forward_hook(lambda m, a, out: seen.update(h=out[0, -1]))
    with torch.no_grad():
        expected = torch.log_softmax(model(input_ids=torch.tensor([ids[:-1]])).logits[0, -1], -1)
        lens = locate.Lens.of(model, seen["h"], "rms")
        for w in (ids[-1], 4, 17):
            assert lens(seen["h"][None], w).item() == pytest.approx(expected[w].item(), abs=1e-5)
        upstream = locate.Lens.of(model, seen["h"], "upstream")  # sqrt(std) is no RMS: another temperature
        assert abs(upstream(seen["h"][None], ids[-1]).item() - expected[ids[-1]].item()) > 1e-3


@pytest.mark.parametrize("attn_values", ["self", "all"])
def test_scores_equal_a_brute_force_log_probability_increase(pico_pair, attn_values):
    """Every layer score and a few FFN neurons, o_proj columns and v_proj rows, recomputed one vector at a time
    from eager attention weights and the layers' own modules."""
    model, tokenizer = load(pico_pair / "teacher", attn_implementation="eager")
    example = fact()
    scores = locate.attribute(model, tokenizer, [example], "rms", attn_values)
    ids = locate.answer_ids(example, tokenizer)
    w = ids[-1]
    residual, last = {}, {}
    for i, layer in enumerate(model.model.layers):
        layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a, i=i: residual.update({i: a[0][0]}))
    model.model.layers[-1].register_forward_hook(lambda m, a, out: last.update(h=out[0, -1]))
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids[:-1]]), output_hidden_states=True, output_attentions=True)
        h = last["h"]
        config = model.config
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        group = heads // kv_heads
        for i, layer in enumerate(model.model.layers):
            x_all = out.hidden_states[i][0]  # [T, d] input of layer i
            x, r = x_all[-1], residual[i][-1]
            after = out.hidden_states[i + 1][0, -1] if i + 1 < config.num_hidden_layers else h
            lp_x, lp_r = lens_log_prob(model, h, x, w), lens_log_prob(model, h, r, w)
            assert scores.attn_layers[i].item() == pytest.approx(lens_log_prob(model, h, r, w) - lp_x, abs=1e-4)
            assert scores.ffn_layers[i].item() == pytest.approx(lens_log_prob(model, h, after, w) - lp_r, abs=1e-4)
            n = layer.post_attention_layernorm(r)
            m = layer.mlp.act_fn(layer.mlp.gate_proj(n)) * layer.mlp.up_proj(n)
            w_down, w_o = layer.mlp.down_proj.weight, layer.self_attn.o_proj.weight
            for neuron in (0, 7, int(scores.ffn[i].argmax())):
                brute = lens_log_prob(model, h, r + m[neuron] * w_down[:, neuron], w) - lp_r
                assert scores.ffn[i, neuron].item() == pytest.approx(brute, abs=1e-4)
            values = layer.self_attn.v_proj(layer.input_layernorm(x_all))  # [T, kv_heads·head_dim]
            alpha = out.attentions[i][0]  # [heads, T, T]

            def z(j):  # head h's value of channel e at t: self position only, or all positions
                head, e = divmod(j, head_dim)
                value = values[:, (head // group) * head_dim + e]
                return alpha[head, -1, -1] * value[-1] if attn_values == "self" else alpha[head, -1] @ value

            for j in (0, 5, int(scores.o[i].argmax())):
                brute = lens_log_prob(model, h, x + z(j) * w_o[:, j], w) - lp_x
                assert scores.o[i, j].item() == pytest.approx(brute, abs=1e-4)
            for row in (0, int(scores.v[i].argmax())):
                kv, e = divmod(row, head_dim)
                columns = [head * head_dim + e for head in range(kv * group, (kv + 1) * group)]
                brute = lens_log_prob(model, h, x + sum(z(j) * w_o[:, j] for j in columns), w) - lp_x
                assert scores.v[i, row].item() == pytest.approx(brute, abs=1e-4)


def test_selection_takes_top_layers_in_order_and_neurons_in_rank_order():
    torch.manual_seed(0)
    scores = locate.Attribution(torch.tensor([0.3, -1.0, 2.0, 0.5]), torch.tensor([5.0, 4.0, -2.0, 1.0]),
                                torch.randn(4, 12), torch.randn(4, 8), torch.randn(4, 4))
    chosen = locate.select(scores, 2, {"ffn": 3, "o": 2, "v": 1})
    assert chosen.attn_layers == [2, 3] and chosen.ffn_layers == [0, 1]
    assert chosen.ffn[1].tolist() == scores.ffn[1].argsort(descending=True)[:3].tolist()
    assert chosen.o[0].tolist() == scores.o[2].argsort(descending=True)[:2].tolist()
    assert chosen.v.shape == (2, 1)


def random_selection(model, n=(5, 3, 2), layers=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = layers or list(range(model.config.num_hidden_layers))
    pick = lambda width, k: torch.stack([torch.randperm(width, generator=g)[:k] for _ in layers])
    widths = locate.Widths.of(model.config)
    return locate.Selection(layers, layers, pick(widths.ffn, n[0]), pick(widths.o, n[1]), pick(widths.v, n[2]))


def random_deltas(selection, d, scale=0.5):
    sizes = {"up_proj": "ffn", "down_proj": "ffn", "v_proj": "v", "o_proj": "o"}
    return {m: scale * torch.randn(*getattr(selection, kind).shape, d) for m, kind in sizes.items()}


def test_injection_changes_only_the_selected_rows_and_columns(pico_pair):
    model, _ = load(pico_pair / "student")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    selection = random_selection(model)
    weights = align.injected(model, selection, random_deltas(selection, model.config.hidden_size))
    assert len(weights) == 4 * model.config.num_hidden_layers
    for name, new in weights.items():
        module = name.split(".")[-2]
        _, kind, axis = locate.MODULES[module]
        changed = (new != before[name]).any(dim=1 - axis).nonzero().flatten()
        chosen = getattr(selection, kind)[int(name.split(".")[2])]
        assert sorted(changed.tolist()) == sorted(chosen.tolist()), name
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def probe_context(pico_pair, tmp_path):
    pair = ModelPair.resolve(str(pico_pair / "teacher"), str(pico_pair / "student"))
    return RunContext(pair, Probe(), Budget(), 0, tmp_path, StageMeter(), task_name="probe")


def test_one_step_moves_the_translator_and_not_the_student(pico_pair):
    model, tokenizer = load(pico_pair / "student")
    teacher, _ = load(pico_pair / "teacher")
    t_sel, s_sel = random_selection(teacher, layers=[1, 3]), random_selection(model)
    step = align.Step({m: locate.vectors(teacher, t_sel, m) for m in locate.MODULES}, s_sel,
                      Probe().transfer_data("align")[:2])
    translator = align.Translator(list(locate.MODULES), 128, 64, 128, 1e-5, 0)
    before_t = {k: v.clone() for k, v in translator.state_dict().items()}
    before_s = {k: v.detach().clone() for k, v in model.state_dict().items()}
    costs = {}
    losses = align.train(model, tokenizer, translator, [step], lr=3e-5, weight_decay=0.05, reg_weight=1000.0,
                         schedule_steps=20, max_length=64, train_on_inputs=False, costs=costs)
    assert len(losses) == 1 and losses[0] > 0
    assert costs == {"student_forward": 2, "student_backward": 2, "translator_steps": 1}
    assert all(not torch.equal(v, before_t[k]) for k, v in translator.state_dict().items())
    assert all(torch.equal(v, before_s[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    fresh = align.Translator(list(locate.MODULES), 128, 64, 128, 1e-5, 0)
    on_inputs = align.train(model, tokenizer, fresh, [step], lr=3e-5, weight_decay=0.05, reg_weight=1000.0,
                            schedule_steps=20, max_length=64, train_on_inputs=True, costs={})
    assert on_inputs[0] > 0 and on_inputs[0] != pytest.approx(losses[0])  # upstream crashed with this option


def test_saved_merged_student_reproduces_the_injected_logits(pico_pair, tmp_path):
    model, tokenizer = load(pico_pair / "student")
    selection = random_selection(model, n=(19, 6, 3))
    deltas = random_deltas(selection, model.config.hidden_size, scale=0.3)
    ids = torch.tensor([locate.answer_ids(fact(), tokenizer)])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        injected = align.forward_injected(model, selection, deltas, ids)
        targeted, changed = align.merge(model, selection, deltas)
    hidden = model.config.hidden_size
    assert targeted == (2 * selection.ffn.numel() + selection.o.numel() + selection.v.numel()) * hidden
    assert changed > 0.99 * targeted
    model.save_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        saved = merged(input_ids=ids).logits
    assert (injected - plain).abs().max() > 1e-2  # Δ matters, so the comparison below means something
    assert (saved - injected).abs().max() < 1e-4


def test_merge_counts_the_weights_a_small_delta_leaves_unchanged_in_bf16(pico_pair):
    """The record says how much of Δ the stored weights kept: a Δ of 1e-6 changes the fp32 student's weights
    and almost none of the bf16 student's (below half of bf16's rounding step but for weights near zero)."""
    counts = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, _ = load(pico_pair / "student")
        model.to(dtype)
        selection = random_selection(model)
        with torch.no_grad():
            counts[dtype] = align.merge(model, selection, random_deltas(selection, model.config.hidden_size, 1e-6))
    (targeted, changed32), (targeted16, changed16) = counts[torch.float32], counts[torch.bfloat16]
    assert targeted == targeted16 > 0 and changed32 > 0.9 * targeted and changed16 < 0.05 * targeted


def test_qwen2_pair_with_gqa_other_head_sizes_and_tied_embeddings_runs_through(tiny_models, tmp_path):
    class Words:
        version = "1"

        def transfer_data(self, role):
            return [Example(f"w{i} w{i + 1}", f" w{i + 2} w{i + 3}.", str(i)) for i in range(8)]

    pair = ModelPair.resolve(str(tiny_models["qwen2-teacher"]), str(tiny_models["qwen2-student"]))
    ctx = RunContext(pair, Words(), Budget(), 0, tmp_path, StageMeter(), task_name="words")
    config = LaTenConfig(transfer_rate=0.25, steps=2, align_batch=3, translator_init_std=0.05, lr=1e-2)
    artifact = LaTen(config).transfer(ctx)
    folder = tmp_path / "laten-extract"
    meta = json.loads((folder / "selection.json").read_text())
    assert meta["counts"] == {"ffn": 24, "o": 8, "v": 4}  # ⌊96·ρ⌋, ⌊4 heads·8·ρ⌋, ⌊2 kv heads·8·ρ⌋
    assert meta["translator"] == {"modules": list(locate.MODULES), "d_teacher": 64, "hidden": 64, "d_student": 32}
    tensors = load_file(folder / "selection.safetensors")
    for group in ("step0", "step1", "fuse"):
        layers = meta["groups"][group]["teacher"]["attn_layers"]
        scores = tensors[f"{group}.teacher.attn_layer_scores"]
        assert layers == sorted(scores.argsort(descending=True)[:2].tolist())
        assert tensors[f"{group}.teacher.v"].shape == (2, 4) and int(tensors[f"{group}.teacher.v"].max()) < 32
        assert tensors[f"{group}.student.o"].shape == (2, 8) and int(tensors[f"{group}.student.o"].max()) < 32
    assert load_file(folder / "fuse_vectors.safetensors")["v_proj"].shape == (2, 4, 64)
    student, _ = load(tiny_models["qwen2-student"])
    fused, _ = load(artifact.path)
    assert fused.config.tie_word_embeddings and fused.lm_head.weight is fused.model.embed_tokens.weight
    fused_params = dict(fused.named_parameters())
    for name, p in student.named_parameters():
        if name.endswith(("v_proj.weight", "o_proj.weight", "up_proj.weight", "down_proj.weight")):
            assert not torch.equal(p, fused_params[name]), name
        else:
            assert torch.equal(p, fused_params[name]), name
    assert ctx.costs["teacher_forward"] == 3 and ctx.costs["translator_steps"] == 2
    assert ctx.costs["teacher_tokens"] == ctx.costs["student_tokens"] > 3 * 4  # each example is 5+ tokens


def test_bad_options_say_what_is_wrong():
    entry = METHODS.get("laten")
    with pytest.raises(UserError, match="transfer_rate"):
        entry.make_config({"transfer_rate": "0"})
    with pytest.raises(UserError, match="modules"):
        entry.make_config({"modules": "up_proj,q_proj"})
    with pytest.raises(UserError, match="attn_values"):
        entry.make_config({"attn_values": "mean"})


def test_probe_end_to_end_beside_lora_and_extract_writes_its_files(pico_pair, tmp_path):
    results = tmp_path / "results"
    for method in ("lora", "laten"):
        done = cli("run", "--method", method, "--results", str(results))
        assert done.returncode == 0, done.stderr
    again = cli("run", "--method", "laten", "--seed", "1", "--results", str(results))
    assert again.returncode == 0, again.stderr
    records = [json.loads(p.read_text()) for p in (results / "records").glob("*.json")]
    laten = {r["seed"]: r for r in records if r["method"] == "laten"}
    assert {r["method"] for r in records} == {"student", "teacher", "lora", "laten"}
    assert laten[0]["artifact"]["kind"] == "model" and laten[0]["costs"]["translator_steps"] == 4
    assert laten[0]["costs"]["teacher_forward"] == 5 and laten[0]["references"]["teacher"]["score"] >= 0.95
    assert laten[1]["costs"]["reused"] == 1  # the extraction does not depend on the run's seed
    assert 0 <= laten[0]["costs"]["weights_changed"] <= laten[0]["costs"]["weights_targeted"] > 0
    board = json.loads(cli("leaderboard", "--results", str(results), "--format", "json").stdout)
    assert {"lora", "laten"} <= {row["method"] for row in board}

    out = tmp_path / "extracted"
    done = cli("extract", "--method", "laten", "--teacher", "pico-teacher", "--student", "pico-student",
               "--task", "probe", "--out", str(out), "-o", "steps=1")
    assert done.returncode == 0, done.stderr
    assert {p.name for p in out.iterdir()} == {"selection.json", "selection.safetensors", "translator.safetensors",
                                               "fuse_vectors.safetensors"}
    assert set(json.loads((out / "selection.json").read_text())["groups"]) == {"step0", "fuse"}


def word_examples(n=3):
    return [Example(f"w{i} w{i + 1} w{i + 2}", f" w{i + 3} w{i + 4}.", str(i)) for i in range(n)]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_factorized_locate_equals_the_direct_lens_and_selects_the_same(tiny_models, kind):
    """C = W_U·diag(g)·W shared by every example gives the definition's scores (GQA: 4 heads on 2 kv heads)."""
    model, tokenizer = load(tiny_models[f"{kind}-teacher"])
    groups = {"a": word_examples(2), "b": word_examples(1)}
    fast = locate.attribute_groups(model, tokenizer, groups, "upstream", "self")
    slow = locate.attribute_groups(model, tokenizer, groups, "upstream", "self", form="direct")
    n = {"ffn": 20, "o": 6, "v": 3}
    for name in groups:
        for a, b in zip(fast[name].tensors(), slow[name].tensors()):
            assert (a - b).abs().max() < 1e-5
        assert fast[name].ffn.abs().max() > 1e-3  # the scores are not all zero
        x, y = locate.select(fast[name], 2, n), locate.select(slow[name], 2, n)
        assert (x.ffn_layers, x.attn_layers) == (y.ffn_layers, y.attn_layers)
        for kind in ("ffn", "o", "v"):
            same_choice(getattr(slow[name], kind), x.layers(kind), getattr(x, kind), getattr(y, kind), 2e-6)


def same_choice(scores, layers, chosen, expected, tol):
    """The same neurons, but where two scores tie within `tol` (random tiny models score near fp32 resolution):
    a neuron in one choice only scores within `tol` of the choice's last one."""
    for k, layer in enumerate(layers):
        row = scores[layer]
        threshold = row[expected[k][-1]]
        for neuron in set(chosen[k].tolist()) ^ set(expected[k].tolist()):
            assert abs(row[neuron] - threshold) <= tol, (layer, neuron)


def test_without_gqa_v_rows_score_as_their_o_columns(tmp_path):
    from pkt_bench.pico import build_tokenizer

    model, tokenizer = load(tiny_model("llama", 2, 32, 4, 4, 8, build_tokenizer([f"w{i}" for i in range(60)]),
                                       tmp_path / "mha"))
    fast = locate.attribute(model, tokenizer, word_examples(2), "upstream", "self")
    slow = locate.attribute(model, tokenizer, word_examples(2), "upstream", "self", form="direct")
    assert torch.equal(fast.v, fast.o)
    assert (fast.v - slow.v).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_bf16_locate_chooses_what_fp32_chooses(tiny_models, kind):
    """The lens runs in fp32 whatever the model's dtype: a bf16 model keeps fp32's layer maps and >= 90% of its
    neurons (a bf16 lens ranked FFN neurons with Spearman 0.16-0.53 against fp32)."""
    folder = tiny_models[f"{kind}-teacher"]
    chosen = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, tokenizer = load(folder, dtype=dtype)
        scores = locate.attribute(model, tokenizer, word_examples(2), "upstream", "self")
        chosen[dtype] = locate.select(scores, 2, {"ffn": 48, "o": 16, "v": 8})
    full, half = chosen[torch.float32], chosen[torch.bfloat16]
    assert (half.ffn_layers, half.attn_layers) == (full.ffn_layers, full.attn_layers)
    for kind_ in ("ffn", "o", "v"):
        a, b = getattr(full, kind_), getattr(half, kind_)
        overlap = sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b)) / a.numel()
        assert overlap >= 0.9, (kind_, overlap)


def test_the_shifted_log_sum_exp_is_exact_and_falls_back_where_the_shift_could_overflow():
    """_increase skips each row's max pass where |a_k|·max|C_k| keeps exp in range; big coefficients take the usual
    log-sum-exp. Both agree with the definition: log softmax of base + a_k·C_k at w, minus the reference."""
    from types import SimpleNamespace

    from pkt_bench.methods.laten.locate import _increase

    torch.manual_seed(0)
    base, columns = torch.randn(5000) * 4, torch.randn(6, 5000)
    probe = SimpleNamespace(w=17, lens=SimpleNamespace(scale=torch.tensor(0.5)))
    for coefficients in (torch.randn(6) * 0.5, torch.tensor([0.1, 30.0, -0.2, 45.0, 0.0, -60.0])):  # 2nd: fallback
        logits = base + columns * (coefficients / 0.5)[:, None]
        expected = logits[:, 17] - logits.logsumexp(1) - 1.5
        got = _increase(base, columns, coefficients, probe, torch.tensor(1.5), columns.abs().amax(1))
        assert torch.allclose(got, expected, atol=1e-4), (got, expected)
