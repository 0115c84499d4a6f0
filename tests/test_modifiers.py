"""Logit standardization, the curriculum temperature and the DOT trainer, each against hand-computed values and
the official code's distinctive detail; composition by name and by suite entry, and the one-line refusals."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from bench.__main__ import main
from bench.recipe import Recipe
from bench.errors import BenchError
from bench.models import create_model
from bench.suites import parse_suite
from methods import MethodContext, build_hparams, get_method
from methods.kd import kd_loss
from methods.modifiers.ctkd import curriculum_temperature, reversal_strength, reverse_gradient
from methods.modifiers.dot import DOT, DOTHparams
from methods.modifiers.ls import standardize_logits

DIGITS_SHAPE = (1, 8, 8)


def composed(name: str, values: dict | None = None):
    from bench.data import DatasetInfo

    info = DatasetInfo(name="digits", num_classes=10, in_channels=1, image_size=8, mean=(0.0,), std=(1.0,),
                       default_augment="none")
    torch.manual_seed(0)
    teacher, student = create_model("resnet8", 10, 1), create_model("resnet8", 10, 1)
    return get_method(name)(student, teacher, build_hparams(name, values or {}, name), MethodContext(info, 64, 30))


# ---- logit standardization -----------------------------------------------------------------------
def test_standardize_logits_is_the_per_sample_z_score_with_the_unbiased_std_and_eps_outside_the_root():
    z = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 1.0, 1.0]])
    std0, std1 = math.sqrt((4 + 1 + 0 + 9) / 3), math.sqrt(4 * 0.25 / 3)  # divisor C - 1, as Tensor.std
    expected = torch.tensor([[-2 / std0, -1 / std0, 0.0, 3 / std0], [-0.5 / std1, -0.5 / std1, 0.5 / std1, 0.5 / std1]])
    assert torch.allclose(standardize_logits(z, eps=0.0), expected, atol=1e-6)
    assert torch.allclose(standardize_logits(z, eps=1.0)[0], torch.tensor([-2.0, -1.0, 0.0, 3.0]) / (1 + std0))
    population = (z - z.mean(1, keepdim=True)) / z.std(1, unbiased=False, keepdim=True)
    assert not torch.allclose(standardize_logits(z), population, atol=1e-3)  # the official std is the unbiased one
    assert torch.allclose(standardize_logits(z + 7.0, eps=0.0), expected, atol=1e-5)  # shift-invariant
    assert torch.allclose(standardize_logits(3.0 * z, eps=0.0), expected, atol=1e-5)  # scale-invariant


def test_kd_with_ls_distils_standardized_logits_and_keeps_ce_on_the_raw_ones():
    method = composed("kd+ls", {"temperature": 2.0, "ce_weight": 1.0, "kd_weight": 9.0}).train()
    x, y = torch.randn(6, *DIGITS_SHAPE), torch.arange(6) % 10
    torch.manual_seed(1)
    logits, losses = method.forward_train(x, y)
    teacher_logits = method.teacher_features(x).logits
    assert torch.allclose(losses["ce"], F.cross_entropy(logits, y))
    expected = 9.0 * kd_loss(standardize_logits(logits), standardize_logits(teacher_logits), 2.0)
    assert torch.allclose(losses["kd"], expected)


# ---- curriculum temperature ----------------------------------------------------------------------
def official_cosine_decay(i: int, max_value: float = 0.0, min_value: float = -1.0, loops: int = 10) -> float:
    """CTKD's train_student.py CosineDecay.get_value (1-based epoch i), written out for the comparison."""
    i = min(max(i, 0), loops)
    return (math.cos(i * math.pi / loops) + 1.0) * 0.5 * (max_value - min_value) + min_value


def test_ctkd_curriculum_is_the_official_cosine_schedule_with_its_sign_flipped():
    assert reversal_strength(0, 10) == pytest.approx((1 - math.cos(math.pi / 10)) / 2)  # ≈ 0.024, not 0
    assert reversal_strength(9, 10) == pytest.approx(1.0) and reversal_strength(50, 10) == pytest.approx(1.0)
    for epoch in range(15):  # our λ is the official (negative) decay value's magnitude; epochs are 0-based here
        assert reversal_strength(epoch, 10) == pytest.approx(-official_cosine_decay(epoch + 1))
        assert reversal_strength(epoch, 5, 0.5, 2.0) == pytest.approx(-official_cosine_decay(epoch + 1, -0.5, -2.0, 5))
    values = [reversal_strength(e, 10) for e in range(10)]
    assert values == sorted(values)  # easy to hard: the reversal only grows


