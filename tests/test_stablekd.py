"""StableKD: the pure losses, the block schedule, gradient isolation between decomposed blocks, adapter shapes for
every pair of the shipped suites that run it, and short runs through the CLI (fixture CIFAR-100, digits)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from bench.data import DatasetInfo
from bench.errors import BenchError
from bench.models import create_model
from bench.suites import SUITES_DIR, load_suite
from methods import MethodContext, build_hparams, get_method
from methods.kd import kd_loss
from methods.stablekd import (
    Bridge,
    StableKD,
    block_feature_loss,
    default_schedule,
    head_block_loss,
    partition,
    partition_at,
    schedule_phases,
)

ROOT = Path(__file__).resolve().parent.parent
MY_SUITES = ["stablekd-fractions", "stablekd-cifar100", "stablekd-imagewoof"]
# Parameters of each block (K = 3 stages + head) by module name, for the two CIFAR families used below.
BLOCK_MODULES = {
    "resnet8": [("conv1", "bn1", "layer1"), ("layer2",), ("layer3",), ("fc",)],
    "wrn_16_1": [("conv1", "block1"), ("block2",), ("block3",), ("bn1", "fc")],
}


def make(teacher: str, student: str, hparams: dict | None = None, epochs: int = 6, shape=(1, 8, 8), classes=10):
    info = DatasetInfo("t", classes, shape[0], shape[1], (0.5,) * shape[0], (0.5,) * shape[0], "none")
    torch.manual_seed(0)
    t = create_model(teacher, classes, shape[0])
    s = create_model(student, classes, shape[0])
    hp = build_hparams("stablekd", hparams or {}, "test")
    return get_method("stablekd")(s, t, hp, MethodContext(info, 64, epochs, tuple(shape)))


def batch(shape=(1, 8, 8), n=4, classes=10):
    torch.manual_seed(1)
    return torch.randn(n, *shape), torch.randint(0, classes, (n,))


# ---- pure functions ------------------------------------------------------------------------------
def test_block_feature_loss_is_the_mean_over_elements_and_only_the_student_gets_gradients():
    s = torch.tensor([[[[1.0, 2.0]], [[0.0, -1.0]]]], requires_grad=True)  # (1, 2, 1, 2)
    t = torch.tensor([[[[0.0, 0.0]], [[1.0, 1.0]]]], requires_grad=True)
    assert block_feature_loss(s, t, "mse").item() == pytest.approx((1 + 4 + 1 + 4) / 4)
    assert block_feature_loss(s, t, "l1").item() == pytest.approx((1 + 2 + 1 + 2) / 4)
    block_feature_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    with pytest.raises(ValueError):
        block_feature_loss(s, t[:, :1])


def test_head_block_loss_is_weighted_ce_plus_kd():
    s, t, y = torch.randn(5, 7), torch.randn(5, 7), torch.randint(0, 7, (5,))
    out = head_block_loss(s, t, y, temperature=2.0, ce_weight=0.3, kd_weight=0.7)
    assert set(out) == {"ce", "kd"}
    assert out["ce"].item() == pytest.approx(0.3 * F.cross_entropy(s, y).item(), rel=1e-6)
    assert out["kd"].item() == pytest.approx(0.7 * kd_loss(s, t, 2.0).item(), rel=1e-6)


def test_partition_is_contiguous_balanced_with_larger_groups_next_to_the_head():
    assert partition(4, 4) == [range(0, 1), range(1, 2), range(2, 3), range(3, 4)]
    assert partition(4, 2) == [range(0, 2), range(2, 4)]
    assert partition(5, 3) == [range(0, 1), range(1, 3), range(3, 5)]
    assert partition(5, 2) == [range(0, 2), range(2, 5)]
    assert partition(5, 1) == [range(0, 5)]
    with pytest.raises(ValueError):
        partition(3, 4)


def test_default_schedule_is_k_then_half_then_one_spread_evenly():
    assert default_schedule(4) == [[0.0, 4.0], [1 / 3, 2.0], [2 / 3, 1.0]]
    assert default_schedule(5) == [[0.0, 5.0], [1 / 3, 3.0], [2 / 3, 1.0]]
    assert default_schedule(2) == [[0.0, 2.0], [0.5, 1.0]]
    phases = schedule_phases(None, 4, 240)
    assert [start for start, _ in phases] == [0, 80, 160]  # the CRD budget: 80 epochs per phase
    assert [len(groups) for _, groups in phases] == [4, 2, 1]
    assert [start for start, _ in schedule_phases(None, 5, 90)] == [0, 30, 60]


def test_short_budgets_end_with_the_last_phase_and_bad_schedules_are_rejected():
    assert partition_at(0, schedule_phases(None, 4, 1)) == [range(0, 4)]
    two = schedule_phases(None, 4, 2)
    assert [len(partition_at(e, two)) for e in (0, 1)] == [4, 1]
    with pytest.raises(BenchError, match="not a merge"):  # [0] [1 2] [3 4] -> [0 1] [2 3 4]
        schedule_phases([[0, 5], [0.3, 3], [0.6, 2]], 5, 30)
    with pytest.raises(BenchError, match="has 4"):
        schedule_phases([[0, 5]], 4, 30)
    with pytest.raises(BenchError, match="starts at epoch 31"):
        schedule_phases([[0, 4], [30, 1]], 4, 30, unit="epoch")
    for bad in ([[0.2, 4]], [[0, 2], [0.5, 4]], [[0, 4], [0, 2]], [[0, 2.5]], [[0, 4, 1]], []):
        with pytest.raises(BenchError):
            build_hparams("stablekd", {"schedule": bad}, "x")
    with pytest.raises(BenchError):
        build_hparams("stablekd", {"schedule": [[0, 4], [1.5, 1]], "schedule_unit": "epoch"}, "x")


def test_bridge_resizes_and_projects():
    down = Bridge((8, 16, 16), (4, 8, 8))
    up = Bridge((8, 4, 4), (6, 8, 8))
    same = Bridge((8, 4, 4), (3, 4, 4))
    x16, x4 = torch.randn(2, 8, 16, 16), torch.randn(2, 8, 4, 4)
    assert down(x16).shape == (2, 4, 8, 8) and up(x4).shape == (2, 6, 8, 8) and same(x4).shape == (2, 3, 4, 4)
    down.eval()  # pooling then conv = conv then pooling (both linear): the cheap order is exact
    ref = down.bn(F.avg_pool2d(down.conv(x16), 2))
    assert torch.allclose(down(x16), ref, atol=1e-5)


# ---- the method ----------------------------------------------------------------------------------
def test_schedule_changes_the_partition_and_the_losses_at_the_configured_epochs():
    m = make("resnet8", "resnet8", {"schedule": [[0, 4], [2, 2], [4, 1]], "schedule_unit": "epoch"}, epochs=6)
    x, y = batch()
    seen = []
    for epoch in range(6):
        m.on_epoch_start(epoch)
        _, losses = m.forward_train(x, y)
        seen.append((len(m.groups), sorted(losses)))
    four = (4, ["ce", "feat_b0", "feat_b1", "feat_b2", "kd"])
    two = (2, ["ce", "feat_b1", "kd"])
    one = (1, ["ce", "kd"])
    assert seen == [four, four, two, two, one, one]
    assert m.partition_at(3) == [range(0, 2), range(2, 4)]


def _block_grads(method: StableKD, name: str) -> list[bool]:
    """Per block: does any parameter of the student's block have a non-zero gradient?"""
    out = []
    for modules in BLOCK_MODULES[name]:
        params = [p for mod in modules for p in getattr(method.student, mod).parameters()]
        out.append(any(p.grad is not None and p.grad.abs().sum() > 0 for p in params))
    return out


