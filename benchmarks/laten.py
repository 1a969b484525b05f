"""LaTen extraction: locate time, align step time and peak RSS, each against a plain pass measured in the same run.

    python benchmarks/laten.py --teacher DIR --student DIR [--splits shared/data/laten_splits] [--data-dir shared/data/eval] [--examples 2]
        [--locate-layers 1] [--steps 2] [--align-batch 4]
    python benchmarks/laten.py --teacher DIR --student DIR --compare-layers 14   # factorized vs direct locate

Prints one table; every figure is a ratio against a baseline measured in the same run:
- locate (`locate.attribute`: one forward pass, then the logit lens over every FFN neuron, o_proj column and
  v_proj row of every layer) per extract example / one plain no-grad teacher forward over the same tokens. The
  lens costs |neurons| × vocabulary × hidden multiply-adds per layer (≈ 5 TFLOP per layer of the 1.5B teacher),
  far more than a CPU run can afford over all layers, so locate runs on the teacher cut to its first
  `--locate-layers` layers (embeddings and lm_head kept) and its time is scaled by depth / locate-layers; the
  lens work is the same in every layer, the forward's share of it small;
- one align step (`align.train`: translator, injection through `functional_call`, the student's LM loss and the
  backward into the translator, over `--align-batch` examples) / one plain student forward+backward through
  every parameter over the same batch;
- peak RSS during each pass / the weight bytes of the model it runs on (full teacher for locate, student for
  align): the peak above the RSS right after loading (what the pass itself adds; for locate the same at any
  depth but for the captured per-layer vectors), and for the full-size passes the peak above the RSS after
  imports (weights included).
Each pass runs in a fresh process; the peak is reset after loading, so the loader's transient copies do not
count.
The align step needs a selection and the teacher vectors it moves; their cost does not depend on which neurons
are chosen, so both come from `locate.select` on all-zero scores (the first layers and neurons), not from a full
locate pass.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SEED = 42


def examples(splits: str, data_dir: str, role: str):
    """The LaTen GSM split of `role` as the gsm8k task (its test set in `data_dir`) turns it into examples."""
    from pkt_bench.taskdata import laten_pairs
    from pkt_bench.tasks.gsm8k import GSM8K

    task = GSM8K(data_dir)
    return [task.from_laten(user, assistant) for _id, user, assistant in laten_pairs(splits, "gsm", role)]


def placeholder(model_config, n_layers: int, n: dict[str, int]):
    """`locate.select` on all-zero scores of a model with this config: its first layers and neurons."""
    from pkt_bench.methods.laten import locate

    w = locate.Widths.of(model_config)
    zeros = locate.Attribution(torch.zeros(w.layers), torch.zeros(w.layers), torch.zeros(w.layers, w.ffn),
                               torch.zeros(w.layers, w.o), torch.zeros(w.layers, w.v))
    return locate.select(zeros, n_layers, n)


def child(mode: str, args) -> None:
    """One measurement in this fresh process; prints a JSON line."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from pkt_bench.finetune import encode
    from pkt_bench.methods.laten import LaTenConfig, align, locate

    c = LaTenConfig(align_batch=args.align_batch)
    t_cfg, s_cfg = AutoConfig.from_pretrained(args.teacher), AutoConfig.from_pretrained(args.student)
    n = locate.counts(locate.Widths.of(s_cfg), locate.Widths.of(t_cfg), c.transfer_rate)
    seeds = examples(args.splits, args.data_dir, "seed")
    pool = examples(args.splits, args.data_dir, "align")
    batches = [align.align_batch(seeds[i], pool, c.align_batch, SEED, i) for i in range(args.steps)]
    if mode == "compare":
        return compare(args, seeds, n)
    path = args.student if mode in ("backward", "align") else args.teacher
    config = AutoConfig.from_pretrained(path)
    if mode == "locate":  # the teacher cut to its first layers (see the module docstring)
        config.num_hidden_layers = args.locate_layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[: args.locate_layers]
    base = _status_mb("VmRSS")
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    weight_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    locate_examples = seeds[: args.examples]
    if mode == "align":
        vectors = torch.load(args.vectors)
        chosen = placeholder(s_cfg, s_cfg.num_hidden_layers, n)
        translator = align.Translator(c.modules, t_cfg.hidden_size, s_cfg.hidden_size,
                                      c.translator_hidden or t_cfg.hidden_size, c.translator_init_std, SEED)
        plan = [align.Step(v, chosen, batch) for v, batch in zip(vectors, batches)]
    gc.collect()
    loaded = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    started = time.perf_counter()
    if mode == "forward":  # what locate's own forward pass is: the same tokens, no gradient
        with torch.no_grad():
            for example in locate_examples:
                model(input_ids=torch.tensor([locate.answer_ids(example, tokenizer)[:-1]]))
    elif mode == "locate":
        locate.attribute(model, tokenizer, locate_examples, c.lens_norm, c.attn_values)
    elif mode == "backward":  # what training the student would cost per align batch
        model.requires_grad_(True)
        for batch in batches:
            for example in batch:
                ids, labels = encode(example, tokenizer, args.max_length)
                model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.backward()
            model.zero_grad(set_to_none=False)
    else:
        losses = align.train(model, tokenizer, translator, plan, lr=c.lr, weight_decay=c.weight_decay,
                             reg_weight=c.reg_weight, schedule_steps=max(len(seeds), args.steps),
                             max_length=args.max_length, train_on_inputs=c.train_on_inputs, costs={})
    wall = time.perf_counter() - started
    peak = _status_mb("VmHWM")
    if mode == "forward":  # untimed: the vectors the align steps move, for the align process
        chosen = placeholder(t_cfg, s_cfg.num_hidden_layers, n)
        torch.save([{m: locate.vectors(model, chosen, m) for m in c.modules}] * args.steps, args.vectors)
    print(json.dumps({"mode": mode, "wall_s": wall, "peak_mb": peak - base, "extra_mb": peak - loaded,
                      "weight_mb": weight_mb, "layers": config.num_hidden_layers,
                      "losses": losses if mode == "align" else None}))


