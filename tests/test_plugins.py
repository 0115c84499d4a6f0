"""Plugins (``bench/plugins.py``): the three ways to load one, bad plugins (one line, exit 2, nothing written or
registered), the plugin's source in its runs' hash (built-in hashes unchanged) and on the MLflow run, and what a
Ray worker is handed. The example plugin under Ray: ``tests/test_plugin_example.py``."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench import api, plugins
from bench.__main__ import main
from bench.errors import BenchError
from bench.suites import expand, load_suite, parse_suite
from methods import list_methods
from tests.plugin_fixtures import isolated, write_plugin  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parent.parent
SUITE = {
    "name": "plug",
    "dataset": "digits",
    "pairs": [{"teacher": "resnet20", "student": "resnet8"}],
    "methods": ["ce", "kd2"],
    "fractions": [0.4],
    "seeds": [0],
    "recipe": {"epochs": 15, "batch_size": 64, "lr": 0.05, "milestones": [10, 13], "weight_decay": 5.0e-4},
    "teacher": {"seed": 0, "recipe": {"epochs": 20, "milestones": [14, 18]}},
    "target_top1": 90,
}


def test_a_plugin_file_given_with_the_flag_registers_its_method(tmp_path, isolated, capsys):
    path = write_plugin(tmp_path)
    assert main(["list", "methods", "--plugin", str(path)]) == 0
    assert "kd2" in capsys.readouterr().out.split()
    assert plugins.loaded()[-1].module == "kd2" and plugins.loaded()[-1].registered == (("method", "kd2"),)


def test_suite_plugins_are_relative_to_the_suite_file_and_load_once(tmp_path, isolated, monkeypatch):
    write_plugin(tmp_path / "suite" / "lib")
    suite_file = tmp_path / "suite" / "plug.yaml"
    suite_file.write_text(yaml.safe_dump({**SUITE, "plugins": ["./lib/kd2.py"]}))
    monkeypatch.chdir(tmp_path)  # elsewhere: the path is the suite file's
    first = load_suite(suite_file)
    again = load_suite(suite_file)  # the same file, unchanged: a no-op, not a clash
    assert [s.method for s in expand(first)] == ["ce", "kd2"] and first.plugins == ["./lib/kd2.py"]
    assert [s.hash for s in expand(again)] == [s.hash for s in expand(first)]


BAD = {
    "missing": (None, "file not found"),
    "import": ("import os\nimport kdbench_no_such_module\n", "bad.py:2: ModuleNotFoundError: No module named"),
    "syntax": ("x = 1\ndef broken(:\n", "bad.py:2: SyntaxError"),
    "builtin": ("kd", "method 'kd' clashes with a built-in (methods.kd)"),
    "other": ("kd2", "method 'kd2' clashes with plugin file"),
    "not a method": (
        "from methods.base import register_method\nclass Loss:\n    name = 'loss'\nregister_method(Loss)\n",
        "is not a subclass of methods.base.Method",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_plugin_is_one_line_exit_2_nothing_written_nothing_registered(case, tmp_path, isolated, capsys):
    text, message = BAD[case]
    flags = []
    if case == "other":
        flags = ["--plugin", str(write_plugin(tmp_path / "first"))]
    bad = tmp_path / "bad.py"
    if case in ("builtin", "other"):
        write_plugin(tmp_path, "bad", name=text)
    elif text is not None:
        bad.write_text(text)
    suite = tmp_path / "plug.yaml"
    suite.write_text(yaml.safe_dump(SUITE))
    before = {kind: set(registry) for kind, registry in plugins._REGISTRIES.items()}
    results = tmp_path / "results"
    code = main(["run", str(suite), *flags, "--plugin", str(bad), "--results", str(results), "--executor", "local"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("error: --plugin: plugin ")
    assert not results.exists()
    after = {kind: set(registry) for kind, registry in plugins._REGISTRIES.items()}
    expected = {**before, "method": before["method"] | ({"kd2"} if case == "other" else set())}
    assert after == expected and "bad" not in sys.modules


def test_a_bad_plugin_named_by_the_suite_says_where(tmp_path, isolated):
    (tmp_path / "bad.py").write_text("raise RuntimeError('no GPU here')\n")
    suite = tmp_path / "plug.yaml"
    suite.write_text(yaml.safe_dump({**SUITE, "plugins": ["bad.py"]}))
    with pytest.raises(BenchError, match=r"plug\.yaml\.plugins: plugin bad\.py: import failed: bad\.py:1: "
                                         r"RuntimeError: no GPU here"):  # fmt: skip
        load_suite(suite)


def test_editing_a_plugin_changes_its_runs_hash_and_never_a_builtin_one(tmp_path, isolated):
    path = write_plugin(tmp_path)
    raw = {**SUITE, "plugins": [str(path)]}
    ce, kd2 = expand(parse_suite(raw))
    without = next(s for s in expand(parse_suite({**SUITE, "methods": ["ce"]})))
    assert ce.hash == without.hash  # a built-in method's hash does not see the plugins: finished runs are reused
    assert not ce.code and set(kd2.code) == {"method"}
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert kd2.code["method"] == digest
    path.write_text(path.read_text() + "\n# tuned\n")
    ce2, kd2_edited = expand(parse_suite(raw))
    assert ce2.hash == ce.hash and kd2_edited.hash != kd2.hash
    assert kd2_edited.teacher_spec.hash == kd2.teacher_spec.hash  # a built-in teacher: the same cached teacher


def test_module_plugins_and_entry_points_of_installed_packages(tmp_path):
    site = tmp_path / "site"
    write_plugin(site / "kdb_demo", "__init__", name="kd_demo")
    write_plugin(site / "kdb_other", "__init__", name="kd_other")
    dist = site / "kdb_demo-0.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kdb-demo\nVersion: 0.3\n")
    (dist / "top_level.txt").write_text("kdb_demo\n")
    (dist / "entry_points.txt").write_text("[kdbench.plugins]\ndemo = kdb_demo\n")
    code = ("import sys; from bench.__main__ import main; from bench import plugins; "
            "rc = main(['list', 'methods', '--plugin', 'kdb_other']); "
            "print([p.origin for p in plugins.loaded()]); sys.exit(rc)")  # fmt: skip
    env = {**__import__("os").environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    names = proc.stdout.split()
    assert "kd_demo" in names and "kd_other" in names
    assert "'module kdb_demo (kdb-demo 0.3)', 'module kdb_other'" in proc.stdout


def test_a_worker_gets_the_exact_source_the_driver_ran(tmp_path, isolated):
    path = write_plugin(tmp_path)
    plugins.load([str(path)])
    carried = plugins.carried()
    assert [p.module for p in carried.plugins if p.required] == ["kd2"]
    plugins._unload(plugins._LOADED["kd2"])  # a fresh worker process: nothing loaded, and no file on its node
    path.unlink()
    assert "kd2" not in list_methods()
    plugins.ensure(carried)
    plugins.ensure(carried)  # every trial calls it: the second time is a no-op
    assert "kd2" in list_methods() and plugins._LOADED["kd2"].digest == carried.plugins[0].digest


def test_a_dict_suite_has_the_schema_and_checks_of_a_yaml_file(tmp_path, isolated):
    bad = {**SUITE, "methods": ["ce", "kd3"]}
    with pytest.raises(BenchError, match=r"^suite\.methods\[1\]: unknown method 'kd3'"):
        api.load_suite(bad)
    with pytest.raises(BenchError, match="unknown run option 'epochs'"):
        api.run_suite({**SUITE, "methods": ["ce"]}, epochs=3)
    suite = api.load_suite(SUITE, plugins=[str(write_plugin(tmp_path))])
    assert [s.method for s in expand(suite)] == ["ce", "kd2"]


def test_a_plugin_run_records_its_source_and_digest(tmp_path, isolated):
    from mlflow.tracking import MlflowClient

    path = write_plugin(tmp_path)
    tiny = {**SUITE, "name": "plug-tiny", "methods": ["kd2"], "pairs": [{"teacher": "resnet8", "student": "resnet8"}],
            "fractions": [0.2], "recipe": {"epochs": 1, "milestones": [], "batch_size": 128},
            "teacher": {"recipe": {"epochs": 1, "milestones": []}}}  # fmt: skip
    results = tmp_path / "results"
    runs = api.run_suite(tiny, plugins=[str(path)], results_dir=results, progress=False, log=lambda *_: None)
    assert runs.status.tolist() == ["finished"]
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    run = client.get_run(runs.run_id[0])
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert run.data.tags["code.method"] == f"kd2 from plugin file {path}, source sha256 {digest}"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "code")] == ["code/kd2.py"]
    assert api.load_results(tiny, results_dir=results).run_id.tolist() == runs.run_id.tolist()


def test_a_method_defined_in_main_is_refused_for_ray_in_one_line(tmp_path, isolated):
    code = (
        "from bench import api\nfrom methods.kd import KD\nfrom methods.base import register_method\n"
        "class Mine(KD):\n    name = 'mine'\nregister_method(Mine)\n"
        f"api.run_suite({{**{SUITE!r}, 'methods': ['mine']}}, executor='ray', results_dir={str(tmp_path / 'r')!r})\n"
    )
    (tmp_path / "script.py").write_text(code)  # a script (or a notebook) hashes its own source
    proc = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and not (tmp_path / "r").exists()
    assert proc.stderr.strip().splitlines()[-1] == (
        "bench.errors.BenchError: method 'mine' is defined in __main__, which Ray workers cannot import: put it in a "
        "file and load it as a plugin, or use the local executor"
    )
