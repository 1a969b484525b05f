import pytest

from pkt_bench.api import UserError
from pkt_bench.models import ModelPair, resolve_model


def test_same_family_pairs_of_different_shapes_resolve(tiny_models):
    for family in ("llama", "qwen2"):
        pair = ModelPair.resolve(str(tiny_models[f"{family}-teacher"]), str(tiny_models[f"{family}-student"]))
        assert (pair.device, pair.dtype) == ("cpu", "float32")
        assert pair.teacher.identity != pair.student.identity


def test_pair_of_different_model_types_is_refused(tiny_models):
    with pytest.raises(UserError, match=r"\(llama\) and student .* \(qwen2\) are of different families"):
        ModelPair.resolve(str(tiny_models["llama-teacher"]), str(tiny_models["qwen2-student"]))


def test_pair_with_different_vocabularies_is_refused(tiny_models):
    with pytest.raises(UserError, match="different vocabularies"):
        ModelPair.resolve(str(tiny_models["llama-teacher"]), str(tiny_models["llama-other-vocab"]))


def test_missing_folder_empty_folder_and_file_are_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="holds no model"):
        resolve_model(str(tmp_path))
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_hub_ids_stay_hub_ids_and_fail_cleanly_offline():
    ref = resolve_model("Qwen/Qwen2.5-0.5B-Instruct")
    assert ref.path == "Qwen/Qwen2.5-0.5B-Instruct"
    with pytest.raises(UserError, match="cannot load model"):
        ModelPair.resolve("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct")


def test_dtype_and_device_choice():
    from pkt_bench.models import pick_dtype

    assert pick_dtype("auto", "cuda") == "bfloat16" and pick_dtype("auto", "cpu") == "float32"
    assert pick_dtype("bfloat16", "cpu") == "bfloat16"
