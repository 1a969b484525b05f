"""vLLM engine settings pass through to the engine and into the cell's key only when they can change results."""

import dataclasses

import pytest

from pkt_bench import evaluate
from pkt_bench.api import Artifact, UserError
from pkt_bench.evaluate import check_backend, engine_args, make_target


def test_engine_args_reach_vllm_and_override_our_defaults(monkeypatch):
    seen = {}

    class FakeVLLM:
        def __init__(self, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(evaluate, "_lm_eval_vllm_class", lambda: FakeVLLM)
    args = engine_args({"gpu_memory_utilization": "0.5", "max_model_len": "4096", "enforce_eager": "true"})
    assert args == {"gpu_memory_utilization": 0.5, "max_model_len": 4096, "enforce_eager": True}
    make_target(Artifact("model", "/m"), "vllm", "cuda", "bfloat16", 8, {**args, "seed": 3}).lm_eval_model()
    assert seen["gpu_memory_utilization"] == 0.5 and seen["max_model_len"] == 4096 and seen["seed"] == 3
    assert seen["pretrained"] == "/m" and seen["max_num_seqs"] == 8 and seen["batch_size"] == "auto"


def test_engine_args_need_a_vllm_backend():
    with pytest.raises(UserError, match="--vllm-arg max_model_len is a vLLM engine setting, but the backend is hf"):
        check_backend("hf", {"max_model_len": 4096})


def test_only_result_changing_settings_enter_the_key(pico_pair):
    from pkt_bench.runner import plan
    from pkt_bench.spec import RunSpec

    cell = plan(RunSpec(references=False))[0]

    def key(**vllm_args):
        return dataclasses.replace(cell, spec=dataclasses.replace(cell.spec, vllm_args=vllm_args)).key

    assert key() == cell.key == key(gpu_memory_utilization=0.5, tensor_parallel_size=2)
    assert key(max_model_len=4096) != cell.key
