"""Small helpers shared by the CIFAR families."""
from __future__ import annotations

from bench.errors import BenchError


def reject_options(model: str, options: dict) -> None:
    """Constructors take ``**kwargs`` for a uniform signature; anything they do not use is a user error."""
    if options:
        raise BenchError(f"model {model!r} does not take option(s) {sorted(options)}")