def test_gradient_reversal_is_identity_forward_and_scales_the_gradient_by_minus_lambda():
    x = torch.tensor(1.5, requires_grad=True)
    y = reverse_gradient(x, 0.3)
    assert y.item() == 1.5
    (2.0 * y).backward()
    assert x.grad.item() == pytest.approx(-0.6)


def test_the_learned_temperature_ascends_the_distillation_loss():
    s, t = torch.randn(8, 10, dtype=torch.float64), torch.randn(8, 10, dtype=torch.float64) * 3
    theta = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    temperature = curriculum_temperature(theta, 0.7, 1.0, 20.0)
    assert temperature.item() == pytest.approx(1.0 + 20.0 / (1.0 + math.exp(-0.2)))
    kd_loss(s, t, temperature).backward()
    h = 1e-3  # the plain derivative of the loss in θ, by central differences
    plain = [kd_loss(s, t, 1.0 + 20.0 * torch.sigmoid(torch.tensor(0.2 + d, dtype=torch.float64))).item()
             for d in (h, -h)]
    derivative = (plain[0] - plain[1]) / (2 * h)
    assert theta.grad.item() == pytest.approx(-0.7 * derivative, rel=1e-5)  # SGD on θ then *raises* the loss


def test_ctkd_temperature_is_a_checkpointed_extra_parameter_and_replaces_the_methods_temperature():
    method = composed("kd+ctkd", {"temperature": 4.0})
    theta = method.logit_modifiers[0].theta
    assert method.extra_parameters() == 1
    assert any(p is theta for p in method.trainable_parameters())
    assert "logit_modifiers.0.theta" in method.checkpoint_state()
    assert method.describe()["ctkd_temperature"] == pytest.approx(1.0 + 20.0 / (1.0 + math.exp(-1.0)))  # ≈ 15.62
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    view = method.distill_logits(s, t, 4.0)
    assert view.student is s and view.teacher is t
    assert view.temperature.item() == pytest.approx(1.0 + 20.0 / (1.0 + math.exp(-1.0)))


def test_without_modifiers_distill_logits_returns_its_inputs():
    method = composed("kd")
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    view = method.distill_logits(s, t, 4.0)
    assert view.student is s and view.teacher is t and view.temperature == 4.0
    assert len(method.logit_modifiers) == 0 and method.extra_parameters() == 0


def test_modifiers_apply_in_order_and_commute_for_ls_and_ctkd():
    a, b = composed("dkd+ls+ctkd"), composed("dkd+ctkd+ls")
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    va, vb = a.distill_logits(s, t, 4.0), b.distill_logits(s, t, 4.0)
    assert torch.equal(va.student, vb.student) and torch.equal(va.temperature, vb.temperature)


# ---- DOT -------------------------------------------------------------------------------------------
def reference_dot(params: dict[str, torch.Tensor], grads: list[tuple[dict, dict]], lr, mu, delta, wd):
    """The official update rule written out per parameter: grads[k] = (task grads, distillation grads)."""
    m_task, m_kd, m_mean = mu - delta, mu + delta, mu
    p = {k: v.clone() for k, v in params.items()}
    task_buf, kd_buf = {}, {}
    for task, kd in grads:
        for k, g in task.items():
            d = g + wd * p[k]
            task_buf[k] = d.clone() if k not in task_buf else (m_task if k in kd else m_mean) * task_buf[k] + d
            p[k] = p[k] - lr * task_buf[k]
        for k, g in kd.items():
            if k not in kd_buf:
                kd_buf[k] = g.clone()  # first step: no weight decay, whatever the parameter
            elif k in task:
                kd_buf[k] = m_kd * kd_buf[k] + g
            else:
                kd_buf[k] = m_mean * kd_buf[k] + g + wd * p[k]
            p[k] = p[k] - lr * kd_buf[k]
    return p


