"""Plugins arrive through the `ptqbench.methods` entry-point group: install a throwaway package and run it."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ptqbench.errors import BadInput
from ptqbench.methods import all_methods, get_method

BIN = Path(sys.executable).parent

PLUGIN = '''
from dataclasses import dataclass
import torch
from ptqbench.methods.base import Method, option
from ptqbench.methods.quant import quantize_rtn


@dataclass
class HalfOptions:
    shrink: float = option(0.9, "multiply weights by this before rounding")


class ShrinkRTN(Method):
    name = "shrink-rtn"
    summary = "throwaway test plugin: RTN of shrunk weights"
    Options = HalfOptions
    streams = "none"

    def quantize_block(self, block):
        for n in block.linear_names:
            block.commit(n, quantize_rtn(block.weight(n) * self.opts.shrink, self.spec))
'''


def test_builtins_registered():
    names = set(all_methods())
    assert {"rtn", "gptq"} <= names
    with pytest.raises(BadInput, match="accepted: .*gptq"):
        get_method("nope")


def test_plugin_installs_and_runs_through_cli(tmp_path):
    pkg = tmp_path / "plugin"
    (pkg / "shrink_plugin").mkdir(parents=True)
    (pkg / "shrink_plugin" / "__init__.py").write_text(PLUGIN)
    (pkg / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "shrink-plugin"
        version = "0.0.1"
        [project.entry-points."ptqbench.methods"]
        shrink-rtn = "shrink_plugin:ShrinkRTN"
    '''))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(target), str(pkg)], check=True, capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(target))
    listed = subprocess.run([str(BIN / "bench"), "methods"], env=env, capture_output=True, text=True, check=True)
    assert "shrink-rtn" in listed.stdout and "plugin" in listed.stdout
    ran = subprocess.run([str(BIN / "bench"), "run", "--model", "tiny:qwen2-vl", "--methods", "shrink-rtn,rtn", "--bits", "4",
                          "--calib-n", "2", "--runs", str(tmp_path / "runs"), "--no-save-model", "--no-latency"],
                         env=env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr + ran.stdout
    assert "shrink-rtn" in ran.stdout
    bad = subprocess.run([str(BIN / "bench"), "run", "--model", "tiny:qwen2-vl", "--methods", "shrink-rtn",
                          "-o", "shrink-rtn.bogus=1", "--runs", str(tmp_path / "runs")], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "bogus" in bad.stderr and "shrink" in bad.stderr
