import subprocess
import sys
import textwrap
from dataclasses import dataclass, field

import pytest
from helpers import REPO, cli

from pkt_bench.api import UserError
from pkt_bench.registry import METHODS, TASKS, Registry, load_plugin


@dataclass
class ToyConfig:
    rank: int = field(default=4, metadata={"help": "rank"})
    block: str = field(default="max", metadata={"help": "block strategy"})
    modules: list[str] = field(default_factory=lambda: ["q_proj"], metadata={"help": "targets"})
    embeddings: bool = field(default=False, metadata={"help": "embeddings"})


def toy_registry():
    return Registry("method", "pkt_bench.methods", "pkt_bench.methods.none")


def test_decorator_registers_presets_of_one_class():
    registry = toy_registry()

    @registry.register("toy", description="the toy")
    @registry.register("toy-random", description="the toy, random block", block="random")
    class Toy:
        description = "class text"
        reference = "https://example.org"
        Config = ToyConfig
        fine_tunes = True

    assert registry.get("toy").cls is registry.get("toy-random").cls is Toy
    assert registry.get("toy").make_config({}).block == "max"
    assert registry.get("toy-random").make_config({}).block == "random"
    assert registry.get("toy-random").make_config({"block": "top"}).block == "top"  # user beats preset
    assert registry.get("toy").description == "the toy"
    assert registry.get("toy").reference == "https://example.org"


def test_duplicate_name_of_another_class_is_refused():
    registry = toy_registry()
    registry.register("same")(type("A", (), {"Config": ToyConfig}))
    with pytest.raises(UserError, match="taken by"):
        registry.register("same")(type("B", (), {"Config": ToyConfig}))


def test_config_values_from_cli_strings_are_coerced_and_checked():
    registry = toy_registry()
    registry.register("toy")(type("Toy", (), {"Config": ToyConfig}))
    entry = registry.get("toy")
    config = entry.make_config({"rank": "8", "modules": "q_proj, v_proj", "embeddings": "true"})
    assert (config.rank, config.modules, config.embeddings) == (8, ["q_proj", "v_proj"], True)
    with pytest.raises(UserError, match="expects a int"):
        entry.make_config({"rank": "eight"})
    with pytest.raises(UserError, match="expects a int"):
        entry.make_config({"rank": 2.5})
    with pytest.raises(UserError, match="has no option 'rnak'; its options are: rank, block"):
        entry.make_config({"rnak": 8})


def test_unknown_name_suggests_the_closest_and_lists_known():
    with pytest.raises(UserError) as error:
        METHODS.get("lroa")
    message = str(error.value)
    assert "did you mean 'lora'?" in message
    assert all(name in message for name in ("lora", "student", "teacher"))
    with pytest.raises(UserError, match="unknown task 'prob'; did you mean 'probe'"):
        TASKS.get("prob")


def test_entry_point_of_an_installed_package_is_found(tmp_path, monkeypatch):
    package = tmp_path / "toy_pkt_plugin.py"
    package.write_text(textwrap.dedent('''
        from dataclasses import dataclass
        @dataclass
        class Config:
            pass
        class EntryMethod:
            description = "registered through an entry point"
            reference = ""
            Config = Config
            fine_tunes = False
    '''))
    dist = tmp_path / "toy_pkt_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-pkt-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[pkt_bench.test_methods]\nfrom-entry-point = toy_pkt_plugin:EntryMethod\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry("method", "pkt_bench.methods", "pkt_bench.test_methods")
    entry = registry.get("from-entry-point")
    assert entry.cls.__name__ == "EntryMethod"
    assert entry.description == "registered through an entry point"


def test_plugin_file_registers_and_broken_file_is_a_user_error(tmp_path):
    load_plugin(REPO / "examples" / "attention_lora.py")
    assert METHODS.get("attention-lora").make_config({}).rank == 8
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_module_anywhere\n")
    with pytest.raises(UserError, match="failed to import: ModuleNotFoundError"):
        load_plugin(broken)
    with pytest.raises(UserError, match="does not exist"):
        load_plugin(tmp_path / "missing.py")


def test_list_shows_plugin_methods_without_importing_torch():
    code = ("import sys; from pkt_bench.cli import app\n"
            "try:\n    app(['list', 'methods', '--details', '--plugin', 'examples/attention_lora.py'])\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'lm_eval') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={"COLUMNS": "200", "PATH": ""})
    assert done.returncode == 0, done.stderr
    for text in ("attention-lora", "LoRA on q/k/v/o only", "lora", "student", "teacher", "rank = 8", "target_modules"):
        assert text in done.stdout


def test_cli_unknown_method_exits_2_with_one_line():
    done = cli("list", "methdos")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "pkt-bench list methods" in done.stderr


def imports_of(path):
    """The pkt_bench modules a file imports anywhere (top level, inside functions, under TYPE_CHECKING)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pkt_bench"):
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("pkt_bench"))
    return names


def test_the_interfaces_import_nothing_of_pkt_bench_so_no_import_circle_runs_through_them():
    from pathlib import Path

    import pkt_bench

    api = Path(pkt_bench.__file__).parent / "api.py"
    assert imports_of(api) == set()
    # and the interfaces are what every other layer imports: the context, the runner, the methods
    root = Path(pkt_bench.__file__).parent
    for user in ("context.py", "runner.py", "methods/lora.py", "finetune.py"):
        assert any(name.startswith("pkt_bench.api") for name in imports_of(root / user)), user
