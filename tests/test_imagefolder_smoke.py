"""The ImageFolder path end to end: the Imagewoof suite's method on a tiny fixture in the real on-disk layout."""
from dataclasses import replace

import pandas as pd

from bench.run import RunOptions, make_tracker, run_suite
from bench.suites import expand, load_suite
from bench.report import runs_frame
from tests.fixtures import write_image_folder


def test_stablekd_imagewoof_suite_trains_one_epoch_on_image_folder_fixture(tmp_path):
    write_image_folder(tmp_path / "data" / "imagewoof", num_classes=10, per_class=1, size=40)
    suite = load_suite("stablekd-imagewoof")
    pair = replace(suite.pairs[0], teacher="tv:resnet18", student="tv:resnet18")  # resnet34 is too slow for a test
    tiny = replace(suite.recipe, epochs=1, milestones=[], batch_size=5, eval_batch_size=5)
    suite = replace(
        suite, pairs=[pair], fractions=[1.0], seeds=[0], recipe=tiny,
        methods=[m for m in suite.methods if m.name == "stablekd"], teacher=replace(suite.teacher, recipe={}),
    )  # fmt: skip
    options = RunOptions(results_dir=tmp_path / "results", data_root=str(tmp_path / "data"), progress=False)
    report = run_suite(suite, options, log=lambda *_: None)
    assert report.exit_code == 0 and len(report.finished) == 1
    frame: pd.DataFrame = runs_frame(make_tracker(suite, options), expand(suite))
    assert frame.status.tolist() == ["finished"] and frame.top1.between(0, 100).all()
    assert frame.teacher_top1.notna().all()
