"""ResultsStore: resume semantics, atomic cells, concurrency, corruption handling."""

import multiprocessing as mp
import os
import sqlite3
from contextlib import closing

import pytest

from ptqbench.errors import BadInput
from ptqbench.grid.store import DB_NAME, ResultsStore

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
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # no WAL: network filesystems


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


V1_SCHEMA = """
CREATE TABLE results (
    id INTEGER PRIMARY KEY,
    model TEXT NOT NULL, method TEXT NOT NULL, method_options TEXT NOT NULL, bits INTEGER NOT NULL,
    group_size INTEGER NOT NULL, sym INTEGER NOT NULL, calib_hash TEXT NOT NULL,
    task TEXT NOT NULL, metric TEXT NOT NULL,
    value REAL, status TEXT NOT NULL CHECK (status IN ('ok', 'failed')), error TEXT,
    run_id TEXT, cell_id TEXT NOT NULL,
    calib_seconds REAL, calib_peak_bytes INTEGER, model_bytes INTEGER,
    prefill_ms REAL, prefill_ms_spread REAL, decode_tok_s REAL, decode_tok_s_spread REAL,
    infer_peak_bytes INTEGER, kernel TEXT, device TEXT,
    env_json TEXT, config_json TEXT, calib_manifest_json TEXT,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    CHECK (value IS NOT NULL OR status != 'ok'),
    UNIQUE (model, method, method_options, bits, group_size, sym, calib_hash, task, metric)
);
CREATE INDEX results_cell ON results (cell_id);
CREATE TABLE cells (
    cell_id TEXT PRIMARY KEY, key_json TEXT NOT NULL,
    model TEXT NOT NULL, method TEXT NOT NULL, method_options TEXT NOT NULL, bits INTEGER NOT NULL,
    group_size INTEGER NOT NULL, sym INTEGER NOT NULL, calib_hash TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')), error TEXT,
    started_at TEXT, finished_at TEXT, attempts INTEGER NOT NULL DEFAULT 0, artifacts_json TEXT
);
PRAGMA journal_mode = WAL;
PRAGMA user_version = 1;
"""


def test_a_version_1_store_is_migrated_and_its_rows_stay_readable(tmp_path):
    """A store written before units and claims (schema 1, the 2026-11 releases) opens, keeps its rows, and
    none of its cells is served to a new run: their ids lack the identity fields every new id has."""
    k = key()
    old_id = ResultsStore.cell_id(**k)  # a key without identity fields hashes as version 1 did
    with closing(sqlite3.connect(tmp_path / DB_NAME)) as con, con:
        con.executescript(V1_SCHEMA)
        con.execute("INSERT INTO cells (cell_id, key_json, model, method, method_options, bits, group_size, sym, calib_hash, "
                    "status, attempts) VALUES (?, '{}', 'tiny', 'gptq', '{}', 4, 128, 0, 'c0ffee', 'done', 1)", (old_id,))
        con.execute("INSERT INTO results (model, method, method_options, bits, group_size, sym, calib_hash, task, metric, "
                    "value, status, cell_id, created_at, updated_at) VALUES ('tiny', 'gptq', '{}', 4, 128, 0, 'c0ffee', "
                    "'synthvqa', 'acc', 0.5, 'ok', ?, 'then', 'then')", (old_id,))
    store = ResultsStore(tmp_path, create=False)
    (r,) = store.rows()
    assert r["value"] == 0.5 and r["cell_id"] == old_id and r["unit"] == ""
    assert store.is_done(old_id)
    new_id = ResultsStore.cell_id(**k, grid="minmax", dtype="float32", device_type="cpu", seed=1, model_fingerprint="f")
    assert new_id != old_id and store.cell_status(new_id) is None
    with closing(sqlite3.connect(tmp_path / DB_NAME)) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == 2
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    run_cell(store, k)  # the old cell can still be written under the new schema (same id, unit '')
    assert [r["value"] for r in store.rows()] == [0.5]


def test_units_are_recorded_apart_and_claims_are_exclusive(tmp_path):
    store = ResultsStore(tmp_path)
    k = key()
    cid = ResultsStore.cell_id(**k)
    assert store.claim(cid, k, owner="host-a:1:1") is None
    assert store.claim(cid, k, owner="otherhost:2:2") == "host-a:1:1"  # another host's fresh claim is live
    store.release(cid, owner="host-a:1:1")
    assert store.claim(cid, k, owner="otherhost:2:2") is None
    import socket

    dead = f"{socket.gethostname()}:{2**22 + 7}:0"  # a pid of this host that does not run
    store.release(cid, owner="otherhost:2:2")
    assert store.claim(cid, k, owner=dead) is None
    assert store.claim(cid, k) is None  # a dead process's claim is taken over
    store.record_unit(cid, "u20", "eval", {"task": "synthvqa", "n": 20}, [{"task": "synthvqa", "metric": "acc", "value": 0.5}])
    store.record_unit(cid, "u100", "eval", {"task": "synthvqa", "n": 100}, [{"task": "synthvqa", "metric": "acc", "value": 0.6}])
    store.record_unit(cid, "ud", "deploy", {"kernel": "auto"}, [], error="RuntimeError: kernel crashed")
    assert store.done_units(cid) == {"u20", "u100"}
    assert sorted((r["unit"], r["value"], r["unit_json"]["n"]) for r in store.rows()) == [("u100", 0.6, 100), ("u20", 0.5, 20)]
    assert {u["unit"]: u["status"] for u in store.units(cid)} == {"u20": "done", "u100": "done", "ud": "failed"}
