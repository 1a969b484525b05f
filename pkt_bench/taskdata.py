"""Where task data comes from: the HF hub, a local data folder, or the LaTen split files.

Local data folder (`--data-dir DIR` or `PKT_BENCH_DATA`), the layout of `shared/data/eval`, upstream files as
released:

    DIR/gsm8k/train.jsonl, DIR/gsm8k/test.jsonl          {question, answer}
    DIR/mmlu/{dev,val,test}/<subject>_<split>.csv        no header: question, A, B, C, D, answer letter
    DIR/humaneval/HumanEval.jsonl (or .jsonl.gz)         {task_id, prompt, canonical_solution, test, entry_point}
    DIR/mbpp/mbpp.jsonl                                  {task_id, text, code, test_list, test_setup_code, ...}

Transfer folder (`-T transfer_dir=DIR`), the layout of `shared/data/laten_splits`:

    DIR/<name>/<name>_{extract,align,train}_split.jsonl  {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}

Task helpers turn these into documents in the schema of the task's hub dataset, so that one lm-eval config reads
both sources. Nothing here imports `datasets` until a dataset is built.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pkt_bench.api import UserError
from pkt_bench.spec import folder_identity

DATA_ENV = "PKT_BENCH_DATA"
LATEN_FILES = {"seed": "extract", "align": "align", "train": "train"}
"""Transfer-data role -> the LaTen split file that holds it (LaTen calls the seed role "extract")."""


def data_identity(data_dir: str | Path | None, subdirs: Sequence[str] | None = ()) -> str | None:
    """What identifies local data in keys: the content digests of the folders `data_dir/<subdir>` a task reads
    (the whole `data_dir` for a task that names none), not their paths, so records made from the same files on
    another machine are found again; None for the HF hub and for a task that reads no local data
    (`subdirs` None)."""
    if not data_dir or subdirs is None:
        return None
    root = Path(data_dir).expanduser()
    folders = [root / s for s in subdirs if (root / s).is_dir()] or [root]
    return "+".join(folder_identity(folder) for folder in folders)


def task_data_identity(task: Any, data_dir: str | Path | None) -> str | None:
    """`data_identity` of the folders `task` reads (its `data_subdirs`)."""
    return data_identity(data_dir, getattr(task, "data_subdirs", ()))


def data_file(data_dir: str | Path, *candidates: str) -> Path:
    """The first of `candidates` (paths relative to `data_dir`) that exists; a one-line error naming them if none."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"data folder {str(root)!r} does not exist; give --data-dir (or {DATA_ENV}) the folder "
                        f"that holds gsm8k/, mmlu/, humaneval/, mbpp/")
    for candidate in candidates:
        if (root / candidate).is_file():
            return root / candidate
    wanted = " or ".join(candidates)
    raise UserError(f"data folder {str(root)!r} has no {wanted}; put the upstream file there (layout: "
                    f"pkt_bench/taskdata.py) or drop --data-dir to read the HF hub")


def data_folder(data_dir: str | Path, relative: str, pattern: str) -> list[Path]:
    """The files matching `pattern` in `data_dir/relative`, sorted by name; an error naming the folder if none."""
    folder = Path(data_dir).expanduser() / relative
    files = sorted(folder.glob(pattern))
    if not files:
        data_file(data_dir, f"{relative}/{pattern}")  # raises the one-line error naming what is missing
    return files


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object per line (`.gz` files are read compressed); a malformed line is named."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise UserError(f"{path}:{number}: not a JSON object ({error.msg})") from None
    return rows


def hub(path: str, name: str | None = None):
    """A `datasets.DatasetDict` from the HF hub (or the local `datasets` cache)."""
    import datasets

    try:
        return datasets.load_dataset(path, name)
    except Exception as error:  # offline, unknown id, network: all mean "no data from the hub"
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"cannot load {path} from the HF hub ({first}); give --data-dir DIR (or {DATA_ENV}) "
                        f"with the local files") from None


def local(splits: dict[str, list[dict[str, Any]]]):
    """A `datasets.DatasetDict` of in-memory documents, one list per split."""
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(docs) for split, docs in splits.items()})


def laten_pairs(transfer_dir: str | Path, name: str, role: str) -> list[tuple[str, str, str]]:
    """(id, user text, assistant text) of each line of the LaTen split file that holds `role`."""
    path = data_file(transfer_dir, f"{name}/{name}_{LATEN_FILES[role]}_split.jsonl")
    pairs = []
    for number, row in enumerate(read_jsonl(path), 1):
        messages = row.get("messages") if isinstance(row, dict) else None
        roles = [m.get("role") for m in messages] if isinstance(messages, list) else []
        if roles != ["user", "assistant"]:
            raise UserError(f"{path}:{number}: expected \"messages\" with one user and one assistant turn")
        pairs.append((str(row.get("id", f"{path.stem}:{number}")), messages[0]["content"], messages[1]["content"]))
    return pairs


_DATASETS: dict[tuple, Any] = {}


def cached(key: tuple, build):
    """`build()` once per `key` in this process: the task and lm-eval's loader of the same YAML share one copy."""
    if key not in _DATASETS:
        _DATASETS[key] = build()
    return _DATASETS[key]


def transfer_dir_identity(task: Any) -> str | None:
    """The content identity of a task's `-T transfer_dir` (its LaTen split folder), or None without one."""
    transfer_dir = getattr(getattr(task, "config", None), "transfer_dir", "")
    return data_identity(transfer_dir, [task.laten_name]) if transfer_dir else None


def task_options_identity(task: Any) -> dict[str, Any]:
    """A task's options as cell keys see them: its `Config`, with a transfer folder by content, not path."""
    if not hasattr(task, "Config"):
        return {}
    options = dataclasses.asdict(task.config)
    if options.get("transfer_dir"):
        options["transfer_dir"] = transfer_dir_identity(task)
    return options
