"""The HTML leaderboard in a real browser: headless Chromium renders it; tables and plots are there and
non-empty after its scripts ran; a screenshot is kept under the test's output folder.

CI installs Debian's `chromium` (.ci/run); elsewhere the test is skipped with that reason."""

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ptqbench import cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (CI installs Debian's chromium)")


class _Census(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables = self.rows_in_table = 0
        self.table_rows: list[int] = []
        self.svgs = self.svg_marks = 0
        self.scripts_external = 0
        self.in_svg = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.table_rows.append(0)
        elif tag == "tr" and self.table_rows:
            self.table_rows[-1] += 1
        elif tag == "svg":
            self.svgs += 1
            self.in_svg = True
        elif self.in_svg and tag in ("circle", "path", "polyline", "line", "rect"):
            self.svg_marks += 1
        if tag in ("script", "link", "img") and (a.get("src") or a.get("href", "")).startswith(("http", "//")):
            self.scripts_external += 1

    def handle_endtag(self, tag):
        if tag == "svg":
            self.in_svg = False


def _chromium(*args, profile):
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120)


def test_html_leaderboard_renders_in_chromium(tmp_path):
    runs = tmp_path / "runs"
    res = CliRunner().invoke(cli.app, ["run", "--model", "tiny:qwen2-vl", "--methods", "rtn,gptq", "--bits", "2,4", "--calib-n", "2",
                                       "--runs", str(runs), "--no-save-model", "--latency-tokens", "4",
                                       "--tasks", "synthvqa,synthvqa-nll", "--eval-n", "6"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    html = tmp_path / "leaderboard.html"
    res = CliRunner().invoke(cli.app, ["leaderboard", "--runs", str(runs), "--format", "html", "--out", str(html)])
    assert res.exit_code == 0, res.output

    dom = _chromium("--dump-dom", html.as_uri(), profile=tmp_path / "p1")
    assert dom.returncode == 0 and "<table" in dom.stdout, dom.stderr[-2000:]
    census = _Census()
    census.feed(dom.stdout)
    assert len(census.table_rows) >= 3 and all(n >= 2 for n in census.table_rows), census.table_rows  # header + data
    assert census.svgs >= 4 and census.svg_marks >= 20  # matplotlib figures with marks in them
    assert census.scripts_external == 0  # one self-contained file
    first = dom.stdout[dom.stdout.index("<table"):]
    first_header = first[:first.index("</thead>")]
    assert "synthvqa acc" in first_header and "synthvqa-nll nll" in first_header  # the first table is the accuracy
    assert "reconstruction" not in first_header.lower() and "final_rel_err" not in first_header

    out = Path(__file__).parent.parent.parent / "test-output"
    out.mkdir(exist_ok=True)
    shot = out / "leaderboard.png"
    cap = _chromium("--window-size=1400,2400", f"--screenshot={shot}", html.as_uri(), profile=tmp_path / "p2")
    assert cap.returncode == 0 and shot.stat().st_size > 10_000, cap.stderr[-2000:]
