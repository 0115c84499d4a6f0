"""A stage's final activation, for models whose code we do not write (timm, any ``nn.Module``): which module it is,
and its input (the stage's pre-activation output) recorded by hooks that exist only while asked for.

Not here: the hand-written CIFAR and torchvision models, which return their pre-activations themselves.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

from torch import Tensor, nn

# Modules that count as a stage's final activation (its input is the stage's pre-activation output).
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
               nn.Hardswish)  # fmt: skip

Call = tuple[str, Tensor, Tensor]  # (module name, its input, its output)


@contextmanager
def recording_activations(model: nn.Module, names: Iterable[str]) -> Iterator[list[Call]]:
    """While active, each call of ``model``'s modules ``names`` appends ``(name, input, output)`` (an in-place
    module's input is cloned before it runs, so it is still the pre-activation)."""
    calls: list[Call] = []
    handles = []
    for name in sorted(set(names)):
        module = model.get_submodule(name)
        pending: list[Tensor] = []

        def before(m: nn.Module, args: tuple, pending: list[Tensor] = pending) -> None:
            pending.append(args[0].clone() if getattr(m, "inplace", False) else args[0])

        def after(m: nn.Module, args: tuple, out: Tensor, name: str = name, pending: list[Tensor] = pending) -> None:
            calls.append((name, pending.pop(), out))

        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def activation_leaves(model: nn.Module, prefix: str) -> list[str]:
    """Names of the activation modules inside ``model``'s module ``prefix`` (itself included)."""
    return [n for n, m in model.named_modules() if isinstance(m, ACTIVATIONS) and (n == prefix or n.startswith(prefix + "."))]


def producer(output: Tensor, calls: list[Call]) -> Call | None:
    """The recorded call that returned the very tensor ``output``, if any."""
    return next((call for call in reversed(calls) if call[2] is output), None)


def preact_of(output: Tensor, calls: list[Call]) -> Tensor:
    """The input of the recorded activation call that returned ``output``; ``output`` itself when none did."""
    call = producer(output, calls)
    return output if call is None else call[1]


def activate(model: nn.Module, name: str | None, preact: Tensor) -> Tensor:
    """``model``'s activation ``name`` applied to ``preact`` (unchanged, in-place or not); identity for None."""
    if name is None:
        return preact
    act = model.get_submodule(name)
    return act(preact.clone() if getattr(act, "inplace", False) else preact)
