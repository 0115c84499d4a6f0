"""Any timm model as a StagedNet: ``timm:<name>`` -> ``timm.create_model(name, pretrained, num_classes, in_chans)``.

The timm model is held as the child ``model``, so state_dict keys are timm's own prefixed with ``model.``
(load a timm checkpoint with ``net.model.load_state_dict(sd)``). Extra options are passed to
``timm.create_model`` (``drop_rate``, ``drop_path_rate``, ``pretrained_cfg_overlay=dict(file=...)``, ...).

Generic stage split, from timm's ``feature_info`` (the module names of the feature levels):

* The feature levels at reduction < 4 (ResNet ``act1``, EfficientNet ``blocks.0``, RegNet ``stem``, ...) are
  folded into the stem; every other level is one stage, so timm ResNets expose ``layer1..layer4``.
* The model's top-level children, expanded through ``nn.Sequential`` containers where a level names a nested
  module (``blocks.3``, ``stages.1``), form an ordered list of units. Stem = the units before the first stage's
  module; stage i = the units after stage i-1's module up to and including its own (EfficientNet's
  ``blocks.3`` goes with ``blocks.4``). Units after the last stage that are still part of
  ``forward_features`` (EfficientNet ``conv_head, bn2``, RegNet ``final_conv``) run in ``forward_pool``,
  followed by ``model.forward_head(x, pre_logits=True)``; the classifier is ``model.get_classifier()``.
* The plan is checked once at construction on a dummy input (eval mode): running the units in order must
  reproduce ``model.forward_features`` exactly, and every stage output must be a 4-D map with the channel count
  ``feature_info`` gives. Any failure (a forward that is not a plain chain of modules, as ViTs with their
  class token and position embedding; channels-last stage outputs, as Swin) falls back to ONE stage =
  the whole ``model.forward_features`` with an identity stem. Its output is whatever timm returns there
  (tokens ``(B, N, C)`` for a ViT), and ``stage_channels = [model.num_features]``.

``net.split`` says which of the two happened (``"stages"`` or ``"single"``).

Pre-activation stage outputs: the planning pass also records, per stage, the module that produced the stage
output when that is one of torch's activation modules (``nn.ReLU``, ``nn.SiLU``, ..., the ``act3`` of a timm
ResNet stage's last block); ``forward_stage_preact`` then takes that module's input through a pre-hook that
exists only for that call. A stage that does not end with such a module (EfficientNet, ConvNeXt, the single
stage) has its output as its pre-activation, and ``activate`` is the identity there.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from bench.errors import BenchError
from bench.models.activations import ACTIVATIONS, activate, preact_of, recording_activations
from bench.models.base import StagedNet
from bench.models.registry import register_prefix

_CHECK_SIZES = (64,)  # tried before the model's own default input size; small keeps construction cheap


def _units_for(model: nn.Module, targets: list[str]) -> list[str] | None:
    """Ordered unit names (dotted paths) such that every target is a unit, or None if impossible."""
    units = [name for name, _ in model.named_children()]
    for target in targets:
        while target not in units:
            parent = next((u for u in units if target.startswith(u + ".")), None)
            if parent is None:
                return None
            module = model.get_submodule(parent)
            if not isinstance(module, nn.Sequential):
                return None
            at = units.index(parent)
            units[at : at + 1] = [f"{parent}.{child}" for child, _ in module.named_children()]
    return units


class TimmStagedNet(StagedNet):
    def __init__(self, model: nn.Module, name: str, in_channels: int):
        super().__init__()
        self.model = model
        self.timm_name = name
        self.num_classes = getattr(model, "num_classes", 0)
        self.split = "single"
        self._stem: list[str] = []
        self._stages: list[list[str]] = []
        self._tail: list[str] = []
        self._stage_acts: list[str | None] = [None]  # per stage: the module whose input is its pre-activation
        self.stage_channels = [int(model.num_features)]
        self.feature_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                x, reference = self._reference_forward(in_channels)
                if reference is not None:
                    feature = model.forward_head(reference, pre_logits=True)
                    self.feature_dim = int(feature.shape[-1])
                    if not torch.allclose(model.get_classifier()(feature), model.forward_head(reference), atol=1e-5):
                        raise BenchError(
                            f"timm model {name!r}: its classifier is not model.get_classifier() applied to the "
                            "pre-logits feature, so it cannot be wrapped"
                        )
                    self._plan_stages(x, reference)
        finally:
            model.train(was_training)

    # -- construction ---------------------------------------------------------------------------------------

    def _reference_forward(self, in_channels: int) -> tuple[Tensor | None, Tensor | None]:
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        default = cfg.get("input_size", (in_channels, 224, 224))
        sizes = [(s, s) for s in _CHECK_SIZES] + [tuple(default[-2:])]
        generator = torch.Generator().manual_seed(0)
        for size in dict.fromkeys(sizes):
            x = torch.randn(1, in_channels, *size, generator=generator)
            try:
                out = self.model.forward_features(x)
            except Exception:
                continue
            if isinstance(out, Tensor):
                return x, out
        return None, None

    def _plan_stages(self, x: Tensor, reference: Tensor) -> None:
        info = list(getattr(self.model, "feature_info", None) or [])
        levels = [f for f in info if (f.get("reduction") or 0) >= 4] or info[-1:]
        targets = [f["module"] for f in levels]
        units = _units_for(self.model, targets) if targets else None
        if units is None:
            return
        ends = [units.index(t) for t in targets]
        if any(b <= a for a, b in zip(ends, ends[1:])):
            return
        stem = units[: ends[0]]
        stages = [[units[ends[0]]]] + [units[a + 1 : b + 1] for a, b in zip(ends, ends[1:])]
        acts: list[str | None] = []
        try:
            y = self._run(stem, x)
            for names, level in zip(stages, levels):
                y, act = self._run_recording_last(names, y)
                acts.append(act)
                if y.dim() != 4 or y.shape[1] != level["num_chs"]:
                    return
            # The units after the last stage that forward_features still runs: the shortest prefix that
            # reproduces its output.
            tail = None
            for k in range(ends[-1] + 1, len(units) + 1):
                if y.shape == reference.shape and torch.allclose(y, reference, atol=1e-5):
                    tail = units[ends[-1] + 1 : k]
                    break
                if k < len(units):
                    y = self._run([units[k]], y)
        except Exception:
            return
        if tail is None:
            return
        # A stage must not modify its input in place (stored stage outputs, teacher features fed to a student).
        for names in stages:
            first = self.model.get_submodule(names[0])
            if getattr(first, "inplace", False):
                first.inplace = False
        self.split = "stages"
        self._stem, self._stages, self._tail, self._stage_acts = stem, stages, tail, acts
        self.stage_channels = [int(level["num_chs"]) for level in levels]

    def _run(self, names: list[str], x: Tensor) -> Tensor:
        for name in names:
            x = self.model.get_submodule(name)(x)
        return x

    def _run_recording_last(self, names: list[str], x: Tensor) -> tuple[Tensor, str | None]:
        """Run the units; also the name of the leaf module that returned the output, if it is an activation."""
        calls: list[tuple[str, Tensor]] = []
        leaves = [(n, m) for unit in names for n, m in self.model.get_submodule(unit).named_modules(prefix=unit)
                  if not any(True for _ in m.children())]  # fmt: skip
        handles = [m.register_forward_hook(lambda _m, _a, out, n=n: calls.append((n, out))) for n, m in leaves]
        try:
            y = self._run(names, x)
        finally:
            for handle in handles:
                handle.remove()
        if calls and calls[-1][1] is y and isinstance(self.model.get_submodule(calls[-1][0]), ACTIVATIONS):
            return y, calls[-1][0]
        return y, None

    # -- StagedNet ------------------------------------------------------------------------------------------

    def forward_stem(self, x: Tensor) -> Tensor:
        return self._run(self._stem, x) if self.split == "stages" else x

    def forward_stage(self, index: int, x: Tensor) -> Tensor:
        if self.split == "stages":
            return self._run(self._stages[index], x)
        if index != 0:
            raise IndexError(f"timm model {self.timm_name!r} is exposed as a single stage")
        return self.model.forward_features(x)

    def forward_stage_preact(self, index: int, x: Tensor) -> tuple[Tensor, Tensor]:
        name = self._stage_acts[index]
        if name is None:
            out = self.forward_stage(index, x)
            return out, out
        with recording_activations(self.model, [name]) as calls:
            out = self.forward_stage(index, x)
        return out, preact_of(out, calls)

    def activate(self, index: int, preact: Tensor) -> Tensor:
        return activate(self.model, self._stage_acts[index], preact)

    def forward_pool(self, x: Tensor) -> Tensor:
        if self.split == "stages":
            x = self._run(self._tail, x)
        return self.model.forward_head(x, pre_logits=True)

    def forward_classifier(self, feature: Tensor) -> Tensor:
        return self.model.get_classifier()(feature)


def create_timm_model(name: str, num_classes: int, in_channels: int = 3, pretrained: bool = False, **kwargs):
    """Factory of the ``timm:`` prefix."""
    import timm

    if not timm.is_model(name):
        raise BenchError(f"unknown timm model 'timm:{name}' (`timm.list_models()` lists them)")
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_channels, **kwargs)
    except TypeError as exc:
        raise BenchError(f"timm model 'timm:{name}' rejected its options: {exc}") from exc
    except Exception as exc:
        if not pretrained:
            raise
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BenchError(
            f"could not load pretrained weights for 'timm:{name}' ({type(exc).__name__}: {reason}); "
            "offline? download them into the Hugging Face cache (HF_HOME, default ~/.cache/huggingface) "
            "or pass pretrained_cfg_overlay=dict(file='/path/to/weights'); HF_HUB_OFFLINE=1 skips the network retries"
        ) from exc
    return TimmStagedNet(model, name, in_channels)


register_prefix("timm", create_timm_model)
