"""Pre-activation stage outputs (``forward_features(x, preact=True)``): each equals a hand-written forward of the
stage's last block (CRD / mdistiller ``preact=True``), on a fixed input with randomised BatchNorm statistics."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.models import create_model

CIFAR = ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4",
         "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg11", "vgg13", "vgg16", "vgg19",
         "mobilenetv2", "shufflev1", "shufflev2", "resnet50"]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomised(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorms (affine and running statistics), so a wrong tensor cannot pass by accident."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g)
            m.running_mean = torch.randn(n, generator=g) * 0.3
            m.running_var = torch.rand(n, generator=g) + 0.5
    return model.eval()


def _conv_bn(block, i: int, x):
    return getattr(block, f"bn{i}")(getattr(block, f"conv{i}")(x))


# ---- hand-written last blocks (the tensor before the stage's final activation) -------------------------------
def cifar_resnet_block(b, x):
    return _conv_bn(b, 2, F.relu(_conv_bn(b, 1, x))) + (x if b.downsample is None else b.downsample(x))


def bottleneck_block(b, x):  # CRD ResNet50 and torchvision Bottleneck
    out = _conv_bn(b, 3, F.relu(_conv_bn(b, 2, F.relu(_conv_bn(b, 1, x)))))
    shortcut = b.shortcut if hasattr(b, "shortcut") else (b.downsample or nn.Identity())
    return out + shortcut(x)


def shufflev1_block(b, x):
    out = _conv_bn(b, 3, F.relu(_conv_bn(b, 2, b.shuffle1(F.relu(_conv_bn(b, 1, x))))))
    res = b.shortcut(x)
    return torch.cat([out, res], 1) if b.stride == 2 else out + res


def shufflev2_block(b, x):
    half = x.shape[1] // 2
    x1, x2 = x[:, :half], x[:, half:]
    return torch.cat([x1, _conv_bn(b, 3, _conv_bn(b, 2, F.relu(_conv_bn(b, 1, x2))))], 1)  # unshuffled, as CRD


def mobilenetv2_block(b, x):  # a linear bottleneck: the stage output is its own pre-activation
    c = b.conv
    out = c[7](c[6](F.relu(c[4](c[3](F.relu(c[1](c[0](x))))))))
    return x + out if b.use_res_connect else out


def wrn_block(b, x):  # the raw output of the stage's last block (its pre-activation is the next BatchNorm of it)
    act = F.relu(b.bn1(x))
    shortcut = x if b.convShortcut is None else b.convShortcut(act)
    return b.conv2(F.relu(b.bn2(b.conv1(act)))) + shortcut


def tv_basic_block(b, x):
    return _conv_bn(b, 2, F.relu(_conv_bn(b, 1, x))) + (x if b.downsample is None else b.downsample(x))


def timm_basic_block(b, x):
    return b.bn2(b.conv2(b.act1(b.bn1(b.conv1(x))))) + (x if b.downsample is None else b.downsample(x))


def mobilenetv1_block(block, x):
    return block[4](block[3](F.relu(block[1](block[0](x)))))


def last_blocks(model, name: str, x):
    """(input of each stage's last block, the block, the hand-written function, what follows the block)."""
    stem = model.forward_stem(x)
    if name.startswith("vgg"):
        blocks = [model.block1, model.block2, model.block3, model.block4]
        pools = [model.pool0, model.pool1, model.pool2, nn.Identity()]  # no pool3 below 64x64 inputs
        out, h = [], stem
        for block, pool in zip(blocks, pools):
            pre = block(pool(h))
            out.append(pre)
            h = F.relu(pre)
        return out
    if name.startswith("wrn"):
        layers = [model.block1.layer, model.block2.layer, model.block3.layer]
        norms = [model.block2.layer[0].bn1, model.block3.layer[0].bn1, model.bn1]
        fn = wrn_block
    elif name == "mobilenetv2":
        out, h = [], stem
        for start, end in model._STAGES:
            blocks = [block for seq in model.blocks[start:end] for block in seq]
            for block in blocks[:-1]:
                h = block(h)
            h = mobilenetv2_block(blocks[-1], h)
            out.append(h)
        return out
    elif name == "mobilenetv1":
        out, h = [], stem
        for start, end in model._STAGES:
            for block in model.model[start : end - 1]:
                h = block(h)
            pre = mobilenetv1_block(model.model[end - 1], h)
            out.append(pre)
            h = F.relu(pre)
        return out
    else:
        layers = [getattr(model, f"layer{i}") for i in range(1, 5) if hasattr(model, f"layer{i}")]
        if name.startswith("timm:"):
            layers = [getattr(model.model, f"layer{i}") for i in range(1, 5)]
        fn = {"resnet50": bottleneck_block, "shufflev1": shufflev1_block, "shufflev2": shufflev2_block,
              "tv:resnet18": tv_basic_block, "tv:resnet50": bottleneck_block,
              "timm:resnet18": timm_basic_block}.get(name, cifar_resnet_block)  # fmt: skip
        norms = None
    out, h = [], stem
    for i, layer in enumerate(layers):
        for block in layer[:-1]:
            h = block(h)
        raw = fn(layer[-1], h)
        if norms is not None:  # WRN
            out.append(norms[i](raw))
            h = raw
        else:
            out.append(raw)
            h = model.activate(i, raw)
    return out


def check_preact(model, name: str, x) -> None:
    with torch.no_grad():
        feats = model.forward_features(x, preact=True)
        plain = model.forward_features(x)
        expected = last_blocks(model, name, x)
    assert plain.preact_stages == []  # computed only when asked for
    for got, want in zip([*feats.stages, feats.feature, feats.logits], [*plain.stages, plain.feature, plain.logits]):
        assert torch.equal(got, want)  # the same pass: asking for pre-activations changes nothing else
    assert len(feats.preact_stages) == model.num_stages
    for index, (got, want) in enumerate(zip(feats.preact_stages, expected, strict=True)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (got < 0).any(), f"stage {index}: a pre-activation of a randomised net is never all >= 0"
        if not name.startswith("wrn"):
            torch.testing.assert_close(model.activate(index, got), feats.stages[index], rtol=0, atol=0)


@pytest.mark.parametrize("name", CIFAR)
def test_cifar_preact_matches_hand_written_last_block(name):
    torch.manual_seed(0)
    model = randomised(create_model(name, num_classes=100))
    check_preact(model, name, torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("name", ["tv:resnet18", "tv:resnet50", "mobilenetv1", "timm:resnet18"])
def test_imagenet_preact_matches_hand_written_last_block(name):
    torch.manual_seed(0)
    model = randomised(create_model(name, num_classes=10))
    check_preact(model, name, torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("name", ["resnet8", "vgg8", "wrn_16_1", "shufflev2"])
def test_preact_pass_trains_like_the_plain_pass(name):
    """In training mode too (batch statistics, running-statistics updates): the same outputs and the same
    BatchNorm state after the pass, so WRN's next-block BatchNorm is not applied twice."""
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    states = []
    outputs = []
    for preact in (False, True):
        torch.manual_seed(0)
        model = randomised(create_model(name, num_classes=10)).train()
        feats = model.forward_features(x, preact=preact)
        outputs.append([*feats.stages, feats.logits])
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    for a, b in zip(*outputs):
        assert torch.equal(a, b)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_timm_stage_without_final_activation_is_its_own_preact():
    model = create_model("timm:efficientnet_b0", num_classes=10).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, 64, 64), preact=True)
    assert all(p is s for p, s in zip(feats.preact_stages, feats.stages))
    assert not any(m._forward_pre_hooks for m in model.modules())  # the capture hook is gone after the call


def test_wrn_has_no_per_stage_preact():
    model = create_model("wrn_16_1", num_classes=10)
    assert not model.local_preact
    with pytest.raises(NotImplementedError):
        model.forward_stage_preact(0, torch.zeros(1, 16, 8, 8))