@pytest.mark.parametrize(
    "teacher,student,bridge",
    [("resnet20", "resnet8", "shared"), ("wrn_16_2", "wrn_16_1", "shared"), ("wrn_16_2", "wrn_16_1", "separate")],
)
def test_no_gradient_crosses_blocks_when_decomposed_and_it_flows_end_to_end_when_recomposed(teacher, student, bridge):
    m = make(teacher, student, {"bridge": bridge})
    x, y = batch()
    m.train()
    m.on_epoch_start(0)
    _, losses = m.forward_train(x, y)
    block_of = {"feat_b0": 0, "feat_b1": 1, "feat_b2": 2, "kd": 3, "ce": 3}
    assert set(losses) == set(block_of)
    for name, loss in losses.items():
        m.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        k = block_of[name]
        assert _block_grads(m, student) == [j == k for j in range(4)], name
        assert all(p.grad is None for p in m.teacher.parameters())
        if student == "wrn_16_1":  # widths differ: bridges learn from the block they feed, not from a target
            grads = {key: a.conv.weight.grad is not None for key, a in m.input_adapters.items()}
            assert grads == {str(j): j == k - 1 for j in range(3)}, name
            if bridge == "separate" and name.startswith("feat"):
                assert m.output_adapters[str(k)].conv.weight.grad.abs().sum() > 0
    m.on_epoch_start(5)  # last third: one block
    assert m.groups == [range(0, 4)]
    m.zero_grad(set_to_none=True)
    _, losses = m.forward_train(x, y)
    losses["kd"].backward()
    assert _block_grads(m, student) == [True] * 4


