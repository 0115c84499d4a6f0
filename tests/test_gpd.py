"""``gpd``: exact Inverse Reparameterization on every supported family (integer and non-integer ratios), the
branch merge against an explicit multi-branch forward, hard parameter sharing (gradients of both losses
accumulate in the same weights), student extraction before and after training, the losses, EMA, the engine
integration and the shipped suites."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.data import DatasetInfo, load_dataset
from bench.engine import build_task, fit
from bench.recipe import Recipe
from bench.errors import BenchError
from bench.models import create_model
from bench.suites import expand, load_suite
from methods import MethodContext, build_hparams, get_method
from methods._gpd_layers import DynamicBranchConv2d, copy_counts
from methods._gpd_surgery import add_branches
from methods.gpd import extract_student, gpd_loss, inverse_reparameterize, soft_ce_loss, student_mode

DIGITS = DatasetInfo("digits", 10, 1, 8, (0.5,), (0.25,), "none")


def _randomise(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so that the BN rescaling is exercised."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)
    return model


def _max_diff(model_a, model_b, x) -> tuple[float, float]:
    """(max |Δ|, max |reference|) of two models (or callables) on ``x``."""
    with torch.no_grad():
        a, b = model_a(x), model_b(x)
    return (a - b).abs().max().item(), a.abs().max().item()


def _ir_check(student: nn.Module, ratio: float, shape: tuple[int, ...], dtype: torch.dtype) -> nn.Module:
    student = _randomise(student).to(dtype)
    dt = inverse_reparameterize(student, ratio, input_shape=shape)
    x = torch.randn(3, *shape, dtype=dtype)
    for train in (False, True):  # eval: running statistics; train: batch statistics
        student.train(train)
        dt.train(train)
        diff, scale = _max_diff(student, dt, x)
        if dtype == torch.float64:
            assert diff <= 1e-10, (ratio, train, diff)
        else:  # batch statistics of 3 samples (1×1 maps deep in the net) amplify float32 rounding
            assert diff <= (1e-3 if train else 1e-5) * scale, (ratio, train, diff, scale)
    return dt


# --------------------------------------------------------------------------------------------------
# Inverse Reparameterization
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [2, 1.5])
@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1"])
def test_ir_is_exact_in_float64(name, ratio):
    torch.manual_seed(0)
    _ir_check(create_model(name, 10, 1), ratio, (1, 8, 8), torch.float64)


@pytest.mark.parametrize("ratio", [2, 1.5])
def test_ir_is_exact_with_branches_in_float64(ratio):
    torch.manual_seed(0)
    _ir_check(add_branches(create_model("resnet8", 10, 1), "scratch"), ratio, (1, 8, 8), torch.float64)


@pytest.fixture(scope="module")
def big_students() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: create_model(name, 10, 1) for name in ("vgg8", "tv:resnet18", "mobilenetv1")}


@pytest.mark.parametrize("ratio", [2, 1.5])
@pytest.mark.parametrize("name", ["vgg8", "tv:resnet18", "mobilenetv1"])
def test_ir_is_exact_in_float32_on_vgg_torchvision_resnet_and_depthwise_mobilenet(big_students, name, ratio):
    shape = (1, 8, 8) if name == "vgg8" else (1, 32, 32)
    _ir_check(copy.deepcopy(big_students[name]), ratio, shape, torch.float32)


@pytest.mark.parametrize("ratio, wide", [(2, 32), (1.5, 24), (3, 48)])
def test_first_layer_and_classifier_keep_their_outer_widths(ratio, wide):
    dt = inverse_reparameterize(create_model("resnet8", 10, 1), ratio, input_shape=(1, 8, 8))
    assert tuple(dt.conv1.weight.shape) == (wide, 1, 3, 3)  # input side of the stem is not expanded
    assert tuple(dt.fc.weight.shape) == (10, 4 * wide)  # the logits keep their 10 classes
    assert dt.bn1.weight.shape == (wide,) and dt.stage_channels == [wide, 2 * wide, 4 * wide]


def test_partial_duplication_counts():
    assert copy_counts(4, 8).tolist() == [2, 2, 2, 2]
    assert copy_counts(4, 6).tolist() == [2, 2, 1, 1]  # channels 0, 1 are duplicated (the anysize layout)
    dt = inverse_reparameterize(create_model("resnet8", 10, 1), 1.5, input_shape=(1, 8, 8))
    w, s = dt.layer1[0].conv1.weight, dt.layer1[0].conv1.student_tensor("weight")
    assert torch.equal(w[16:24], w[:8]) and torch.allclose(s[:8], 2 * w[:8, :16]) and torch.equal(s[8:], w[8:16, :16])


def test_noise_breaks_exactness_only_when_asked():
    torch.manual_seed(0)
    student = create_model("resnet8", 10, 1).eval()
    noisy = inverse_reparameterize(student, 2, noise=1e-2, input_shape=(1, 8, 8)).eval()
    diff, _ = _max_diff(student, noisy, torch.randn(2, 1, 8, 8))
    assert diff > 1e-6


class _ConcatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 6, 3, padding=1)
        self.fc = nn.Linear(10, 3)

    def forward(self, x):
        return self.fc(torch.cat([self.a(x), self.b(x)], 1).mean((2, 3)))


def test_channel_concatenation_is_rejected():
    with pytest.raises(BenchError, match="does not reproduce"):
        inverse_reparameterize(_ConcatNet(), 2, input_shape=(1, 8, 8))


def test_unsupported_layers_are_rejected():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.LazyLinear(3))
    net(torch.zeros(1, 1, 8, 8))
    with pytest.raises(BenchError, match="GroupNorm"):
        inverse_reparameterize(net, 2, input_shape=(1, 8, 8))


# --------------------------------------------------------------------------------------------------
# Branches (CBR): the merged kernel equals the explicit multi-branch computation
# --------------------------------------------------------------------------------------------------
def _multi_branch(x: torch.Tensor, layer: DynamicBranchConv2d) -> torch.Tensor:
    """Each branch as its own chain of convolutions / pooling, as OREPA draws them, then the weighted sum."""
    t = {name: getattr(layer, name) for name in layer.roles}
    v, o = t["vector"], t["weight"].shape[0]
    i = x.shape[1]
    e = t["w_dw"].shape[1]
    if layer.depthwise:
        def ch(w):
            return w.view(1, -1, 1, 1)

        branches = [
            F.conv2d(x, t["weight"], padding=1, groups=i),
            F.avg_pool2d(x * ch(t["w_avg"]), 3, 1, 1, count_include_pad=True),
            F.conv2d(x * ch(t["w_prior"]), t["prior"][:, None], padding=1, groups=i),
            F.conv2d(x * ch(t["w_id"] + t["id"]), t["w_id_kxk"][:, None], padding=1, groups=i),
            F.conv2d(x, t["w_1x1"][:, None], padding=1, groups=i),
            F.conv2d(F.conv2d(x, t["w_dw"].reshape(i * e, 1, 3, 3), padding=1, groups=i),
                     t["w_pw"].reshape(o, e, 1, 1), groups=i),
        ]  # fmt: skip
    else:
        branches = [
            F.conv2d(x, t["weight"], padding=1),
            F.avg_pool2d(F.conv2d(x, t["w_avg"][:, :, None, None]), 3, 1, 1, count_include_pad=True),
            F.conv2d(F.conv2d(x, t["w_prior"][:, :, None, None]), t["prior"][:, None], padding=1, groups=o),
            F.conv2d(F.conv2d(x, (t["w_id"] + t["id"])[:, :, None, None]), t["w_id_kxk"], padding=1),
            F.conv2d(x, t["w_1x1"], padding=1),
            F.conv2d(F.conv2d(x, t["w_dw"].reshape(i * e, 1, 3, 3), padding=1, groups=i),
                     t["w_pw"].reshape(o, i * e, 1, 1)),
        ]  # fmt: skip
    out = sum(b * v[k].view(1, -1, 1, 1) for k, b in enumerate(branches))
    return out if layer.bias is None else out + layer.bias.view(1, -1, 1, 1)


@pytest.mark.parametrize("depthwise", [False, True])
def test_merged_kernel_equals_the_multi_branch_forward(depthwise):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=6 if depthwise else 1, bias=True).double()
    layer = DynamicBranchConv2d(conv, "scratch")
    with torch.no_grad():
        layer.vector.normal_()  # every branch contributes
        layer.w_id.normal_()
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        explicit, merged, deployed = _multi_branch(x, layer), layer(x), layer.export()(x)
    assert (explicit - merged).abs().max() < 1e-10
    assert (explicit - deployed).abs().max() < 1e-10
    assert type(layer.export()) is nn.Conv2d
    # widened (IR) the layer computes the same function, and its student slice is the original layer again
    wide = copy.deepcopy(layer)
    wide.widen({"in": 12, "out": 12} if depthwise else {"in": 9, "out": 12})
    with torch.no_grad():
        x_wide = x.repeat(1, 2, 1, 1)[:, : wide.widths["in"][1]]
        x_wide = x_wide / wide.count_in_wide.view(1, -1, 1, 1).double()
        dt_out = wide(x_wide) * wide.count_out_wide.view(1, -1, 1, 1).double()
        wide.mode.student = True
        student_out = wide(x)
    assert (dt_out[:, :6] - explicit).abs().max() < 1e-10
    assert (student_out - explicit).abs().max() < 1e-10


def test_single_init_keeps_the_trained_function():
    torch.manual_seed(0)
    student = _randomise(create_model("resnet8", 10, 1)).eval()
    branched = add_branches(student, "single").eval()
    # the 3x3 stride-1 convs of resnet8: the stem, both convs of layer1, the second conv of layer2 and layer3
    assert sum(isinstance(m, DynamicBranchConv2d) for m in branched.modules()) == 5
    diff, scale = _max_diff(student, branched, torch.randn(2, 1, 8, 8))
    assert diff <= 1e-5 * scale


# --------------------------------------------------------------------------------------------------
# The losses
# --------------------------------------------------------------------------------------------------
def test_soft_ce_by_hand():
    logits = torch.tensor([[0.0, math.log(2.0)]])  # q = [1/3, 2/3]
    p = torch.tensor([[0.25, 0.75]])
    nll = -(0.25 * math.log(1 / 3) + 0.75 * math.log(2 / 3))
    uniform = -(math.log(1 / 3) + math.log(2 / 3)) / 2
    assert soft_ce_loss(logits, p, 0.1).item() == pytest.approx(0.9 * nll + 0.1 * uniform, rel=1e-6)


def test_gpd_loss_terms():
    torch.manual_seed(0)
    z_dt, z_s = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    z_t = torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 3])
    from methods.dkd import dkd_loss

    full = gpd_loss(z_dt, z_s, y, z_t, kd_ratio=3.0, beta=2.0, temperature=1.0, dkd_weight=0.5)
    assert set(full) == {"dt_ce", "ce", "dt_dkd", "dkd", "gpd"}
    assert full["dkd"].item() == pytest.approx(0.5 * dkd_loss(z_s, z_t, y, 1.0, 2.0, 1.0).item(), rel=1e-6)
    assert full["gpd"].item() == pytest.approx(3 * soft_ce_loss(z_s, F.softmax(z_dt, 1)).item(), rel=1e-6)
    full["gpd"].backward(retain_graph=True)
    assert z_dt.grad is None and z_s.grad is not None  # the DT output is detached in the distillation term
    assert set(gpd_loss(z_dt, z_s, y)) == {"dt_ce", "ce", "gpd"}  # from scratch: no static teacher


# --------------------------------------------------------------------------------------------------
# The method: hard sharing, extraction, training
# --------------------------------------------------------------------------------------------------
def _method(name: str = "gpd", hparams: dict | None = None, student: str = "resnet8"):
    torch.manual_seed(0)
    s = create_model(student, 10, 1)
    t = create_model("resnet14", 10, 1) if name == "gpd" else None
    return get_method(name)(s, t, build_hparams(name, hparams or {}, name), MethodContext(DIGITS, 100, 3))


def _train_steps(method, steps: int = 3):
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.05, momentum=0.9)
    method.train()
    for _ in range(steps):
        x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
        _, losses = method.forward_train(x, y)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()


def _sliced(dt):
    def run(x):
        with student_mode(dt):
            return dt(x)

    return run


@pytest.mark.parametrize("branches", [False, True])
def test_extracted_student_is_the_slice_before_and_after_training(branches):
    method = _method(hparams={"branches": branches})
    torch.manual_seed(0)
    original = create_model("resnet8", 10, 1)  # the student the method received
    x = torch.randn(4, 1, 8, 8)
    method.eval()
    extracted = extract_student(method.dt).eval()
    assert _max_diff(_sliced(method.dt), extracted, x)[0] < 1e-5
    if not branches:  # without branches the student is unchanged by the method's set-up
        assert _max_diff(original.eval(), extracted, x)[0] < 1e-5
    before = {k: v.clone() for k, v in method.student.state_dict().items()}
    _train_steps(method)
    method.eval()
    loaded = create_model("resnet8", 10, 1)
    loaded.load_state_dict(method.student.state_dict())  # strict: the plain architecture's keys
    loaded.eval()
    for model in (extract_student(method.dt).eval(), method.student, loaded):
        diff, scale = _max_diff(_sliced(method.dt), model, x)
        assert diff <= 1e-5 * scale
    assert any(not torch.equal(v, before[k]) for k, v in method.student.state_dict().items())
    bn = method.student.layer1[0].bn1
    assert torch.equal(bn.running_mean, method.dt.layer1[0].bn1.student_running_mean)  # the student's own stats


@pytest.mark.parametrize("branches", [False, True])
def test_both_losses_accumulate_in_the_shared_weights(branches):
    method = _method(hparams={"branches": branches, "grad_clip": None}).train()  # clipping: tested below
    conv = method.dt.layer1[0].conv1
    weight = conv.weight  # the k×k branch (or the plain kernel): (32, 32, 3, 3) at ratio 2
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    _, losses = method.forward_train(x, y)
    dt_loss = losses["dt_ce"] + losses["dt_dkd"]
    student_loss = losses["ce"] + losses["dkd"] + losses["gpd"]
    (g_dt,) = torch.autograd.grad(dt_loss, weight, retain_graph=True)
    (g_s,) = torch.autograd.grad(student_loss, weight, retain_graph=True)
    sum(losses.values()).backward()
    torch.testing.assert_close(weight.grad, g_dt + g_s)
    assert g_s[:16, :16].abs().sum() > 0 and g_s[16:].abs().sum() == 0 and g_s[:, 16:].abs().sum() == 0
    assert g_dt[16:, 16:].abs().sum() > 0


def test_the_method_clips_the_global_gradient_norm():
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    grads = {}
    for clip in (None, 0.5):
        method = _method(hparams={"grad_clip": clip, "branches": False}).train()
        for _ in range(2):  # the clipper re-arms for every backward
            for p in method.dt.parameters():
                p.grad = None
            _, losses = method.forward_train(x, y)
            sum(losses.values()).backward()
        grads[clip] = [p.grad.clone() for p in method.dt.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads[None]]))
    assert norm > 0.5
    for raw, clipped in zip(grads[None], grads[0.5]):
        torch.testing.assert_close(clipped, raw * (0.5 / (norm + 1e-6)))


def test_engine_fit_clips_at_5_logs_the_dt_and_saves_a_plain_student(monkeypatch):
    norms = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, **kwargs):
        norms.append(max_norm)
        return clip(params, max_norm, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    splits = load_dataset("digits")
    recipe = Recipe(epochs=1, batch_size=64, milestones=[])  # no grad_clip in the recipe
    task = build_task(splits, 0.03, 0, recipe, torch.device("cpu"), progress=False)
    method = _method()
    history = fit(method, task, recipe)
    last = history.epochs[-1]
    assert norms and set(norms) == {5.0}
    assert {"test_top1", "dt_test_top1", "train_loss_gpd", "train_loss_dt_dkd"} <= set(last)
    assert math.isfinite(last["train_loss"])
    loaded = create_model("resnet8", 10, 1)
    loaded.load_state_dict(method.student.state_dict())
    assert method.describe()["student_params"] == sum(p.numel() for p in loaded.parameters())


def test_from_scratch_needs_no_teacher_and_checkpoints_round_trip():
    method = _method("gpd_scratch", {"branches": False})
    assert method.teacher is None
    _train_steps(method, 1)
    _, losses = method.forward_train(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
    assert set(losses) == {"dt_ce", "ce", "gpd"}
    state = method.checkpoint_state()
    assert "dt.conv1.weight" in state and "student.layer1.0.bn1.running_mean" in state
    other = _method("gpd_scratch", {"branches": False})
    other.load_checkpoint_state(state)
    method.eval()
    other.eval()
    assert _max_diff(method.student, other.student, torch.randn(3, 1, 8, 8))[0] == 0


def test_fine_tuning_starts_from_the_checkpoint(tmp_path):
    torch.manual_seed(1)
    pretrained = _randomise(create_model("resnet8", 10, 1))
    torch.save({"model": pretrained.state_dict()}, tmp_path / "student.pth")
    method = _method("gpd_scratch", {"init_checkpoint": str(tmp_path / "student.pth")}).eval()
    x = torch.randn(3, 1, 8, 8)
    diff, scale = _max_diff(pretrained.eval(), method.dt, x)  # single-init branches: the DT is the checkpoint
    assert diff <= 1e-5 * scale
    assert _max_diff(pretrained, method.student, x)[0] <= 1e-5 * scale
    with pytest.raises(BenchError, match="not found"):
        _method("gpd_scratch", {"init_checkpoint": str(tmp_path / "missing.pth")})


def test_ema_follows_every_optimizer_step():
    method = _method(hparams={"ema_decay": 0.5, "branches": False})
    ema0 = method.ema_dt.conv1.weight.detach().clone()
    _train_steps(method, 1)
    dt1 = method.dt.conv1.weight.detach().clone()
    models = method.eval_models()  # applies the pending EMA step
    assert set(models) == {"", "dt", "ema"}
    torch.testing.assert_close(method.ema_dt.conv1.weight, 0.5 * ema0 + 0.5 * dt1)
    method.eval_models()  # no second update without a step
    torch.testing.assert_close(method.ema_dt.conv1.weight, 0.5 * ema0 + 0.5 * dt1)
    with torch.no_grad():
        method.ema_student.eval()
        assert _max_diff(method.ema_student, extract_student(method.ema_dt).eval(), torch.randn(2, 1, 8, 8))[0] < 1e-5


@pytest.mark.parametrize("values, message", [({"ratio": 0.5}, "ratio"), ({"ema_decay": 1.0}, "ema_decay"),
                                             ({"grad_clip": 0}, "grad_clip"), ({"temperature": 0}, "temperature")])
def test_bad_hparams(values, message):
    with pytest.raises(BenchError, match=message):
        build_hparams("gpd", values, "gpd")


def test_shipped_gpd_suites_validate():
    for name in ("gpd-imagenet", "gpd-cifar100"):
        suite = load_suite(name)
        labels = {m.label for m in suite.methods}
        assert {"gpd", "dkd", "gpd_scratch"} <= labels
        for pair in suite.pairs:
            assert set(pair.reference) <= labels | {"teacher", "student"}, (name, pair.reference)
        specs = expand(suite)
        assert all(s.teacher_spec is None for s in specs if s.method == "gpd_scratch")
    imagenet = load_suite("gpd-imagenet")
    assert imagenet.pairs[1].reference["gpd"] == 73.63
    gpd = next(s for s in expand(imagenet) if s.method == "gpd" and s.student == "tv:resnet18")
    assert gpd.hparams["beta"] == 0.5 and gpd.hparams["temperature"] == 1.0 and gpd.hparams["ema_decay"] == 0.99996
