import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench.errors import BenchError
from bench.suites import SUITES_DIR, expand, load_suite

ROOT = Path(__file__).resolve().parent.parent

GOOD = {
    "name": "t",
    "dataset": "digits",
    "pairs": [{"teacher": "resnet20", "student": "resnet8"}],
    "methods": ["ce", {"kd": {"temperature": 2.0}}, {"name": "kd", "label": "kd-T8", "hparams": {"temperature": 8}}],
    "fractions": [0.4, 1.0],
    "seeds": [0, 1],
    "recipe": {"epochs": 3, "milestones": [2]},
}


def write(tmp_path, data) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_expand_enumerates_pairs_methods_fractions_seeds(tmp_path):
    suite = load_suite(write(tmp_path, GOOD))
    specs = expand(suite)
    assert len(specs) == 1 * 3 * 2 * 2
    assert len({s.hash for s in specs}) == len(specs)
    kd8 = [s for s in specs if s.label == "kd-T8"][0]
    assert kd8.hparams == {"temperature": 8.0, "ce_weight": 0.1, "kd_weight": 0.9}
    assert [s for s in specs if s.method == "ce"][0].teacher_spec is None
    assert kd8.teacher_spec.recipe.epochs == 3


def test_hash_is_stable_and_ignores_labels_but_not_hparams(tmp_path):
    a = expand(load_suite(write(tmp_path, GOOD)))
    b = expand(load_suite(write(tmp_path, {**GOOD, "name": "other"})))
    assert [s.hash for s in a] == [s.hash for s in b]
    changed = {**GOOD, "methods": ["ce", {"kd": {"temperature": 3.0}}, GOOD["methods"][2]]}
    c = expand(load_suite(write(tmp_path, changed)))
    assert {s.hash for s in a} != {s.hash for s in c}


def test_per_pair_hparams_override_the_method_entry(tmp_path):
    data = {**GOOD, "pairs": [{"teacher": "resnet20", "student": "resnet8", "hparams": {"kd": {"temperature": 6}}}]}
    specs = expand(load_suite(write(tmp_path, data)))
    assert {s.hparams["temperature"] for s in specs if s.label == "kd"} == {6.0}


BAD = [
    ({**GOOD, "colour": 1}, "unknown key 'colour'"),
    ({**GOOD, "dataset": "mnist"}, "dataset: unknown dataset 'mnist'"),
    ({**GOOD, "pairs": [{"teacher": "resnet1000", "student": "resnet8"}]}, "pairs[0].teacher: unknown model"),
    ({**GOOD, "pairs": [{"teacher": "resnet20"}]}, "pairs[0]"),
    ({**GOOD, "methods": ["kd", "magic"]}, "methods[1]: unknown method 'magic'"),
    ({**GOOD, "methods": [{"kd": {"tau": 4}}]}, "methods[0].kd: unknown key 'tau'"),
    ({**GOOD, "methods": [{"kd": {"temperature": "hot"}}]}, "methods[0].kd.temperature: expected a number"),
    ({**GOOD, "methods": [{"kd": {"temperature": -1}}]}, "temperature: must be > 0"),
    ({**GOOD, "methods": []}, "methods: must be a non-empty list"),
    ({**GOOD, "fractions": [0.4, 1.5]}, "fractions: 1.5 is outside (0, 1]"),
    ({**GOOD, "fractions": [0]}, "fractions: 0.0 is outside (0, 1]"),
    ({**GOOD, "fractions": []}, "fractions: must be a non-empty list"),
    ({**GOOD, "seeds": ["a"]}, "seeds: 'a' is not an integer"),
    ({**GOOD, "recipe": {"epochs": 0}}, "recipe.epochs: must be >= 1"),
    ({**GOOD, "recipe": {"epochs": 5, "milestones": [7]}}, "recipe.milestones: must lie in (0, epochs=5)"),
    ({**GOOD, "recipe": {"lr": "fast"}}, "recipe.lr: expected a number"),
    ({**GOOD, "recipe": {"augment": "mixup"}}, "recipe.augment: must be one of"),
    ({**GOOD, "methods": ["kd", "kd"]}, "label 'kd' used twice"),
    ({**GOOD, "pairs": [{"teacher": "resnet20", "student": "resnet8", "hparams": {"dkd": {}}}]}, "not a method label"),
    ("name: [unclosed\n", "YAML syntax error"),
    ("- just\n- a list\n", "must be a YAML mapping"),
]


@pytest.mark.parametrize("data,message", BAD, ids=[m for _, m in BAD])
def test_invalid_suites_raise_one_line_errors_naming_the_field(tmp_path, data, message):
    with pytest.raises(BenchError) as err:
        load_suite(write(tmp_path, data))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_suite_name_and_missing_file():
    with pytest.raises(BenchError, match="unknown suite 'nope'"):
        load_suite("nope")
    with pytest.raises(BenchError, match="not found"):
        load_suite("missing/suite.yaml")
    for manifest in ("teachers", SUITES_DIR / "teachers.yaml"):  # the published-teacher manifest beside the suites
        with pytest.raises(BenchError, match="manifest of published teachers .* not a suite"):
            load_suite(manifest)


