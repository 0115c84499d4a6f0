"""Any PyTorch ``nn.Module`` as a staged model: a suite's ``{module: my_pkg.nets:Net, kwargs: {...}, stages:
[layer1, layer2, layer3], feature: avgpool}`` in place of a teacher or student name, or :func:`wrap_module` in a
plugin's own ``register_model`` factory.

How: torchvision's ``create_feature_extractor`` traces the module (``torch.fx``) and finds each stage's output by
module name (the last node inside ``layer1``, ...), the pre-logit ``feature`` node (default: the input of the
final ``nn.Linear``) and the logits (the forward's result), in the train and the eval graph alike. From each
graph we generate Python code that looks its modules up on the wrapper at call time (``self.layer1...``), as
``GraphModule`` does, so the wrapper owns the module's children and root parameters under their own names:
``state_dict`` keys are the module's own (a checkpoint of the bare module loads as it is), ``.to()`` and module
surgery (GPD) act on what the code runs. ``forward_features`` runs the whole graph once. timm models trace too
(a ViT's stages are its token maps; forward arguments other than the images take their defaults).
Pre-activation stage outputs (``forward_features(x, preact=True)``): where an activation module inside a stage
returned the stage output (found by the construction probe), its input; else the stage output itself
(``bench.models.activations``).

Stage by stage (StableKD feeds a student stage the teacher's previous stage output): the graph is cut at the
stage outputs into stage 0 (the stem is part of it; ``forward_stem`` is the identity), stages 1..K-1, the pooling
(up to ``feature``) and the classifier. That works when each piece reads only the previous cut (a chain); a
value crossing a cut (a skip connection around a stage boundary) makes ``forward_stage`` refuse with one line.
The pre-logit feature must be pooled: a (C,) or (C, 1, 1) output per sample.

Construction probes the module once (eval mode, a zero image of 64, 32 or 224 pixels, the first that runs) for
the stage channels and the feature width, and checks that the traced logits are the module's own output.

:class:`ModelRef` is the suite entry; :func:`declare` registers it in the model registry under its display name
(``name``, else the callable's name with its kwargs), which is what tables and run names show; Ray trials
declare the same refs again (``bench.plugins.carried``).

Not here: loading plugins (``bench.plugins``), the teacher checkpoint (``bench.teachers``).
"""
from __future__ import annotations

import importlib
import inspect
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from bench.config import from_mapping
from bench.errors import BenchError, DuplicateName
from bench.models.activations import activate, activation_leaves, preact_of, producer, recording_activations
from bench.models.base import Features, StagedNet
from bench.models.registry import register_model

PROBE_SIZES = (64, 32, 224)  # 64 first: a pooled feature is told from a small map


@dataclass
class ModelRef:
    """A suite's model given as an importable callable returning an ``nn.Module`` (a class or a factory)."""

    module: str  # "package.module:attribute"
    stages: list[str]  # module names whose outputs are the stages, in forward order
    feature: str | None = None  # node of the pooled pre-logit feature (default: the final Linear's input)
    kwargs: dict[str, Any] = field(default_factory=dict)
    name: str | None = None  # shown in tables and run names (default: attribute(kwargs))

    def validate(self, where: str) -> None:
        mod, _, attr = self.module.partition(":")
        if not attr or not all(p.isidentifier() for p in mod.split(".")) or not attr.replace(".", "_").isidentifier():
            raise BenchError(f"{where}.module: expected 'package.module:attribute', got {self.module!r}")
        if not self.stages:
            raise BenchError(f"{where}.stages: name at least one module whose output is a stage")
        if self.name is not None and (not self.name or "/" in self.name or ":" in self.name):
            raise BenchError(f"{where}.name: a non-empty name without '/' or ':', got {self.name!r}")

    @property
    def module_name(self) -> str:
        return self.module.partition(":")[0]

    @property
    def display(self) -> str:
        if self.name:
            return self.name
        attr = self.module.partition(":")[2]
        args = ",".join(f"{k}={json.dumps(v, sort_keys=True)}" for k, v in sorted(self.kwargs.items()))
        return (f"{attr}({args})" if args else attr).replace("/", "_").replace(":", "_")

    def canonical(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=str)

    def resolve(self, where: str = "model") -> Callable[..., nn.Module]:
        mod, _, attr = self.module.partition(":")
        try:
            obj: Any = importlib.import_module(mod)
        except Exception as err:
            first = (str(err).strip().splitlines() or [""])[0]
            raise BenchError(f"{where}.module: cannot import {mod!r} ({type(err).__name__}: {first})") from None
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise BenchError(f"{where}.module: {mod!r} has no attribute {attr!r}")
            obj = getattr(obj, part)
        if not callable(obj):
            raise BenchError(f"{where}.module: {self.module!r} is not callable (a class or a function)")
        return obj

    def build(self, num_classes: int, in_channels: int) -> "ModuleNet":
        """The module, called with ``kwargs`` (plus ``num_classes`` / ``in_channels`` where its signature names
        them and kwargs do not), wrapped."""
        fn = self.resolve(self.display)
        kwargs = dict(self.kwargs)
        try:
            named = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            named = {}
        for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
            if key in named and key not in kwargs:
                kwargs[key] = value
        module = fn(**kwargs)
        if not isinstance(module, nn.Module):
            raise BenchError(f"model {self.display}: {self.module} returned {type(module).__name__}, not an nn.Module")
        net = wrap_module(module, self.stages, self.feature, self.display, in_channels)
        if net.num_classes != num_classes:
            raise BenchError(f"model {self.display}: it gives {net.num_classes} logits but the dataset has "
                             f"{num_classes} classes (set kwargs.num_classes)")  # fmt: skip
        return net


