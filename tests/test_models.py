"""The model zoo: CRD-exact parameter counts and state_dict keys, the staged contract, tv:/timm: prefixes."""
from __future__ import annotations

import pytest
import torch

from bench.errors import BenchError
from bench.models import count_parameters, create_model, is_known_model, list_models

# Exact parameter counts at 100 classes. Checked against a line-by-line transcription of RepDistiller's
# models/{resnet,wrn,vgg,mobilenetv2,ShuffleNetv1,ShuffleNetv2,resnetv2}.py (same counts, same state_dict key
# lists in the same order, same logits and features after loading the same weights on 32x32 inputs).
CRD_PARAMS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "mobilenetv2": 812_836,
    "shufflev1": 949_258,
    "shufflev2": 1_355_528,
    "resnet50": 23_705_252,
}
ALIASES = {"MobileNetV2": "mobilenetv2", "mobile_half": "mobilenetv2", "ShuffleV1": "shufflev1",
           "ShuffleV2": "shufflev2", "ResNet50": "resnet50"}
SMALL_INPUT_FAMILIES = [n for n in CRD_PARAMS if n.startswith(("resnet", "wrn")) and n != "resnet50"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On a shared 2-core machine, OpenMP with 2 threads is ~50x slower than 1 thread for these tiny convs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _expected_stages(name: str) -> int:
    return 4 if name in ("resnet50", "mobilenetv2") or name.startswith("vgg") else 3


def check_staged(model, x: torch.Tensor) -> None:
    """The staged contract on one input: chaining, shapes, channels, no in-place damage to stage inputs."""
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert torch.allclose(feats.logits, model(x), atol=1e-5)
        assert len(feats.stages) == model.num_stages == len(model.stage_channels)
        assert [s.shape[1] for s in feats.stages] == model.stage_channels
        assert feats.feature.shape == (x.shape[0], model.feature_dim)
        assert feats.logits.shape == (x.shape[0], model.num_classes)
        # stage k run alone on stage k-1's output reproduces stage k, and leaves its input untouched
        inputs = [model.forward_stem(x)] + feats.stages[:-1]
        for index, stage_input in enumerate(inputs):
            before = stage_input.clone()
            assert torch.allclose(model.forward_stage(index, stage_input), feats.stages[index], atol=1e-5)
            assert torch.equal(stage_input, before)
        feature, logits = model.forward_head(feats.stages[-1])
        assert torch.allclose(logits, feats.logits, atol=1e-5)
        assert model.stage_shapes(tuple(x.shape[1:])) == [tuple(s.shape[1:]) for s in feats.stages]


@pytest.mark.parametrize("name", sorted(CRD_PARAMS))
def test_crd_parameter_count(name):
    model = create_model(name, num_classes=100)
    assert count_parameters(model) == CRD_PARAMS[name]
    assert model.num_classes == 100
    assert model.num_stages == _expected_stages(name)


@pytest.mark.parametrize("alias,name", sorted(ALIASES.items()))
def test_crd_aliases(alias, name):
    assert count_parameters(create_model(alias, 100)) == CRD_PARAMS[name]


def test_registry_lists_the_zoo():
    names = list_models()
    for name in list(CRD_PARAMS) + list(ALIASES) + ["mobilenetv1", "tv:<name>", "timm:<name>"]:
        assert name in names
    assert is_known_model("tv:resnet18") and is_known_model("timm:anything") and not is_known_model("nope")


@pytest.mark.parametrize("name", sorted(CRD_PARAMS))
def test_staged_contract_16x16(name):
    check_staged(create_model(name, num_classes=100), torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize("name", SMALL_INPUT_FAMILIES)
def test_digits_input_8x8_one_channel(name):
    model = create_model(name, num_classes=10, in_channels=1)
    assert model.conv1.in_channels == 1
    check_staged(model, torch.randn(2, 1, 8, 8))


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_16_2", "vgg8", "mobilenetv2", "shufflev1", "shufflev2"])
def test_cifar_32x32_shapes(name):
    model = create_model(name, num_classes=100)
    check_staged(model, torch.randn(2, 3, 32, 32))
    # CRD's last maps on 32x32 (where its fixed pooling kernels fit exactly)
    last = {"resnet8x4": 8, "wrn_16_2": 8, "vgg8": 4, "mobilenetv2": 2, "shufflev1": 4, "shufflev2": 4}[name]
    assert model.stage_shapes((3, 32, 32))[-1][1:] == (last, last)


def test_vgg_pool3_only_for_64x64_inputs():
    model = create_model("vgg8", 100)
    assert model.stage_shapes((3, 32, 32))[-1] == (512, 4, 4)  # CRD: no pool3 below 64x64
    assert model.stage_shapes((3, 64, 64))[-1] == (512, 4, 4)  # CRD: pool3 at 64x64 (Tiny-ImageNet)


# A handful of exact CRD keys per model (present / absent), and the total number of state_dict entries.
CRD_KEYS = {
    "resnet8x4": (62, ["conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.0.bn2.bias",
                       "layer1.0.downsample.0.weight", "layer3.0.downsample.1.running_var", "fc.weight", "fc.bias"],
                  ["avgpool.weight", "layer1.0.shortcut.0.weight"]),
    "wrn_40_2": (227, ["conv1.weight", "block1.layer.0.bn1.weight", "block1.layer.0.convShortcut.weight",
                       "block1.layer.5.conv2.weight", "block3.layer.0.convShortcut.weight", "bn1.running_var",
                       "fc.weight"],
                 ["block1.layer.1.convShortcut.weight", "bn2.weight"]),
    "vgg13": (72, ["block0.0.weight", "block0.0.bias", "block0.1.running_mean", "block0.3.weight",
                   "block0.4.weight", "block4.4.num_batches_tracked", "classifier.weight", "classifier.bias"],
              ["block0.5.weight", "features.0.weight"]),
    "mobilenetv2": (320, ["conv1.0.weight", "conv1.1.running_mean", "blocks.0.0.conv.0.weight",
                          "blocks.6.0.conv.7.running_var", "conv2.0.weight", "conv2.1.weight",
                          "classifier.0.weight"],
                    ["classifier.weight", "blocks.7.0.conv.0.weight"]),
    "shufflev1": (296, ["conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer1.0.bn3.running_mean",
                        "layer2.7.conv3.weight", "layer3.3.conv2.weight", "linear.weight"],
                  ["layer1.0.shortcut.0.weight", "fc.weight"]),
    "resnet50": (320, ["conv1.weight", "layer1.0.shortcut.0.weight", "layer1.0.shortcut.1.running_mean",
                       "layer4.2.conv3.weight", "layer4.2.bn3.bias", "linear.weight"],
                 ["layer1.1.shortcut.0.weight", "fc.weight"]),
}


@pytest.mark.parametrize("name", sorted(CRD_KEYS))
def test_crd_state_dict_keys(name):
    count, present, absent = CRD_KEYS[name]
    state = create_model(name, 100).state_dict()
    assert len(state) == count
    for key in present:
        assert key in state, key
    for key in absent:
        assert key not in state, key


def test_shufflev1_grouping_matches_crd():
    state = create_model("shufflev1", 100).state_dict()
    assert state["layer1.0.conv1.weight"].shape == (54, 24, 1, 1)  # first block: no grouping on the stem
    assert state["layer1.0.conv3.weight"].shape == (216, 18, 1, 1)  # 240 - 24 concatenated, groups 3
    assert state["layer2.0.conv1.weight"].shape == (60, 80, 1, 1)


def test_crd_checkpoint_round_trip():
    """A state_dict saved from one model loads strictly into a fresh one and gives the same logits."""
    a, b = create_model("wrn_16_1", 100).eval(), create_model("wrn_16_1", 100).eval()
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_mobilenetv1_imagenet_student():
    model = create_model("mobilenetv1", num_classes=1000)
    assert count_parameters(model) == 4_231_976
    assert model.stage_channels == [128, 256, 512, 1024]
    assert "model.13.4.running_var" in model.state_dict() and "fc.weight" in model.state_dict()
    check_staged(create_model("mobilenetv1", num_classes=10), torch.randn(2, 3, 32, 32))


def test_tv_resnet18_is_torchvision():
    torchvision = pytest.importorskip("torchvision")
    model = create_model("tv:resnet18", num_classes=1000)
    reference = torchvision.models.resnet18()
    assert list(model.state_dict()) == list(reference.state_dict())
    assert count_parameters(model) == 11_689_512
    assert model.stage_channels == [64, 128, 256, 512] and model.feature_dim == 512
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), reference.eval()(x), atol=1e-5)
    check_staged(model, x)


