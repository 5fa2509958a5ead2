"""ResultsStore: resume semantics, atomic cells, concurrency, corruption handling."""

import multiprocessing as mp
import os
import sqlite3

import pytest

from ptqbench.errors import BadInput
from ptqbench.leaderboard.store import DB_NAME, ResultsStore

ENV = {"torch": "test"}  # given explicitly so writers need not import torch to probe the env


def key(method="gptq", bits=4, **kw):
    return {"model": "tiny", "method": method, "method_options": {}, "bits": bits, "group_size": 128,
            "sym": False, "calib_hash": "c0ffee", **kw}  # fmt: skip


def run_cell(store, k, rows=None, artifacts=None):
    cid = ResultsStore.cell_id(**k)
    store.start_cell(cid, {**k, "env": ENV})
    store.finish_cell(cid, rows if rows is not None else [{"task": "synthvqa", "metric": "acc", "value": 0.5}], artifacts)
    return cid


def test_cell_id_is_stable_and_canonical():
    a = ResultsStore.cell_id(**key(method_options={"b": 1, "a": True}))
    b = ResultsStore.cell_id(**{**key(), "method_options": {"a": True, "b": 1}, "sym": 0})
    assert a == b == ResultsStore.cell_id(**{**key(), "method_options": '{"b": 1,  "a": true}'})
    assert a != ResultsStore.cell_id(**key(method_options={"b": 2, "a": True}))
    assert ResultsStore.cell_id(**key()) != ResultsStore.cell_id(**key(bits=3))
    assert ResultsStore.cell_id(**key()) != ResultsStore.cell_id(**key(calib_hash="other"))


def test_resume_semantics(tmp_path):
    store = ResultsStore(tmp_path)
    done = run_cell(store, key())
    assert store.is_done(done)

    failed = ResultsStore.cell_id(**key(bits=2))
    store.start_cell(failed, key(bits=2))
    assert not store.is_done(failed)  # running is not done: a crash mid-cell is retried
    store.fail_cell(failed, "CUDA out of memory")
    assert not store.is_done(failed)
    (c,) = store.cells(status="failed")
    assert c["cell_id"] == failed and c["error"] == "CUDA out of memory" and c["attempts"] == 1

    store.start_cell(failed, key(bits=2))  # the resumed run retries it
    (c,) = store.cells(cell_id=failed)
    assert c["status"] == "running" and c["error"] is None and c["attempts"] == 2
    assert not store.is_done("no-such-cell")
    # A fresh store object on the same folder (a new process) sees the same state.
    again = ResultsStore(tmp_path, create=False)
    assert again.is_done(done) and not again.is_done(failed)


def test_finish_cell_is_all_or_nothing(tmp_path):
    store = ResultsStore(tmp_path)
    k = key()
    cid = ResultsStore.cell_id(**k)
    store.start_cell(cid, {**k, "env": ENV})
    rows = [{"task": "synthvqa", "metric": "acc", "value": 0.5}, {"task": "synthvqa", "metric": "nll", "value": float("nan")}]
    with pytest.raises(BadInput, match="nll"):
        store.finish_cell(cid, rows, {})
    assert store.rows() == [] and not store.is_done(cid)


def test_rows_validation(tmp_path):
    store = ResultsStore(tmp_path)
    k = key()
    cid = ResultsStore.cell_id(**k)
    with pytest.raises(BadInput, match="never started"):
        store.finish_cell(cid, [], {})
    with pytest.raises(BadInput, match="does not match"):
        store.start_cell(cid, key(bits=3))
    store.start_cell(cid, {**k, "env": ENV})
    for bad in ({"task": "t", "metric": "acc", "value": None},  # ok needs a value
                {"task": "t", "metric": "acc", "value": 1, "bogus": 1},  # typo'd field
                {"task": "t", "metric": "acc", "value": 1, "bits": 8},  # contradicts the cell
                {"task": "t", "metric": "acc", "value": 1, "status": "maybe"}):  # fmt: skip
        with pytest.raises(BadInput):
            store.finish_cell(cid, [bad], {})
    store.finish_cell(cid, [{"task": "t", "metric": "acc", "value": None, "status": "failed", "error": "timeout"}], {})
    (r,) = store.rows()
    assert r["value"] is None and r["status"] == "failed" and r["error"] == "timeout"