_DECLARED: dict[str, ModelRef] = {}


def parse_ref(raw: Any, where: str) -> ModelRef:
    return from_mapping(ModelRef, raw, where)


def declare(ref: ModelRef, where: str = "model") -> str:
    """Register ``ref`` under its display name (idempotent); the name another setting took is an error."""
    name = ref.display
    have = _DECLARED.get(name)
    if have == ref:
        return name
    if have is not None:
        raise BenchError(f"{where}: model name {name!r} is already declared as {have.canonical()}; give this one "
                         "its own `name:`")  # fmt: skip
    ref.resolve(where)

    def factory(num_classes: int, in_channels: int = 3, **kwargs: Any) -> ModuleNet:
        if kwargs:
            raise BenchError(f"model {name!r} takes its options from the suite's kwargs, not {sorted(kwargs)}")
        return ref.build(num_classes, in_channels)

    try:
        register_model(factory, name=name)
    except DuplicateName as err:
        raise BenchError(f"{where}: model name {name!r} is taken by {err.describe_holder()}; give it another "
                         "`name:`") from None  # fmt: skip
    _DECLARED[name] = ref
    return name


def declare_pair_models(raw: Any, base: Path | None, where: str) -> Any:
    """A suite pair with its mapping-valued ``teacher`` / ``student`` declared (:func:`declare`) and replaced by
    their names; a teacher's ``checkpoint`` (relative to the suite file) becomes the pair's
    ``teacher_checkpoint``. Anything else is returned as it is (``Pair`` validation reports it)."""
    if not isinstance(raw, dict):
        return raw
    out = dict(raw)
    for role in ("teacher", "student"):
        if not isinstance(raw.get(role), dict):
            continue
        entry = dict(raw[role])
        checkpoint = entry.pop("checkpoint", None)
        out[role] = declare(parse_ref(entry, f"{where}.{role}"), f"{where}.{role}")
        if checkpoint is None:
            continue
        if role != "teacher":
            raise BenchError(f"{where}.student.checkpoint: only a teacher's weights are loaded from a checkpoint")
        if raw.get("teacher_checkpoint") is not None or not isinstance(checkpoint, str):
            raise BenchError(f"{where}.teacher.checkpoint: a path, given once (not also as teacher_checkpoint)")
        out["teacher_checkpoint"] = str(((base or Path.cwd()) / Path(checkpoint).expanduser()).resolve())
    return out


def declared() -> tuple[ModelRef, ...]:
    return tuple(_DECLARED.values())


def declared_ref(name: str) -> ModelRef | None:
    return _DECLARED.get(name)


# --------------------------------------------------------------------------------------------------
# The wrapper
# --------------------------------------------------------------------------------------------------
class _NotAChain(Exception):
    """A piece of the graph reads a value from before the previous cut."""


@dataclass
class _Plan:
    """One graph (train or eval) compiled: the whole forward, and the pieces between cuts (None: not a chain)."""

    full: Callable[..., dict[str, Tensor]]
    pieces: list[Callable[..., Tensor]] | None
    why_not: str = ""