def test_tv_resnet50_channels_and_one_channel_input():
    model = create_model("tv:resnet50", num_classes=10, in_channels=1)
    assert model.stage_channels == [256, 512, 1024, 2048] and model.feature_dim == 2048
    check_staged(model, torch.randn(2, 1, 32, 32))


def test_tv_pretrained_offline_is_a_bench_error(monkeypatch):
    import torchvision.models._api as tv_api
    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    with pytest.raises(BenchError, match=r"could not download torchvision weights.*checkpoints/resnet18-"):
        create_model("tv:resnet18", num_classes=10, pretrained=True)


def test_timm_resnet18_exposes_four_stages():
    pytest.importorskip("timm")
    model = create_model("timm:resnet18", num_classes=10, in_channels=1)
    assert model.split == "stages"
    assert model.stage_channels == [64, 128, 256, 512] and model.feature_dim == 512
    assert list(model.state_dict())[0] == "model.conv1.weight"
    check_staged(model, torch.randn(2, 1, 32, 32))


def test_timm_pretrained_offline_is_a_bench_error(monkeypatch):
    timm = pytest.importorskip("timm")

    def offline(name, pretrained=False, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(BenchError, match=r"could not load pretrained weights for 'timm:resnet18'"):
        create_model("timm:resnet18", num_classes=10, pretrained=True)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("nope", {}),
        ("resnet_8", {}),
        ("foo:bar", {}),
        ("tv:not_a_model", {}),
        ("tv:vgg16", {}),
        ("timm:not_a_real_timm_model", {}),
        ("resnet8", {"pretrained": True}),
        ("wrn_16_1", {"width": 3}),
        ("tv:resnet18", {"zero_init": True}),
    ],
)
def test_bad_names_and_options_raise_bench_error(name, kwargs):
    with pytest.raises(BenchError):
        create_model(name, num_classes=10, **kwargs)
