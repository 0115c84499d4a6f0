"""Baseline methods of the CRD table: fitnet, at, dist, crd, reviewkd.

Golden values: each loss on fixed tensors against the published formula, re-computed here independently
(plain Python / numpy loops over the formula, not the implementation's tensor code). Adapters: what each
method optimises on tiny staged models (8×8 single-channel inputs, as the digits data), CRD's memory bank in
checkpoints and its exact continuation after a resume.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from bench.data import DatasetInfo
from bench.errors import BenchError
from bench.models import create_model
from methods import MethodContext, build_hparams, get_method
from methods.at import at_loss
from methods.crd import CRD, contrast_exp, crd_loss, nce_loss, sample_negatives
from methods.dist import dist_loss
from methods.fitnet import HintRegressor, fitnet_loss
from methods.reviewkd import reviewkd_loss

INFO = DatasetInfo("digits", 10, 1, 8, (0.5,), (0.25,), "none")


def context(num_train: int = 32, epochs: int = 2) -> MethodContext:
    return MethodContext(INFO, num_train, epochs)


def build(method: str, student: str = "resnet8", teacher: str = "resnet14", seed: int = 0, num_train: int = 32, **hp):
    torch.manual_seed(seed)
    s = create_model(student, INFO.num_classes, INFO.in_channels)
    t = create_model(teacher, INFO.num_classes, INFO.in_channels)
    return get_method(method)(s, t, build_hparams(method, hp, method), context(num_train))


def batch(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % INFO.num_classes


# ------------------------------------------------------------------------------------------------ fitnet
def test_fitnet_loss_is_the_mean_squared_hint_error():
    a = torch.tensor([[[[1.0, 2.0], [0.0, -1.0]]]])
    b = torch.tensor([[[[0.5, 2.0], [1.0, 1.0]]]])
    assert fitnet_loss(a, b).item() == pytest.approx((0.25 + 0 + 1 + 4) / 4)


@pytest.mark.parametrize(
    "s_shape,t_shape,kind",
    [((8, 8, 8), (16, 4, 4), torch.nn.Conv2d), ((8, 4, 4), (16, 8, 8), torch.nn.ConvTranspose2d),
     ((8, 5, 5), (16, 3, 3), torch.nn.Conv2d), ((8, 4, 4), (16, 4, 4), torch.nn.Conv2d)],
)  # fmt: skip
def test_hint_regressor_maps_the_student_shape_to_the_teacher_shape(s_shape, t_shape, kind):
    reg = HintRegressor(s_shape, t_shape)
    assert isinstance(reg.conv, kind)
    out = reg(torch.randn(2, *s_shape))
    assert out.shape == (2, *t_shape) and (out >= 0).all()  # conv -> BN -> ReLU


def test_hint_regressor_refuses_unsupported_sizes():
    with pytest.raises(BenchError, match="no regressor"):
        HintRegressor((8, 2, 2), (16, 8, 8))


def test_fitnet_optimises_ce_plus_100_times_the_hint_on_the_middle_stage():
    method = build("fitnet")
    assert (method.hp.hint_stage, method.hp.hint_weight, method.hp.ce_weight) == (1, 100.0, 1.0)
    x, y = batch()
    logits, losses = method.forward_train(x, y)
    s_feats, t_feats = method.student.forward_features(x), method.teacher.forward_features(x)
    expected = 100.0 * torch.mean((method.regressor(s_feats.stages[1]) - t_feats.stages[1]) ** 2)
    assert losses["hint"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses["ce"].item() == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-6)
    sum(losses.values()).backward()
    assert method.regressor.conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.teacher.parameters())


def test_fitnet_rejects_a_missing_hint_stage():
    with pytest.raises(BenchError, match="hint_stage 3"):
        build("fitnet", hint_stage=3)


# ------------------------------------------------------------------------------------------------ at
def _at_by_hand(f: np.ndarray) -> np.ndarray:
    """AT §3.1: Q = Σ_c |A_c|^2 per position (the 1/C of the channel mean cancels), then Q / ‖Q‖₂ per sample."""
    q = (np.abs(f) ** 2).sum(axis=1).reshape(f.shape[0], -1)
    return q / np.sqrt((q**2).sum(axis=1, keepdims=True))


def test_at_loss_matches_the_formula_including_spatial_pooling():
    rng = np.random.default_rng(0)
    s1, t1 = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 5, 4, 4))
    s2, t2 = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 4, 2, 2))  # student map pooled 4x4 -> 2x2
    s2_pooled = s2.reshape(2, 3, 2, 2, 2, 2).mean(axis=(3, 5))
    expected = ((_at_by_hand(s1) - _at_by_hand(t1)) ** 2).mean()
    expected += ((_at_by_hand(s2_pooled) - _at_by_hand(t2)) ** 2).mean()
    got = at_loss([torch.tensor(s1), torch.tensor(s2)], [torch.tensor(t1), torch.tensor(t2)], p=2.0)
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_at_uses_every_stage_with_weight_1000():
    method = build("at")
    x, y = batch()
    _, losses = method.forward_train(x, y)
    s, t = method.student.forward_features(x).stages, method.teacher.forward_features(x).stages
    assert len(s) == 3
    assert losses["at"].item() == pytest.approx(1000.0 * at_loss(s, t).item(), rel=1e-5)


def test_at_needs_equal_stage_counts():
    with pytest.raises(BenchError, match="stages"):
        build("at", student="vgg8", teacher="resnet14")


# ------------------------------------------------------------------------------------------------ dist
def _pearson(a: list[float], b: list[float]) -> float:
    """Pearson correlation with the official code's 1e-8 added to the product of the deviations' norms."""
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return cov / (math.sqrt(sum((x - ma) ** 2 for x in a)) * math.sqrt(sum((y - mb) ** 2 for y in b)) + 1e-8)


def test_dist_loss_matches_the_inter_and_intra_pearson_relations():
    zs = [[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 3.0, 1.0], [2.0, 2.5, -0.5, 0.0]]
    zt = [[2.0, 1.0, 0.0, -2.0], [1.0, 1.0, 4.0, 0.0], [0.5, 3.0, 1.0, -1.0]]
    tau, beta, gamma = 2.0, 2.0, 1.5

    def soft(row):
        e = [math.exp(v / tau) for v in row]
        return [v / sum(e) for v in e]

    ys, yt = [soft(r) for r in zs], [soft(r) for r in zt]
    inter = 1 - sum(_pearson(a, b) for a, b in zip(ys, yt)) / 3
    cols_s, cols_t = list(zip(*ys)), list(zip(*yt))
    intra = 1 - sum(_pearson(list(a), list(b)) for a, b in zip(cols_s, cols_t)) / 4
    expected = tau**2 * (beta * inter + gamma * intra)
    got = dist_loss(torch.tensor(zs, dtype=torch.float64), torch.tensor(zt, dtype=torch.float64), beta, gamma, tau)
    assert got.item() == pytest.approx(expected, rel=1e-7)


def test_dist_defaults_and_zero_loss_for_identical_predictions():
    hp = build_hparams("dist", {}, "dist")
    assert (hp.temperature, hp.beta, hp.gamma, hp.ce_weight) == (4.0, 2.0, 2.0, 1.0)
    z = 3 * torch.randn(6, 10, dtype=torch.float64)
    assert dist_loss(z, z.clone()).item() == pytest.approx(0.0, abs=1e-4)  # > 0 only by the 1e-8 in ρ
    assert dist_loss(z, z.flip(1)).item() > 1.0


# ------------------------------------------------------------------------------------------------ reviewkd
def test_reviewkd_loss_is_the_hierarchical_context_loss():
    rng = np.random.default_rng(1)
    fs4, ft4 = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 3, 4, 4))
    fs1, ft1 = rng.normal(size=(2, 5, 1, 1)), rng.normal(size=(2, 5, 1, 1))

    def pool(f, size):
        k = f.shape[-1] // size
        return f.reshape(*f.shape[:2], size, k, size, k).mean(axis=(3, 5))

    mse = lambda a, b: ((a - b) ** 2).mean()  # noqa: E731
    # 4x4 map: the pooled 4x4 level is skipped (4 >= 4); 2x2 with weight 1/2, 1x1 with 1/4; normalised by 1.75
    level4 = (mse(fs4, ft4) + 0.5 * mse(pool(fs4, 2), pool(ft4, 2)) + 0.25 * mse(pool(fs4, 1), pool(ft4, 1))) / 1.75
    level1 = mse(fs1, ft1)  # a 1x1 map has only the full-size term
    got = reviewkd_loss([torch.tensor(fs4), torch.tensor(fs1)], [torch.tensor(ft4), torch.tensor(ft1)])
    assert got.item() == pytest.approx(level4 + level1, rel=1e-9)


def test_reviewkd_fuses_every_level_to_the_teacher_shapes_and_warms_up():
    method = build("reviewkd", student="resnet8", teacher="wrn_16_2")
    x, y = batch()
    s, t = method.student.forward_features(x), method.teacher.forward_features(x, preact=True)
    levels_t = [*t.preact_stages, t.feature[:, :, None, None]]  # the teacher's pre-activations (official code)
    outputs = method.review([*s.stages, s.feature[:, :, None, None]], levels_t)
    assert [o.shape for o in outputs] == [f.shape for f in levels_t]
    assert method.abfs[-1].att_conv is None and all(a.att_conv is not None for a in method.abfs[:-1])
    method.on_epoch_start(0)
    first = method.forward_train(x, y)[1]["reviewkd"].item()
    method.on_epoch_start(19)
    full = method.forward_train(x, y)[1]["reviewkd"].item()
    assert first == pytest.approx(full / 20, rel=1e-4)  # mdistiller: min(epoch / 20, 1) with 1-based epochs
    assert full == pytest.approx(reviewkd_loss(outputs, levels_t).item(), rel=1e-4)


@pytest.mark.parametrize("teacher_preact,student_preact", [(True, False), (False, False), (True, True)])
def test_reviewkd_compares_the_chosen_feature_taps(teacher_preact, student_preact):
    """Default (CIFAR, official code): the teacher's pre-activations, the student's post-activation outputs; the
    ImageNet setting takes the student's pre-activations too. The HCL of the ABF outputs against the chosen
    teacher tensors is the loss, and it differs from the loss against the other teacher tensors."""
    method = build("reviewkd", student="resnet8", teacher="resnet14", warmup_epochs=0,
                   teacher_preact=teacher_preact, student_preact=student_preact)  # fmt: skip
    x, y = batch()
    with torch.no_grad():
        s = method.student.forward_features(x, preact=True)
        t = method.teacher.forward_features(x, preact=True)
        s_levels = [*(s.preact_stages if student_preact else s.stages), s.feature[:, :, None, None]]
        t_levels = {tap: [*stages, t.feature[:, :, None, None]] for tap, stages in
                    ((True, t.preact_stages), (False, t.stages))}  # fmt: skip
        got = method.forward_train(x, y)[1]["reviewkd"]
        outputs = method.review(s_levels, t_levels[teacher_preact])
    assert (t.preact_stages[0] < 0).any()  # the pre-activation targets are not clipped at 0
    assert got.item() == pytest.approx(reviewkd_loss(outputs, t_levels[teacher_preact]).item(), rel=1e-5)
    assert got.item() != pytest.approx(reviewkd_loss(outputs, t_levels[not teacher_preact]).item(), rel=1e-3)


def test_reviewkd_trains_on_a_batch_of_one():
    method = build("reviewkd")
    x, y = batch(1)
    before = method.abfs[-1].conv1[1].running_mean.clone()
    sum(method.forward_train(x, y)[1].values()).backward()  # BatchNorm of a 1x1 map needs more than one value
    assert torch.equal(method.abfs[-1].conv1[1].running_mean, before)  # running statistics used, not updated
    method.forward_train(*batch(2))
    assert not torch.equal(method.abfs[-1].conv1[1].running_mean, before)


# ------------------------------------------------------------------------------------------------ crd
def test_nce_loss_matches_the_formula():
    scores = [[0.5, 0.1, 0.02], [0.05, 0.2, 0.3]]
    n = 10  # noise P_n = 1/N, K = 2 negatives: K·P_n = 0.2
    total = 0.0
    for row in scores:
        total += math.log(row[0] / (row[0] + 0.2 + 1e-7))
        total += sum(math.log(0.2 / (v + 0.2 + 1e-7)) for v in row[1:])
    assert nce_loss(torch.tensor(scores, dtype=torch.float64), n).item() == pytest.approx(-total / 2, rel=1e-9)


def test_crd_loss_contrasts_each_embedding_with_the_other_networks_bank():
    rng = np.random.default_rng(2)
    e_s, e_t = rng.normal(size=(2, 4)), rng.normal(size=(2, 4))
    rows_t, rows_s = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 4))
    tau, z_s, z_t, n = 0.5, 3.0, 5.0, 10
    exp_s = np.exp(np.einsum("bkd,bd->bk", rows_t, e_s) / tau)
    exp_t = np.exp(np.einsum("bkd,bd->bk", rows_s, e_t) / tau)

    def nce(p):
        noise = (p.shape[1] - 1) / n
        return -(np.log(p[:, 0] / (p[:, 0] + noise + 1e-7)).sum() + np.log(noise / (p[:, 1:] + noise + 1e-7)).sum()) / 2

    got_s = contrast_exp(torch.tensor(rows_t), torch.tensor(e_s), tau)
    got_t = contrast_exp(torch.tensor(rows_s), torch.tensor(e_t), tau)
    assert np.allclose(got_s.numpy(), exp_s)
    got = crd_loss(got_s, got_t, z_s, z_t, n)
    assert got.item() == pytest.approx(nce(exp_s / z_s) + nce(exp_t / z_t), rel=1e-9)


def test_negatives_come_from_other_classes_without_replacement():
    labels = torch.tensor([0] * 5 + [1] * 30 + [2] * 15)
    counts = torch.bincount(labels)
    order, start = torch.argsort(labels, stable=True), counts.cumsum(0) - counts
    torch.manual_seed(0)
    neg = sample_negatives(labels, order, start, counts, 12)
    assert neg.shape == (50, 12)
    assert (labels[neg] != labels[:, None]).all()
    assert all(len(set(row.tolist())) == 12 for row in neg)
    # pools smaller than K = 40 (classes 1, 2): drawn with replacement, still other classes only
    neg = sample_negatives(labels, order, start, counts, 40)
    assert (labels[neg] != labels[:, None]).all() and neg.max() < 50
    # uniform over the pool, both without-replacement paths: class 0 (pool 45 >= 2K: re-drawn duplicates) and
    # class 1 (K <= pool 20 < 2K: random keys) draw each member of their pool about equally often
    for cls, members in ((0, slice(5, 50)), (1, [*range(5), *range(35, 50)])):
        draws = sample_negatives(torch.full((4000,), cls), order, start, counts, 12)
        assert all(len(set(row.tolist())) == 12 for row in draws[:200])
        freq = torch.bincount(draws.flatten(), minlength=50).float()
        assert freq.sum() == freq[members].sum() == 48000
        assert freq[members].min() > 0.85 * freq[members].mean() and freq[members].max() < 1.15 * freq[members].mean()


def _crd(seed: int, num_train: int = 16):
    method = build("crd", seed=seed, num_train=num_train, nce_k=6)
    method.set_train_targets(torch.arange(num_train) % INFO.num_classes)
    return method


def test_crd_defaults_bank_and_memory_update():
    hp = build_hparams("crd", {}, "crd")
    assert (hp.feat_dim, hp.nce_k, hp.nce_t, hp.nce_m, hp.ce_weight, hp.crd_weight, hp.kd_weight) == (
        128, 16384, 0.07, 0.5, 1.0, 0.8, 0.0)  # fmt: skip
    method = _crd(0)
    assert method.memory_s.shape == method.memory_t.shape == (16, 128)
    state = method.checkpoint_state()
    assert {"memory_s", "memory_t", "z"} <= set(state) and not any(k.startswith("teacher.") for k in state)
    assert "train_labels" not in state  # re-bound from the loader by fit, not checkpointed
    x, y = batch(4)
    index = torch.tensor([3, 7, 0, 12])
    y = index % INFO.num_classes
    before_s = method.memory_s[index].clone()
    _, losses = method.forward_train(x, y, index)
    assert set(losses) == {"ce", "crd"} and torch.isfinite(losses["crd"])
    assert (method.z > 0).all()
    with torch.no_grad():
        e_s = method.embed_s(method.student.forward_features(x).feature)
    expected = torch.nn.functional.normalize(0.5 * before_s + 0.5 * e_s, dim=1)
    assert torch.allclose(method.memory_s[index], expected, atol=1e-5)
    untouched = torch.tensor([i for i in range(16) if i not in index.tolist()])
    fresh = _crd(0)
    assert torch.equal(method.memory_s[untouched], fresh.memory_s[untouched])


def test_crd_needs_indices_and_labels():
    method = build("crd", num_train=16, nce_k=6)
    x, y = batch(4)
    with pytest.raises(BenchError, match="index"):
        method.forward_train(x, y)
    with pytest.raises(BenchError, match="set_train_targets"):
        method.forward_train(x, y, torch.arange(4))
    with pytest.raises(BenchError, match="training labels"):
        method.set_train_targets(torch.arange(5))


def test_crd_resumed_from_its_checkpoint_state_continues_exactly():
    """What the engine does on resume: method state (incl. the banks and Z), optimizer state and RNG state."""

    def steps(method, opt, indices):
        out = []
        for idx in indices:
            x, _ = batch(4, seed=int(idx[0]))
            _, losses = method.forward_train(x, idx % INFO.num_classes, idx)
            loss = sum(losses.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        return out

    plan = [torch.tensor(p) for p in ([0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [1, 5, 9, 13])]
    a = _crd(0)
    opt_a = torch.optim.SGD(a.trainable_parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(123)
    steps(a, opt_a, plan[:2])
    saved = copy.deepcopy((a.checkpoint_state(), opt_a.state_dict(), torch.get_rng_state()))  # as written to disk
    tail_a = steps(a, opt_a, plan[2:])

    b = _crd(7)  # different initial weights and banks: everything must come from the saved state
    b.teacher.load_state_dict(a.teacher.state_dict())  # the frozen teacher comes from its own file
    b.load_checkpoint_state(saved[0])
    opt_b = torch.optim.SGD(b.trainable_parameters(), lr=0.1, momentum=0.9)
    opt_b.load_state_dict(saved[1])
    torch.set_rng_state(saved[2])
    tail_b = steps(b, opt_b, plan[2:])
    assert tail_a == tail_b
    assert torch.equal(a.memory_s, b.memory_s) and torch.equal(a.memory_t, b.memory_t) and torch.equal(a.z, b.z)


def test_crd_plus_kd_adds_the_kd_term():
    method = build("crd", num_train=16, nce_k=6, kd_weight=1.0)
    method.set_train_targets(torch.arange(16) % INFO.num_classes)
    x, _ = batch(4)
    idx = torch.arange(4)
    assert set(method.forward_train(x, idx % INFO.num_classes, idx)[1]) == {"ce", "crd", "kd"}


def test_crd_fit_binds_the_training_set_through_the_engine(tmp_path):
    from bench.data import load_dataset
    from bench.engine import build_task
    from bench.recipe import Recipe

    splits = load_dataset("digits")
    recipe = Recipe(epochs=1, batch_size=64, milestones=[], eval_batch_size=512)
    task = build_task(splits, 0.2, 0, recipe, torch.device("cpu"), checkpoint_path=tmp_path / "c.pt", progress=False)
    if not hasattr(task.train_loader, "with_indices"):
        pytest.skip("bench.data loaders cannot yield sample indices yet (the change proposed in issue 8)")
    torch.manual_seed(0)
    s, t = create_model("resnet8", 10, 1), create_model("resnet14", 10, 1)
    hp = build_hparams("crd", {"nce_k": 64}, "crd")
    method = CRD(s, t, hp, MethodContext(splits.info, task.train_loader.num_samples, 1))
    history = method.fit(task, recipe)
    assert math.isfinite(history.epochs[-1]["train_loss_crd"])
    assert torch.equal(method.train_labels, task.train_loader.targets)
