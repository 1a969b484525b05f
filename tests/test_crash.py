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
    while not list((results / "records").glob("*.json")) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # no cleanup runs: like a lost node or the OOM killer
    process.wait()
    before = stored(results)
    assert 1 <= len(before) < 5
    done = cli("sweep", str(config), "--results", str(results))
    assert done.returncode == 0, done.stderr
    assert f"{len(before)} stored, {5 - len(before)} to run" in done.stderr
    after = stored(results)
    assert len(after) == 5
    assert all(after[name] == data for name, data in before.items())  # finished records kept, byte for byte


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