def compare(args, seeds, n: dict[str, int]) -> None:
    """Locate at the paper's GSM8K setting (4 step groups + 1 fusion group, one example each) on the full-depth
    teacher, the neuron scores of `--compare-layers` only, once in the direct form (the lens on every candidate
    vector, what `locate` computed before) and once factorized; prints times and whether the selections agree."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pkt_bench.methods.laten import LaTenConfig, locate

    c = LaTenConfig()
    model = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    train = examples(args.splits, args.data_dir, "train")
    groups = {f"step{i}": [seeds[i]] for i in range(4)} | {"fuse": [train[0]]}
    layers = [int(x) for x in args.compare_layers.split(",")]
    result = {"mode": "compare", "layers": layers, "depth": model.config.num_hidden_layers, "groups": len(groups)}
    scores = {}
    for form in ("direct", "factorized"):
        started = time.perf_counter()
        scores[form] = locate.attribute_groups(model, tokenizer, groups, c.lens_norm, c.attn_values, form=form,
                                               layers=layers)
        result[f"{form}_s"] = time.perf_counter() - started
    started = time.perf_counter()  # the part of either form that does not depend on how many layers are scored
    locate.attribute_groups(model, tokenizer, groups, c.lens_norm, c.attn_values, layers=[])
    result["fixed_s"] = time.perf_counter() - started
    same, diff, swapped, gap = True, 0.0, 0, 0.0
    for name in groups:
        a, b = scores["direct"][name], scores["factorized"][name]
        diff = max(diff, *((x - y).abs().max().item() for x, y in zip(a.tensors(), b.tensors())))
        for kind in ("ffn", "o", "v"):
            for layer in layers:
                x, y = getattr(a, kind)[layer], getattr(b, kind)[layer]
                old, new = locate.top(x, n[kind]), locate.top(y, n[kind])
                same &= torch.equal(old, new)
                # neurons chosen by one form only, and how far their direct score is from the direct threshold
                only = set(old.tolist()) ^ set(new.tolist())
                swapped += len(only)
                gap = max([gap] + [abs(x[i] - x[old[-1]]).item() for i in only])
        same &= locate.top_layers(a.ffn_layers, args.student_layers) == locate.top_layers(b.ffn_layers,
                                                                                          args.student_layers)
    result.update(same_selection=same, max_abs_diff=diff, neurons_swapped=swapped, swap_gap=gap)
    print(json.dumps(result))


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field)) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--splits", default="/work/shared/data/laten_splits",
                        help="the LaTen split folder (its gsm/ splits are used)")
    parser.add_argument("--data-dir", default="/work/shared/data/eval", help="the task data folder (gsm8k/)")
    parser.add_argument("--examples", type=int, default=2, help="extract examples located")
    parser.add_argument("--locate-layers", type=int, default=1, help="teacher layers the locate pass runs on")
    parser.add_argument("--steps", type=int, default=2, help="align steps")
    parser.add_argument("--align-batch", type=int, default=4, help="examples per align step (LaTen's align_batch)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--compare-layers", default="",
                        help="instead of the table: time the direct and the factorized locate on these teacher "
                             "layers (comma-separated) at the paper's 5 examples, full depth, and compare selections")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--vectors", help=argparse.SUPPRESS)
    parser.add_argument("--student-layers", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args)

    from rich.console import Console
    from rich.table import Table

    if args.compare_layers:
        return print_comparison(args)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("forward", "locate", "backward", "align"):
            command = [sys.executable, __file__, "--child", mode, "--vectors", f"{tmp}/vectors.pt"] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("child", "vectors")]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
            runs[mode] = json.loads(done.stdout.splitlines()[-1])
    fwd, loc, bwd, ali = (runs[m] for m in ("forward", "locate", "backward", "align"))
    depth = fwd["layers"]
    locate_s = loc["wall_s"] * depth / loc["layers"] / args.examples
    forward_s = fwd["wall_s"] / args.examples
    step_s, plain_s = ali["wall_s"] / args.steps, bwd["wall_s"] / args.steps
    table = Table(title=f"LaTen, {Path(args.teacher).name} -> {Path(args.student).name}, fp32 on CPU, "
                        f"{torch.get_num_threads()} threads; {args.examples} GSM extract examples, {args.steps} "
                        f"align steps of {args.align_batch} examples")
    for column in ("measurement", "ours", "baseline", "ratio"):
        table.add_column(column)
    table.add_row(f"locate per example ({loc['wall_s']:.0f} s on {loc['layers']} teacher layer(s) for "
                  f"{args.examples}, × {depth}/{loc['layers']}) vs plain teacher forward",
                  f"{locate_s:,.0f} s", f"{forward_s:.2f} s", f"{locate_s / forward_s:,.0f}")
    table.add_row("align step (translator through the frozen student) vs plain student forward+backward, "
                  "same batch", f"{step_s:.1f} s", f"{plain_s:.1f} s", f"{step_s / plain_s:.2f}")
    for label, run, weights in (
            (f"locate ({loc['layers']}-layer teacher)", loc, fwd), ("plain teacher forward", fwd, fwd),
            ("align steps", ali, bwd), ("plain student forward+backward", bwd, bwd)):
        table.add_row(f"peak RSS above the loaded model during {label} / {'teacher' if weights is fwd else 'student'}"
                      f" weight bytes", f"{run['extra_mb']:,.0f} MB", f"{weights['weight_mb']:,.0f} MB",
                      f"{run['extra_mb'] / weights['weight_mb']:.2f}")
    for label, run in (("plain teacher forward", fwd), ("align steps", ali), ("plain student forward+backward", bwd)):
        table.add_row(f"peak RSS during {label}, weights included / weight bytes", f"{run['peak_mb']:,.0f} MB",
                      f"{run['weight_mb']:,.0f} MB", f"{run['peak_mb'] / run['weight_mb']:.2f}")
    Console(width=200).print(table)


def print_comparison(args) -> None:
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoConfig

    command = [sys.executable, __file__, "--child", "compare"] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("child", "vectors", "student_layers")]
    command.append(f"--student-layers={AutoConfig.from_pretrained(args.student).num_hidden_layers}")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"compare failed:\n{done.stderr[-3000:]}")
    r = json.loads(done.stdout.splitlines()[-1])
    k, depth = len(r["layers"]), r["depth"]
    per_layer = {form: (r[f"{form}_s"] - r["fixed_s"]) / k for form in ("direct", "factorized")}
    full = {form: r["fixed_s"] + per_layer[form] * depth for form in per_layer}
    table = Table(title=f"LaTen locate, {Path(args.teacher).name}, fp32 on CPU, {torch.get_num_threads()} threads; "
                        f"{r['groups']} groups of 1 GSM example (4 steps + fusion), neuron scores of layers "
                        f"{r['layers']} timed, × {depth}/{k} for the full depth")
    for column in ("measurement", "direct (before)", "factorized", "ratio"):
        table.add_column(column)
    table.add_row(f"neuron scores, per layer ({k} timed)", f"{per_layer['direct']:,.1f} s",
                  f"{per_layer['factorized']:,.1f} s", f"{per_layer['direct'] / per_layer['factorized']:.2f}")
    table.add_row(f"whole locate, extrapolated (forwards and layer scores: {r['fixed_s']:.0f} s)",
                  f"{full['direct']:,.0f} s", f"{full['factorized']:,.0f} s",
                  f"{full['direct'] / full['factorized']:.2f}")
    table.add_row("same selection on the timed layers and same FFN layer map", "", "", str(r["same_selection"]))
    table.add_row("max |score difference|", "", "", f"{r['max_abs_diff']:.2e}")
    table.add_row("neurons chosen by one form only (all groups and kinds; same set, other order counts 0)", "", "",
                  str(r["neurons_swapped"]))
    table.add_row("their largest |direct score - direct selection's last score|", "", "", f"{r['swap_gap']:.2e}")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
