"""``python -m bench new method NAME [--plugin DIR]`` (``bench/scaffold.py``): the plugin variant's files pass their
own tests (a hand-computed loss check and a one-epoch digits run) from outside the repository; the in-repository
variant writes methods/NAME.py and tests/test_NAME.py; bad names and existing files write nothing."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import scaffold
from bench.__main__ import main

ROOT = Path(__file__).resolve().parent.parent


def test_the_plugin_variant_passes_its_own_tests_outside_the_repository(tmp_path, capsys):
    folder = tmp_path / "my_kd"
    assert main(["new", "method", "my_kd", "--plugin", str(folder)]) == 0
    assert capsys.readouterr().out.split() == ["wrote", str(folder / "my_kd.py"), "wrote", str(folder / "test_my_kd.py")]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_my_kd.py"],
                          cwd=folder, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0 and "2 passed" in proc.stdout, proc.stdout[-3000:]


def test_the_repository_variant_writes_the_method_and_its_test(tmp_path, monkeypatch):
    (tmp_path / "methods").mkdir()
    (tmp_path / "tests").mkdir()
    monkeypatch.setattr(scaffold, "checkout_root", lambda: tmp_path)
    method, test = scaffold.new_method("soft_kd")
    assert method == tmp_path / "methods" / "soft_kd.py" and test == tmp_path / "tests" / "test_soft_kd.py"
    text = method.read_text()
    assert "def soft_kd_loss(" in text and "class SoftKd(Method):" in text and 'name = "soft_kd"' in text
    assert "from methods.soft_kd import soft_kd_loss" in test.read_text()
    compile(text, str(method), "exec")
    compile(test.read_text(), str(test), "exec")


@pytest.mark.parametrize("name, message", [("MyKD", "lower-case Python identifier"), ("class", "lower-case"),
                                           ("kd", "method 'kd' exists already")])  # fmt: skip
def test_bad_names_write_nothing(name, message, tmp_path, capsys):
    assert main(["new", "method", name, "--plugin", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_existing_files_are_never_overwritten(tmp_path, capsys):
    (tmp_path / "test_my_kd.py").write_text("# mine\n")
    assert main(["new", "method", "my_kd", "--plugin", str(tmp_path)]) == 2
    assert "exists already; nothing written" in capsys.readouterr().err
    assert not (tmp_path / "my_kd.py").exists() and (tmp_path / "test_my_kd.py").read_text() == "# mine\n"
