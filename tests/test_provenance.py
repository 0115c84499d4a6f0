"""Provenance on every run, read back through the MLflow client: our tags, MLflow's own system tags and note,
the experiment kind, the dataset inputs (digests of the chosen indices), the environment file and the git diff."""
import subprocess

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from bench.data import load_dataset, run_indices
from bench.provenance import KEYS, git_diff, indices_digest, run_note
from bench.suites import expand, load_suite
from bench.tracking import EXPERIMENT_KIND
from methods import get_method
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def tracked(tiny_suite_run):
    suite_path, results, _ = tiny_suite_run
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    return load_suite(suite_path), results, client, experiment, client.search_runs([experiment.experiment_id])


def test_the_experiment_opens_on_its_training_runs(tracked):
    _, _, _, experiment, runs = tracked
    assert experiment.tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1] == "custom_model_development"
    assert len(runs) == 6


def test_every_run_says_what_produced_it(tracked):
    _, results, client, _, runs = tracked
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(git_diff())
    for run in runs:
        tags = run.data.tags
        assert set(KEYS) <= set(tags), set(KEYS) - set(tags)
        assert tags["git_commit"] == head[:12] and tags["mlflow.source.git.commit"] == head
        assert tags["git_dirty"] == str(dirty).lower()
        assert tags["mlflow.source.name"] == "python -m bench run tiny" and tags["mlflow.source.type"] == "LOCAL"
        assert tags["command"].startswith("python -m bench run ") and "--executor local" in tags["command"]
        assert tags["world_size"] == "1" and tags["global_batch_size"] == "128"
        assert tags["device_name"] and int(tags["device_count"]) >= 1 and tags["torch_version"]
        assert tags["deterministic"] in ("true", "false") and "matmul" in tags["tf32"]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert any(p.startswith("git-diff-") for p in artifacts) == dirty
    environment = {run.data.tags["environment"] for run in runs}
    assert len(environment) == 1  # written once for the invocation, named by each run
    (path,) = environment
    text = open(path).read()
    assert path.startswith(str(results / "tiny" / "environment")) and "PyTorch version" in text
    assert "Installed distributions" in text and "mlflow==" in text


def test_the_note_is_the_spec_in_one_paragraph(tracked):
    suite, _, _, _, runs = tracked
    specs = {s.hash: s for s in expand(suite)}
    targets = load_dataset("digits").train.target_array()
    for run in runs:
        spec = specs[run.data.tags["spec_hash"]]
        note = run.data.tags["mlflow.note.content"]
        train, _ = run_indices(targets, spec.fraction, spec.seed, 0.0)
        assert note == run_note(spec, get_method(spec.method).teacher_mode, len(train))
        assert f"seed {spec.seed}" in note and f"({len(train)} images" in note and "\n" not in note
        assert ("frozen teacher resnet8" in note) == (spec.method == "kd")


def test_the_data_are_dataset_inputs_told_apart_by_the_digest_of_their_indices(tracked):
    _, _, _, _, runs = tracked
    splits = load_dataset("digits")
    targets = splits.train.target_array()
    digests = {}
    for run in runs:
        inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
        assert set(inputs) == {"train", "test"}
        assert inputs["train"].name == "digits train 0.5" and inputs["test"].name == "digits test"
        seed = int(run.data.params["seed"])
        train, _ = run_indices(targets, 0.5, seed, 0.0)
        assert inputs["train"].digest == indices_digest(train, targets)
        digests.setdefault(seed, set()).add(inputs["train"].digest)
    assert all(len(d) == 1 for d in digests.values())  # ce and kd with one seed: the same subset
    assert len(set().union(*digests.values())) == 3  # another seed: another subset, another digest
    test_targets = splits.test.target_array()
    assert inputs["test"].digest == indices_digest(np.arange(len(test_targets)), test_targets)
