"""Where pkt-bench finds transfer methods and tasks.

Three sources, one mechanism: a class registers itself with `@register_method(name)` / `@register_task(name)`
when its module is imported. Built-ins are the modules of `pkt_bench.methods` and `pkt_bench.tasks`; external
packages point at their modules through the entry-point groups `pkt_bench.methods` and `pkt_bench.tasks`;
a single file comes in through `--plugin path/to/file.py`. Plugin modules keep torch out of their top-level
imports, so listing them is cheap.

One class may be registered under several names with different preset config values (as mergekit does for
ties/dare): `@register_method("teacher-random", block="random")`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import importlib.util
import pkgutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pkt_bench.api import UserError


@dataclass(frozen=True)
class Entry:
    """A registered name: the class, the config values the name presets, its one-line description and link."""

    name: str
    cls: type
    preset: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    link: str = ""  # this name's own reference, where it is not the class's

    @property
    def reference(self) -> str:
        return self.link or getattr(self.cls, "reference", "")

    def config_fields(self) -> list[dataclasses.Field]:
        config_cls = getattr(self.cls, "Config", None)
        return list(dataclasses.fields(config_cls)) if config_cls else []

    def make_config(self, values: dict[str, Any]) -> Any:
        """The method's config: defaults, then this name's preset, then `values`; unknown keys are errors.

        PEFT's names of the LoRA options (`r`, `lora_alpha`, ...) are taken for ours where a config has them.
        """
        config_cls = self.cls.Config
        known = {f.name: f for f in dataclasses.fields(config_cls)}
        values = {PEFT_ALIASES.get(k, k) if k not in known and PEFT_ALIASES.get(k) in known else k: v
                  for k, v in values.items()}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise UserError(
                f"{self.name!r} has no option {unknown[0]!r}; its options are: {', '.join(known) or 'none'}"
            )
        merged = {**self.preset, **values}
        defaults = config_cls().__dict__
        for key, value in values.items():
            merged[key] = _coerce(self.name, key, value, defaults[key])
        return config_cls(**merged)



PEFT_ALIASES = {"r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout", "init_lora_weights": "init"}
"""PEFT's `LoraConfig` names -> ours, so `-o r=8 -o lora_alpha=32` works as a PEFT user writes it."""

_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _coerce(owner: str, key: str, value: Any, default: Any) -> Any:
    """Bring a CLI/YAML value to the type of the option's default ("8", "true" or "a,b" from the CLI)."""
    if default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
    elif isinstance(default, (int, float)):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                number = type(default)(value)
            except ValueError:
                number = None
            if number is not None and (not isinstance(value, float) or number == value):
                return number
    elif isinstance(default, (list, tuple)):
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, (list, tuple)):
            return type(default)(item.strip() if isinstance(item, str) else item for item in items)
    elif isinstance(default, str) and isinstance(value, str):
        return value
    raise UserError(
        f"option {key!r} of {owner!r} expects a {type(default).__name__} (default {default!r}), got {value!r}"
    )


class Registry:
    """Names -> entries for one kind of plugin ("method" or "task")."""

    def __init__(self, kind: str, builtin_package: str, entry_point_group: str):
        self.kind = kind
        self._builtin_package = builtin_package
        self._group = entry_point_group
        self._entries: dict[str, Entry] = {}
        self._discovered = False

    def register(self, name: str, *, description: str | None = None, reference: str = "", **preset: Any):
        """Class decorator: register the class under `name`, with optional preset config values (and then the
        preset's own description and reference, which a preset of another method needs)."""

        def decorate(cls: type) -> type:
            if name in self._entries and self._entries[name].cls is not cls:
                existing = self._entries[name].cls
                raise UserError(
                    f"{self.kind} name {name!r} is taken by {existing.__module__}.{existing.__qualname__}; "
                    f"register {cls.__qualname__} under another name"
                )
            self._entries[name] = Entry(name, cls, dict(preset), description or getattr(cls, "description", ""),
                                        reference)
            return cls

        return decorate

    def discover(self) -> None:
        """Import the built-in modules and the entry points once (plugin modules are light to import)."""
        if self._discovered:
            return
        self._discovered = True
        package = importlib.import_module(self._builtin_package)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{self._builtin_package}.{module.name}")
        for entry_point in importlib.metadata.entry_points(group=self._group):
            try:
                loaded = entry_point.load()
            except Exception as error:  # a broken third-party plugin must not hide the others
                print(f"pkt-bench: warning: cannot load {self.kind} plugin {entry_point.value!r}: {error}",
                      file=sys.stderr)
                continue
            if isinstance(loaded, type) and entry_point.name not in self._entries:
                self.register(entry_point.name)(loaded)

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[name] for name in self.names()]

    def get(self, name: str) -> Entry:
        self.discover()
        if name in self._entries:
            return self._entries[name]
        folded = {known.lower(): known for known in self._entries}
        if name.lower() in folded:  # GSM8K, MMLU: names in any case, as lm-eval users type them
            return self._entries[folded[name.lower()]]
        close = difflib.get_close_matches(name, self._entries, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(
            f"unknown {self.kind} {name!r}; {hint}known {self.kind}s: {', '.join(self.names())} "
            f"(add one with --plugin FILE.py)"
        )


def make_task(entry: Entry, data_dir: str | None, options: dict[str, Any], allow_code_execution: bool = False) -> Any:
    """The task of `entry` with its options (defaults, the name's preset, then `options`) and, for a task that
    runs model-written code (`executes_code`), the user's permission to run it."""
    cls = entry.cls
    permission = {"allow_code_execution": allow_code_execution} if getattr(cls, "executes_code", False) else {}
    if hasattr(cls, "Config"):
        return cls(data_dir, entry.make_config(options), **permission)
    if options:
        raise UserError(f"task {entry.name!r} takes no options; drop --task-option")
    return cls(data_dir, **permission)


def load_plugin(path: str | Path) -> None:
    """Import a single plugin file; its decorators register what it defines."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"plugin file {str(path)!r} does not exist; give the path of a .py file")
    module_name = f"pkt_bench_plugin_{path.stem}_{abs(hash(str(path.resolve()))):x}"
    if module_name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"plugin file {str(path)!r} is not a Python module; give a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except UserError:
        raise
    except Exception as error:
        del sys.modules[module_name]
        raise UserError(f"plugin file {str(path)!r} failed to import: {type(error).__name__}: {error}") from error


METHODS = Registry("method", "pkt_bench.methods", "pkt_bench.methods")
TASKS = Registry("task", "pkt_bench.tasks", "pkt_bench.tasks")
register_method = METHODS.register
register_task = TASKS.register
