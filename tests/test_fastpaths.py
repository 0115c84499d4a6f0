"""The speed fast paths change no result: device-resident batched augmentation equals torchvision's
per-sample transforms, and the opt-in switches (channels_last, compile) train the same model."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import bench.data as data
import bench.engine as engine
import bench.loaders as loader_module
from bench.data import TensorImages, load_dataset
from bench.engine import build_task, fit, seed_everything
from bench.loaders import LoaderSpec, TensorLoader, describe_loader, random_crop_flip
from bench.models import create_model
from bench.recipe import Recipe
from methods import MethodContext
from methods.kd import KD, KDHparams

torch.set_num_threads(1)


def torchvision_crop_flip(image: Image.Image, size: int, padding: int, dy: int, dx: int, flip: bool, monkeypatch):
    """torchvision's own RandomCrop + RandomHorizontalFlip on one PIL image, with the crop offsets and
    the flip forced to the given ones (``get_params`` / ``p`` are the transforms' only random parts)."""
    monkeypatch.setattr(T.RandomCrop, "get_params", staticmethod(lambda img, output_size: (dy, dx, size, size)))
    pipeline = T.Compose([T.RandomCrop(size, padding=padding), T.RandomHorizontalFlip(p=1.0 if flip else 0.0)])
    return pipeline(image)


def to_pil(image: torch.Tensor) -> Image.Image:
    array = image.permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)


@pytest.mark.parametrize("channels,size,padding", [(3, 32, 4), (1, 8, 1)])
def test_batched_crop_flip_equals_torchvision_per_sample(channels, size, padding, monkeypatch):
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (48, channels, size, size), dtype=np.uint8))
    gen = torch.Generator().manual_seed(1)
    out, offsets, flips = random_crop_flip(images.float() / 255, padding, True, gen)
    assert out.shape == images.shape
    assert flips.any() and not flips.all()
    assert set(offsets.flatten().tolist()) == set(range(2 * padding + 1))  # every offset drawn, in range
    for i in range(len(images)):
        dy, dx, flip = int(offsets[0, i]), int(offsets[1, i]), bool(flips[i])
        ref = torchvision_crop_flip(to_pil(images[i]), size, padding, dy, dx, flip, monkeypatch)
        torch.testing.assert_close(out[i], T.ToTensor()(ref), rtol=0, atol=0)


@pytest.mark.parametrize("augment, train, with_indices", [("crop_flip", True, True), ("none", True, False),
                                                         ("none", False, True)])  # fmt: skip
def test_host_memory_loader_yields_the_same_batches(augment, train, with_indices):
    """--no-device-data: the split stays in host memory and each batch is moved to the device; the order,
    the augmentation and the batches are those of the device-resident loader."""
    rng = np.random.default_rng(1)
    split = TensorImages(torch.from_numpy(rng.integers(0, 256, (50, 3, 32, 32), dtype=np.uint8)), torch.arange(50))
    info = data.DatasetInfo("c", 10, 3, 32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "crop_flip")
    indices = np.arange(3, 50, 2)
    spec = LoaderSpec(info, indices, 8, train, augment, 3, "cpu")
    loaders = [TensorLoader(split, spec, resident=r) for r in (True, False)]
    for loader in loaders:
        loader.with_indices = with_indices
        loader.set_epoch(1)
    assert not loaders[1].resident and describe_loader(loaders[1]).startswith("uint8 tensors in host memory")
    for a, b in zip(*loaders, strict=True):
        for ta, tb in zip(a, b, strict=True):
            assert torch.equal(ta, tb)


def test_crop_only_never_flips():
    images = torch.rand(16, 3, 32, 32)
    _, _, flips = random_crop_flip(images, 4, False, torch.Generator().manual_seed(0))
    assert not flips.any()


