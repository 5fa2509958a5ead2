"""Results store: one SQLite file, `<runs_dir>/results.sqlite`, shared by every run of the grid.

Why SQLite: several benchmark processes (one per GPU, or a resumed run next to a live one) write
cells at once. The busy timeout makes a second writer wait instead of failing, and `BEGIN IMMEDIATE`
takes the write lock up front so two writers never deadlock upgrading a read lock. Each cell's rows
land in one transaction together with the cell's 'done' mark, so a crash leaves either the whole cell
or none of it. The journal is SQLite's rollback journal, not WAL: WAL needs shared memory that a
network filesystem (a cluster's shared runs folder) does not give, and a process that kept a
connection open while another run checkpointed and removed the WAL read the store as malformed.

Identity: a cell is the quantized model, keyed by everything that produced it (the CELL_KEY columns
plus IDENTITY_FIELDS: rounding convention, compute dtype and device, seed, model fingerprint); its id
is a hash of all of them. A cell's task scores and deployment figures are *units* of their own, keyed
by the cell plus their own settings (task, eval n, eval seed, generation; kernel, dtype, batch, tokens):
a rerun with another eval n or latency setting computes the new unit and never serves the old one.

Tables:
- `results`: one row per (cell, unit, task, metric) with the value, the cost/deployment numbers and the
  provenance (env, config, manifest). unit '' is the quantization's own rows (reconstruction errors).
- `cells`: one row per cell: status of its quantization, error, attempts, artifacts, and the claim
  (owner, time) that keeps two processes from computing it at once.
- `units`: one row per (cell, unit): kind (eval | deploy), its key, status, error.

Schema version 1 stores (before units and claims) are migrated in place on first open; their cells
keep their old ids, which no new run computes, so they are shown but never reused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import socket
import sqlite3
import subprocess
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from ptqbench.errors import BadInput

DB_NAME = "results.sqlite"
SCHEMA_VERSION = 2  # kept in PRAGMA user_version so a foreign SQLite file is refused, not altered
CLAIM_TTL_S = 6 * 3600  # a claim held by another host counts as live this long after its last heartbeat
BUSY_TIMEOUT_MS = 60_000
SQLITE_MAGIC = b"SQLite format 3\x00"

CELL_KEY = ("model", "method", "method_options", "bits", "group_size", "sym", "calib_hash")
# Identity beyond the key columns: hashed into the cell id and kept in key_json.
IDENTITY_FIELDS = ("grid", "dtype", "device_type", "seed", "model_fingerprint")
ROW_KEY = CELL_KEY + ("task", "metric")
UNIT_KINDS = ("eval", "deploy")
FP_METHOD = "fp"  # the full-precision cell: the accuracy baseline and the FP latency
FORMAT_METHOD = "format"  # a deployment format's own cell: its latency, measured once per model (grid/formats.py)
# JSON columns: callers pass dicts under the short name (env=...), rows() gives dicts back.
JSON_COLS = {"env": "env_json", "config": "config_json", "calib_manifest": "calib_manifest_json"}
ROW_FIELDS = (
    "value", "status", "error", "run_id", "calib_seconds", "calib_peak_bytes", "model_bytes",
    "prefill_ms", "prefill_ms_spread", "decode_tok_s", "decode_tok_s_spread", "infer_peak_bytes",
    "kernel", "device", "unit", "unit_json", "n", "ci_low", "ci_high",
)  # fmt: skip

RESULTS_TABLE = """
CREATE TABLE results (
    id INTEGER PRIMARY KEY,
    model TEXT NOT NULL, method TEXT NOT NULL, method_options TEXT NOT NULL, bits INTEGER NOT NULL,
    group_size INTEGER NOT NULL, sym INTEGER NOT NULL, calib_hash TEXT NOT NULL,
    task TEXT NOT NULL, metric TEXT NOT NULL,
    value REAL, status TEXT NOT NULL CHECK (status IN ('ok', 'failed')), error TEXT,
    run_id TEXT, cell_id TEXT NOT NULL, unit TEXT NOT NULL DEFAULT '', unit_json TEXT,
    n INTEGER, ci_low REAL, ci_high REAL,
    calib_seconds REAL, calib_peak_bytes INTEGER, model_bytes INTEGER,
    prefill_ms REAL, prefill_ms_spread REAL, decode_tok_s REAL, decode_tok_s_spread REAL,
    infer_peak_bytes INTEGER, kernel TEXT, device TEXT,
    env_json TEXT, config_json TEXT, calib_manifest_json TEXT,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    CHECK (value IS NOT NULL OR status != 'ok'),
    UNIQUE (cell_id, unit, task, metric)
)"""
SCHEMA = f"""
{RESULTS_TABLE};
CREATE INDEX results_cell ON results (cell_id);
CREATE TABLE cells (
    cell_id TEXT PRIMARY KEY, key_json TEXT NOT NULL,
    model TEXT NOT NULL, method TEXT NOT NULL, method_options TEXT NOT NULL, bits INTEGER NOT NULL,
    group_size INTEGER NOT NULL, sym INTEGER NOT NULL, calib_hash TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')), error TEXT,
    started_at TEXT, finished_at TEXT, attempts INTEGER NOT NULL DEFAULT 0, artifacts_json TEXT,
    claimed_by TEXT, claimed_at TEXT
);
CREATE TABLE units (
    cell_id TEXT NOT NULL, unit TEXT NOT NULL, kind TEXT NOT NULL, key_json TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('done', 'failed')), error TEXT, attempts INTEGER NOT NULL DEFAULT 1,
    finished_at TEXT NOT NULL, items_json TEXT,
    PRIMARY KEY (cell_id, unit)
);
PRAGMA user_version = {SCHEMA_VERSION};
"""
# Version 1 -> 2: results gain unit/unit_json and a unique key per (cell, unit, task, metric) (a table
# rebuild: SQLite cannot drop a UNIQUE constraint); cells gain the claim and the 'pending' status.
_V1_RESULT_COLS = ("id, model, method, method_options, bits, group_size, sym, calib_hash, task, metric, value, status, "
                   "error, run_id, cell_id, calib_seconds, calib_peak_bytes, model_bytes, prefill_ms, prefill_ms_spread, "
                   "decode_tok_s, decode_tok_s_spread, infer_peak_bytes, kernel, device, env_json, config_json, "
                   "calib_manifest_json, created_at, updated_at")
_V1_CELL_COLS = ("cell_id, key_json, model, method, method_options, bits, group_size, sym, calib_hash, status, error, "
                 "started_at, finished_at, attempts, artifacts_json")
MIGRATE_V1 = [
    "DROP INDEX IF EXISTS results_cell",
    "ALTER TABLE results RENAME TO results_v1",
    "ALTER TABLE cells RENAME TO cells_v1",
    *[stmt for stmt in SCHEMA.split(";") if "CREATE" in stmt],
    f"INSERT INTO results ({_V1_RESULT_COLS}) SELECT {_V1_RESULT_COLS} FROM results_v1",
    f"INSERT INTO cells ({_V1_CELL_COLS}) SELECT {_V1_CELL_COLS} FROM cells_v1",
    "DROP TABLE results_v1",
    "DROP TABLE cells_v1",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
]


def process_owner() -> str:
    """This process as a claim owner: host, pid and the pid's start time (so a reused pid is not us)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_pid_start(os.getpid())}"


