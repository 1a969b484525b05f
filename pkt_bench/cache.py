"""Content-addressed folders that methods build once and reuse: extractions, teacher generations.

A folder is `<cache_dir>/<kind>-<hash>/`, built in a unique temp folder beside it and renamed into place when
`build` returns, so a crash or a concurrent builder never leaves a half-built folder under the final name.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pkt_bench import formats
from pkt_bench.spec import cell_key
from pkt_bench.taskdata import task_data_identity, transfer_dir_identity

if TYPE_CHECKING:
    from collections.abc import Callable

    from pkt_bench.api import TransferContext

COSTS_FILE = "costs.json"


def cache_identity(ctx: TransferContext, kind: str, identity: dict[str, Any]) -> dict[str, Any]:
    """What a cached folder's hash covers: the method's identity plus the pair, task and data it ran on."""
    transfer_dir = transfer_dir_identity(ctx.task)
    return {
        "kind": kind, "identity": identity,
        "teacher": ctx.pair.teacher.identity, "student": ctx.pair.student.identity,
        "device_type": ctx.pair.device.split(":")[0], "dtype": ctx.pair.dtype,
        "task": ctx.task_name, "task_version": ctx.task.version,
        "data_dir": task_data_identity(ctx.task, ctx.data_dir),
        **formats.identity(ctx.transfer_format, ctx.task),
        **({"transfer_dir": transfer_dir} if transfer_dir else {}),
    }


def cached(ctx: TransferContext, kind: str, identity: dict[str, Any], build: Callable[[Path], None]) -> Path:
    if ctx.cache_dir is None:
        folder = ctx.workdir / kind
        folder.mkdir(parents=True, exist_ok=True)
        build(folder)
        return folder
    folder = ctx.cache_dir / f"{kind}-{cell_key(cache_identity(ctx, kind, identity))}"
    if (folder / COSTS_FILE).exists():
        for name, value in json.loads((folder / COSTS_FILE).read_text()).items():
            ctx.costs[name] = ctx.costs.get(name, 0) + value
        ctx.costs["reused"] = ctx.costs.get("reused", 0) + 1
        return folder
    ctx.cache_dir.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=ctx.cache_dir, prefix=f".{folder.name}.", suffix=".partial"))
    before = dict(ctx.costs)
    try:
        build(partial)
        spent = {name: value - before.get(name, 0) for name, value in ctx.costs.items() if value != before.get(name, 0)}
        (partial / COSTS_FILE).write_text(json.dumps(spent, indent=1, sort_keys=True))
        try:
            partial.rename(folder)
        except OSError:  # another process finished the same folder first: theirs is as good as ours
            if not (folder / COSTS_FILE).exists():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder
