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


@pytest.fixture
def gsm8k_data(tmp_path):
    """A data folder in the local layout with three GSM8K-shaped problems per split."""
    import json

    root = tmp_path / "data"
    (root / "gsm8k").mkdir(parents=True)
    for split in ("train", "test"):
        rows = [{"question": f"{split} {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(3)]
        (root / "gsm8k" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_a_local_folder_is_keyed_by_its_content_not_its_path(tiny_models, gsm8k_data, tmp_path):
    """Records made on one machine are found again on another that holds the same files under another path; a
    changed weight file gives new keys."""
    import shutil

    from pkt_bench.runner import plan
    from pkt_bench.spec import RunSpec

    here, there = tiny_models["qwen2-teacher"], tmp_path / "elsewhere" / "qwen2-teacher"
    shutil.copytree(here, there)
    assert resolve_model(str(there)).identity == resolve_model(str(here)).identity
    assert resolve_model(str(there)).identity.startswith("qwen2-teacher@")
    student = str(tiny_models["qwen2-student"])
    def key(method, teacher, data=gsm8k_data):
        return plan(RunSpec(method=method, teacher=str(teacher), student=student, tasks=["gsm8k-0shot"],
                            data_dir=str(data), references=False, fit_context=True))[0].key

    keys = [key(method, teacher) for method in ("teacher", "lora") for teacher in (here, there)]
    assert keys[0] == keys[1] and keys[2] == keys[3] and keys[0] != keys[2]
    weights = next(p for p in there.iterdir() if p.suffix == ".safetensors")
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1  # one bit of the last weight
    weights.write_bytes(bytes(blob))
    assert resolve_model(str(there)).identity != resolve_model(str(here)).identity
    assert key("teacher", there) != keys[0]
    moved = tmp_path / "moved-data"
    shutil.copytree(gsm8k_data, moved)
    assert key("lora", here, moved) == keys[2]  # the data folder by content too


def test_local_data_is_keyed_by_the_content_of_the_folder_the_task_reads(gsm8k_data, tmp_path):
    import json
    import shutil

    from pkt_bench.registry import TASKS, make_task
    from pkt_bench.taskdata import data_identity, task_data_identity

    root = gsm8k_data
    copy = tmp_path / "other-machine" / "eval"
    shutil.copytree(root, copy)
    task = make_task(TASKS.get("gsm8k"), str(copy), {})
    assert task_data_identity(task, str(copy)) == data_identity(str(root), ["gsm8k"])
    (copy / "mbpp").mkdir()
    (copy / "mbpp" / "mbpp.jsonl").write_text("{}\n")  # another task's data: gsm8k's keys stay
    assert data_identity(str(copy), ["gsm8k"]) == data_identity(str(root), ["gsm8k"])
    assert data_identity(str(copy)) != data_identity(str(root))  # a task naming no folder: all of it
    humaneval = TASKS.get("humaneval").cls.data_subdirs  # its transfer data are MBPP's train problems
    before = data_identity(str(copy), humaneval)
    (copy / "mbpp" / "mbpp.jsonl").write_text('{"task_id": 601}\n')
    assert data_identity(str(copy), humaneval) != before
    with open(copy / "gsm8k" / "test.jsonl", "a") as test:
        test.write(json.dumps({"question": "one more?", "answer": "#### 1"}) + "\n")
    assert data_identity(str(copy), ["gsm8k"]) != data_identity(str(root), ["gsm8k"])
    assert data_identity(None) is None
    probe = make_task(TASKS.get("probe"), str(copy), {})  # reads no local data: --data-dir leaves its keys alone
    assert task_data_identity(probe, str(copy)) is None


def test_a_folder_saved_again_by_another_transformers_keeps_its_identity(tiny_models, tmp_path):
    """Two copies of one model that differ only in the version stamp transformers writes into config.json and
    generation_config.json have one identity (their records are found on either); any other change is another."""
    import json
    import shutil

    from pkt_bench.spec import folder_identity

    def copy(name: str, edit) -> str:
        folder = tmp_path / name / "model"
        shutil.copytree(tiny_models["qwen2-student"], folder)
        for file in ("config.json", "generation_config.json"):
            path = folder / file
            data = json.loads(path.read_text())
            edit(file, data)
            path.write_text(json.dumps(data, indent=3))  # another writer's layout too
        return folder_identity(folder)

    def version(new: str):
        return lambda file, data: data.update(transformers_version=new)

    original = copy("a", version("5.24.0"))
    assert copy("b", version("5.19.0")) == original
    assert copy("c", lambda file, data: data.pop("transformers_version")) == original
    assert copy("d", lambda file, data: data.update(rope_theta=1.0) if file == "config.json" else None) != original
    assert copy("e", lambda file, data: data.update(bos_token_id=7) if file != "config.json" else None) != original
    folder = tmp_path / "a" / "model"
    weights = bytearray((folder / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(weights))
    assert folder_identity(folder) != original  # one weight byte
