"""Any ``nn.Module`` as a staged model (``bench/models/generic.py``): stage outputs by module name through
``torch.fx``, the module's own state_dict keys, stage-by-stage execution where the graph is a chain (one-line
refusal where it is not), the feature methods on it, a suite's ``{module: ..., stages: [...]}`` entry (teacher
weights from ``checkpoint:``, sha256 recorded), and torchvision's resnet18 trained as a student with FitNet on the
ImageFolder fixture."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from bench import api, plugins
from bench.data import DatasetInfo
from bench.errors import BenchError
from bench.models import create_model
from bench.models.generic import ModelRef, declare, parse_ref, wrap_module
from bench.suites import expand, parse_suite
from methods import MethodContext, build_hparams, get_method
from tests.fixtures import write_image_folder
from tests.plugin_fixtures import isolated  # noqa: F401 (fixture)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "plugin"
RESNET18 = {"module": "torchvision.models:resnet18", "kwargs": {"num_classes": 10},
            "stages": ["layer1", "layer2", "layer3", "layer4"]}  # fmt: skip


class Skip(nn.Module):
    """Stage ``c`` adds the output of stage ``a``: a skip connection around the cut after ``b``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = (nn.Conv2d(i, 8, 3, padding=1) for i in (1, 8, 8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        a = self.a(x)
        return self.fc((self.c(self.b(a)) + a).mean((2, 3)))


def test_a_torchvision_resnet_keeps_its_keys_and_outputs_and_runs_stage_by_stage():
    torch.manual_seed(0)
    module = torchvision.models.resnet18(num_classes=10).eval()
    net = wrap_module(module, RESNET18["stages"]).eval()
    assert list(net.state_dict()) == list(module.state_dict())  # a bare resnet18 checkpoint loads as it is
    assert net.stage_channels == [64, 128, 256, 512] and net.feature_dim == 512 and net.num_classes == 10
    x = torch.randn(2, 3, 48, 48)
    feats = net.forward_features(x)
    assert torch.equal(feats.logits, module(x)) and feats.feature.shape == (2, 512)
    h = net.forward_stem(x)
    for i in range(4):
        h = net.forward_stage(i, h)
        assert torch.equal(h, feats.stages[i])
    feature, logits = net.forward_head(h)
    assert torch.equal(feature, feats.feature) and torch.equal(logits, feats.logits)
    other = torchvision.models.resnet18(num_classes=10).eval()
    net.load_state_dict(other.state_dict())
    assert torch.equal(net(x), other(x))  # the wrapper runs its own (loaded) parameters


def test_pre_activation_stage_outputs_are_the_final_relus_inputs():
    """A torchvision ResNet's stage ends in its last block's ReLU (one module called twice per block, in place):
    the pre-activation is that call's input, the last block's own bn2(conv2(.)) + shortcut, written out here."""
    torch.manual_seed(0)
    module = torchvision.models.resnet18(num_classes=10).eval()
    net = wrap_module(module, RESNET18["stages"]).eval()
    x = torch.randn(2, 3, 48, 48)
    feats = net.forward_features(x, preact=True)
    assert len(feats.preact_stages) == 4 and net.forward_features(x).preact_stages == []
    h = net.forward_stem(x)  # the identity: the stem is part of stage 0
    m = module.maxpool(module.relu(module.bn1(module.conv1(x))))  # layer1's input, for the hand-written blocks
    for i, layer in enumerate((module.layer1, module.layer2, module.layer3, module.layer4)):
        *first, last = layer
        inner = nn.Sequential(*first)(m) if first else m
        shortcut = last.downsample(inner) if last.downsample is not None else inner
        expected = last.bn2(last.conv2(last.relu(last.bn1(last.conv1(inner))))) + shortcut
        torch.testing.assert_close(feats.preact_stages[i], expected, rtol=0, atol=1e-5)
        assert torch.equal(torch.relu(feats.preact_stages[i]), feats.stages[i])
        out, pre = net.forward_stage_preact(i, h)
        assert torch.equal(out, feats.stages[i]) and torch.equal(pre, feats.preact_stages[i])
        assert torch.equal(net.activate(i, pre), out)
        h = m = out
    assert feats.preact_stages[0].min() < 0  # really before the ReLU


def test_a_stage_without_a_final_activation_is_its_own_pre_activation():
    net = wrap_module(Skip(), ["a", "b", "c"]).eval()
    feats = net.forward_features(torch.randn(2, 1, 8, 8), preact=True)
    assert all(p is s for p, s in zip(feats.preact_stages, feats.stages))


@pytest.mark.parametrize("name, stages, feature", [
    ("resnet18", ["layer1", "layer2", "layer3", "layer4"], None),
    ("vit_tiny_patch16_224", ["blocks.3", "blocks.7", "blocks.11"], "fc_norm"),  # token stages; extra forward args
])  # fmt: skip
def test_timm_models_trace_too(name, stages, feature):
    import timm

    module = timm.create_model(name, num_classes=10).eval()
    net = wrap_module(module, stages, feature).eval()
    x = torch.randn(1, 3, 224, 224)
    feats = net.forward_features(x)
    assert torch.allclose(feats.logits, module(x), atol=1e-5) and len(feats.stages) == len(stages)
    h = net.forward_stem(x)
    for i in range(len(stages)):
        h = net.forward_stage(i, h)
    assert torch.allclose(net.forward_head(h)[1], feats.logits, atol=1e-5)


def test_a_skip_across_a_stage_cut_refuses_stage_by_stage_in_one_line():
    net = wrap_module(Skip(), ["a", "b", "c"])
    assert len(net.forward_features(torch.randn(2, 1, 8, 8)).stages) == 3  # features still work
    with pytest.raises(BenchError, match=r"^model Skip cannot run stage by stage: node a crosses a stage boundary"):
        net.forward_stage(2, torch.randn(2, 8, 8, 8))
    context = MethodContext(DatasetInfo("digits", 10, 1, 8, (0.5,), (0.2,), "none"), 100, 3)
    method = get_method("stablekd")(wrap_module(Skip(), ["a", "b", "c"]), net, build_hparams("stablekd", {}, "s"), context)
    with pytest.raises(BenchError, match="cannot run stage by stage"):
        method.forward_train(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))


@pytest.mark.parametrize("name", ["kd", "fitnet", "at", "dist", "reviewkd", "srd", "stablekd", "dkd", "dml"])
def test_the_methods_train_a_wrapped_module_as_student(name, isolated):
    plugins.load([str(EXAMPLE / "tiny_cnn.py")])
    context = MethodContext(DatasetInfo("digits", 10, 1, 8, (0.5,), (0.2,), "none"), 100, 3)
    student, teacher = create_model("tinycnn", 10, 1), create_model("resnet8", 10, 1)
    method = get_method(name)(student, teacher, build_hparams(name, {}, name), context)
    method.on_epoch_start(0)
    logits, losses = method.forward_train(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
    sum(losses.values()).backward()
    assert logits.shape == (4, 10) and all(torch.isfinite(v) for v in losses.values())
    assert student.block1[0].weight.grad is not None


@pytest.mark.parametrize("raw, message", [
    ({**RESNET18, "module": "torchvision.models.resnet18"}, "expected 'package.module:attribute'"),
    ({**RESNET18, "module": "kdbench_nowhere:Net"}, "cannot import 'kdbench_nowhere' (ModuleNotFoundError"),
    ({**RESNET18, "module": "torchvision.models:resnet1800"}, "has no attribute 'resnet1800'"),
    ({**RESNET18, "stages": ["layer1", "layer9"]}, "stage1 'layer9' is not a module or node of it"),
    ({**RESNET18, "stages": ["layer1", "layer2", "layer3"], "feature": "layer4"},
     "feature node gives a (512, 2, 2) map at 64px; name the pooled node"),
    ({**RESNET18, "feature": "layer4"}, "stages, feature and the output must be distinct nodes"),
    ({**RESNET18, "kwargs": {}}, "gives 1000 logits but the dataset has 10 classes (set kwargs.num_classes)"),
    ({**RESNET18, "stages": ["layer2", "layer1"]}, "must come in forward order"),
    ({**RESNET18, "name": "resnet8"}, "model name 'resnet8' is taken by a built-in"),
])  # fmt: skip
def test_bad_model_entries_are_one_line(raw, message, isolated):
    with pytest.raises(BenchError) as err:
        name = declare(parse_ref(raw, "pairs[0].student"), "pairs[0].student")
        create_model(name, 10, 3)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_one_name_two_settings_is_an_error(isolated):
    declare(ModelRef("torchvision.models:resnet18", ["layer1"], name="r18"))
    with pytest.raises(BenchError, match="model name 'r18' is already declared"):
        declare(ModelRef("torchvision.models:resnet18", ["layer2"], name="r18"))


def test_a_wrapped_teacher_loads_its_checkpoint_and_records_its_sha256(tmp_path, isolated):
    from mlflow.tracking import MlflowClient

    plugins.load([str(EXAMPLE / "tiny_cnn.py")])
    from tiny_cnn import TinyCNN

    torch.manual_seed(0)
    weights = tmp_path / "suite" / "teacher.pt"
    weights.parent.mkdir()
    torch.save(TinyCNN(10, 1, 4).state_dict(), weights)
    suite = {
        "name": "wrapped-teacher", "dataset": "digits", "methods": ["kd"], "fractions": [0.2], "seeds": [0],
        "pairs": [{"teacher": {"module": "tiny_cnn:TinyCNN", "kwargs": {"width": 4}, "stages": ["block1", "block2"],
                               "checkpoint": str(weights)}, "student": "resnet8"}],
        "recipe": {"epochs": 1, "milestones": [], "batch_size": 128},
    }  # fmt: skip
    (spec,) = expand(parse_suite(suite))
    assert spec.teacher == "TinyCNN(width=4)" and spec.teacher_spec.checkpoint == str(weights)
    assert set(spec.code) == {"teacher"} and set(spec.teacher_spec.code) == {"model"}
    results = tmp_path / "results"
    runs = api.run_suite(suite, results_dir=results, progress=False, log=lambda *_: None)
    assert runs.status.tolist() == ["finished"]
    tags = MlflowClient(f"sqlite:///{results / 'mlflow.db'}").get_run(runs.run_id[0]).data.tags
    assert tags["teacher_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert tags["code.teacher"].startswith("TinyCNN(width=4) from plugin file")


def test_torchvision_resnet18_trains_as_a_student_with_fitnet_on_an_image_folder(tmp_path, isolated):
    write_image_folder(tmp_path / "data" / "imagewoof", num_classes=10, per_class=1, size=40)
    suite = {
        "name": "r18-fitnet", "dataset": "imagewoof", "methods": ["fitnet"], "fractions": [1.0], "seeds": [0],
        "pairs": [{"teacher": "tv:resnet18", "student": RESNET18}],
        "recipe": {"epochs": 1, "milestones": [], "batch_size": 5, "eval_batch_size": 5},
        "teacher": {"recipe": {"epochs": 1}},
    }  # fmt: skip
    runs = api.run_suite(suite, results_dir=tmp_path / "results", data_root=str(tmp_path / "data"), progress=False,
                         log=lambda *_: None)  # fmt: skip
    assert runs.student.tolist() == ["resnet18(num_classes=10)"] and runs.status.tolist() == ["finished"]
    assert runs.top1.between(0, 100).all() and runs.extra_params.iloc[0] > 0  # FitNet's regressor
