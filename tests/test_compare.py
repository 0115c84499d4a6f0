"""``python -m bench compare A B`` on a real result set (the tiny suite's runs) and copies of it with planted
changes: a regression is flagged (exit 1) only when B is worse beyond the tolerance and significantly; bad input
is one line and exit 2."""
import json

import pandas as pd
import pytest

from bench.__main__ import main
from tests.conftest import bench_cli


@pytest.fixture(scope="module")
def real(tiny_suite_run):
    _, results, _ = tiny_suite_run
    return results / "tiny" / "runs.csv"


def planted(real, tmp_path, name="tiny", change=None) -> "pd.DataFrame":
    """A copy of the real runs.csv as ``tmp_path/<name>/runs.csv`` after ``change(frame)``."""
    frame = pd.read_csv(real)
    if change is not None:
        change(frame)
    folder = tmp_path / name
    folder.mkdir(parents=True, exist_ok=True)
    frame.to_csv(folder / "runs.csv", index=False)
    return folder


def run(capsys, *args):
    code = main(["compare", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def lower(label, by):
    def change(frame):
        rows = frame.index[frame.label == label]
        frame.loc[rows, "top1"] = frame.loc[rows, "top1"] - by[: len(rows)]

    return change


def test_a_result_set_against_itself_differs_by_exactly_zero(real, capsys):
    code, out, _ = run(capsys, real.parent.parent, real)  # a results folder, a runs.csv
    assert code == 0
    assert "| resnet8→resnet8 f0.5 kd | " in out and out.count("+0.00 [+0.00, +0.00] | paired") == 2
    assert "0 of 2 common cells regressed" in out


def test_a_planted_regression_is_flagged(real, tmp_path, capsys):
    b = planted(real, tmp_path, change=lower("kd", [3.0, 2.5, 3.5]))
    code, out, _ = run(capsys, real, b, "--json", tmp_path / "cmp.json")
    assert code == 1
    kd = next(line for line in out.splitlines() if "f0.5 kd" in line)
    assert "-3.00 [" in kd and "paired" in kd and "**REGRESSED**" in kd
    assert "REGRESSED" not in next(line for line in out.splitlines() if "f0.5 ce" in line)
    cells = {c["cell"]: c for c in json.loads((tmp_path / "cmp.json").read_text())["cells"]}
    assert cells["resnet8→resnet8 f0.5 kd"]["regressed"] and not cells["resnet8→resnet8 f0.5 ce"]["regressed"]
    assert cells["resnet8→resnet8 f0.5 kd"]["diff"][0] == pytest.approx(-3.0)


def test_within_the_tolerance_or_within_noise_is_not_a_regression(real, tmp_path, capsys):
    small = planted(real, tmp_path / "small", change=lower("kd", [0.4, 0.4, 0.4]))  # significant, but 0.4 < 0.5
    assert run(capsys, real, small)[0] == 0
    assert run(capsys, real, small, "--tolerance", "0.3")[0] == 1
    noisy = planted(real, tmp_path / "noisy", change=lower("kd", [9.0, -6.0, 0.0]))  # mean −1, interval spans 0
    code, out, _ = run(capsys, real, noisy)
    assert code == 0 and "-1.00 [" in out


def test_different_seeds_are_compared_with_welchs_interval(real, tmp_path, capsys):
    def other_seeds(frame):
        frame["seed"] = frame["seed"] + 10
        lower("kd", [3.0, 3.0, 3.0])(frame)

    code, out, _ = run(capsys, real, planted(real, tmp_path, change=other_seeds))
    kd = next(line for line in out.splitlines() if "f0.5 kd" in line)
    assert "| Welch |" in kd and "-3.00 [" in kd and code == (1 if "REGRESSED" in kd else 0)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda real, tmp: tmp / "missing", "not found"),
        (lambda real, tmp: planted(real, tmp, change=lambda f: f.__setitem__("suite", "other")), "different suites"),
        (lambda real, tmp: planted(real, tmp, change=lambda f: f.__setitem__("label", "x")), "no common cell"),
        (lambda real, tmp: (tmp / "bad.csv").write_text("a,b\n1,2\n") and tmp / "bad.csv", "not a runs.csv"),
        (lambda real, tmp: planted(real, tmp, "one").parent and planted(real, tmp, "two").parent, "several suites"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(real, tmp_path, capsys, make, message):
    code, out, err = run(capsys, real, make(real, tmp_path))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not out


def test_the_cli_exit_codes_without_traceback(real, tmp_path):
    regressed = planted(real, tmp_path, change=lower("kd", [3.0, 2.5, 3.5]))
    proc = bench_cli("compare", str(real), str(regressed))
    assert proc.returncode == 1 and "REGRESSED" in proc.stdout
    proc = bench_cli("compare", str(real), str(tmp_path / "nope"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")