def _compile(nodes: list[torch.fx.Node], source: torch.fx.Node, result: Any, label: str,
             defaults: dict[torch.fx.Node, Any]) -> Callable:  # fmt: skip
    """Python code for ``nodes`` (in order) reading ``source`` as its input and returning ``result`` (nodes),
    with module lookups on the ``self`` it is called with; the forward's other arguments take their ``defaults``.
    Raises ``_NotAChain`` when a node reads a value that is neither ``source`` nor computed by ``nodes``
    (constants are re-created)."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, Any] = {source: graph.placeholder("x"), **defaults}

    def arg(node: torch.fx.Node) -> Any:
        if node not in env:
            if node.op != "get_attr":
                raise _NotAChain(node.name)
            env[node] = graph.node_copy(node, arg)
        return env[node]

    for node in nodes:
        if node.op not in ("placeholder", "output") and node is not source:
            env[node] = graph.node_copy(node, arg)
    graph.output(torch.fx.node.map_arg(result, arg))
    code = graph.python_code("self")
    namespace = dict(code.globals)
    exec(compile(code.src, f"<kdbench graph of {label}>", "exec"), namespace)
    return namespace["forward"]


def _plan(graph: torch.fx.Graph, feature: str | None, model: nn.Module, label: str, num_stages: int) -> _Plan:
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if not inputs or any(not n.args for n in inputs[1:]):
        raise BenchError(f"model {label}: its forward must take the images, and nothing else without a default")
    defaults = {n: n.args[0] for n in inputs[1:]}
    returned = next(n for n in nodes if n.op == "output").args[0]
    stages = [returned[f"stage{i}"] for i in range(num_stages)]
    logits = returned["logits"]
    if feature is not None:
        feat = returned["feature"]
    elif logits.op == "call_module" and isinstance(model.get_submodule(logits.target), nn.Linear):
        feat = logits.args[0]
    else:
        raise BenchError(f"model {label}: its output is not computed by an nn.Linear; name the pre-logit `feature:` node")
    cuts = [*stages, feat, logits]
    where = {n: i for i, n in enumerate(nodes)}
    if any(where[a] >= where[b] for a, b in zip(cuts, cuts[1:])):
        raise BenchError(f"model {label}: stages, feature and logits must come in forward order, one after the other")
    outputs = {**{f"stage{i}": s for i, s in enumerate(stages)}, "feature": feat, "logits": logits}
    full = _compile(nodes[: where[logits] + 1], inputs[0], outputs, label, defaults)
    try:
        starts = [inputs[0], *cuts[:-1]]
        pieces = [_compile(nodes[where[a] + 1 : where[b] + 1], a, b, label, defaults) for a, b in zip(starts, cuts)]
    except _NotAChain as err:
        return _Plan(full, None, f"model {label} cannot run stage by stage: node {err} crosses a stage boundary "
                                 "(a skip connection around a cut)")  # fmt: skip
    return _Plan(full, pieces)


class ModuleNet(StagedNet):
    """A traced ``nn.Module`` behind the staged-model contract (module docstring)."""

    def __init__(self, module: nn.Module, stages: list[str], feature: str | None, label: str,
                 in_channels: int | None = None) -> None:  # fmt: skip
        super().__init__()
        self.label = label
        self.stage_names = list(stages)
        own = set(dir(self))
        for name, child in module.named_children():
            self._adopt(name, own, lambda: self.add_module(name, child))
        for name, param in module.named_parameters(recurse=False):
            self._adopt(name, own, lambda: self.register_parameter(name, param))
        for name, buf in module.named_buffers(recurse=False):
            keep = name not in module._non_persistent_buffers_set
            self._adopt(name, own, lambda: self.register_buffer(name, buf, persistent=keep))
        traced = self._trace(module, stages, feature)
        for graph in (traced.train_graph, traced.eval_graph):  # constants the tracer made (torch.tensor(...))
            for node in graph.nodes:
                if node.op == "get_attr" and "." not in node.target and not hasattr(self, node.target):
                    self.register_buffer(node.target, getattr(traced, node.target), persistent=False)
        self._plans = {
            True: _plan(traced.train_graph, feature, module, label, len(stages)),
            False: _plan(traced.eval_graph, feature, module, label, len(stages)),
        }
        first_conv = next((m.in_channels for m in module.modules() if isinstance(m, nn.Conv2d)), 3)
        self._probe(module, in_channels or first_conv)

    def _adopt(self, name: str, own: set[str], register: Callable[[], None]) -> None:
        if name in own:
            raise BenchError(f"model {self.label}: its attribute {name!r} clashes with the staged-model wrapper")
        register()

    def _trace(self, module: nn.Module, stages: list[str], feature: str | None):
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

        try:
            train_names, eval_names = get_graph_node_names(module)
        except Exception as err:
            first = (str(err).strip().splitlines() or [""])[0]
            raise BenchError(f"model {self.label}: torch.fx cannot trace it ({type(err).__name__}: {first})") from None
        nodes = {f"stage{i}": s for i, s in enumerate(stages)}
        if feature is not None:
            nodes["feature"] = feature
        for key, name in nodes.items():
            if name not in eval_names and not any(n.startswith(name + ".") for n in eval_names):
                raise BenchError(f"model {self.label}: {key} {name!r} is not a module or node of it "
                                 f"(some of its nodes: {', '.join(eval_names[1:12])}, ...)")  # fmt: skip
        nodes["logits"] = eval_names[-1]
        if len(set(nodes.values())) != len(nodes):
            raise BenchError(f"model {self.label}: stages, feature and the output must be distinct nodes")
        return create_feature_extractor(module, return_nodes={name: key for key, name in nodes.items()})

    @torch.no_grad()
    def _probe(self, module: nn.Module, in_channels: int) -> None:
        was_training = self.training
        self.eval()
        module.eval()
        param = next(self.parameters(), None)
        errors = []
        try:
            for size in PROBE_SIZES:
                x = torch.zeros(1, in_channels, size, size, dtype=param.dtype if param is not None else None)
                try:
                    with recording_activations(self, self._activation_candidates()) as calls:
                        out = self._plans[False].full(self, x)
                    reference = module(x)
                except Exception as err:
                    errors.append(f"{size}px: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}")
                    continue
                break
            else:
                raise BenchError(f"model {self.label}: no probe input ran through it ({'; '.join(errors)})")
        finally:
            self.train(was_training)
            module.train(was_training)
        if not isinstance(reference, Tensor) or not torch.allclose(out["logits"], reference, atol=1e-5):
            raise BenchError(f"model {self.label}: the traced output differs from its forward's result; its forward "
                             "must return the logits tensor")  # fmt: skip
        feature = out["feature"]
        if feature.dim() > 2 and any(d != 1 for d in feature.shape[2:]):
            raise BenchError(f"model {self.label}: feature node gives a {tuple(feature.shape[1:])} map at "
                             f"{x.shape[-1]}px; name the pooled node (a (C,) or (C, 1, 1) output)")  # fmt: skip
        self._feature_shape = tuple(feature.shape[1:])
        stages = [value for key, value in out.items() if key.startswith("stage")]
        finals = [producer(stage, calls) for stage in stages]
        self._stage_acts = [call[0] if call is not None else None for call in finals]
        self.stage_channels = [int(s.shape[1]) if s.dim() == 4 else int(s.shape[-1]) for s in stages]
        self.feature_dim = int(feature[0].numel())
        self.num_classes = int(reference.shape[-1])

    # -- StagedNet ------------------------------------------------------------------------------------------

    def features_from(self, out: dict[str, Tensor]) -> Features:
        """The one place a traced forward's outputs become ``Features``."""
        return Features(
            stages=[out[f"stage{i}"] for i in range(self.num_stages)],
            feature=out["feature"].flatten(1),
            logits=out["logits"],
        )

    def _activation_candidates(self) -> list[str]:
        return [name for stage in self.stage_names for name in activation_leaves(self, stage)]

    def forward_features(self, x: Tensor, preact: bool = False) -> Features:
        """One pass of the traced graph; with ``preact``, each stage's pre-activation output too: the input of the
        activation module that returned the stage output (found at construction), else the output itself."""
        if not preact:
            return self.features_from(self._plans[self.training].full(self, x))
        with recording_activations(self, [n for n in self._stage_acts if n is not None]) as calls:
            features = self.features_from(self._plans[self.training].full(self, x))
        features.preact_stages = [preact_of(stage, calls) for stage in features.stages]
        return features

    def forward(self, x: Tensor) -> Tensor:
        return self._plans[self.training].full(self, x)["logits"]

    def _piece(self, index: int) -> Callable[..., Tensor]:
        plan = self._plans[self.training]
        if plan.pieces is None:
            raise BenchError(plan.why_not)
        return plan.pieces[index]

    def forward_stem(self, x: Tensor) -> Tensor:
        return x  # the stem is part of stage 0

    def forward_stage(self, index: int, x: Tensor) -> Tensor:
        return self._piece(index)(self, x)

    def forward_stage_preact(self, index: int, x: Tensor) -> tuple[Tensor, Tensor]:
        with recording_activations(self, [n for n in self._stage_acts[index : index + 1] if n is not None]) as calls:
            out = self.forward_stage(index, x)
        return out, preact_of(out, calls)

    def activate(self, index: int, preact: Tensor) -> Tensor:
        return activate(self, self._stage_acts[index], preact)

    def forward_pool(self, x: Tensor) -> Tensor:
        return self._piece(self.num_stages)(self, x).flatten(1)

    def forward_classifier(self, feature: Tensor) -> Tensor:
        return self._piece(self.num_stages + 1)(self, feature.reshape(feature.shape[0], *self._feature_shape))


def wrap_module(module: nn.Module, stages: list[str], feature: str | None = None, label: str | None = None,
                in_channels: int | None = None) -> ModuleNet:  # fmt: skip
    """``module`` behind the staged-model contract: its stages are the outputs of the modules named in
    ``stages``; ``feature`` names the pooled pre-logit node (default: the final Linear's input); ``in_channels``
    of the probe input (default: the first convolution's)."""
    return ModuleNet(module, list(stages), feature, label or type(module).__name__, in_channels)
