"""Flag habits from lm-eval and PEFT, checked in-process (no subprocess, no models)."""

from typer.testing import CliRunner

from pkt_bench import __version__
from pkt_bench.cli import _names, app
from pkt_bench.registry import METHODS, TASKS


def test_task_names_in_any_case_and_comma_lists():
    assert TASKS.get("GSM8K").name == "gsm8k" and TASKS.get("Mmlu-5shot").name == "mmlu-5shot"
    assert _names(["gsm8k,mmlu", " probe "]) == ["gsm8k", "mmlu", "probe"] and _names(None) is None


def test_peft_option_names_are_aliases_of_ours():
    config = METHODS.get("lora").make_config({"r": "8", "lora_alpha": "32", "lora_dropout": "0"})
    assert (config.rank, config.alpha, config.dropout) == (8, 32.0, 0.0)
    assert METHODS.get("sensitivity").make_config({"r": "4"}).rank == 4


def test_presets_have_their_own_words():
    pissa, lora = METHODS.get("pissa"), METHODS.get("lora")
    assert "PiSSA" in pissa.description and pissa.reference == "https://arxiv.org/abs/2404.02948"
    assert lora.reference == "https://arxiv.org/abs/2106.09685"
    texts = {METHODS.get(n).description for n in ("sensitivity", "teacher-random", "random-init")}
    assert len(texts) == 3


def test_version_and_no_records_exit_codes(tmp_path):
    runner = CliRunner()
    done = runner.invoke(app, ["--version"])
    assert done.exit_code == 0 and done.output.strip() == f"pkt-bench {__version__}"
    (tmp_path / "records").mkdir()
    board = runner.invoke(app, ["leaderboard", "--results", str(tmp_path)])
    plot = runner.invoke(app, ["plot", "--results", str(tmp_path), "--out", str(tmp_path / "plots")])
    assert board.exit_code == plot.exit_code == 2  # both say "no records" the same way
    assert not (tmp_path / "plots").exists()