def test_dot_keeps_two_momentum_buffers_and_follows_the_official_update():
    torch.manual_seed(0)
    w, u, v = (torch.randn(3, requires_grad=True) for _ in range(3))  # w: both losses; u: distillation only; v: task only
    start = {"w": w.detach().clone(), "u": u.detach().clone(), "v": v.detach().clone()}
    recipe = Recipe(lr=0.1, momentum=0.9, weight_decay=0.01, epochs=5, milestones=[4])
    trainer = DOT.build([w, u, v], recipe, DOTHparams(delta=0.075))
    x = [torch.randn(3) for _ in range(3)]
    grads = []
    for xi in x:
        ce = ((w * xi).sum() - 1.0) ** 2 + (v * xi).sum() ** 2
        kd = ((w - xi) ** 2).sum() + ((u * xi).sum() + 2.0) ** 2
        task_g = dict(zip("wv", torch.autograd.grad(ce, [w, v], retain_graph=True)))
        kd_g = dict(zip("wu", torch.autograd.grad(kd, [w, u], retain_graph=True)))
        grads.append((task_g, kd_g))
        trainer.update({"ce": ce, "kd": kd}, ce + kd)
    expected = reference_dot(start, grads, 0.1, 0.9, 0.075, 0.01)
    for name, p in zip("wuv", (w, u, v)):
        assert torch.allclose(p.detach(), expected[name], atol=1e-6), name
    state = trainer.optimizer.state_dict()["state"]
    assert set(state[0]) == {"momentum_buffer", "momentum_kd_buffer"}  # w: both
    assert set(state[1]) == {"momentum_kd_buffer"} and set(state[2]) == {"momentum_buffer"}
    group = trainer.optimizer.param_groups[0]
    assert (group["momentum"], group["momentum_kd"]) == pytest.approx((0.825, 0.975))