def _pid_start(pid: int) -> str:
    try:  # field 22 of /proc/<pid>/stat: start time in clock ticks since boot (Linux)
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def owner_alive(owner: str | None, claimed_at: str | None) -> bool:
    """A claim is live while its process runs (same host), or for CLAIM_TTL_S after its time (other hosts)."""
    if not owner:
        return False
    host, _, rest = owner.partition(":")
    pid_text, _, start = rest.partition(":")
    if host == socket.gethostname() and pid_text.isdigit():
        pid = int(pid_text)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists, owned by another user
        return start in ("?", _pid_start(pid))
    try:
        age = (datetime.now(timezone.utc) - datetime.fromisoformat(claimed_at)).total_seconds()
    except (TypeError, ValueError):
        return False
    return age < CLAIM_TTL_S


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _plain(obj):
    """A JSON-ready copy. Diagnostics hold tensors/arrays (-> lists) and int or tuple dict keys
    (-> str; mixed key types would also break sort_keys)."""
    if isinstance(obj, dict):
        return {k if isinstance(k, str) else str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((_plain(v) for v in obj), key=str)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if hasattr(obj, "tolist"):  # torch tensors, numpy arrays and scalars
        return _plain(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    raise BadInput(f"value of type {type(obj).__name__} cannot be stored as JSON; accepted: JSON values, tensors, arrays, paths")


def canonical_json(obj) -> str:
    return json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"))


def _norm(name: str, v):
    """One key field in the form stored and hashed (options as canonical JSON, sym as 0/1)."""
    if name == "method_options":
        if isinstance(v, str):  # already JSON (e.g. read back from the store): re-canonicalize
            try:
                v = json.loads(v)
            except ValueError:
                raise BadInput(f"method_options {v!r} is not JSON; accepted: a dict or a JSON object") from None
        return canonical_json(v or {})
    if name == "calib_hash":
        return "" if v is None else str(v)  # full precision has none; NULL would defeat UNIQUE
    if name in ("bits", "group_size"):
        try:
            return 0 if v is None else int(v)
        except (TypeError, ValueError):
            raise BadInput(f"{name} {v!r} is not accepted; accepted: an integer") from None
    if name == "sym":
        return int(bool(v))
    return str(v)


def identity_extras(key: dict) -> dict:
    """The IDENTITY_FIELDS a key carries (None dropped), in canonical form."""
    return {n: _plain(key[n]) for n in IDENTITY_FIELDS if key.get(n) is not None}


def normalize_key(key: dict, names=CELL_KEY) -> dict:
    missing = [n for n in names if n in ("model", "method", "bits", "task", "metric") and key.get(n) in (None, "")]
    if missing:
        raise BadInput(f"result key lacks {', '.join(missing)}; accepted: a dict with {', '.join(names)}")
    return {n: _norm(n, key.get(n)) for n in names}


@functools.lru_cache(maxsize=1)
def _static_env() -> dict:
    from importlib import metadata

    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    try:
        git = subprocess.run(
            ["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
        commit = git.stdout.strip() if git.returncode == 0 else None
        if commit:  # a result from uncommitted code is only reproducible if we say so
            dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=Path(__file__).parent,
                                   capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
            commit += "-dirty" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "ptqbench": version("ptqbench"), "torch": version("torch"), "transformers": version("transformers"),
        "lmms-eval": version("lmms_eval") or version("lmms-eval"), "git_commit": commit,
        "python": platform.python_version(),
    }  # fmt: skip


def current_environment() -> dict:
    """Versions, git commit and device name recorded with every result row (env_json)."""
    env = dict(_static_env())
    try:
        import torch

        env["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
        env["torch_threads"] = torch.get_num_threads()  # reduction order: GPTQ-family figures move with it
    except Exception:  # an env probe must never fail a finished cell
        env["device"] = None
    return env


class ResultsStore:
    def __init__(self, runs_dir, *, create: bool = True):
        """Open (create=True: create if needed) the store in `runs_dir`.

        create=False is for readers (the leaderboard): a missing folder or file is a BadInput.
        A file that is not our SQLite database is refused with BadInput and left byte-for-byte as is.
        """
        self.runs_dir = Path(runs_dir)
        self.path = self.runs_dir / DB_NAME
        if not create:
            if not self.runs_dir.is_dir():
                raise BadInput(f"runs folder {str(self.runs_dir)!r} does not exist; accepted: a folder written by `bench run`")
            if not self.path.is_file():
                raise BadInput(f"runs folder {str(self.runs_dir)!r} has no {DB_NAME}; accepted: a folder written by `bench run`")
        else:
            self.runs_dir.mkdir(parents=True, exist_ok=True)
        self._check_header()
        with self._connect() as con:
            self._check_or_create_schema(con, create)

    # -- opening ---------------------------------------------------------------------------
    def _bad_file(self, why: str) -> BadInput:
        return BadInput(f"{self.path} is not a ptqbench results store ({why}); it was left untouched: move it away or pass another --runs folder")

    def _check_header(self):
        # Checked before SQLite touches the file: SQLite itself may write journals next to it.
        if self.path.is_file() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                if f.read(len(SQLITE_MAGIC)) != SQLITE_MAGIC:
                    raise self._bad_file("not an SQLite file")

    @contextmanager
    def _connect(self):
        try:
            con = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        except sqlite3.Error as e:
            raise self._bad_file(str(e)) from None
        try:
            con.row_factory = sqlite3.Row
            con.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            yield con
        except sqlite3.IntegrityError as e:
            raise BadInput(f"result rejected by the store: {e}") from None
        except sqlite3.DatabaseError as e:
            if type(e) is not sqlite3.DatabaseError:
                raise  # e.g. "database is locked" past the timeout: not a property of the file
            raise self._bad_file(str(e)) from None  # "file is not a database", "malformed", ...
        finally:
            con.close()

    def _check_or_create_schema(self, con, create: bool):
        version = con.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if version in (1, SCHEMA_VERSION) and {"results", "cells"} <= tables:
            if con.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise self._bad_file("integrity check failed")
            self._leave_wal(con)
            if version == 1:
                self._migrate_v1(con)
            return
        if tables or version:
            raise self._bad_file(f"schema version {version}, tables {sorted(tables)}; expected version {SCHEMA_VERSION}")
        if not create:
            raise BadInput(f"results store {self.path} is empty; run `bench run` first")
        with _transaction(con):
            # Another process may have created it between our check and the lock.
            if not con.execute("SELECT 1 FROM sqlite_master WHERE name='results'").fetchone():
                for stmt in SCHEMA.split(";"):
                    if stmt.strip():
                        con.execute(stmt)

    @staticmethod
    def _leave_wal(con) -> None:
        """Stores written before schema 2 are in WAL mode (persistent): switch them back when no one else has
        them open (else try again next time; the switch needs the file to itself, so do not wait for it)."""
        if con.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
            con.execute("PRAGMA busy_timeout = 0")
            try:
                con.execute("PRAGMA journal_mode = DELETE")
            except sqlite3.OperationalError:
                pass
            con.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")

    def _migrate_v1(self, con) -> None:
        with _transaction(con):
            if con.execute("PRAGMA user_version").fetchone()[0] == 1:  # not migrated meanwhile by another process
                for stmt in MIGRATE_V1:
                    con.execute(stmt)

    def check_writable(self) -> None:
        """A write that is rolled back: a read-only file or folder fails here, before any work, and a
        writable store is left byte-for-byte as it was."""
        with self._connect() as con:
            try:
                con.execute("BEGIN IMMEDIATE")
                con.execute("CREATE TABLE _probe (x)")
            except sqlite3.OperationalError as e:
                raise BadInput(f"results store {self.path} is not writable ({e}); accepted: a writable --runs folder") from None
            finally:
                if con.in_transaction:
                    con.execute("ROLLBACK")

    @contextmanager
    def _write(self):
        """One write transaction; the lock is taken at BEGIN so concurrent writers queue up."""
        with self._connect() as con, _transaction(con):
            yield con

    # -- cells -----------------------------------------------------------------------------
    @staticmethod
    def cell_id(**key) -> str:
        """Stable id of a grid cell: a hash of model, method, options, bits, group_size, sym, calib_hash and
        the IDENTITY_FIELDS given (a key without them hashes as version 1 stores did)."""
        k = normalize_key(key)
        extras = identity_extras(key)
        return hashlib.sha256(canonical_json([k[n] for n in CELL_KEY] + ([extras] if extras else [])).encode()).hexdigest()[:16]

    @staticmethod
    def unit_id(key: dict) -> str:
        """Stable id of a unit (a task evaluation or a deployment measurement) from its settings."""
        return hashlib.sha256(canonical_json(key).encode()).hexdigest()[:16]

    def claim(self, cell_id: str, key_dict: dict, owner: str | None = None) -> str | None:
        """Claim a cell for this process, atomically. Returns None when claimed, else the live owner that
        holds it. A claim whose owner died (or expired) is taken over. The cell row is created if new
        ('pending'); its status is left as it is (a done cell may still gain units)."""
        owner = owner or process_owner()
        key, stored = self._split_key(cell_id, key_dict)
        with self._write() as con:
            r = con.execute("SELECT claimed_by, claimed_at FROM cells WHERE cell_id = ?", (cell_id,)).fetchone()
            if r is not None and r["claimed_by"] not in (None, owner) and owner_alive(r["claimed_by"], r["claimed_at"]):
                return r["claimed_by"]
            con.execute(
                f"""INSERT INTO cells (cell_id, key_json, {", ".join(CELL_KEY)}, status, claimed_by, claimed_at)
                    VALUES (?, ?, {", ".join("?" * len(CELL_KEY))}, 'pending', ?, ?)
                    ON CONFLICT (cell_id) DO UPDATE SET claimed_by = excluded.claimed_by, claimed_at = excluded.claimed_at,
                        key_json = excluded.key_json""",
                (cell_id, canonical_json(stored), *[key[n] for n in CELL_KEY], owner, _now()),
            )
        return None

    def release(self, cell_id: str, owner: str | None = None) -> None:
        """Drop this process's claim; a cell left 'running' by it becomes 'failed' (interrupted)."""
        owner = owner or process_owner()
        with self._write() as con:
            con.execute("UPDATE cells SET status = 'failed', error = 'interrupted', finished_at = ? "
                        "WHERE cell_id = ? AND claimed_by = ? AND status = 'running'", (_now(), cell_id, owner))
            con.execute("UPDATE cells SET claimed_by = NULL, claimed_at = NULL WHERE cell_id = ? AND claimed_by = ?",
                        (cell_id, owner))

    def cell_status(self, cell_id: str) -> str | None:
        with self._connect() as con:
            r = con.execute("SELECT status FROM cells WHERE cell_id = ?", (cell_id,)).fetchone()
        return None if r is None else r["status"]

    def done_units(self, cell_id: str) -> set[str]:
        with self._connect() as con:
            return {r["unit"] for r in con.execute("SELECT unit FROM units WHERE cell_id = ? AND status = 'done'", (cell_id,))}

    def record_unit(self, cell_id: str, unit: str, kind: str, unit_key: dict, rows: list[dict], error: str | None = None,
                    items: dict | None = None) -> None:
        """Write one unit's rows and mark it done, or mark it failed with `error`; one transaction. `items`:
        per metric, the per-item outcomes behind it ({"kind", "items", "weights"}) for paired comparisons."""
        if kind not in UNIT_KINDS:
            raise BadInput(f"unit kind {kind!r} is not accepted; accepted: {', '.join(UNIT_KINDS)}")
        now = _now()
        with self._write() as con:
            base = self._cell_key(con, cell_id)
            if error is None:
                con.execute("DELETE FROM results WHERE cell_id = ? AND unit = ?", (cell_id, unit))
                for row in rows:
                    self._insert_row(con, cell_id, base, dict(row, unit=unit, unit_json=canonical_json(unit_key)), now)
            con.execute(
                """INSERT INTO units (cell_id, unit, kind, key_json, status, error, finished_at, items_json)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (cell_id, unit) DO UPDATE SET status = excluded.status, error = excluded.error,
                       key_json = excluded.key_json, finished_at = excluded.finished_at, items_json = excluded.items_json,
                       attempts = attempts + 1""",
                (cell_id, unit, kind, canonical_json(unit_key), "done" if error is None else "failed", error, now,
                 None if items is None else canonical_json(items)),
            )

    def units(self, cell_id: str | None = None) -> list[dict]:
        where, args = ("WHERE cell_id = ?", [cell_id]) if cell_id else ("", [])
        with self._connect() as con:
            out = [dict(r) for r in con.execute(f"SELECT * FROM units {where} ORDER BY finished_at", args)]
        for r in out:
            r["key"] = json.loads(r.pop("key_json"))
            raw = r.pop("items_json")
            r["items"] = json.loads(raw) if raw else {}
        return out

    def _split_key(self, cell_id: str, key_dict: dict) -> tuple[dict, dict]:
        key = normalize_key(key_dict)
        if self.cell_id(**key_dict) != cell_id:
            raise BadInput(f"cell id {cell_id!r} does not match its key (expected {self.cell_id(**key_dict)!r})")
        extra = set(key_dict) - set(CELL_KEY) - set(IDENTITY_FIELDS)
        _check_fields(extra, set(ROW_FIELDS) | set(JSON_COLS) | set(JSON_COLS.values()))
        stored = {**{k: v for k, v in key_dict.items() if k in extra}, **identity_extras(key_dict), **key}
        return key, stored

    def is_done(self, cell_id: str) -> bool:
        with self._connect() as con:
            r = con.execute("SELECT status FROM cells WHERE cell_id = ?", (cell_id,)).fetchone()
        return r is not None and r["status"] == "done"

    def start_cell(self, cell_id: str, key_dict: dict) -> None:
        """Mark a cell running (attempts + 1). key_dict holds the cell key and may hold row defaults
        (run_id, env, config, calib_manifest, kernel, device, ...) that finish_cell applies to every row."""
        key, stored = self._split_key(cell_id, key_dict)
        now = _now()
        with self._write() as con:
            con.execute(
                f"""INSERT INTO cells (cell_id, key_json, {", ".join(CELL_KEY)}, status, started_at, attempts, claimed_by, claimed_at)
                    VALUES (?, ?, {", ".join("?" * len(CELL_KEY))}, 'running', ?, 1, ?, ?)
                    ON CONFLICT (cell_id) DO UPDATE SET status = 'running', error = NULL, key_json = excluded.key_json,
                        artifacts_json = NULL, started_at = excluded.started_at, finished_at = NULL,
                        attempts = attempts + 1, claimed_by = COALESCE(claimed_by, excluded.claimed_by),
                        claimed_at = COALESCE(claimed_at, excluded.claimed_at)""",
                (cell_id, canonical_json(stored), *[key[n] for n in CELL_KEY], now, process_owner(), now),
            )

    def finish_cell(self, cell_id: str, rows: list[dict], artifacts: dict | None = None) -> None:
        """Write all rows of a cell and mark it done, in one transaction (all or nothing).

        Each row needs task, metric and value (or status='failed' with an error); the cell key and the
        defaults given to start_cell fill the rest. A re-run replaces the rows with the same key."""
        artifacts_json = canonical_json(artifacts or {})
        with self._write() as con:
            base = self._cell_key(con, cell_id)
            now = _now()
            con.execute("DELETE FROM results WHERE cell_id = ? AND unit = ''", (cell_id,))  # a rerun keeps no stale row
            for row in rows:
                self._insert_row(con, cell_id, base, row, now)
            con.execute(
                "UPDATE cells SET status = 'done', error = NULL, finished_at = ?, artifacts_json = ? WHERE cell_id = ?",
                (now, artifacts_json, cell_id),
            )

    def _insert_row(self, con, cell_id: str, base: dict, row: dict, now: str) -> None:
        values = self._row_values(cell_id, base, row)
        cols = list(values)
        con.execute(
            f"""INSERT INTO results ({", ".join(cols)}, created_at, updated_at)
                VALUES ({", ".join("?" * len(cols))}, ?, ?)
                ON CONFLICT (cell_id, unit, task, metric) DO UPDATE SET
                {", ".join(f"{c} = excluded.{c}" for c in cols if c not in ROW_KEY + ("cell_id", "unit"))},
                updated_at = excluded.updated_at""",
            (*values.values(), now, now),
        )

    def fail_cell(self, cell_id: str, error: str) -> None:
        """Mark a cell failed with its error; it is not done, so a resumed run retries it."""
        with self._write() as con:
            self._cell_key(con, cell_id)
            con.execute(
                "UPDATE cells SET status = 'failed', error = ?, finished_at = ? WHERE cell_id = ?",
                (str(error), _now(), cell_id),
            )

    def _cell_key(self, con, cell_id) -> dict:
        r = con.execute("SELECT key_json FROM cells WHERE cell_id = ?", (cell_id,)).fetchone()
        if r is None:
            raise BadInput(f"cell {cell_id!r} was never started; call start_cell first")
        return json.loads(r["key_json"])

    def _row_values(self, cell_id: str, base: dict, row: dict) -> dict:
        _check_fields(set(row), set(ROW_KEY) | set(ROW_FIELDS) | set(JSON_COLS) | set(JSON_COLS.values()))
        base = {k: v for k, v in base.items() if k not in IDENTITY_FIELDS}
        for n in CELL_KEY:  # a row may repeat its key, but not contradict it
            if n in row and _norm(n, row[n]) != _norm(n, base.get(n)):
                raise BadInput(f"row {n}={row[n]!r} does not belong to cell {cell_id} ({n}={base.get(n)!r})")
        merged = {**base, **row}
        for short, col in JSON_COLS.items():  # accept env={...} or env_json='{...}'
            if col in merged:
                v = merged.pop(col)
                merged.setdefault(short, json.loads(v) if isinstance(v, str) else v)
        if merged.get("env") is None:
            merged["env"] = current_environment()
        values = normalize_key(merged, ROW_KEY)
        # Every column is written, so a re-run never keeps a stale number from an older attempt.
        values.update({c: merged.get(c) for c in ROW_FIELDS if c != "unit"})
        values.update({col: None if merged.get(s) is None else canonical_json(merged[s]) for s, col in JSON_COLS.items()})
        values["status"] = status = merged.get("status") or "ok"
        if status not in ("ok", "failed"):
            raise BadInput(f"row status {status!r} is not accepted; accepted: ok, failed")
        v = merged.get("value")
        if status == "ok" and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)):
            # SQLite would silently store NaN as NULL: refuse it here with the row named.
            raise BadInput(f"row {values['task']}/{values['metric']} has value {v!r}; accepted: a finite number, or status='failed' with an error")
        values["value"] = None if v is None else float(v)
        values["cell_id"] = cell_id
        values["unit"] = merged.get("unit") or ""
        return values

    # -- reading ---------------------------------------------------------------------------
    def rows(self, **filters) -> list[dict]:
        """Result rows, each a dict (JSON columns decoded: env, config, calib_manifest, method_options).
        Filters are column=value or column=[values]; e.g. rows(model='m', bits=[2, 4], status='ok')."""
        cols = set(ROW_KEY) | set(ROW_FIELDS) | {"cell_id"}
        where, args = _where(filters, cols)
        with self._connect() as con:
            out = [dict(r) for r in con.execute(f"SELECT * FROM results {where} ORDER BY id", args)]
        for r in out:
            r.pop("id")
            for short, col in JSON_COLS.items():
                raw = r.pop(col)
                r[short] = json.loads(raw) if raw else None
            r["method_options"] = json.loads(r["method_options"])
            r["sym"] = bool(r["sym"])
            r["unit_json"] = json.loads(r["unit_json"]) if r["unit_json"] else None
        return out

    def cells(self, **filters) -> list[dict]:
        """Cells (without artifacts), with the same filter syntax as rows(); e.g. cells(status='failed')."""
        cols = set(CELL_KEY) | {"cell_id", "status"}
        where, args = _where(filters, cols)
        with self._connect() as con:
            out = [dict(r) for r in con.execute(
                f"SELECT *, artifacts_json IS NOT NULL AS has_artifacts FROM cells {where} ORDER BY started_at, cell_id", args
            )]  # fmt: skip
        for r in out:
            r.pop("artifacts_json")
            r["key"] = json.loads(r.pop("key_json"))
            r["method_options"] = json.loads(r["method_options"])
            r["sym"], r["has_artifacts"] = bool(r["sym"]), bool(r["has_artifacts"])
            if r["status"] == "running" and not owner_alive(r["claimed_by"], r["claimed_at"]):
                r["status"], r["error"] = "failed", "interrupted (its process is gone)"  # never 'running' for ever
        return out

    def artifacts(self, cell_id: str) -> dict:
        with self._connect() as con:
            r = con.execute("SELECT artifacts_json FROM cells WHERE cell_id = ?", (cell_id,)).fetchone()
        if r is None:
            raise BadInput(f"no cell {cell_id!r} in {self.path}")
        return json.loads(r["artifacts_json"]) if r["artifacts_json"] else {}


@contextmanager
def _transaction(con):
    """BEGIN IMMEDIATE (the write lock up front) ... COMMIT, or ROLLBACK on any exception."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def _check_fields(given: set, accepted: set):
    unknown = sorted(given - accepted)
    if unknown:
        raise BadInput(f"unknown result field(s) {', '.join(unknown)}; accepted: {', '.join(sorted(accepted))}")


def _where(filters: dict, cols: set) -> tuple[str, list]:
    _check_fields(set(filters), cols)
    clauses, args = [], []
    for name, value in filters.items():
        values = list(value) if isinstance(value, (list, tuple, set, frozenset)) else [value]
        if name in CELL_KEY:
            values = [_norm(name, v) for v in values]
        clauses.append(f"{name} IN ({', '.join('?' * len(values))})")
        args += values
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", args
