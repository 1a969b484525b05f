import importlib.metadata

import pytest

import pkt_bench.cli
import pkt_bench.methods
import pkt_bench.tasks


def test_installed_files_live_under_pkt_bench_only():
    """No generic top-level `methods`, `tasks` or `cli` may land in site-packages."""
    distribution = importlib.metadata.distribution("pkt-bench")
    if '"editable": true' in (distribution.read_text("direct_url.json") or ""):
        pytest.skip("an editable install copies no files; CI checks a regular install")
    assert distribution.read_text("top_level.txt").split() == ["pkt_bench"]
    files = {str(f) for f in distribution.files or []}
    assert {"pkt_bench/cli.py", "pkt_bench/methods/lora.py", "pkt_bench/tasks/probe/__init__.py"} <= files


def test_console_script_points_at_the_cli():
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts["pkt-bench"] == "pkt_bench.cli:main"
    assert callable(pkt_bench.cli.main) and pkt_bench.methods.__name__ == "pkt_bench.methods"
