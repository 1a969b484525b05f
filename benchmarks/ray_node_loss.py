"""A probe-ladder sweep on a 3-node Ray cluster on this machine, one worker node killed by signal mid-sweep, against
the same sweep on the local executor: the records (scores, items, references) and the leaderboard must agree.

    python benchmarks/ray_node_loss.py [--out DIR] [--seeds 3]

The cluster is Ray's `cluster_utils.Cluster`: a head without CPUs for cells and two worker nodes of one CPU each,
every node with its own node folder (`PKT_BENCH_NODE_DIR`). When both workers are inside a cell, the raylet of
the first one is sent SIGKILL (its workers die with it); a fresh worker node joins, and the sweep goes on. The
log (stdout) is what docs/ray.md and the closing note quote.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

METHODS = ["student", "teacher", "graft", "lora", "sensitivity"]
PAIRS = [("pico-kin-teacher", "pico-kin-same"), ("pico-kin-teacher", "pico-kin-depth"),
         ("pico-kin-teacher", "pico-kin-width"), ("pico-kin-teacher", "pico-kin-pruned")]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="ray-node-loss-")))
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    import ray
    from ray.cluster_utils import Cluster
    from rich.console import Console

    from pkt_bench.leaderboard import scores
    from pkt_bench.store import ResultStore
    from pkt_bench.sweep import Sweep, run_sweep

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    pairs = "\n".join(f"  - {{teacher: {t}, student: {s}}}" for t, s in PAIRS)
    config = out / "sweep.yaml"
    config.write_text(f"methods: [{', '.join(METHODS)}]\nseeds: {list(range(args.seeds))}\ntasks: [probe]\n"
                      f"device: cpu\nbackend: hf\nbudget: {{examples: 64, epochs: 3}}\nresources: {{cpus: 1}}\npairs:\n{pairs}\n")
    quiet = Console(file=open(os.devnull, "w"))
    started = time.time()
    local = run_sweep(Sweep.load(config), ResultStore(out / "local"), console=quiet)
    log(f"local executor: {local.ran} cells in {time.time() - started:.0f} s, {len(local.failed)} failed")

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1, env_vars={"PKT_BENCH_NODE_DIR": str(out / f"node{i}")}) for i in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    log(f"cluster: head + {len(workers)} worker nodes ({', '.join(w.node_id[:8] for w in workers)})")
    outcome: dict = {}

    def sweep() -> None:
        outcome["ray"] = run_sweep(Sweep.load(config), ResultStore(out / "ray"), executor="ray", console=quiet)

    started = time.time()
    driver = threading.Thread(target=sweep)
    driver.start()
    store = ResultStore(out / "ray")
    while driver.is_alive() and len(list(store.records())) < len(local.cells) // 3:
        time.sleep(0.5)
    victim = workers[0]
    raylet = victim.all_processes["raylet"][0].process.pid
    os.kill(raylet, signal.SIGKILL)
    log(f"killed the raylet of worker node {victim.node_id[:8]} (pid {raylet}, SIGKILL) with "
        f"{len(list(store.records()))} of {len(local.cells)} records stored")
    replacement = cluster.add_node(num_cpus=1, env_vars={"PKT_BENCH_NODE_DIR": str(out / "node2")})
    log(f"worker node {replacement.node_id[:8]} joined")
    driver.join()
    result = outcome["ray"]
    log(f"ray executor: {result.ran} cells run after {result.stored_before} stored, {len(result.failed)} failed, "
        f"{time.time() - started:.0f} s")
    ray.shutdown()
    cluster.shutdown()

    here = {r["key"]: r for r in ResultStore(out / "local").records()}
    there = {r["key"]: r for r in ResultStore(out / "ray").records()}
    same = [k for k in here if k in there and all(here[k][f] == there[k][f] for f in ("metrics", "items", "references"))]
    nodes: dict = {}
    for record in there.values():
        node = record["environment"]["hardware"].get("ray_node", "?")[:8]
        nodes[node] = nodes.get(node, 0) + 1
    log(f"records: local {len(here)}, ray {len(there)}, identical scores/items/references {len(same)}; "
        f"cells per node {json.dumps(nodes)}")
    boards = [[(s.method, s.pair, s.task, round(s.mean, 6), s.seeds) for s in scores(list(store_.records()))]
              for store_ in (ResultStore(out / "local"), ResultStore(out / "ray"))]
    log(f"leaderboards identical: {boards[0] == boards[1]} ({len(boards[0])} rows)")
    leftovers = [p for p in (out / "ray").rglob("*") if p.suffix in (".tmp", ".partial")]
    log(f"partial files in the driver's results folder: {len(leftovers)}")


if __name__ == "__main__":
    main()