def test_shared_bridge_target_is_what_the_next_block_is_fed():
    m = make("wrn_16_2", "wrn_16_1")
    assert len(m.output_adapters) == 0 and sorted(m.input_adapters) == ["0", "1", "2"]
    x, y = batch()
    m.train()
    _, losses = m.forward_train(x, y)
    with torch.no_grad():
        fed0 = m.input_adapters["0"](m.teacher.forward_features(x).stages[0])
        out0 = m.student.forward_stage(0, m.student.forward_stem(x))
    assert losses["feat_b0"].item() == pytest.approx(F.mse_loss(out0, fed0).item(), rel=1e-5)


def test_decomposed_blocks_read_the_teacher_activations():
    """Student = teacher copy with a broken stem: only block 0 sees it while decomposed, all see it end to end."""
    m = make("resnet8", "resnet8")
    m.student.load_state_dict(m.teacher.state_dict())
    with torch.no_grad():
        m.student.conv1.weight.mul_(-3.0)
    m.eval()  # running BN statistics on both sides: an exact copy reproduces the teacher exactly
    x, y = batch()
    m.on_epoch_start(0)
    _, losses = m.forward_train(x, y)
    assert losses["feat_b0"].item() > 1e-3
    for name in ("feat_b1", "feat_b2", "kd"):
        assert losses[name].item() == pytest.approx(0.0, abs=1e-6), name
    m.on_epoch_start(5)
    _, losses = m.forward_train(x, y)
    assert losses["kd"].item() > 1e-3


def test_bridges_only_where_shapes_differ_and_counted_as_extra_parameters():
    same = make("resnet20", "resnet8")
    assert same.extra_parameters() == 0
    assert len(same.output_adapters) == 0
    assert all(isinstance(a, torch.nn.Identity) for a in same.input_adapters.values())
    forced = make("resnet20", "resnet8", {"always_adapt": True})
    assert forced.extra_parameters() > 0 and isinstance(forced.input_adapters["0"], Bridge)
    # a schedule whose only cut is between blocks 1 and 2 needs bridges there only
    short = make("wrn_16_2", "wrn_16_1", {"schedule": [[0, 2], [0.5, 1]]})
    assert sorted(short.input_adapters) == ["1"] and len(short.output_adapters) == 0
    assert short.extra_parameters() == (64 * 32) + 2 * 32  # 1x1 conv 64 -> 32 channels + BN affine
    separate = make("wrn_16_2", "wrn_16_1", {"schedule": [[0, 2], [0.5, 1]], "bridge": "separate"})
    assert sorted(separate.output_adapters) == ["1"]
    assert separate.extra_parameters() == 2 * (64 * 32) + 2 * 32 + 2 * 64


def _fit_blocks(teacher: str, student: str, hparams: dict, steps: int = 60) -> dict[str, float]:
    """Decomposed phase, one fixed batch, random nets: Adam on the student only (each block by its own loss,
    the bridges fixed so that every target stays put); each block's feature loss as a fraction of its start."""
    m = make(teacher, student, hparams, epochs=3, shape=(3, 8, 8), classes=100)
    x, y = batch((3, 8, 8), n=4, classes=100)
    m.train()
    m.on_epoch_start(0)
    with torch.no_grad():
        cached = m.teacher.forward_features(x, preact=m.hp.teacher_feature == "preact")
    m.teacher_features = lambda _x, preact=False: cached  # the frozen teacher's pass, once
    optimizer = torch.optim.Adam(m.student.parameters(), lr=1e-2)
    first: dict[str, float] = {}
    for _ in range(steps + 1):
        feats = {k: v for k, v in m.forward_train(x, y)[1].items() if k.startswith("feat")}
        first = first or {k: v.item() for k, v in feats.items()}
        optimizer.zero_grad()
        sum(feats.values()).backward()
        optimizer.step()
    return {k: feats[k].item() / first[k] for k in first}


