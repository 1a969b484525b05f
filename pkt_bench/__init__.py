"""pkt-bench: a comparative benchmarking harness for parametric knowledge transfer between LLMs."""

__version__ = "0.1.0"