def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path):
    suite = write(tmp_path, {**GOOD, "fractions": [2.0]})
    results = tmp_path / "results"
    for cmd in (["validate", str(suite)], ["run", str(suite), "--results", str(results)]):
        proc = subprocess.run([sys.executable, "-m", "bench", *cmd], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
        assert "fractions" in proc.stderr
    assert not results.exists()


def test_cli_missing_dataset_path_exits_2(tmp_path):
    suite = write(tmp_path, {**GOOD, "dataset": "cifar100"})
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "run", str(suite), "--data-root", str(tmp_path / "nowhere"), "--results", str(results)],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2 and "cifar-100-python" in proc.stderr and "Traceback" not in proc.stderr
    assert not results.exists()


def test_speed_flags_change_the_recipe_and_so_the_run_hash(tmp_path):
    from bench.__main__ import build_parser, with_speed_flags

    suite = load_suite(write(tmp_path, GOOD))
    args = build_parser().parse_args(["run", "x", "--amp", "--channels-last"])
    fast = with_speed_flags(suite, args)
    assert fast.recipe.amp and fast.recipe.channels_last and not fast.recipe.compile
    assert not suite.recipe.amp  # the loaded suite is untouched
    assert {s.hash for s in expand(fast)}.isdisjoint(s.hash for s in expand(suite))
    plain = with_speed_flags(suite, build_parser().parse_args(["run", "x"]))
    assert [s.hash for s in expand(plain)] == [s.hash for s in expand(suite)]


def test_references_carry_their_provenance_from_the_suite_or_their_own(tmp_path):
    raw = {
        **GOOD,
        "pairs": [{"teacher": "resnet20", "student": "resnet8",
                   "reference": {"kd": 70.5, "ce": {"top1": 60, "source": "own table", "protocol": "last epoch"}}}],
        "reference_sources": {"kd": {"source": "Hinton et al. 2015", "protocol": "best epoch, one run"}},
    }  # fmt: skip
    suite = load_suite(write(tmp_path, raw))
    refs = suite.references(suite.pairs[0])
    assert (refs["kd"].top1, refs["kd"].source, refs["kd"].protocol) == (70.5, "Hinton et al. 2015", "best epoch, one run")
    assert (refs["ce"].top1, refs["ce"].source, refs["ce"].protocol) == (60.0, "own table", "last epoch")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"reference_sources": {"nope": {"source": "x"}}}, "reference_sources: 'nope' is not a method label"),
        ({"reference_sources": {"kd": {"protocol": "x"}}}, "reference_sources.kd"),
        ({"pairs": [{"teacher": "resnet20", "student": "resnet8", "reference": {"nope": 1.0}}]},
         "pairs[0].reference: 'nope' is not a method label"),
        ({"pairs": [{"teacher": "resnet20", "student": "resnet8", "reference": {"kd": "high"}}]},
         "pairs[0].reference.kd"),
    ],
)  # fmt: skip
def test_bad_references_name_the_field(tmp_path, change, message):
    with pytest.raises(BenchError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_suite(write(tmp_path, {**GOOD, **change}))


def test_a_method_entry_recipe_overrides_the_pair_and_the_suite_recipe(tmp_path):
    """The protocol behind a method's reference numbers (e.g. DKD's batch 512 / lr 0.2 on ImageNet): applied on top
    of the pair's overrides, only to that column, and part of its runs' hash."""
    data = {
        **GOOD,
        "pairs": [{"teacher": "resnet20", "student": "resnet8", "recipe": {"lr": 0.01, "batch_size": 32}}],
        "methods": ["ce", {"name": "kd", "label": "kd", "recipe": {"lr": 0.2, "nesterov": True}}],
    }
    specs = expand(load_suite(write(tmp_path, data)))
    kd = [s.recipe for s in specs if s.label == "kd"]
    ce = [s.recipe for s in specs if s.label == "ce"]
    assert {(r.lr, r.batch_size, r.nesterov, r.epochs) for r in kd} == {(0.2, 32, True, 3)}
    assert {(r.lr, r.batch_size, r.nesterov) for r in ce} == {(0.01, 32, False)}
    plain = expand(load_suite(write(tmp_path, {**data, "methods": ["ce", "kd"]})))
    assert {s.hash for s in specs if s.label == "kd"}.isdisjoint(s.hash for s in plain if s.label == "kd")
    assert [s.hash for s in specs if s.label == "ce"] == [s.hash for s in plain if s.label == "ce"]
    assert [s for s in specs if s.label == "kd"][0].params()["recipe.lr"] == 0.2


@pytest.mark.parametrize(
    "recipe, message",
    [({"lr": -1}, r"methods\[1\].recipe.lr: must be > 0"), ({"speed": 2}, r"methods\[1\].recipe: unknown key 'speed'"),
     ([1], r"methods\[1\].recipe: expected a mapping"), ({"milestones": [5]}, r"methods\[1\].recipe.milestones")],
)  # fmt: skip
def test_bad_method_recipes_name_the_field(tmp_path, recipe, message):
    data = {**GOOD, "methods": ["ce", {"name": "kd", "recipe": recipe}]}
    with pytest.raises(BenchError, match=message):
        load_suite(write(tmp_path, data))


def test_a_key_given_twice_is_refused_with_its_line(tmp_path):
    text = yaml.safe_dump(GOOD) + "seeds: [3]\n"
    with pytest.raises(BenchError, match=r"line \d+ YAML syntax error: key 'seeds' appears twice"):
        load_suite(write(tmp_path, text))
