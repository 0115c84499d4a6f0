"""The layout stays what the README describes: no import circle among ``bench/`` and ``methods/`` (imports inside
functions and under ``TYPE_CHECKING`` count too), no module of ``bench/`` over 500 lines, and Ray imported by the
Ray executor alone (``bench.run.ray``, its Ray Train part ``bench.run.ray_train``, and sweeps), so ``--executor
local`` and everything but Ray start without it."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bench", "methods")
MAX_LINES = 500


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (a package's own parents excluded)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            candidates = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in candidates:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                targets.add(target)
    return targets


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_planted_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_in_bench_and_methods():
    known = modules()
    graph = {name: imported(name, path, known) for name, path in known.items()}
    assert graph["bench.run.lifecycle"] >= {"bench.engine", "bench.lockstep"}  # the walk sees real imports
    assert cycles(graph) == []


def test_the_engine_imports_none_of_its_callers():
    known = modules()
    callers = {"bench.teacher_cache", "bench.lockstep", "bench.run", "bench.report", "methods"}
    engine = imported("bench.engine", known["bench.engine"], known)
    assert not {m for m in engine if any(m == c or m.startswith(c + ".") for c in callers)}


def test_the_report_reads_runs_and_imports_no_training_code():
    known = modules()
    training = ("bench.engine", "bench.lockstep", "bench.teacher_cache", "bench.run", "methods", "bench.data")
    for name, path in known.items():
        if name.startswith("bench.report"):
            bad = {m for m in imported(name, path, known) if any(m == t or m.startswith(t + ".") for t in training)}
            assert not bad, (name, bad)


def test_no_module_of_bench_is_over_500_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items() if name.startswith("bench")}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_only_the_ray_executor_imports_ray():
    known = modules()
    for name, path in known.items():
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level]
        if any(m == "ray" or m.startswith("ray.") for m in names):
            assert name in ("bench.run.ray", "bench.run.ray_train", "bench.run.sweep"), name


def test_the_local_executor_and_the_report_start_without_ray():
    code = ("import sys, bench.__main__, bench.run.local, bench.run.suite, bench.report, methods; "
            "print('ray' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
