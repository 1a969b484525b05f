"""On-policy distillation (`gkd`): the generalized JSD against the formula in float64, the student's sampling
against a sampler written out step by step, the on-policy batch's layout, and the objective on tiny models against
transformers' own logits on the sequences the student wrote."""

import pytest
import torch

from pkt_bench.methods.gkd import OnPolicyDistillation, Sampling, generalized_jsd, on_policy_batch, sample_answers
from pkt_bench.methods.kd import OnlineTeacher
from pkt_bench.models import ModelPair
from test_objectives import a_batch, softmax64


def jsd_reference(student, teacher, beta):
    """β·Σ p_T log(p_T / M) + (1 − β)·Σ p_S log(p_S / M), M = β·p_T + (1 − β)·p_S; β = 0: Σ p_T log(p_T / p_S),
    β = 1: Σ p_S log(p_S / p_T). Summed over rows, float64."""
    p_s, p_t = softmax64(student), softmax64(teacher)
    if beta == 0:
        return (p_t * (p_t.log() - p_s.log())).sum()
    if beta == 1:
        return (p_s * (p_s.log() - p_t.log())).sum()
    m = beta * p_t + (1 - beta) * p_s
    return beta * (p_t * (p_t.log() - m.log())).sum() + (1 - beta) * (p_s * (p_s.log() - m.log())).sum()


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_generalized_jsd_is_the_written_formula(beta):
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(3, 6, generator=generator) * 4  # peaked against flat: every KL here is asymmetric
    teacher = torch.randn(3, 6, generator=generator) * 0.7
    expected = jsd_reference(student, teacher, beta).item()
    assert generalized_jsd(student, teacher, beta).item() == pytest.approx(expected, rel=1e-5)
    # these inputs tell the variants apart: the directions swapped, the mixture's weights swapped
    others = [jsd_reference(teacher, student, beta).item(), jsd_reference(student, teacher, 1 - beta).item()]
    assert all(abs(o - expected) > 1e-2 * expected for o in others)


def reference_sampler(model, prompts, sampling):
    """Pure temperature sampling written out: each step, every unfinished row's last logits (from the unpadded
    sequence, no cache) / τ, softmax, one multinomial draw over the batch (as `generate` draws), until every row
    has met an end token or the budget."""
    rows = [list(p) for p in prompts]
    answers = [[] for _ in prompts]
    done = [False] * len(prompts)
    with torch.no_grad():
        for _ in range(sampling.max_new_tokens):
            last = torch.stack([model(input_ids=torch.tensor([r + a])).logits[0, -1].float()
                                for r, a in zip(rows, answers)])
            drawn = torch.multinomial(torch.softmax(last / sampling.temperature, -1), 1)[:, 0].tolist()
            for i, token in enumerate(drawn):
                if not done[i]:
                    answers[i].append(token)
                    done[i] = token in sampling.eos_ids
            if all(done):
                break
    return answers


def test_the_student_samples_at_its_temperature_alone_and_stops_at_its_end_tokens(tiny_models):
    pair = ModelPair.resolve(str(tiny_models["llama-teacher"]), str(tiny_models["llama-student"]))
    student, tokenizer = pair.load("student")
    with torch.no_grad():
        student.get_decoder().norm.weight.mul_(40)  # peaked logits: the temperature and every filter change the draw
    for module in student.modules():  # dropout that a sample drawn in training mode would feel
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    student.eval()
    # a generation_config whose settings would change the draw: none of them may reach it
    student.generation_config.top_k, student.generation_config.top_p = 3, 0.5
    student.generation_config.repetition_penalty = 3.0
    prompts = [tokenizer("w1 w2 w3").input_ids, tokenizer("w7").input_ids, tokenizer("w4 w5").input_ids]
    eos = tuple(tokenizer.convert_tokens_to_ids([f"w{i}" for i in range(0, 60, 4)]))  # frequent, so rows stop early
    sampling = Sampling(max_new_tokens=12, temperature=0.7, eos_ids=eos, pad_id=tokenizer.pad_token_id)
    torch.manual_seed(5)
    expected = reference_sampler(student, prompts, sampling)
    torch.manual_seed(5)
    student.train()
    got = sample_answers(student, prompts, sampling)
    assert got == expected
    assert student.training and student.generation_config.top_k == 3  # mode and config restored
    assert any(a[-1] in eos and len(a) < 12 for a in got)  # the cut after the first end token was exercised
    assert all(t not in eos for a in got for t in a[:-1])


def test_a_lora_wrapped_student_with_a_wide_head_also_samples_at_its_temperature_alone(tiny_models):
    """As the method samples: the student inside PEFT (whose base model holds the generation_config), with more
    than 50 tokens (transformers' default top_k) and flat logits, so a top-k or top-p filter would change draws."""
    from peft import LoraConfig, get_peft_model

    pair = ModelPair.resolve(str(tiny_models["llama-teacher"]), str(tiny_models["llama-student"]))
    student, tokenizer = pair.load("student")
    student.resize_token_embeddings(80)
    with torch.no_grad():
        torch.manual_seed(0)
        student.get_output_embeddings().weight.normal_(0, 0.5)
    student.generation_config.top_k, student.generation_config.top_p = 3, 0.5
    student.generation_config.repetition_penalty = 3.0
    wrapped = get_peft_model(student, LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.5))
    prompts = [tokenizer("w1 w2 w3").input_ids, tokenizer("w7").input_ids]
    sampling = Sampling(max_new_tokens=10, temperature=1.3, eos_ids=(tokenizer.eos_token_id,),
                        pad_id=tokenizer.pad_token_id)
    wrapped.eval()
    torch.manual_seed(7)
    expected = reference_sampler(wrapped, prompts, sampling)
    torch.manual_seed(7)
    wrapped.train()
    assert sample_answers(wrapped, prompts, sampling) == expected
    assert any(t >= 50 for a in expected for t in a)  # tokens past a top-50 cut were drawn
    assert wrapped.training and student.generation_config.top_k == 3


