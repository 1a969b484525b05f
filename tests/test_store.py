import json

import pytest

from pkt_bench.api import UserError
from pkt_bench.spec import SCHEMA_VERSION
from pkt_bench.store import ResultStore


def record(key, score):
    return {"schema_version": SCHEMA_VERSION, "key": key, "metrics": {"acc": score}}


def test_put_get_and_overwrite(tmp_path):
    store = ResultStore(tmp_path)
    store.put(record("abc", 0.5))
    assert store.get("abc")["metrics"]["acc"] == 0.5
    store.put(record("abc", 0.7))
    assert store.get("abc")["metrics"]["acc"] == 0.7
    assert store.get("missing") is None
    assert [p.name for p in store.records_dir.iterdir()] == ["abc.json"]


def test_a_crash_while_writing_leaves_the_old_record_and_no_partial_file(tmp_path, monkeypatch):
    store = ResultStore(tmp_path)
    store.put(record("abc", 0.5))
    before = store.path("abc").read_bytes()

    def crash(obj, handle, **kwargs):
        handle.write('{"schema_version": 1, "key": "abc", "metr')  # half a record, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", crash)
    with pytest.raises(KeyboardInterrupt):
        store.put(record("abc", 0.9))
    assert store.path("abc").read_bytes() == before
    assert [p.name for p in store.records_dir.iterdir()] == ["abc.json"]


def test_reader_skips_unreadable_and_foreign_schema_records_and_leaves_them(tmp_path, capsys):
    store = ResultStore(tmp_path)
    store.put(record("good", 0.5))
    (store.records_dir / "torn.json").write_text('{"schema_version": 1, "ke')
    (store.records_dir / "future.json").write_text(json.dumps({"schema_version": 99, "key": "future"}))
    assert [r["key"] for r in store.records()] == ["good"]
    warnings = capsys.readouterr().err
    assert "torn.json" in warnings and "schema 99" in warnings
    assert (store.records_dir / "torn.json").exists() and (store.records_dir / "future.json").exists()


def _checkout(tmp_path, monkeypatch):
    """A git checkout standing in for pkt-bench's own: one tracked file, committed."""
    import subprocess

    from pkt_bench import environment

    folder = tmp_path / "checkout"
    (folder / "pkt_bench").mkdir(parents=True)
    (folder / "pkt_bench" / "x.py").write_text("A = 1\n")
    for args in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", "-C", str(folder), *args], check=True)
    monkeypatch.setattr(environment, "checkout", lambda: folder)
    return folder


def test_a_run_from_uncommitted_code_is_refused_unless_allowed_and_then_stores_the_diff(tmp_path, monkeypatch):
    """Uncommitted changes to tracked files stop a run before any cell (nothing stored); --allow-dirty runs it,
    and its record names the commit as dirty and points at the exact `git diff HEAD`, stored beside it."""
    import json
    import subprocess

    from pkt_bench.runner import ALLOW_DIRTY, run
    from pkt_bench.spec import Budget, RunSpec

    folder = _checkout(tmp_path, monkeypatch)
    spec = RunSpec(budget=Budget(examples=4, epochs=1), references=False)
    store = ResultStore(tmp_path / "results")
    monkeypatch.delenv(ALLOW_DIRTY)
    record = run(spec, store)[0].record  # a clean checkout runs
    assert not record["environment"]["git_commit"].endswith("-dirty") and "git_diff" not in record["environment"]

    (folder / "pkt_bench" / "x.py").write_text("A = 2\n")
    (folder / "untracked.txt").write_text("not code\n")
    with pytest.raises(UserError, match=r"uncommitted changes to pkt_bench/x\.py; .* pass --allow-dirty"):
        run(spec, store, force=True)
    assert [p.name for p in store.records_dir.iterdir()] == [f"{record['key']}.json"]
    assert json.loads(store.path(record["key"]).read_text()) == record  # untouched

    monkeypatch.setenv(ALLOW_DIRTY, "1")
    dirty = run(spec, store, force=True)[0].record
    env = dirty["environment"]
    assert env["git_commit"].endswith("-dirty")
    diff = subprocess.run(["git", "-C", str(folder), "diff", "--binary", "HEAD"], capture_output=True, text=True).stdout
    assert "+A = 2" in diff and (store.root / env["git_diff"]["file"]).read_text() == diff
    import hashlib

    assert env["git_diff"]["sha256"] == hashlib.sha256(diff.encode()).hexdigest()


def test_a_record_states_its_budget_as_used_its_losses_and_the_command(tmp_path):
    from pkt_bench.runner import run
    from pkt_bench.spec import Budget, RunSpec

    budget = Budget(examples=8, epochs=2, batch_size=2, grad_accum=2, gradient_checkpointing=True)
    record = run(RunSpec(budget=budget, references=False), ResultStore(tmp_path))[0].record
    assert record["budget"]["gradient_checkpointing"] is True  # the key keeps the neutral field at its default
    assert record["cell"]["budget"]["gradient_checkpointing"] is False
    (stats,) = record["fine_tune"]
    assert len(stats["losses"]) == stats["optimizer_steps"] == 4
    assert stats["losses"][0] == pytest.approx(stats["first_loss"], abs=1e-6)
    assert stats["losses"][-1] == pytest.approx(stats["last_loss"], abs=1e-6)
    assert record["made_by"].startswith("pkt-bench")


def test_a_failure_note_keeps_this_machine_s_results_path_out(tmp_path):
    from pkt_bench.store import failure_reason

    store = ResultStore(tmp_path / "results")
    store.note_attempt("k", "lora on probe", None)  # started
    store.note_attempt("k", "lora on probe", f"FileNotFoundError: {store.root.resolve()}/artifacts/k.partial/x.json")
    note = store.failure("k")
    assert [a["error"] for a in note["attempts"]] == ["FileNotFoundError: <results>/artifacts/k.partial/x.json"]
    assert str(tmp_path) not in json.dumps(note) and "<results>/artifacts" in failure_reason(note)
