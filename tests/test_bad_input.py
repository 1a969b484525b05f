"""Bad input: one line that says what is wrong and how to fix it, exit code 2, nothing stored changed."""

import pytest
from helpers import cli, tree_digest

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
        "zero budget": (["run", "--epochs", "0"], "budget epochs must be a positive integer"),
        "negative budget": (["run", "--examples=-5"], "budget examples must be a positive integer"),
        "malformed yaml": (["run", "--config", str(tmp / "bad.yaml")], f"{tmp / 'bad.yaml'}:4: malformed YAML"),
        "missing spec file": (["run", "--config", str(tmp / "none.yaml")], "does not exist"),
        "unknown backend": (["run", "--backend", "vlm"], "unknown backend 'vlm'"),
        "bad dtype": (["run", "--dtype", "fp8"], "'dtype' must be one of"),
        "unknown budget preset": (["run", "--budget", "seekng"], "unknown budget preset 'seekng'; presets: seeking"),
        "unknown transfer format": (["run", "--transfer-format", "tulu"], "'transfer_format' must be one of auto"),
        "unknown format": (["leaderboard", "--format", "xml"], "unknown format 'xml'"),
        "missing plugin": (["list", "methods", "--plugin", str(tmp / "none.py")], "plugin file"),
    }


CASES = ["unknown method", "unknown task", "unknown method option", "missing folder", "folder without model",
         "family mismatch", "vocabulary mismatch", "probe on a foreign pair", "zero budget", "negative budget",
         "malformed yaml", "missing spec file", "unknown backend", "bad dtype", "unknown budget preset",
         "unknown transfer format", "unknown format", "missing plugin"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line_and_keeps_records(case, tiny_models, pico_pair, results, tmp_path):
    all_cases = cases(tiny_models, tmp_path)
    assert set(all_cases) == set(CASES)
    args, expected = all_cases[case]
    before = tree_digest(results)
    done = cli(*args, "--results", str(results)) if args[0] != "list" else cli(*args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    message = done.stderr.strip()
    assert "\n" not in message and message.startswith("pkt-bench: error: ") and expected in message, message
    assert tree_digest(results) == before
