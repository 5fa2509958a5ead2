#!/usr/bin/env python3
"""Fail loudly when the installed packages drift from requirements/lock.txt.

    .venv/bin/python scripts/check_lock.py            # every installed locked package at its locked version
    .venv/bin/python scripts/check_lock.py --complete # and every locked package installed (the test set-up)

Checked in this interpreter's own environment (a venv's site-packages): a package at another version than
the lock, a package the lock does not know, and (with --complete) a locked package that is missing. torch and
torchvision are not in the lock: a venv of its own must hold the pair scripts/setup installs; a torch seen
through the system site-packages (a GPU box's CUDA build) is kept and only reported.
"""

from __future__ import annotations

import argparse
import re
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

LOCK = Path(__file__).resolve().parent.parent / "requirements" / "lock.txt"
TORCH_PAIR = {"torch": "2.14.1", "torchvision": "0.29.1"}
# Never locked: the installer itself, the project, and torch's CUDA runtime wheels (they follow torch).
UNLOCKED = re.compile(r"^(pip|setuptools|wheel|ptqbench|nvidia-.*|triton|cuda-.*)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = LOCK) -> dict[str, str]:
    pins = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise SystemExit(f"{path}:{n}: {line!r} is not 'name==version'")
        pins[canonical(name)] = version.strip()
    return pins


def own_distributions() -> dict[str, tuple[str, bool]]:
    """name -> (version, installed in this environment's own site-packages rather than the system's)."""
    own_dirs = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    out: dict[str, tuple[str, bool]] = {}
    for dist in metadata.distributions():
        name = canonical(dist.metadata["Name"] or "")
        if not name or name in out:  # the first on sys.path wins, as for an import
            continue
        where = Path(str(dist.locate_file(""))).resolve()
        out[name] = (dist.version, where in own_dirs)
    return out


def drift(pins: dict[str, str], installed: dict[str, tuple[str, bool]], complete: bool) -> list[str]:
    problems = []
    for name, (version, own) in sorted(installed.items()):
        if name in TORCH_PAIR:
            if own and version.split("+")[0] != TORCH_PAIR[name]:
                problems.append(f"{name} {version} is installed; scripts/setup installs {TORCH_PAIR[name]}")
            continue
        if not own or UNLOCKED.match(name):
            continue
        if name not in pins:
            problems.append(f"{name} {version} is installed but not in the lock")
        elif pins[name] != version:
            problems.append(f"{name} {version} is installed; the lock says {pins[name]}")
    if complete:
        problems += [f"{name} {v} is in the lock but not installed" for name, v in sorted(pins.items()) if name not in installed]
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--complete", action="store_true", help="also require every locked package to be installed")
    ap.add_argument("--lock", type=Path, default=LOCK, help="the lock to check against (default requirements/lock.txt)")
    args = ap.parse_args(argv)
    installed = own_distributions()
    problems = drift(read_lock(args.lock), installed, args.complete)
    for p in problems:
        print(f"lock drift: {p}", file=sys.stderr)
    if problems:
        print(f"lock drift: {len(problems)} package(s) differ from {args.lock.name}; run scripts/setup again, or refresh the "
              "lock with scripts/lock if the change is intended", file=sys.stderr)
        return 1
    torch = installed.get("torch")
    where = "own" if torch and torch[1] else "system (kept)"
    print(f"environment matches the lock ({len(installed)} packages; torch {torch[0] if torch else 'missing'}, {where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
