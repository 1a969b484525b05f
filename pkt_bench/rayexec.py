"""The Ray executor: each sweep cell a Ray task, on one machine or a cluster, with or without a shared disk.

Where a cell writes (`storage`):

- `node` (the default): nothing is assumed shared. A worker runs its cell against a results folder on its own
  node, `$PKT_BENCH_NODE_DIR` there (default `~/.cache/pkt-bench/ray-node/<the driver's results folder, hashed>`),
  seeded with the reference records the cell reads (sent by the driver), and returns the record; the driver
  writes it into its results folder through the atomic store, once. Caches shared between cells (extractions,
  generated transfer data) live in the node's folder: each node builds its own, once, and reuses it for every
  later cell and sweep there; two cells on one node building one entry build it in unique temp folders and one
  rename wins (`pkt_bench.cache`), so no entry is ever seen half-written. Artifacts stay on the node that made
  them (the record says which: `environment.hardware.node`); the report reads records only.
- `shared`: the results folder is storage every node reaches at the same path (NFS, a cluster file system):
  workers write records, caches and artifacts there directly, as the local executor does.

A worker node that dies mid-cell costs that cell a retry on another node (Ray's task retries, `RETRIES`); the
driver writes a record only for a task that returned, so each record is written exactly once, and a node-local
folder of a dead node holds nothing the report reads. SIGINT or SIGTERM of the driver cancels the tasks in flight
and keeps every record already written; rerunning the sweep runs the rest.

Resources: each cell asks for its grid's `resources: {cpus: N, gpus: F}` (fractions allowed; Ray packs cells
onto nodes by them and sets `CUDA_VISIBLE_DEVICES` for each); the cell runs on N threads. Its record notes the
host, the Ray node and the visible devices (`environment.hardware`).
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pkt_bench.api import UserError
from pkt_bench.store import ResultStore

if TYPE_CHECKING:
    from pkt_bench.sweep import SweepCell

STORAGES = ("node", "shared")
RETRIES = 2
"""Times Ray reruns a cell whose worker or node died (an exception raised by the cell is not retried: it is the
cell's result, reported as failed)."""
NODE_DIR_ENV = "PKT_BENCH_NODE_DIR"


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError("the ray executor needs Ray: pip install 'pkt-bench[ray]'") from None
    return ray


def node_folder(driver_results: str) -> Path:
    """This node's results folder for a sweep whose driver writes to `driver_results`."""
    base = os.environ.get(NODE_DIR_ENV)
    if base:
        return Path(base).expanduser()
    digest = hashlib.sha256(driver_results.encode()).hexdigest()[:12]
    return Path("~/.cache/pkt-bench/ray-node").expanduser() / digest


def run_remote(spec, driver_results: str, storage: str, references: list[dict[str, Any]], plugins: tuple[str, ...],
               threads: int) -> dict[str, Any]:
    """The body of a cell's Ray task: run it where `storage` says, and bring its record back in node storage."""
    import ray

    from pkt_bench.sweep import run_cell

    os.environ["PKT_BENCH_RAY_NODE"] = ray.get_runtime_context().get_node_id()
    results = driver_results if storage == "shared" else str(node_folder(driver_results))
    store = ResultStore(results)
    for record in references:  # the scores this cell reads, as the driver stored them
        if store.get(record["key"], unreadable_ok=True) is None:
            store.put(record)
    result = run_cell(spec, results, plugins, threads)
    if storage == "node" and "error" not in result:
        result["record"] = store.get(result["key"])
    return result


def execute(cells: list[SweepCell], results: str, plugins: tuple[str, ...], max_parallel: int | None,
            done: Callable[[SweepCell, dict[str, Any]], None], storage: str, references: Callable[
                [SweepCell], list[dict[str, Any]]]) -> None:
    """Run `cells` as Ray tasks, at most `max_parallel` in flight when given; `done` gets each result, in node
    storage after its record is written here. `references(cell)`: the stored records the cell reads."""
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init()  # RAY_ADDRESS names a cluster; without it, a local instance on this machine
    remote = ray.remote(run_remote)
    store = ResultStore(results)
    queue: Iterator[SweepCell] = iter(cells)
    pending: dict[Any, SweepCell] = {}
    main = threading.current_thread() is threading.main_thread()  # only there may a signal handler be set
    previous = signal.signal(signal.SIGTERM, _interrupt) if main else None
    try:
        while True:
            while not max_parallel or len(pending) < max_parallel:
                cell = next(queue, None)
                if cell is None:
                    break
                threads = max(1, int(cell.resources.cpus))
                task = remote.options(num_cpus=cell.resources.cpus, num_gpus=cell.resources.gpus,
                                      max_retries=RETRIES, retry_exceptions=False)
                sent = references(cell) if storage == "node" else []
                pending[task.remote(cell.spec, results, storage, sent, plugins, threads)] = cell
            if not pending:
                return
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                cell = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as error:  # retries spent (out of memory, nodes lost): report, go on
                    result = {"error": f"{type(error).__name__}: {error}"}
                record = result.pop("record", None)
                if record is not None:
                    store.put(record)
                done(cell, result)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        print(f"pkt-bench: sweep interrupted: {len(pending)} cells in flight cancelled; every record written is "
              f"kept, and running the sweep again runs the rest", file=sys.stderr)
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        if started:
            ray.shutdown()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
