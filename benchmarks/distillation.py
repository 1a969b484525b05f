"""One training micro-step of each teacher-guided objective (kd, hidden-kd, gkd, semalign v1 / v2-reconstruction geometry / fisher) against
lora's cross-entropy on the same batch: time, on a real pair.

    python benchmarks/distillation.py --teacher DIR --student DIR [--data-dir shared/data/eval] [--examples 2]
        [--max-length 128] [--dtype bfloat16] [--repeats 2]

Teacher and student are loaded once (LoRA r = 16 on the student's seven matrices, as `lora`); each objective then
runs `--repeats` forward+backward passes over the same batch (the first GSM8K train examples), and the table gives
the median seconds, as a ratio to lora's measured in the same run. (Peak memory is not reported: measured one
objective after another in one process, the allocator reuses the pages an earlier one freed, so the peaks do not
compare.)
v1 runs with every LoRA factor trainable (the method trains the paired layer's only), the v2 reconstruction in its
first frontier stage (layer 1 only, but the backward reaches every layer: its dearest stage). The semalign
objectives use a random transfer matrix M (its values do not change the cost; the bases themselves are
`benchmarks/semalign.py`'s) and the depth map as their pairing. gkd's step includes the student sampling its
32-token answers (its defaults). Stops at once when less than 6 GB is free (the
bf16 pair and its passes need about 5 GB).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"))
    parser.add_argument("--examples", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    free = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable"))
    if free < 6 * 2**20:
        raise SystemExit(f"only {free / 2**20:.1f} GB free; this benchmark needs 6")

    import torch
    from peft import LoraConfig, get_peft_model

    from pkt_bench.finetune import _collate, encode, response_ce
    from pkt_bench.methods.gkd import OnPolicyDistillation, Sampling
    from pkt_bench.methods.hidden_kd import hidden_objective
    from pkt_bench.methods.kd import Distillation, OnlineTeacher
    from pkt_bench.methods.semalign.objectives import Cosine, Frontier, OnlineTargets
    from pkt_bench.methods.semalign.pairing import window_sources
    from pkt_bench.models import LINEAR_MODULES, load_model
    from pkt_bench.tasks.gsm8k import GSM8K

    torch.manual_seed(0)
    student, tokenizer = load_model(args.student, "cpu", args.dtype)
    student = get_peft_model(student, LoraConfig(r=16, lora_alpha=16, target_modules=LINEAR_MODULES,
                                                 task_type="CAUSAL_LM"))
    teacher_model, _ = load_model(args.teacher, "cpu", args.dtype)
    examples = GSM8K(args.data_dir).transfer_data("train")[: args.examples]
    batch = _collate([encode(e, tokenizer, args.max_length) for e in examples], tokenizer.pad_token_id, "cpu")
    t, s = teacher_model.config, student.get_base_model().config
    vocab = len(tokenizer)
    costs: dict[str, int] = {}
    teacher = OnlineTeacher(teacher_model, costs)
    matrix = torch.randn(t.hidden_size, s.hidden_size) / t.hidden_size**0.5
    sources = window_sources([0.0] * t.num_hidden_layers, s.num_hidden_layers)
    last = {s.num_hidden_layers: sources[s.num_hidden_layers]}
    head = student.get_base_model().get_output_embeddings().weight.detach()
    objectives = {
        "lora (CE)": response_ce,
        "kd": Distillation(teacher, 0.5, 2.0, vocab),
        "hidden-kd": hidden_objective(teacher, t.num_hidden_layers, s.num_hidden_layers, t.hidden_size,
                                      s.hidden_size, 1.0, 0, "cpu"),
        "gkd": OnPolicyDistillation(teacher, 0.0, 1.0, Sampling(32, 0.9, (tokenizer.eos_token_id,),
                                                                tokenizer.pad_token_id), vocab, costs, 0),
        "semalign v1": Cosine(OnlineTargets(teacher, last, matrix, "mlp"), last, "mlp", "response"),
        # a schedule longer than the run: frontier = layer 1, the dearest stage (the backward reaches every layer)
        "semalign v2-reconstruction geometry": Frontier(teacher, sources, matrix, "geometry", head, vocab, 1.0,
                                                        10**6, 1, "write", "all"),
        "semalign v2-reconstruction fisher": Frontier(teacher, sources, matrix, "fisher", head, vocab, 1.0, 10**6,
                                                      1, "write", "all"),
    }
    print(f"tokens per batch: {int(batch['attention_mask'].sum())}, response tokens: "
          f"{int((batch['labels'] != -100).sum())}, dtype {args.dtype}")
    rows = {}
    for name, objective in objectives.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            objective(student, batch).backward()
            times.append(time.perf_counter() - start)
            student.zero_grad(set_to_none=True)
        rows[name] = statistics.median(times)
        print(name, rows[name], flush=True)
    print("| objective | s per micro-step | × lora |")
    print("|---|---|---|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.1f} | {seconds / rows['lora (CE)']:.2f} |")


if __name__ == "__main__":
    main()
