"""Bad input: one line that says what is wrong and how to fix it, exit code 2, nothing stored changed."""

import shutil

import pytest
from helpers import DATA, NO_DATA, cli, tree_digest

from pkt_bench.spec import SCHEMA_VERSION
from pkt_bench.store import ResultStore


@pytest.fixture
def results(tmp_path):
    store = ResultStore(tmp_path / "results")
    store.put({"schema_version": SCHEMA_VERSION, "key": "kept", "metrics": {"acc": 0.5}})
    (store.root / "artifacts" / "kept").mkdir(parents=True)
    (store.root / "artifacts" / "kept" / "adapter.bin").write_bytes(b"weights")
    return store.root


def cases(tiny, tmp):
    (tmp / "empty").mkdir()
    (tmp / "bad.yaml").write_text("method: lora\nbudget:\n  epochs: [1\n")
    corrupt = tmp / "corrupt"
    shutil.copytree(tiny["llama-teacher"], corrupt)
    (corrupt / "config.json").write_text('{"model_type": "llama", ')
    return {
        "unknown method": (["run", "--method", "lroa"], "did you mean 'lora'"),
        "unknown task": (["run", "--task", "prob"], "did you mean 'probe'"),
        "unknown method option": (["run", "-o", "rnak=4"], "has no option 'rnak'"),
        "missing folder": (["run", "--teacher", str(tmp / "nope")], "does not exist"),
        "folder without model": (["run", "--teacher", str(tmp / "empty")], "holds no model"),
        "family mismatch": (["run", "--teacher", str(tiny["llama-teacher"]), "--student",
                             str(tiny["qwen2-student"])], "different families"),
        "vocabulary mismatch": (["run", "--teacher", str(tiny["llama-teacher"]), "--student",
                                 str(tiny["llama-other-vocab"])], "different vocabularies"),
        "probe on a foreign pair": (["run", "--teacher", str(tiny["llama-teacher"]), "--student",
                                     str(tiny["llama-student"])], "only works with the pico pair"),
        "zero budget": (["run", "--epochs", "0"], "--epochs must be a positive integer, got 0"),  # the flag typed
        "negative budget": (["run", "--examples=-5"], "--examples must be a positive integer"),
        "malformed yaml": (["run", "--config", str(tmp / "bad.yaml")], f"{tmp / 'bad.yaml'}:4: malformed YAML"),
        "missing spec file": (["run", "--config", str(tmp / "none.yaml")], "does not exist"),
        "unknown backend": (["run", "--backend", "vlm"], "unknown backend 'vlm'"),
        "bad dtype": (["run", "--dtype", "fp8"], "--dtype must be one of"),
        "unknown budget preset": (["run", "--budget", "seekng"], "unknown budget preset 'seekng'; presets: seeking"),
        "unknown transfer format": (["run", "--transfer-format", "tulu"], "--transfer-format must be one of auto"),
        "unknown format": (["leaderboard", "--format", "xml"], "unknown format 'xml'"),
        "missing plugin": (["list", "methods", "--plugin", str(tmp / "none.py")], "plugin file"),
        "corrupt config.json": (["run", "--teacher", str(corrupt)], "config.json is not valid JSON"),
        "unknown device": (["run", "--device", "tpu"], "unknown device 'tpu'; use auto, cpu, cuda"),
        "missing CUDA": (["run", "--device", "cuda:7"], "cuda:7"),
        "zero rank": (["run", "-o", "rank=0"], "-o rank must be a positive integer, got 0"),
        "unknown target module": (["run", "-o", "target_modules=q_projj"], "'q_projj' is no module of 'pico-student'; "
                                  "did you mean 'q_proj'?"),
        "task beyond the context": (["run", "--task", "GSM8K", "--data-dir", str(DATA)],
                                    "task 'gsm8k' generates up to 512 tokens, but the pair's context holds 64"),
        # without data the context check still comes first: nothing asks the hub (which CI cannot reach)
        "task beyond the context, no data": (["run", "--task", "gsm8k", "--data-dir", ""],
                                             "task 'gsm8k' generates up to 512 tokens, but the pair's context holds 64"),
        "code task beyond the context": (["run", "--task", "mbpp", "--allow-code-execution", "--data-dir", str(DATA)],
                                         "task 'mbpp' generates up to 512 tokens, but the pair's context holds 64"),
        "limit flag": (["run", "--limit", "0"], "--limit must be a positive integer, got 0"),
    }


