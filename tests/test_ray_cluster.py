"""The Ray executor on a multi-node cluster started on this machine (Ray's `cluster_utils.Cluster`: a head and
worker nodes as separate processes, each with its own resources). The head takes no cells; each worker node gets
its own node folder (`PKT_BENCH_NODE_DIR`), so nothing reaches the driver through the disk but what the driver
writes: records come back through Ray."""

import json
import os
import signal
import threading
import time

import pytest
from rich.console import Console

from pkt_bench.store import ResultStore
from pkt_bench.sweep import Sweep, run_sweep

ray = pytest.importorskip("ray", reason="the Ray executor is the extra 'ray': pip install 'pkt-bench[ray]'")
cluster_utils = pytest.importorskip("ray.cluster_utils")

PLUGIN = '''\
"""A test method: the student as is, after `seconds` asleep, logging where and when it ran."""
import json, os, time
from dataclasses import dataclass, field

from pkt_bench.api import Artifact
from pkt_bench.registry import register_method


@dataclass
class Config:
    seconds: float = field(default=0.0, metadata={"help": "sleep"})


@register_method("sleepy", description="the student as is, slowly")
class Sleepy:
    reference = ""
    Config = Config
    fine_tunes = False

    def __init__(self, config):
        self.config = config

    def transfer(self, ctx):
        def log(**fields):
            with open(os.environ["SLEEPY_LOG"], "a") as out:
                out.write(json.dumps({"node": os.environ.get("PKT_BENCH_NODE_DIR"), "pid": os.getpid(),
                                      "devices": os.environ.get("CUDA_VISIBLE_DEVICES"), **fields}) + "\\n")

        start = time.time()
        log(event="start", time=start)
        time.sleep(self.config.seconds)
        log(event="end", start=start, end=time.time())
        return Artifact(kind="model", path=ctx.pair.student.path)
'''


