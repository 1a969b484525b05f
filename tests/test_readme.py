import re

from helpers import REPO


def setup_commands():
    section = (REPO / "README.md").read_text().split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_them_verbatim():
    commands = setup_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert "pkt-bench run" in commands[0] and "pytest" in commands[1]
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert all(command in ci_lines for command in commands)
    assert ci_lines.index("pip install -q torch==2.13.0") < ci_lines.index(commands[0]) < ci_lines.index(commands[1])