CASES = ["unknown method", "unknown task", "unknown method option", "missing folder", "folder without model",
         "family mismatch", "vocabulary mismatch", "probe on a foreign pair", "zero budget", "negative budget",
         "malformed yaml", "missing spec file", "unknown backend", "bad dtype", "unknown format", "missing plugin",
         "corrupt config.json", "unknown device", "missing CUDA", "zero rank", "unknown target module",
         "task beyond the context", "code task beyond the context", "limit flag", "unknown budget preset",
         "unknown transfer format", "task beyond the context, no data"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line_and_keeps_records(case, tiny_models, pico_pair, results, tmp_path):
    all_cases = cases(tiny_models, tmp_path)
    assert set(all_cases) == set(CASES)
    args, expected = all_cases[case]
    if case.endswith("task beyond the context") and not DATA.is_dir():
        pytest.skip(NO_DATA)
    before = tree_digest(results)
    done = cli(*args, "--results", str(results)) if args[0] != "list" else cli(*args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    message = done.stderr.strip()
    assert "\n" not in message and message.startswith("pkt-bench: error: ") and expected in message, message
    assert tree_digest(results) == before


def test_an_unreadable_record_is_named_before_any_cell_and_force_overwrites_it(pico_pair, results, tmp_path):
    from pkt_bench.runner import check_records, plan
    from pkt_bench.spec import RunSpec

    cells = plan(RunSpec())
    store = ResultStore(results)
    truncated = store.path(cells[0].key)
    truncated.write_text('{"schema_version": 1, "key": ')
    before = tree_digest(results)
    done = cli("run", "--results", str(results))
    assert done.returncode == 2 and tree_digest(results) == before
    assert done.stderr.strip().splitlines() == [
        f"pkt-bench: error: record {truncated} is unreadable (Expecting value: line 1 column 30 (char 29)); rerun "
        f"with --force to overwrite it, or delete the file"]
    check_records(cells, store, force=True)  # --force: the cell runs and its record replaces the broken one
    assert store.get(cells[0].key, unreadable_ok=True) is None


def _more_cases(tiny, tmp):
    """The inputs that ended in a traceback before (issue 25, item 7)."""
    no_weights = tmp / "no-weights"
    shutil.copytree(tiny["llama-teacher"], no_weights)
    for weights in no_weights.glob("*.safetensors"):
        weights.unlink()
    truncated = tmp / "truncated"
    shutil.copytree(tiny["llama-teacher"], truncated)
    weights = next(truncated.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])
    garbage = tmp / "garbage"
    shutil.copytree(tiny["llama-teacher"], garbage)
    next(garbage.glob("*.safetensors")).write_bytes(b"\xff" * 64)
    (tmp / "a-file").write_text("not a folder")
    return {
        "weights missing": (["run", "--teacher", str(no_weights)], "has a config.json but no weights"),
        "truncated weights": (["run", "--teacher", str(truncated)], "is corrupt or truncated"),
        "corrupt weights": (["run", "--teacher", str(garbage)], "is corrupt or truncated"),
        "negative seed": (["run", "--seed", "-1"], "--seed must be an integer from 0 to 2**32 - 1, got -1"),
        "empty task name": (["run", "--task", "probe,,gsm8k"], "empty name in 'probe,,gsm8k'"),
    }


@pytest.mark.parametrize("case", ["weights missing", "truncated weights", "corrupt weights", "negative seed",
                                  "empty task name"])
def test_inputs_that_ended_in_a_traceback_now_get_one_line(case, tiny_models, pico_pair, results, tmp_path):
    args, expected = _more_cases(tiny_models, tmp_path)[case]
    before = tree_digest(results)
    done = cli(*args, "--results", str(results))
    message = done.stderr.strip()
    assert done.returncode == 2 and "\n" not in message and expected in message, message
    assert tree_digest(results) == before


def test_results_that_is_a_file_or_read_only_is_refused_before_any_cell(pico_pair, results, tmp_path):
    import os

    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    for command in (["run"], ["leaderboard"]):
        done = cli(*command, "--results", str(a_file))
        assert done.returncode == 2 and "is a file, not a" in done.stderr and "\n" not in done.stderr.strip()
    assert a_file.read_text() == "not a folder"
    from pkt_bench.api import UserError

    store = ResultStore(results)
    store.check_writable()
    real = os.access
    with pytest.MonkeyPatch.context() as patch:  # as root nothing is read-only: the check as it reads the folder
        patch.setattr("pkt_bench.store.os.access", lambda p, mode: real(p, mode) and p != results / "records")
        with pytest.raises(UserError, match="is not writable .*records is read-only"):
            store.check_writable()
    if os.geteuid() == 0:
        pytest.skip("root writes to read-only folders: the CLI half needs another user")
    before = tree_digest(results)
    for folder in (results, results / "records"):
        folder.chmod(0o555)
    try:
        done = cli("run", "--results", str(results))
    finally:
        for folder in (results, results / "records"):
            folder.chmod(0o755)
    assert done.returncode == 2 and "is not writable" in done.stderr and tree_digest(results) == before


def test_a_read_only_model_cache_is_one_line(tmp_path, monkeypatch):
    from pkt_bench import pico
    from pkt_bench.api import UserError

    monkeypatch.setenv("PKT_BENCH_CACHE", str(tmp_path / "cache"))

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "cache" / "lineage.json"))

    monkeypatch.setattr(pico.Path, "mkdir", refuse)
    with pytest.raises(UserError, match="cannot build pico-student in the model cache .* make it writable or set "
                                        "PKT_BENCH_CACHE"):
        pico.ensure_built("student")