def quiet():
    return Console(file=open("/dev/null", "w"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head (no CPUs for cells) and two worker nodes of 1 CPU and 1 (declared) GPU each, own node folders; one
    cluster for the module (the node-loss test, last, replaces the node it removes). Yields (cluster, nodes, the
    folder of node folders, the test method's log)."""
    root = tmp_path_factory.mktemp("cluster")
    log = root / "sleepy.jsonl"
    saved = os.environ.get("SLEEPY_LOG")
    os.environ["SLEEPY_LOG"] = str(log)  # before the nodes start: their workers inherit it
    made = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [made.add_node(num_cpus=1, num_gpus=1, env_vars={"PKT_BENCH_NODE_DIR": str(root / f"node{i}")})
             for i in range(2)]
    ray.init(address=made.address, log_to_driver=False)
    yield made, nodes, root, log
    ray.shutdown()
    made.shutdown()
    if saved is None:
        os.environ.pop("SLEEPY_LOG", None)
    else:
        os.environ["SLEEPY_LOG"] = saved


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """The test method's file, loaded once in the driver (as --plugin does); workers load it by its path."""
    from pkt_bench.registry import load_plugin

    path = tmp_path_factory.mktemp("plugin") / "sleepy.py"
    path.write_text(PLUGIN)
    load_plugin(path)
    return (str(path),)


def write_sweep(tmp_path, body):
    config = tmp_path / "sweep.yaml"
    config.write_text(body)
    return config


def records(folder):
    return {r["key"]: r for r in ResultStore(folder).records()}


def test_a_sweep_over_two_worker_nodes_matches_the_local_executor(pico_pair, cluster, plugin, tmp_path):
    config = write_sweep(tmp_path, """\
methods: [student, {method: sleepy, method_config: {seconds: 1}}]
tasks: [probe]
seeds: [0, 1, 2]
limit: 5
device: cpu
resources: {cpus: 1}
""")
    plugins = plugin
    local = run_sweep(Sweep.load(config), ResultStore(tmp_path / "local"), console=quiet(), plugins=plugins)
    on_ray = run_sweep(Sweep.load(config), ResultStore(tmp_path / "ray"), executor="ray", console=quiet(),
                       plugins=plugins)
    assert on_ray.ran == local.ran == 5 and not on_ray.failed  # student, teacher, sleepy x 3 seeds
    here, there = records(tmp_path / "local"), records(tmp_path / "ray")
    assert set(here) == set(there)
    for key, record in there.items():
        assert record["metrics"] == here[key]["metrics"] and record["items"] == here[key]["items"]
        assert record["references"] == here[key]["references"]
    nodes = {r["environment"]["hardware"]["ray_node"] for r in there.values()}
    assert len(nodes) == 2  # both worker nodes ran cells
    # every node wrote only in its own folder; the driver's folder holds the records it wrote, nothing else
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == ["records"]
    assert all((cluster[2] / f"node{i}" / "records").is_dir() for i in range(2))


def test_half_gpu_cells_pack_two_to_a_node_each_with_its_device(pico_pair, cluster, plugin, tmp_path):
    log = cluster[3]
    log.unlink(missing_ok=True)
    config = write_sweep(tmp_path, """\
methods: [{method: sleepy, method_config: {seconds: 15}}]
tasks: [probe]
seeds: [0, 1, 2, 3]
limit: 5
device: cpu
references: false
resources: {cpus: 0.5, gpus: 0.5}
""")
    done = run_sweep(Sweep.load(config), ResultStore(tmp_path / "ray"), executor="ray", console=quiet(),
                     plugins=plugin)
    assert done.ran == 4 and not done.failed
    runs = events(log, "end")
    assert {r["devices"] for r in runs} == {"0"}  # each node's one GPU, as Ray sets the variable
    by_node = {}
    for r in runs:
        by_node.setdefault(r["node"], []).append(r)
    assert sorted(len(v) for v in by_node.values()) == [2, 2]
    for pair in by_node.values():  # the two cells of a node overlap in time
        first, second = sorted(pair, key=lambda r: r["start"])
        assert second["start"] < first["end"]
    assert {r["environment"]["hardware"]["cuda_visible_devices"] for r in records(tmp_path / "ray").values()} == {"0"}


def test_sigterm_of_the_driver_cancels_the_cells_in_flight_and_keeps_the_records(pico_pair, cluster, plugin,
                                                                                    tmp_path):
    log = cluster[3]
    log.unlink(missing_ok=True)
    config = write_sweep(tmp_path, """\
methods: [{method: sleepy, method_config: {seconds: 6}}]
tasks: [probe]
seeds: [0, 1, 2, 3, 4, 5]
limit: 5
device: cpu
references: false
resources: {cpus: 1}
""")
    store = ResultStore(tmp_path / "ray")

    def stop_when_two_are_stored():
        deadline = time.time() + 180
        while len(list(store.records())) < 2 and time.time() < deadline:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or a scheduler would stop the driver

    threading.Thread(target=stop_when_two_are_stored, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_sweep(Sweep.load(config), store, executor="ray", console=quiet(), plugins=plugin)
    kept = set(records(tmp_path / "ray"))
    assert 2 <= len(kept) < 6  # the finished records stay; the cells in flight were cancelled
    rest = run_sweep(Sweep.load(config), store, executor="ray", console=quiet(), plugins=plugin)
    assert rest.stored_before == len(kept) and rest.ran == 6 - len(kept) and not rest.failed
    assert len(records(tmp_path / "ray")) == 6


def test_a_worker_node_lost_mid_sweep_costs_a_retry_not_the_sweep(pico_pair, cluster, plugin, tmp_path):
    made, nodes, root, log = cluster
    log.unlink(missing_ok=True)
    config = write_sweep(tmp_path, """\
methods: [{method: sleepy, method_config: {seconds: 8}}]
tasks: [probe]
seeds: [0, 1, 2, 3]
limit: 5
device: cpu
references: false
resources: {cpus: 1}
""")
    outcome = {}

    def sweep():
        outcome["run"] = run_sweep(Sweep.load(config), ResultStore(tmp_path / "ray"), executor="ray",
                                   console=quiet(), plugins=plugin)

    driver = threading.Thread(target=sweep)
    driver.start()
    deadline = time.time() + 180
    while len(events(log, "start")) < 2 and time.time() < deadline:  # both nodes are in a cell
        time.sleep(0.5)
    assert {e["node"] for e in events(log, "start")} == {str(root / "node0"), str(root / "node1")}
    made.remove_node(nodes[0], allow_graceful=False)  # its raylet and workers killed, mid-cell
    made.add_node(num_cpus=1, env_vars={"PKT_BENCH_NODE_DIR": str(root / "node2")})
    driver.join(timeout=300)
    assert not driver.is_alive() and not outcome["run"].failed and outcome["run"].ran == 4
    assert len(events(log, "start")) == 5 and len(events(log, "end")) == 4  # the lost cell ran again elsewhere
    stored = records(tmp_path / "ray")
    assert sorted(r["seed"] for r in (r["cell"] for r in stored.values())) == [0, 1, 2, 3]  # each once
    assert not list((tmp_path / "ray").rglob("*.tmp")) and not list((tmp_path / "ray").rglob("*.partial"))


def events(log, kind):
    lines = log.read_text().splitlines() if log.exists() else []
    return [e for e in map(json.loads, lines) if e["event"] == kind]