def test_rows_carry_provenance_and_rerun_replaces(tmp_path):
    store = ResultsStore(tmp_path)
    k = key(method_options={"act_order": True})
    cid = ResultsStore.cell_id(**k)
    config = {"model": "tiny", "method": "gptq", "seed": 0}
    store.start_cell(cid, {**k, "env": ENV, "config": config, "calib_manifest": {"n": 8}, "run_id": "r1"})
    store.finish_cell(cid, [{"task": "synthvqa", "metric": "acc", "value": 0.5, "prefill_ms": 3.0}], {})
    (r,) = store.rows(method="gptq", bits=[4, 8], method_options={"act_order": True})
    assert r["env"] == ENV and r["config"] == config and r["calib_manifest"] == {"n": 8}
    assert r["run_id"] == "r1" and r["cell_id"] == cid and r["prefill_ms"] == 3.0
    assert store.rows(bits=2) == []
    # A re-run of the cell replaces its rows (same unique key) and drops numbers it no longer reports.
    store.start_cell(cid, {**k, "env": ENV})
    store.finish_cell(cid, [{"task": "synthvqa", "metric": "acc", "value": 0.75}], {})
    (r,) = store.rows()
    assert r["value"] == 0.75 and r["prefill_ms"] is None and r["created_at"] <= r["updated_at"]
    with pytest.raises(BadInput, match="unknown"):
        store.rows(colour="red")


def test_artifacts_stored_apart(tmp_path):
    store = ResultsStore(tmp_path)
    big = {f"layers.{i}.mlp": {"err": [i * 0.001] * 200} for i in range(200)}  # several hundred KB
    cid = run_cell(store, key(), artifacts=big)
    assert store.artifacts(cid) == big
    import torch  # here, not at module level: the concurrency test's spawned writers import this module

    diag = {"blocks": {0: {"err": torch.tensor([0.5, 0.25])}, "vision": 1.0}, ("a", 1): torch.tensor(2.0)}
    cid = run_cell(store, key(bits=3), artifacts=diag)  # int/tuple keys and tensors, as diagnostics have
    assert store.artifacts(cid) == {"blocks": {"0": {"err": [0.5, 0.25]}, "vision": 1.0}, "('a', 1)": 2.0}
    c = store.cells(cell_id=cid)[0]
    assert c["has_artifacts"] and "artifacts_json" not in c
    with pytest.raises(BadInput):
        store.artifacts("nope")


def test_concurrent_writers(tmp_path):
    ctx = mp.get_context("spawn")
    from _helpers import store_writer  # importable by the spawned processes (tests/ is on their path)

    procs = [ctx.Process(target=store_writer, args=(str(tmp_path), w, 50)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * 4
    store = ResultsStore(tmp_path, create=False)
    assert len(store.cells(status="done")) == 200
    assert len(store.rows()) == 400
    with sqlite3.connect(tmp_path / DB_NAME) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_random_bytes_refused_and_untouched(tmp_path):
    path = tmp_path / DB_NAME
    junk = os.urandom(8192)
    path.write_bytes(junk)
    for create in (True, False):
        with pytest.raises(BadInput, match="not a ptqbench results store") as e:
            ResultsStore(tmp_path, create=create)
        assert "\n" not in str(e.value)
    assert path.read_bytes() == junk
    assert sorted(p.name for p in tmp_path.iterdir()) == [DB_NAME]


def test_damaged_database_refused_and_untouched(tmp_path):
    store = ResultsStore(tmp_path)
    for i in range(30):
        run_cell(store, key(group_size=i), artifacts={"x": "y" * 3000})
    path = tmp_path / DB_NAME
    data = bytearray(path.read_bytes())
    data[4096 * 2 : 4096 * 6] = os.urandom(4096 * 4)  # smash some pages after the header
    path.write_bytes(bytes(data))
    with pytest.raises(BadInput, match="not a ptqbench results store"):
        ResultsStore(tmp_path, create=False).rows()
    assert path.read_bytes() == bytes(data)


def test_foreign_sqlite_refused(tmp_path):
    with sqlite3.connect(tmp_path / DB_NAME) as con:
        con.execute("CREATE TABLE other (x)")
    with pytest.raises(BadInput, match="schema"):
        ResultsStore(tmp_path)


def test_missing_or_empty_runs_folder(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        ResultsStore(tmp_path / "nope", create=False)
    with pytest.raises(BadInput, match="has no results.sqlite"):
        ResultsStore(tmp_path, create=False)
    assert not (tmp_path / "nope").exists() and list(tmp_path.iterdir()) == []