@pytest.mark.parametrize("teacher,student", [("resnet50", "vgg8"), ("resnet32x4", "shufflev1")])
def test_every_block_target_is_reachable(teacher, student):
    """Where a bridge (1x1 conv + BN: half its output negative) meets a post-ReLU student stage, the default
    compares the student's pre-activation: every block's feature loss falls below 5 % of its start."""
    ratios = _fit_blocks(teacher, student, {})
    assert len(ratios) == 4 if student == "vgg8" else 3
    assert all(r < 0.05 for r in ratios.values()), ratios


def test_post_relu_output_cannot_reach_a_bridged_target():
    """The earlier reading (``student_feature: output``) stalls near the target's negative energy."""
    ratios = _fit_blocks("resnet50", "vgg8", {"student_feature": "output"})
    assert all(r > 0.2 for r in ratios.values()), ratios


def test_preact_reading_feeds_the_next_block_the_students_activation_of_the_bridged_target():
    m = make("resnet50", "vgg8", epochs=3, shape=(3, 8, 8), classes=100)
    assert m.preact_cuts == {0, 1, 2, 3}  # every cut is bridged (widths differ)
    same = make("resnet20", "resnet8")  # identity bridges: the target is the teacher's own post-ReLU output
    assert same.preact_cuts == set()
    wrn = make("wrn_16_2", "wrn_16_1")  # WRN stage outputs are raw (signed): compared as they are
    assert wrn.preact_cuts == set()
    assert make("resnet20", "resnet8", {"teacher_feature": "preact"}).preact_cuts == {0, 1, 2}
    x, y = batch((3, 8, 8), n=4, classes=100)
    m.train()
    m.on_epoch_start(0)
    _, losses = m.forward_train(x, y)
    with torch.no_grad():
        bridged0 = m.input_adapters["0"](m.teacher.forward_features(x).stages[0])
        bridged1 = m.input_adapters["1"](m.teacher.forward_features(x).stages[1])
        _, pre0 = m.student.forward_stage_preact(0, m.student.forward_stem(x))
        _, pre1 = m.student.forward_stage_preact(1, F.relu(bridged0))  # block 1 reads ReLU(bridged target 0)
    assert (bridged0 < 0).any()
    assert losses["feat_b0"].item() == pytest.approx(F.mse_loss(pre0, bridged0).item(), rel=1e-5)
    assert losses["feat_b1"].item() == pytest.approx(F.mse_loss(pre1, bridged1).item(), rel=1e-5)


def test_pairs_with_different_stage_counts_are_rejected():
    with pytest.raises(BenchError, match="stages"):
        make("vgg8", "resnet8", shape=(3, 32, 32), classes=100)


# ---- the shipped suites --------------------------------------------------------------------------
INPUT_SHAPES = {"cifar100": (3, 32, 32), "cifar10": (3, 32, 32), "digits": (1, 8, 8), "imagewoof": (3, 64, 64)}


def _lists_stablekd(path: Path) -> bool:
    methods = (yaml.safe_load(path.read_text()) or {}).get("methods") or []
    names = [m if isinstance(m, str) else m.get("name", next(iter(m))) for m in methods if isinstance(m, (str, dict))]
    return "stablekd" in names


def _stablekd_pairs() -> list[tuple[str, str, str]]:
    """(dataset, teacher, student) of every suite under suites/ that lists stablekd (YAML files that do not,
    such as the teacher manifest, are not parsed as suites)."""
    out = []
    for path in sorted(SUITES_DIR.glob("*.yaml")):
        if _lists_stablekd(path):
            suite = load_suite(path)
            out += [(suite.dataset, p.teacher, p.student) for p in suite.pairs]
    return sorted(set(out))


