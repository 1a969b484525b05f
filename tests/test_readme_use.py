"""The README's Use section runs as written: every command that needs no network, GPU or placeholder, on the
pico pair, in a scratch folder (results via PKT_BENCH_RESULTS). The others are listed, so none is missed silently."""

import re
import shlex

from helpers import REPO, cli

NEEDS_MORE = ("Qwen/", " T ", "--backend vllm", "humaneval", "--executor ray", "reproduction.yaml",
              "reproduction-cpu.yaml", "--pair pico-kin")
"""Markers of commands this test cannot run offline on 2 CPU cores: hub ids, placeholders, vLLM, code execution
(its own tests run it), Ray, the reproduction sweeps (real models), and the kinship ladder's full-size pairs
(minutes to build; tests/test_ladder.py runs graft on a small world)."""


def use_commands() -> list[str]:
    block = re.search(r"## Use\n\n```bash\n(.*?)\n```", (REPO / "README.md").read_text(), flags=re.S).group(1)
    joined = block.replace("\\\n", " ")
    commands = [re.sub(r"\s*#.*$", "", line).strip() for line in joined.splitlines()]
    return [command for command in commands if command]  # a line that is only a comment continues the one above


def test_every_offline_command_of_the_use_section_runs_as_written(pico_pair, tmp_path):
    commands = use_commands()
    runnable = [c for c in commands if not any(marker in f"{c} " for marker in NEEDS_MORE)]
    assert len(commands) == 24 and len(runnable) == 14, runnable  # a new command: decide which list it is in
    for folder in ("examples", "sweeps"):
        (tmp_path / folder).symlink_to(REPO / folder)
    env = {"PKT_BENCH_RESULTS": str(tmp_path / "results")}
    for command in runnable:
        args = shlex.split(command)
        assert args[0] == "pkt-bench"
        done = cli(*args[1:], env=env, cwd=tmp_path)
        assert done.returncode == 0, (command, done.stderr[-2000:])
    assert (tmp_path / "extracted").is_dir() and list((tmp_path / "plots").glob("*.png"))
