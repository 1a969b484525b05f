import json

import pytest

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
