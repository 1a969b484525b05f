"""MBPP's reference code through the scorer on all 500 test problems (task_ids 11-510), with the wall time; then
HumanEval's transfer data, MBPP's train problems written as HumanEval problems, each run with its asserts.

    python benchmarks/mbpp_reference.py [--data-dir DIR]   (default: ../shared/data/eval)

The test suite scores the first 100 (tests/test_tasks_mbpp.py) and runs the first 20 transfer problems
(tests/test_tasks_humaneval.py); this runs them all (the test problems as `pkt-bench score` does, the transfer
problems in MBPP's program with its asserts) and lists every problem whose code fails, with the sandbox's reason. The results are recorded in tasks/mbpp/README.md and
tasks/humaneval/README.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from pkt_bench.registry import TASKS, make_task

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "eval"))
    args = parser.parse_args()
    mbpp = make_task(TASKS.get("mbpp"), args.data_dir, {}, allow_code_execution=True)
    with tempfile.TemporaryDirectory() as folder:
        predictions = Path(folder) / "reference.jsonl"
        predictions.write_text("".join(json.dumps({"id": doc["task_id"], "completion": doc["code"]}) + "\n"
                                       for doc in mbpp.docs("test")))
        started = time.perf_counter()
        result = mbpp.score(predictions)
        wall = time.perf_counter() - started
    failed = [item for item in result.items if not item["passed"]]
    print(f"MBPP reference code: pass@1 {result.metrics['pass@1']:.4f} ({len(result.items) - len(failed)}/"
          f"{len(result.items)} problems) in {wall:.1f} s")
    for item in failed:
        print(f"  task {item['id']}: {item['status']}: {item['reason']}")
    transfer_problems(args.data_dir)


def transfer_problems(data_dir: str) -> None:
    """Every HumanEval transfer example's prompt + completion, then its MBPP problem's asserts."""
    from pkt_bench.sandbox import run_programs
    from pkt_bench.tasks.mbpp import utils

    humaneval = make_task(TASKS.get("humaneval"), data_dir, {}, allow_code_execution=True)
    docs = {f"mbpp:{doc['task_id']}": doc for doc in utils.dataset(data_dir)["train"]}
    examples = humaneval.transfer_pool()
    started = time.perf_counter()
    results = run_programs([utils.program(docs[e.id], e.prompt + e.response) for e in examples])
    wall = time.perf_counter() - started
    failed = [(e.id, r) for e, r in zip(examples, results) if not r.passed]
    print(f"HumanEval transfer data: {len(examples) - len(failed)}/{len(examples)} of {len(docs)} MBPP train problems "
          f"pass their asserts as HumanEval problems in {wall:.1f} s")
    for ident, result in failed:
        print(f"  {ident}: {result.status}: {result.reason}")


if __name__ == "__main__":
    main()
