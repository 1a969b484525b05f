"""The Ray executor on a local Ray instance yields the same records as the local executor (several nodes:
test_ray_cluster.py)."""

import pytest
from rich.console import Console

import pkt_bench.runner
from pkt_bench.store import ResultStore
from pkt_bench.sweep import Sweep, run_sweep

ray = pytest.importorskip("ray", reason="the Ray executor is the extra 'ray': pip install 'pkt-bench[ray]'")

GRID = """\
methods: [student, lora]
tasks: [probe]
seeds: [0, 1]
budget: {examples: 8, epochs: 1}
limit: 5
resources: {cpus: 1}
"""


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_and_local_executors_store_the_same_records(pico_pair, local_ray, tmp_path, monkeypatch):
    config = tmp_path / "sweep.yaml"
    config.write_text(GRID)
    quiet = Console(file=open("/dev/null", "w"))
    local = run_sweep(Sweep.load(config), ResultStore(tmp_path / "local"), console=quiet)

    def not_here(*args, **kwargs):
        raise AssertionError("a cell ran in the driver, not in a Ray worker")

    monkeypatch.setattr(pkt_bench.runner, "_run_cell", not_here)  # workers import their own, unpatched runner
    on_ray = run_sweep(Sweep.load(config), ResultStore(tmp_path / "ray"), executor="ray", console=quiet)
    assert on_ray.ran == local.ran == 4 and not on_ray.failed  # student, teacher, lora x 2 seeds
    by_key = {store: {r["key"]: r for r in ResultStore(tmp_path / store).records()} for store in ("local", "ray")}
    assert set(by_key["ray"]) == set(by_key["local"]) == {c.key for c in local.cells}
    for key, record in by_key["ray"].items():
        twin = by_key["local"][key]
        assert record["metrics"] == twin["metrics"] and record["items"] == twin["items"]
        assert record["costs"] == twin["costs"] and record["references"] == twin["references"]
    assert ray.is_initialized()  # the executor leaves an instance it did not start alone


def test_an_unknown_ray_storage_is_one_line_before_anything_runs(tmp_path):
    from pkt_bench.api import UserError

    config = tmp_path / "sweep.yaml"
    config.write_text(GRID)
    with pytest.raises(UserError, match="unknown --ray-storage 'nfs'; use node .* or shared"):
        run_sweep(Sweep.load(config), ResultStore(tmp_path / "r"), executor="ray", storage="nfs")
    assert not (tmp_path / "r").exists()
