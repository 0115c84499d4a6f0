"""kdbench installed, not cloned: the wheel built from the repository carries every package and the shipped suites
(package data ``kdbench_suites``), and from a folder outside the repository ``list suites``, ``validate mini`` and
a one-epoch digits suite with a plugin work, writing ``results/`` in that folder."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pandas as pd
import yaml

from tests.plugin_fixtures import write_plugin

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_is_in_the_wheel_list():
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for d in ("bench", "methods") for p in (ROOT / d).rglob("__init__.py")}
    assert found | {"kdbench_suites"} == set(packages)


def build_flags() -> list[str]:
    """Build with this environment's setuptools when it can make wheels (no network), else in pip's isolated
    build environment (fetches setuptools from the package index)."""
    import setuptools

    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    can = (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None
    return ["--no-build-isolation"] if can else []


def test_the_installed_wheel_lists_validates_and_runs_a_suite_from_elsewhere(tmp_path):
    source = tmp_path / "src"  # a copy: an in-tree build would leave build/ and *.egg-info in the repository
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("bench", "methods", "suites"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", *build_flags(), "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("kdbench-*.whl")
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)], check=True,
                   capture_output=True, timeout=300)  # fmt: skip

    elsewhere = tmp_path / "project"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}

    def bench(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "bench", *args], cwd=elsewhere, env=env, capture_output=True,
                              text=True, timeout=600)  # fmt: skip

    where = subprocess.run([sys.executable, "-c", "import bench; print(bench.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert where.startswith(str(target))
    listed = bench("list", "suites")
    assert listed.returncode == 0 and {"mini", "cifar100-crd"} <= set(listed.stdout.split())
    valid = bench("validate", "mini")
    assert valid.returncode == 0 and f"ok: {target / 'kdbench_suites' / 'mini.yaml'} (96 runs)" in valid.stdout

    write_plugin(elsewhere)
    suite = {
        "name": "outside", "dataset": "digits", "pairs": [{"teacher": "resnet8", "student": "resnet8"}],
        "methods": ["kd2"], "fractions": [0.2], "seeds": [0], "plugins": ["./kd2.py"],
        "recipe": {"epochs": 1, "milestones": [], "batch_size": 128}, "teacher": {"recipe": {"epochs": 1}},
    }  # fmt: skip
    (elsewhere / "outside.yaml").write_text(yaml.safe_dump(suite))
    run = bench("run", "outside.yaml", "--executor", "local", "--no-progress")
    assert run.returncode == 0, run.stderr[-2000:]
    runs = pd.read_csv(elsewhere / "results" / "outside" / "runs.csv")
    assert runs.method.tolist() == ["kd2"] and runs.status.tolist() == ["finished"]
