"""Bad input, end to end through `bench`'s real entry point: one line naming the bad value and what is
accepted, exit code 2, no traceback, and nothing written (the folder tree is byte-for-byte as before).

docs/reliability.md lists these cases; keep the two in step."""

import hashlib
import json
import sqlite3
import sys
from pathlib import Path

import pytest

from ptqbench import cli

TINY = ["--model", "tiny:qwen2-vl", "--methods", "rtn", "--bits", "4", "--calib-n", "2", "--no-latency"]


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def bench(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`bench ARGS` through cli.main, as the console script runs it."""
    monkeypatch.setattr(sys, "argv", ["bench", *map(str, args)])
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def sharegpt(records) -> str:
    return json.dumps(records)


CONV = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]

# (id, flags replacing parts of TINY, files to create {name: bytes or str}, text the one line must contain)
CASES = [
    ("unknown-method", ["--methods", "gptq,nope"], {}, "'nope'"),
    ("empty-methods", ["--methods", ""], {}, "methods is empty"),
    ("duplicate-method", ["--methods", "rtn,rtn"], {}, "twice"),
    ("bits-9", ["--bits", "9"], {}, "bits 9"),
    ("bits-1", ["--bits", "1"], {}, "bits 1"),
    ("bits-word", ["--bits", "x"], {}, "'x'"),
    ("bits-empty", ["--bits", ""], {}, "bits is empty"),
    ("bits-twice", ["--bits", "2,2"], {}, "twice"),
    ("act-bits-3", ["--act-bits", "3"], {}, "act-bits 3"),
    ("act-bits-9", ["--act-bits", "9"], {}, "act-bits 9"),
    ("act-bits-word", ["--act-bits", "x"], {}, "'x'"),
    ("act-bits-twice", ["--act-bits", "8,8"], {}, "twice"),
    ("act-scheme-unknown", ["--act-scheme", "channel"], {}, "act-scheme 'channel'"),
    ("schedule-unknown", ["--schedule", "pipeline"], {}, "schedule 'pipeline' is not accepted; accepted: lockstep, cells"),
    ("memory-budget-unit", ["--memory-budget", "8XB"], {}, "memory-budget '8XB' is not accepted"),
    ("memory-budget-zero", ["--memory-budget", "0GiB"], {}, "memory-budget '0GiB' is not accepted"),
    ("smoothquant-alpha-out-of-range", ["--methods", "smoothquant", "-o", "smoothquant.alpha=2"], {}, "alpha=2.0"),
    ("group-size-not-dividing", ["--group-size", "48"], {}, "48"),
    ("group-size-zero", ["--group-size", "0"], {}, "0"),
    ("grid-unknown", ["--grid", "fancy"], {}, "'fancy'"),
    ("calib-n-zero", ["--calib-n", "0"], {}, "calib-n 0"),
    ("seq-len-tiny", ["--seq-len", "4"], {}, "seq-len 4"),
    ("seed-zero", ["--seed", "0"], {}, "seed 0"),
    ("seeds-zero", ["--seeds", "1,0"], {}, "seeds '1,0'"),
    ("seeds-twice", ["--seeds", "2,2"], {}, "seeds '2,2'"),
    ("batch-size-zero", ["--batch-size", "0"], {}, "batch-size 0"),
    ("eval-n-zero", ["--eval-n", "0"], {}, "eval-n 0"),
    ("model-unknown-family", ["--model", "tiny:gpt2"], {}, "'gpt2'"),
    ("model-missing-dir", ["--model", "{tmp}/nowhere"], {}, "nowhere"),
    ("model-random-missing-config", ["--model", "random:{tmp}/none.json"], {}, "none.json"),
    ("device-tpu", ["--device", "tpu"], {}, "device 'tpu'"),
    ("dtype-float8", ["--dtype", "float8"], {}, "'float8'"),
    ("kernel-unknown", ["--kernel", "magic"], {}, "'magic'"),
    ("infer-dtype-auto", ["--infer-dtype", "auto"], {}, "'auto'"),
    ("latency-tokens-1", ["--latency", "--latency-tokens", "1"], {}, "latency-tokens 1"),
    ("latency-batch-0", ["--latency", "--latency-batch", "0"], {}, "latency-batch 0"),
    ("executor-unknown", ["--executor", "dask"], {}, "'dask'"),
    ("address-without-ray", ["--address", "127.0.0.1:6379"], {}, "ray executor"),
    ("option-unknown-key", ["--methods", "gptq", "-o", "gptq.nonsense=1"], {}, "nonsense"),
    ("option-bad-value", ["--methods", "gptq", "-o", "gptq.act_order=maybe"], {}, "act_order"),
    ("option-invalid-yaml", ["--methods", "gptq", "-o", "gptq.act_order=[unclosed"], {}, "not valid YAML"),
    ("option-no-equals", ["-o", "gptq.act_order"], {}, "METHOD.KEY=VALUE"),
    ("option-method-not-in-grid", ["--methods", "rtn", "-o", "gptq.act_order=true"], {}, "not in the grid"),
    ("task-unknown", ["--tasks", "no-such-task"], {}, "'no-such-task'"),
    ("name-parent", ["--name", "../escape"], {}, "'../escape'"),
    ("name-absolute", ["--name", "{tmp}/abs"], {}, "abs"),
    ("name-nested", ["--name", "a/b"], {}, "'a/b'"),
    ("name-dotdot", ["--name", ".."], {}, "'..'"),
    ("runs-is-a-file", ["--runs", "{tmp}/afile"], {"afile": "x"}, "afile"),
    ("runs-under-a-file", ["--runs", "{tmp}/afile/sub"], {"afile": "x"}, "afile"),
    ("runs-not-writable", ["--runs", "/proc/ptqbench-runs"], {}, "/proc/ptqbench-runs"),
    ("calib-missing-file", ["--calib", "{tmp}/missing.json"], {}, "missing.json"),
    ("calib-empty-txt", ["--calib", "{tmp}/c.txt"], {"c.txt": ""}, "c.txt"),
    ("calib-binary-txt", ["--calib", "{tmp}/c.txt"], {"c.txt": b"\xff\xfe\x00\x81binary"}, "c.txt"),
    ("calib-bad-json", ["--calib", "{tmp}/c.json"], {"c.json": "{not json"}, "c.json"),
    ("calib-empty-list", ["--calib", "{tmp}/c.json"], {"c.json": "[]"}, "c.json"),
    ("calib-entries-not-objects", ["--calib", "{tmp}/c.json"],
     {"c.json": sharegpt([{"id": "a", "conversations": ["hi", "there"]}])}, "c.json"),
    ("calib-record-not-object", ["--calib", "{tmp}/c.json"], {"c.json": sharegpt(["just text"])}, "c.json"),
    ("calib-image-not-string", ["--calib", "{tmp}/c.json"],
     {"c.json": sharegpt([{"id": "a", "image": 7, "conversations": CONV}])}, "image"),
    ("calib-image-missing", ["--calib", "{tmp}/c.json"],
     {"c.json": sharegpt([{"id": "a", "image": "gone.png", "conversations": CONV}])}, "gone.png"),
    ("calib-image-undecodable", ["--calib", "{tmp}/c.json"],
     {"c.json": sharegpt([{"id": "a", "image": "bad.png", "conversations": CONV}]), "bad.png": b"not a png"}, "bad.png"),
    ("calib-suffix", ["--calib", "{tmp}/c.csv"], {"c.csv": "a,b"}, ".csv"),
    ("calib-synthvqa-mode", ["--calib", "synthvqa:nope"], {}, "'nope'"),
    ("config-missing", ["--config", "{tmp}/none.yaml"], {}, "none.yaml"),
    ("config-invalid-yaml", ["--config", "{tmp}/r.yaml"], {"r.yaml": "model: [unclosed\n"}, "r.yaml"),
    ("config-unknown-key", ["--config", "{tmp}/r.yaml"], {"r.yaml": "methodz: [rtn]\n"}, "'methodz'"),
    ("config-wrong-type", ["--config", "{tmp}/r.yaml"], {"r.yaml": "seq_len: many\n"}, "'many'"),
    ("store-not-sqlite", ["--runs", "{tmp}/runs"], {"runs/results.sqlite": b"\x00garbage" * 100}, "not a ptqbench results store"),
    ("store-foreign-sqlite", ["--runs", "{tmp}/runs"], {"runs/results.sqlite": "FOREIGN"}, "schema"),
    ("calib-missing-beside-a-store", ["--runs", "{tmp}/runs", "--calib", "{tmp}/missing.json"],
     {"runs/results.sqlite": "STORE"}, "missing.json"),
    ("checkpoint-tampered", ["--model", "{ckpt}"], {}, "SHA256"),
    ("checkpoint-pickled-weights", ["--model", "{ckpt}"], {}, "--allow-pickle"),
    ("checkpoint-damaged-header", ["--model", "{ckpt}"], {}, "model.safetensors"),
]


def _make_checkpoint(case: str, tmp: Path) -> Path:
    """A tiny Qwen2-VL checkpoint folder, spoiled as the case says."""
    from ptqbench.models.testbed import write_sha256sums
    from ptqbench.models.tiny import build_tiny

    model, processor = build_tiny("qwen2-vl")
    d = tmp / "ckpt"
    model.save_pretrained(d)
    processor.save_pretrained(d)
    weights = d / "model.safetensors"
    if case == "checkpoint-pickled-weights":  # the weights only as a pickle, the way old checkpoints ship them
        import torch

        weights.unlink()
        torch.save(model.state_dict(), d / "pytorch_model.bin")
    if case == "checkpoint-tampered":
        write_sha256sums(d)
        data = bytearray(weights.read_bytes())
        data[-100] ^= 0x01
        weights.write_bytes(bytes(data))
    elif case == "checkpoint-damaged-header":
        data = bytearray(weights.read_bytes())
        data[8:40] = b"\x00" * 32  # the JSON header garbled
        weights.write_bytes(bytes(data))
    return d


@pytest.mark.parametrize("case, flags, files, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(case, flags, files, needle, tmp_path, monkeypatch, capsys):
    for name, content in files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if content == "STORE":  # a healthy store with a result in it: it must stay byte-for-byte as it is
            from ptqbench.grid.store import ResultsStore

            k = dict(model="m", method="rtn", method_options={}, bits=4, group_size=32, sym=False, calib_hash="c")
            store = ResultsStore(p.parent)
            store.start_cell(ResultsStore.cell_id(**k), dict(k, env={}))
            store.finish_cell(ResultsStore.cell_id(**k), [{"task": "t", "metric": "acc", "value": 0.5}])
        elif content == "FOREIGN":
            with sqlite3.connect(p) as con:
                con.execute("CREATE TABLE other (x)")
        elif isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
    ckpt = _make_checkpoint(case, tmp_path) if case.startswith("checkpoint-") else None
    args = [*TINY, "--runs", str(tmp_path / "runs")]
    args += [f.format(tmp=tmp_path, ckpt=ckpt) for f in flags]  # typer keeps the last of a repeated flag
    before = snapshot(tmp_path)
    capsys.readouterr()  # what building the fixtures printed is not the CLI's
    code, out, err = bench(monkeypatch, capsys, "run", *args)
    lines = [ln for ln in (out + err).splitlines() if ln.strip()]
    assert code == 2, (out, err)
    assert len(lines) == 1, lines
    assert "Traceback" not in out + err
    assert needle in lines[0] and any(w in lines[0] for w in ("accepted", "refused", "pass another")), lines[0]
    assert snapshot(tmp_path) == before  # nothing written: no run folder, no store, no cache


def test_the_table_is_big_enough():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


def test_export_to_a_file_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    code, out, err = bench(monkeypatch, capsys, "export", str(tmp_path / "nocell"), str(tmp_path / "afile"),
                           "--runs", str(tmp_path / "runs"))
    assert code == 2 and len((out + err).strip().splitlines()) == 1 and "Traceback" not in out + err
