"""Bad input: one line naming the bad value and what is accepted, exit code 2, nothing passed off as a result."""

import sqlite3

import pytest
from typer.testing import CliRunner

from ptqbench import cli

runner = CliRunner()


def bench(*args):
    """Run the CLI in-process the way `main()` does (BadInput -> exit 2)."""
    from ptqbench.errors import BadInput

    try:
        res = runner.invoke(cli.app, list(args), catch_exceptions=False)
        return res.exit_code, res.output
    except BadInput as e:
        return 2, f"error: {e}"


@pytest.mark.parametrize("args, needle", [
    (["--methods", "gptq,nope"], "'nope'"),
    (["--bits", "9"], "bits 9"),
    (["--bits", "x"], "'x'"),
    (["--group-size", "48"], "group size 48"),
    (["--calib-n", "0"], "calib-n 0"),
    (["--seed", "0"], "seed 0"),
    (["--model", "tiny:gpt2"], "'gpt2'"),
    (["--device", "tpu"], "device 'tpu'"),
    (["-o", "gptq.nonsense=1", "--methods", "gptq"], "nonsense"),
    (["-o", "gptq.act_order=maybe", "--methods", "gptq"], "act_order"),
])
def test_bad_flags(tmp_path, args, needle):
    code, out = bench("run", "--model", "tiny:qwen2-vl", "--runs", str(tmp_path / "runs"), *args) if "--model" not in args \
        else bench("run", "--runs", str(tmp_path / "runs"), *args)
    assert code == 2, out
    line = out.strip()
    assert "\n" not in line and needle in line and ("accepted" in line.lower() or "must be" in line)


def test_unknown_config_key(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: tiny:qwen2-vl\nmethodz: [rtn]\n")
    code, out = bench("run", "--config", str(cfg))
    assert code == 2 and "'methodz'" in out and "methods" in out


def test_config_yaml_same_fields_as_flags(tmp_path):
    from ptqbench.config import load_config

    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: tiny:llava\nmethods: gptq,rtn\nbits: [3]\ngroup-size: 16\noptions: {gptq: {act_order: true}}\n")
    c = load_config(cfg, {"bits": [2, 4], "options": {"gptq": {"percdamp": 0.1}}})
    assert c.quant.methods == ["gptq", "rtn"] and c.quant.bits == [2, 4] and c.quant.group_size == 16
    assert c.quant.options == {"gptq": {"act_order": True, "percdamp": 0.1}}


@pytest.mark.parametrize("content, needle", [("", "empty"), ("{not json", "not readable JSON"), ("[]", "no records")])
def test_bad_calibration_files(tmp_path, content, needle):
    path = tmp_path / ("calib.txt" if content == "" else "calib.json")
    path.write_text(content)
    code, out = bench("run", "--model", "tiny:qwen2-vl", "--methods", "rtn", "--calib", str(path), "--runs", str(tmp_path / "r"))
    assert code == 2 and needle in out and str(path) in out
    assert not (tmp_path / "r" / "results.sqlite").exists() or not sqlite3.connect(tmp_path / "r" / "results.sqlite").execute(
        "select count(*) from results").fetchone()[0]


def test_undecodable_image(tmp_path):
    (tmp_path / "img.png").write_bytes(b"not a png at all")
    path = tmp_path / "calib.json"
    path.write_text('[{"id": "a", "image": "img.png", "conversations": [{"from": "human", "value": "<image>\\nq"}, {"from": "gpt", "value": "a"}]}]')
    code, out = bench("run", "--model", "tiny:qwen2-vl", "--methods", "rtn", "--calib", str(path), "--runs", str(tmp_path / "r"))
    assert code == 2 and "img.png" in out and "cannot be decoded" in out


def test_model_without_image_token(tmp_path, monkeypatch):
    from ptqbench.models import sources as models

    real = models.load_model

    def no_image_token(name, dtype, **kw):
        lm = real(name, dtype, **kw)
        for cfg in (lm.model.config, lm.model.config.text_config):  # bypass the strict config validators
            object.__setattr__(cfg, "image_token_id", None)
        return lm

    monkeypatch.setattr(models, "load_model", no_image_token)
    monkeypatch.setattr("ptqbench.grid.plan.load_model", no_image_token)
    code, out = bench("run", "--model", "tiny:qwen2-vl", "--methods", "rtn", "--runs", str(tmp_path / "r"))
    assert code == 2 and "image token" in out


def test_missing_model_dir(tmp_path):
    code, out = bench("run", "--model", str(tmp_path / "nowhere"), "--methods", "rtn", "--runs", str(tmp_path / "r"))
    assert code == 2 and "nowhere" in out and "accepted" in out
