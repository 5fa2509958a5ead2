"""scripts/check_lock.py: the environment the tests run in is the locked one, and drift is caught."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("check_lock", ROOT / "scripts" / "check_lock.py")
check_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_lock)


def test_installed_packages_match_the_lock():
    problems = check_lock.drift(check_lock.read_lock(), check_lock.own_distributions(), complete=False)
    assert problems == [], "\n".join(problems)


def test_lock_pins_what_broke_ci():
    pins = check_lock.read_lock()
    assert pins["filelock"] == "4.2.12"  # 4.3.1 dropped filelock._api, which lmms-eval 0.7.3 imports
    assert "torch" not in pins and not any(p.startswith("nvidia-") for p in pins)  # setup pins torch itself


def test_drift_is_reported():
    pins = {"numpy": "1.0.0", "rich": "13.0.0", "gone": "1.0"}
    installed = {"numpy": ("2.4.6", True), "rich": ("13.0.0", True), "extra": ("0.1", True), "system-pkg": ("9", False),
                 "torch": ("2.13.0", True), "pip": ("23.2.1", True), "nvidia-cublas": ("13", True)}
    problems = check_lock.drift(pins, installed, complete=True)
    assert problems == [
        "extra 0.1 is installed but not in the lock",
        "numpy 2.4.6 is installed; the lock says 1.0.0",
        "torch 2.13.0 is installed; scripts/setup installs 2.14.1",
        "gone 1.0 is in the lock but not installed",
    ]
    assert check_lock.drift(pins, {"torch": ("2.5.0+cu124", False)}, complete=False) == []  # a GPU box's own torch


def test_lock_lines_are_validated(tmp_path):
    bad = tmp_path / "lock.txt"
    bad.write_text("# comment\nnumpy>=1\n")
    try:
        check_lock.read_lock(bad)
    except SystemExit as e:
        assert "numpy>=1" in str(e)
    else:
        raise AssertionError("a range in the lock must be refused")
