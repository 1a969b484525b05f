"""Crash safety: a sweep killed with SIGKILL and restarted loses nothing; two sweeps at once corrupt nothing."""

import json
import os
import signal
import subprocess
import sys
import time

from helpers import REPO, cli

GRID = """\
methods: [student, lora]
tasks: [probe]
seeds: {seeds}
budget: {{examples: 8, epochs: 1}}
limit: 5
"""


def sweep_process(config, results, *extra):
    return subprocess.Popen([sys.executable, "-m", "pkt_bench", "sweep", str(config), "--results", str(results), *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stored(results):
    """Every record file's bytes; each must parse as a complete record."""
    files = {p.name: p.read_bytes() for p in (results / "records").glob("*.json")}
    for name, data in files.items():
        record = json.loads(data)
        assert record["key"] + ".json" == name and record["metrics"]
    return files


def test_sigkill_mid_sweep_then_restart_loses_nothing_and_finishes(pico_pair, tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text(GRID.format(seeds="[0, 1, 2]"))  # 5 cells: student, teacher (seed 0), lora x 3 seeds
    results = tmp_path / "results"
    process = sweep_process(config, results)
    deadline = time.monotonic() + 300
    # until a record is stored and the next cell has started (its note written)
    while not (list((results / "records").glob("*.json")) and list((results / "failures").glob("*.json"))) \
            and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # no cleanup runs: like a lost node or the OOM killer
    process.wait()
    before = stored(results)
    assert 1 <= len(before) < 5
    # the cell it was running has no record, but a note says it was started and never finished
    [note] = [json.loads(p.read_text()) for p in (results / "failures").glob("*.json")]
    assert note["key"] + ".json" not in before and [a["error"] for a in note["attempts"]] == [None]
    from pkt_bench.store import failure_reason

    assert failure_reason(note).startswith("failed, 1 attempt: its process ended without a record")
    done = cli("sweep", str(config), "--results", str(results))
    assert done.returncode == 0, done.stderr
    assert f"{len(before)} stored, {5 - len(before)} to run" in done.stderr
    after = stored(results)
    assert len(after) == 5
    assert all(after[name] == data for name, data in before.items())  # finished records kept, byte for byte
    assert not list((results / "failures").glob("*.json"))


def test_two_sweeps_into_one_results_folder_at_once(pico_pair, tmp_path):
    results = tmp_path / "results"
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text(GRID.format(seeds="[0, 1]"))
    second.write_text(GRID.format(seeds="[1, 2]"))  # seed 1 in both: the same cells, written twice at once
    processes = [sweep_process(first, results, "--max-parallel", "2"), sweep_process(second, results)]
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
    records = stored(results)
    assert len(records) == 5  # the union of both grids: the references once, lora x 3 seeds
    lora = [json.loads(data) for data in records.values() if json.loads(data)["method"] == "lora"]
    for record in lora:
        assert os.path.isfile(os.path.join(record["artifact"]["path"], "adapter_config.json"))
    artifacts = os.listdir(results / "artifacts")
    assert sorted(artifacts) == sorted(r["key"] for r in lora)  # no partial or stale folder left behind


DIES_ONCE = '''
import os
import signal
from dataclasses import dataclass

from pkt_bench.api import Artifact
from pkt_bench.registry import register_method


@dataclass
class Config:
    pass


@register_method("dies-once")
class DiesOnce:
    """Its worker process is killed (as by the OOM killer) the first time it runs, then it is the student."""

    description = "test plugin"
    reference = ""
    Config = Config
    fine_tunes = False

    def __init__(self, config):
        pass

    def transfer(self, ctx):
        marker = os.environ["PKT_TEST_DIED"]
        if not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return Artifact(kind="model", path=ctx.pair.student.path)
'''


def test_a_worker_killed_mid_cell_breaks_no_sweep_and_its_cell_is_retried(pico_pair, tmp_path):
    plugin, config = tmp_path / "dies_once.py", tmp_path / "sweep.yaml"
    plugin.write_text(DIES_ONCE)
    config.write_text("methods: [dies-once]\ntasks: [probe]\nseeds: [0]\nreferences: false\nlimit: 5\n")
    results = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "pkt_bench", "sweep", str(config), "--results", str(results),
                           "--plugin", str(plugin), "--max-parallel", "1"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PKT_TEST_DIED": str(tmp_path / "died")}, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "failed, will retry once" in done.stderr and "BrokenProcessPool: a worker process died" in done.stderr
    assert "sweep done: 1 cells run" in done.stderr and "failed again" not in done.stderr
    [record] = stored(results).values()
    assert json.loads(record)["method"] == "dies-once"
    assert not list((results / "failures").glob("*.json"))