def test_dot_with_zero_delta_is_sgd_with_momentum_where_every_parameter_gets_both_gradients():
    torch.manual_seed(0)
    a = torch.randn(4, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    recipe = Recipe(lr=0.05, momentum=0.9, weight_decay=5e-4, epochs=5, milestones=[4])
    trainer = DOT.build([a], recipe, DOTHparams(delta=0.0))
    sgd = torch.optim.SGD([b], lr=0.05, momentum=0.9, weight_decay=5e-4)
    for _ in range(4):
        xi = torch.randn(4)
        losses = {"ce": ((a * xi).sum() - 1) ** 2, "kd": ((a - xi) ** 2).sum()}
        trainer.update(losses, sum(losses.values()))
        sgd.zero_grad()
        (((b * xi).sum() - 1) ** 2 + ((b - xi) ** 2).sum()).backward()
        sgd.step()
    assert torch.allclose(a, b, atol=1e-6)


def test_dot_needs_a_task_and_a_distillation_loss_and_refuses_nesterov_and_clipping():
    w = torch.randn(2, requires_grad=True)
    trainer = DOT.build([w], Recipe(epochs=2, milestones=[1]), DOTHparams())
    with pytest.raises(BenchError, match="task loss 'ce'"):
        trainer.update({"kd": (w**2).sum()}, (w**2).sum())
    for recipe in (Recipe(nesterov=True), Recipe(grad_clip=5.0)):
        with pytest.raises(BenchError, match="Nesterov"):
            DOT.build([w], recipe, DOTHparams())


def test_a_method_trained_by_dot_uses_its_trainer():
    method = composed("kd+dot", {"dot": {"delta": 0.09}})
    trainer = method.make_trainer(method.trainable_parameters(), Recipe(momentum=0.9))
    assert trainer.optimizer.param_groups[0]["momentum_kd"] == pytest.approx(0.99)
    assert type(composed("kd").make_trainer(method.trainable_parameters(), Recipe())).__name__ == "SGDTrainer"


# ---- composition and refusal --------------------------------------------------------------------
def test_composed_names_hparams_and_refusals():
    cls = get_method("dkd+ls+ctkd+dot")
    assert issubclass(cls, get_method("dkd")) and cls.modifier_names == ("ls", "ctkd") and cls.trainer_name == "dot"
    assert get_method("kd+ls") is get_method("kd+ls")  # composed once
    hp = build_hparams("kd+ctkd", {"temperature": 2, "ctkd": {"curriculum_epochs": 5}}, "x")
    assert (hp.temperature, hp.ctkd.curriculum_epochs, hp.ctkd.min_temperature) == (2.0, 5, 1.0)
    for name, message in [
        ("fitnet+ls", "method 'fitnet' does not accept 'ls'"),
        ("dml+dot", "method 'dml' does not accept 'dot'"),
        ("mlkd+ctkd", "methods that do: dkd, kd, nkd"),
        ("wttm+ls", "does not accept 'ls'"),
        ("kd+dot+ls", "the trainer 'dot' comes last"),
        ("kd+ls+ls", "'ls' given twice"),
        ("kd+nope", "unknown modifier 'nope'"),
    ]:
        with pytest.raises(BenchError, match=message.replace("+", r"\+")):
            get_method(name)
    with pytest.raises(BenchError, match="ctkd.min_temperature: must be > 0"):
        build_hparams("kd+ctkd", {"ctkd": {"min_temperature": 0}}, "x")


PAIR = {"teacher": "resnet20", "student": "resnet8"}
SUITE = {
    "name": "t",
    "dataset": "digits",
    "pairs": [{"teacher": "resnet20", "student": "resnet8", "hparams": {"dkd+ls+ctkd": {"ctkd": {"init": 2.0}}}}],
    "methods": [
        {"kd": {"temperature": 2.0, "modifiers": ["ls"]}},
        {"dkd": {"modifiers": ["ls", {"ctkd": {"curriculum_epochs": 5}}]}},
        {"name": "kd", "label": "kd-dot", "hparams": {"temperature": 4.0}, "trainer": {"dot": {"delta": 0.09}}},
        {"kd": {"trainer": "dot"}},
    ],
    "fractions": [1.0],
    "seeds": [0],
    "recipe": {"epochs": 2, "milestones": [1]},
}


def test_suite_entries_compose_into_labels_hashes_and_mlflow_params():
    from bench.suites import expand

    specs = {s.label: s for s in expand(parse_suite(SUITE))}
    assert list(specs) == ["kd+ls", "dkd+ls+ctkd", "kd-dot", "kd+dot"]
    assert specs["kd-dot"].method == specs["kd+dot"].method == "kd+dot"
    assert specs["kd-dot"].hash != specs["kd+dot"].hash  # delta 0.09 vs 0.075
    ctkd = specs["dkd+ls+ctkd"]
    assert ctkd.hparams["ctkd"]["curriculum_epochs"] == 5 and ctkd.hparams["ctkd"]["init"] == 2.0  # merged per pair
    params = ctkd.params()
    assert params["modifiers"] == "ls,ctkd" and "trainer" not in params
    assert params["hp.ctkd.curriculum_epochs"] == 5 and params["hp.ls.eps"] == 1e-7
    assert specs["kd+dot"].params()["trainer"] == "dot"
    plain = expand(parse_suite({**SUITE, "methods": [{"kd": {"temperature": 2.0}}], "pairs": [PAIR]}))[0]
    assert plain.hash != specs["kd+ls"].hash and "modifiers" not in plain.params()


@pytest.mark.parametrize("entry,message", [
    ({"fitnet": {"modifiers": ["ls"]}}, "method 'fitnet' does not accept 'ls'"),
    ({"dml": {"trainer": "dot"}}, "method 'dml' does not accept 'dot'"),
    ({"kd": {"modifiers": ["dot"]}}, "modifiers: unknown modifier 'dot'"),
    ({"kd": {"trainer": "ls"}}, "trainer: unknown trainer 'ls'"),
    ({"kd": {"modifiers": "ls"}}, "modifiers: expected a list"),
    ({"kd": {"modifiers": [{"ctkd": {"nope": 1}}]}}, "unknown key 'nope'"),
])  # fmt: skip
def test_refused_or_malformed_modifiers_exit_2_at_validation_with_one_line(tmp_path, capsys, entry, message):
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({**SUITE, "methods": [entry], "pairs": [PAIR]}))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0


def test_a_recipe_the_trainer_cannot_follow_exits_2_at_validation(tmp_path, capsys):
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({**SUITE, "recipe": {"epochs": 2, "milestones": [1], "nesterov": True}}))
    assert main(["validate", str(path)]) == 2
    assert "kd-dot on resnet20→resnet8: the dot trainer has no Nesterov" in capsys.readouterr().err
