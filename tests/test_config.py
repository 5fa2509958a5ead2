"""config.py is the one declaration of every setting: the flags and the YAML keys follow from it."""

import dataclasses

import pytest
from typer.testing import CliRunner

from ptqbench import cli
from ptqbench.config import SECTIONS, SETTINGS, RunConfig, load_config
from ptqbench.errors import BadInput


def test_every_field_of_every_section_is_a_setting_with_help():
    fields = [(name, f.name) for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    assert sorted(fields) == sorted((s.section, s.attr) for s in SETTINGS.values())
    assert all(s.help for s in SETTINGS.values())


def test_every_setting_is_a_flag_of_bench_run():
    out = CliRunner().invoke(cli.app, ["run", "--help"], terminal_width=200).output
    for s in SETTINGS.values():
        if s.cli:
            assert f"--{s.flag}" in out, s.key
    assert "--option" in out and "--config" in out


def test_flat_keys_round_trip():
    cfg = RunConfig.from_flat(model="tiny:llava", bits=[3], calib_n=4, grid="gptq", eval_n=5, latency=False)
    assert (cfg.model.source, cfg.quant.bits, cfg.calib.n, cfg.quant.rounding, cfg.eval.n) == ("tiny:llava", [3], 4, "gptq", 5)
    assert RunConfig.from_flat(**cfg.to_dict()) == cfg
    assert cfg.replace(seed=7).calib.seed == 7 and cfg.calib.seed == 1


def test_yaml_sections_equal_flat_keys(tmp_path):
    flat, nested = tmp_path / "flat.yaml", tmp_path / "nested.yaml"
    flat.write_text("model: tiny:llava\nbits: 2,3\ncalib-n: 4\ngrid: gptq\n")
    nested.write_text("model: tiny:llava\nquant: {bits: [2, 3], grid: gptq}\ncalib: synthvqa\ncalib_n: 4\n")
    assert load_config(flat, {}) == load_config(nested, {})


def test_a_run_folders_config_is_a_valid_config_file(tmp_path):
    import yaml

    cfg = RunConfig.from_flat(model="tiny:llava", methods=["rtn"], bits=[4], options={"rtn": {}})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=True))
    assert load_config(path, {}) == cfg


@pytest.mark.parametrize("key, value, needle", [
    ("calib_n", 0, "calib-n 0"), ("kernel", "magic", "kernel 'magic'"), ("bits", [9], "bits 9"),
    ("latency_tokens", 1, "latency-tokens 1"), ("grid", "fancy", "grid 'fancy'"), ("seq_len", "x", "seq-len 'x'"),
])
def test_each_settings_check_names_the_bad_value(key, value, needle):
    with pytest.raises(BadInput, match=needle):
        RunConfig.from_flat(**{key: value})