def test_the_on_policy_batch_keeps_each_prompt_and_labels_only_the_answer(tiny_models, monkeypatch):
    import pkt_bench.methods.gkd as gkd

    _, tokenizer = ModelPair.resolve(str(tiny_models["llama-teacher"]), str(tiny_models["llama-student"])).load("student")
    batch = a_batch(tokenizer)
    seen = []
    monkeypatch.setattr(gkd, "sample_answers", lambda model, prompts, sampling: seen.extend(prompts) or [[7, 8], [9]])
    out = on_policy_batch(None, batch, Sampling(4, 1.0, (2,), tokenizer.pad_token_id))
    p0, p1 = tokenizer("w1 w2 w3").input_ids, tokenizer("w7 w8").input_ids
    assert seen == [p0, p1]
    pad = tokenizer.pad_token_id
    assert out["input_ids"].tolist() == [p0 + [7, 8], p1 + [9] + [pad] * (len(p0) + 1 - len(p1))]
    assert out["labels"].tolist() == [[-100] * len(p0) + [7, 8], [-100] * len(p1) + [9] + [-100] * (len(p0) + 1 - len(p1))]
    assert out["attention_mask"].sum(1).tolist() == [len(p0) + 2, len(p1) + 1]
    # a row whose answer was cut off (no label left): all of its tokens are the prompt, its padding is not
    cut = {**batch, "labels": batch["labels"].clone()}
    cut["labels"][1] = -100
    seen.clear()
    on_policy_batch(None, cut, Sampling(4, 1.0, (2,), tokenizer.pad_token_id))
    assert seen == [p0, p1 + tokenizer(" w9", add_special_tokens=False).input_ids]


@pytest.mark.parametrize("family,beta", [("llama", 0.0), ("qwen2", 0.4)])
def test_the_gkd_objective_is_the_jsd_on_the_students_own_answers(tiny_models, family, beta):
    pair = ModelPair.resolve(str(tiny_models[f"{family}-teacher"]), str(tiny_models[f"{family}-student"]))
    (teacher, tokenizer), (student, _) = pair.load("teacher"), pair.load("student")
    batch = a_batch(tokenizer)
    gold = int((batch["labels"][:, 1:] != -100).sum())
    sampling = Sampling(6, 0.9, (tokenizer.eos_token_id,), tokenizer.pad_token_id)
    costs = {"student_tokens_generated": 100}  # counts add to what earlier steps counted
    objective = OnPolicyDistillation(OnlineTeacher(teacher, costs), beta, 1.0, sampling, len(tokenizer), costs, 0)
    torch.manual_seed(3)
    with torch.no_grad():
        loss = objective(student, batch).item()
    torch.manual_seed(3)
    prompts = [tokenizer("w1 w2 w3").input_ids, tokenizer("w7 w8").input_ids]
    answers = sample_answers(student, prompts, sampling)
    # the reference: each row alone, transformers' logits at the positions that predict an answer token
    total, n = 0.0, 0
    with torch.no_grad():
        for prompt, answer in zip(prompts, answers):
            ids = torch.tensor([prompt + answer])
            rows = slice(len(prompt) - 1, len(prompt) + len(answer) - 1)
            total += jsd_reference(student(input_ids=ids).logits[0, rows], teacher(input_ids=ids).logits[0, rows], beta)
            n += len(answer)
    assert loss == pytest.approx((total / n * gold).item(), rel=1e-4)
    assert costs["student_tokens_generated"] == 100 + n and costs["teacher_forward"] == 2
    assert costs["teacher_tokens"] == sum(map(len, prompts)) + n
    assert objective.first_terms == pytest.approx({"jsd": (total / n).item(), "beta": beta, "on_policy": True,
                                                   "answer_tokens": n, "train_answer_tokens": gold}, rel=1e-4)


def test_with_lambda_zero_the_divergence_runs_on_the_train_answers(tiny_models):
    pair = ModelPair.resolve(str(tiny_models["llama-teacher"]), str(tiny_models["llama-student"]))
    (teacher, tokenizer), (student, _) = pair.load("teacher"), pair.load("student")
    batch = a_batch(tokenizer)
    early = {**batch, "labels": batch["labels"].clone()}  # row 2 answers from its second token on (a 1-token prompt)
    length = int(batch["attention_mask"][1].sum())
    early["labels"][1, 1:length] = batch["input_ids"][1, 1:length]
    for batch in (batch, early):
        costs = {}
        objective = OnPolicyDistillation(OnlineTeacher(teacher, costs), 0.0, 0.0, Sampling(6, 0.9, (1,), 0),
                                         len(tokenizer), costs, 0)
        with torch.no_grad():
            loss = objective(student, batch).item()
            targets = batch["labels"][:, 1:] != -100
            s, t = student(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits[:, :-1][targets], \
                teacher(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits[:, :-1][targets]
        assert loss == pytest.approx(jsd_reference(s, t, 0.0).item(), rel=1e-4)  # mean × count = the sum
        assert "student_tokens_generated" not in costs
