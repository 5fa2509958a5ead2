"""The package's structure, read from its source with `ast` (nothing is imported): rooms import only
rooms below them, no import cycle, no function over 80 lines, no machine path. docs/architecture.md
draws the rooms this test enforces."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ptqbench"
# Lowest first. A module may import its own room and the rooms of lower ranks; deploy and eval share a
# rank and do not import each other.
RANKS = {"errors": 0, "methods": 1, "config": 2, "data": 3, "models": 4, "engine": 5, "deploy": 6, "eval": 6,
         "grid": 7, "leaderboard": 8, "cli": 9, "__main__": 10}
MAX_LINES = 80
SOLVERS = {"ptqbench/methods/gptq.py:solve"}  # numerical kernels read best whole (the reference's shape)
CODE_ROOTS = ["ptqbench", "testbed", "experiments", "scripts"]


def modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def imports_of(name: str, path: Path, known: dict) -> set[str]:
    """Package modules `name` imports anywhere in its body (lazy imports in functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            targets = subs if len(subs) == len(node.names) else subs + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t.startswith("ptqbench") and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package itself


def test_every_room_has_a_rank():
    assert {room(m) for m in modules()} - {None} <= set(RANKS)


def test_rooms_import_only_rooms_below_them():
    bad = []
    for mod, targets in graph().items():
        for t in targets:
            a, b = room(mod), room(t)
            if b is None:  # the package itself: its version string, a leaf
                continue
            if a is None or (b != a and RANKS[b] >= RANKS[a]):
                bad.append(f"{mod} -> {t}")
    assert not bad, "imports against the flow:\n" + "\n".join(sorted(bad))


def test_methods_import_nothing_of_the_package_but_errors():
    bad = [f"{m} -> {t}" for m, ts in graph().items() if room(m) == "methods" for t in ts
           if room(t) not in ("methods", "errors")]
    assert not bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def long_functions(limit: int = MAX_LINES) -> list[str]:
    out = []
    for top in CODE_ROOTS:
        for p in sorted((ROOT / top).rglob("*.py")) if (ROOT / top).is_dir() else []:
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    where = f"{p.relative_to(ROOT)}:{node.name}"
                    if n > limit and where not in SOLVERS:
                        out.append(f"{where} ({n} lines)")
    return out


def test_no_function_over_80_lines():
    assert long_functions() == []


@pytest.mark.parametrize("needle", ["/tmp/", "/work/", "/root/", "/home/", "C:\\\\"])
def test_no_machine_paths_in_the_package(needle):
    frozen = PACKAGE / "models" / "testbed_model"  # the frozen checkpoint's own record of how it was trained
    hits = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*") if p.suffix in (".py", ".yaml", ".json", ".md")
            and frozen not in p.parents and needle in p.read_text(errors="replace")]
    assert hits == []