def test_my_suites_run_stablekd():
    pairs = _stablekd_pairs()
    for name in MY_SUITES:
        suite = load_suite(name)
        assert {m.name for m in suite.methods} == {"ce", "kd", "stablekd"}
        assert {(suite.dataset, p.teacher, p.student) for p in suite.pairs} <= set(pairs)
    assert ("imagewoof", "tv:resnet34", "tv:resnet18") in pairs
    assert load_suite("stablekd-fractions").fractions == [0.1, 0.2, 0.4, 1.0]


@pytest.mark.parametrize("dataset,teacher,student", _stablekd_pairs())
def test_adapter_shapes_for_every_shipped_pair(dataset, teacher, student):
    """Every bridge maps the teacher's stage shape to the student's (inputs) and back (targets), and one
    training step of every phase runs (imagewoof's 224 pixels are checked at 64)."""
    shape = INPUT_SHAPES[dataset]
    m = make(teacher, student, epochs=3, shape=shape, classes=10)
    t_shapes, s_shapes = m.teacher.stage_shapes(shape), m.student.stage_shapes(shape)
    for key, adapter in m.input_adapters.items():
        i = int(key)
        assert adapter(torch.zeros(2, *t_shapes[i])).shape[1:] == s_shapes[i]
    assert sorted(map(int, m.input_adapters)) == list(range(m.num_stages))  # default schedule uses them all
    hp = build_hparams("stablekd", {"bridge": "separate"}, "test")
    separate = get_method("stablekd")(m.student, m.teacher, hp, m.context)
    for key, adapter in separate.output_adapters.items():
        i = int(key)
        assert adapter(torch.zeros(2, *s_shapes[i])).shape[1:] == t_shapes[i]
    assert sorted(map(int, separate.output_adapters)) == list(range(m.num_stages))
    x, y = batch(shape, n=2)
    m.train()
    for epoch in range(3):
        m.on_epoch_start(epoch)
        logits, losses = m.forward_train(x, y)
        assert logits.shape == (2, 10) and all(torch.isfinite(v) for v in losses.values())


def bench(*args):
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_bench_validate_accepts_my_suites(capsys):
    from bench.__main__ import main

    assert main(["validate", *[str(SUITES_DIR / f"{n}.yaml") for n in MY_SUITES]]) == 0
    assert capsys.readouterr().out.count("ok:") == 3


def _tiny_suite(dataset: str, teacher: str, student: str, batch_size: int) -> dict:
    return {
        "name": f"stablekd-smoke-{dataset}",
        "dataset": dataset,
        "pairs": [{"teacher": teacher, "student": student}],
        "methods": [{"stablekd": {"schedule": [[0, 4], [1, 1]], "schedule_unit": "epoch"}}],
        "fractions": [1.0],
        "seeds": [0],
        "recipe": {"epochs": 2, "milestones": [1], "batch_size": batch_size},
        "teacher": {"recipe": {"epochs": 1, "milestones": []}},
        "target_top1": 1,
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "dataset,teacher,student,batch_size", [("cifar100", "resnet8", "resnet8", 8), ("digits", "resnet20", "resnet8", 64)]
)
def test_stablekd_runs_through_the_cli(tmp_path, dataset, teacher, student, batch_size):
    """Two epochs (decomposed, then end to end) through ``python -m bench run``, tracked in MLflow."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    args = []
    if dataset == "cifar100":
        from tests.fixtures import write_cifar

        args = ["--data-root", str(write_cifar(tmp_path / "data", num_classes=100, train_per_class=1))]
    suite = tmp_path / "tiny.yaml"
    suite.write_text(yaml.safe_dump(_tiny_suite(dataset, teacher, student, batch_size)))
    results = tmp_path / "results"
    proc = bench("run", str(suite), "--results", str(results), "--no-progress", "--executor", "local", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    name = f"stablekd-smoke-{dataset}"
    runs = pd.read_csv(results / name / "runs.csv")
    assert len(runs) == 1 and runs.status.iloc[0] == "finished" and 0 <= runs.top1.iloc[0] <= 100
    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    run_id = run.info.run_id
    steps = lambda key: sorted(m.step for m in client.get_metric_history(run_id, key))  # noqa: E731
    assert steps("train_loss_feat_b0") == [1]  # decomposed in epoch 1 only
    assert steps("train_loss_kd") == [1, 2] and steps("test_top1") == [1, 2]