def test_tensor_loader_equals_torchvision_pipeline(monkeypatch):
    """A whole training epoch of the device-resident loader: each batch equals torchvision's
    RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize applied per sample with the
    same offsets and flips, and the epoch visits every sample once."""
    rng = np.random.default_rng(0)
    n = 70
    split = TensorImages(torch.from_numpy(rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)), torch.arange(n))
    info = data.DatasetInfo("c", 10, 3, 32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "crop_flip")
    draws = []

    def recording(images, padding, flip, generator, draws=None):
        out = random_crop_flip(images, padding, flip, generator, draws)
        draws.append(out)
        return out

    monkeypatch.setattr(loader_module, "random_crop_flip", recording)
    loader = TensorLoader(split, LoaderSpec(info, None, 32, True, "crop_flip", seed=5, device="cpu"))
    loader.set_epoch(2)
    batches = list(loader)
    assert [len(y) for _, y in batches] == [32, 32, 6]
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == list(range(n)) and seen.tolist() != list(range(n))  # shuffled, complete
    normalize = T.Compose([T.ToTensor(), T.Normalize(info.mean, info.std)])
    for (x, y), (_, offsets, flips) in zip(batches, draws):
        for i, index in enumerate(y.tolist()):
            dy, dx, flip = int(offsets[0, i]), int(offsets[1, i]), bool(flips[i])
            ref = torchvision_crop_flip(to_pil(split.images[index]), 32, 4, dy, dx, flip, monkeypatch)
            torch.testing.assert_close(x[i], normalize(ref), rtol=1e-6, atol=1e-6)
    # the same epoch replays identically (resume without loader state)
    again = list(loader)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


# ---- opt-in switches -----------------------------------------------------------------------------
RECIPE = Recipe(epochs=1, batch_size=64, lr=0.05, milestones=[], augment="crop_flip")


def train_kd(splits, recipe: Recipe):
    seed_everything(7)
    teacher = create_model("resnet8", 10, 1)
    task = build_task(splits, 0.2, 0, recipe, torch.device("cpu"), progress=False)
    student = create_model("resnet8", 10, 1)
    method = KD(student, teacher, KDHparams(), MethodContext(splits.info, task.train_loader.num_samples, 1))
    history = fit(method, task, recipe)
    return history.epochs[-1], method.student.state_dict()


@pytest.fixture(scope="module")
def splits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def reference(splits):
    return train_kd(splits, RECIPE)


def assert_close_run(run, reference, tol):
    (metrics, state), (ref_metrics, ref_state) = run, reference
    assert metrics["train_loss"] == pytest.approx(ref_metrics["train_loss"], rel=tol)
    assert metrics["test_nll"] == pytest.approx(ref_metrics["test_nll"], rel=tol)
    for key, value in ref_state.items():
        torch.testing.assert_close(state[key].contiguous(), value, rtol=tol, atol=tol)


def test_channels_last_trains_the_same_model(splits, reference):
    run = train_kd(splits, dataclasses.replace(RECIPE, channels_last=True))
    convs = [v for v in run[1].values() if v.dim() == 4 and v.shape[1] > 1 and v.shape[-1] > 1]
    assert convs and all(v.is_contiguous(memory_format=torch.channels_last) and not v.is_contiguous() for v in convs)
    assert_close_run(run, reference, 1e-4)


def test_compile_trains_the_same_model(splits, reference, monkeypatch):
    # the eager backend exercises the compile path (dynamo tracing of forward_train) within seconds;
    # the default inductor backend is what a user gets.
    monkeypatch.setitem(engine.COMPILE_OPTIONS, "backend", "eager")
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    assert_close_run(train_kd(splits, dataclasses.replace(RECIPE, compile=True)), reference, 1e-5)
    assert counters["stats"]["unique_graphs"] >= 1  # forward_train really went through dynamo


def test_amp_runs_in_bf16_and_stays_close(splits, reference):
    metrics, state = train_kd(splits, dataclasses.replace(RECIPE, amp=True))
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())  # master weights
    assert metrics["train_loss"] == pytest.approx(reference[0]["train_loss"], rel=0.05)
    assert metrics["train_loss"] != reference[0]["train_loss"]  # bf16 really was used


def test_switches_are_off_by_default_and_recorded_as_params():
    from bench.suites import expand, load_suite

    recipe = Recipe()
    assert not (recipe.amp or recipe.channels_last or recipe.compile)
    spec = expand(load_suite("mini"))[0]
    params = spec.params()
    assert {params["recipe.amp"], params["recipe.channels_last"], params["recipe.compile"]} == {False}
    fast = dataclasses.replace(spec, recipe=dataclasses.replace(spec.recipe, amp=True))
    assert fast.params()["recipe.amp"] is True and fast.hash != spec.hash
