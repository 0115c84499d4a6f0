"""Published figures a suite compares its runs with, and where they come from: ``Reference`` (one cell's
top-1 and/or convergence figure) and ``Provenance`` (a suite's ``reference_sources`` entry per method label).

A suite file gives a pair's reference as a number (its top-1) or as a mapping ``{top1, epochs_to_target,
speedup, source, protocol, epoch}``; ``resolve_references`` fills what a cell leaves out from the method's
``reference_sources`` entry. ``epoch`` says which of our accuracies the published one is compared with: the
``best`` epoch (the default; what most papers print) or the ``final`` one. The verdicts are made in
``bench.report.verdicts``; the suite schema is ``bench.suites``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from bench.errors import BenchError

REFERENCE_EPOCHS = ("best", "final")  # which of our accuracies a published one is compared with


def _check_epoch(epoch: str, where: str) -> None:
    if epoch and epoch not in REFERENCE_EPOCHS:
        raise BenchError(f"{where}.epoch: must be one of {list(REFERENCE_EPOCHS)}, got {epoch!r}")


@dataclass
class Provenance:
    """Where a published number comes from and how it was measured, printed beside it in the tables."""

    source: str  # the paper and table, or the repository file, the number is taken from
    protocol: str = ""  # best or last epoch, runs averaged, and how the recipe differs from the suite's
    epoch: str = ""  # compare with our "best" (default) or "final" epoch top-1

    def validate(self, where: str) -> None:
        _check_epoch(self.epoch, where)


@dataclass
class Reference:
    """A published figure for one cell: top-1 (%), and/or a convergence figure (epochs to the suite's
    ``target_top1``, or a speed-up: the baseline's epochs to target over the method's). ``source`` /
    ``protocol`` / ``epoch`` default to the suite's ``reference_sources`` entry of the method label."""

    top1: float | None = None
    epochs_to_target: float | None = None
    speedup: float | None = None
    source: str = ""
    protocol: str = ""
    epoch: str = ""

    def validate(self, where: str) -> None:
        if self.top1 is None and self.epochs_to_target is None and self.speedup is None:
            raise BenchError(f"{where}: give top1, epochs_to_target or speedup")
        _check_epoch(self.epoch, where)


def resolve_references(given: dict[str, float | Reference], sources: dict[str, Provenance]) -> dict[str, Reference]:
    """Each label's reference as a ``Reference`` with its provenance: its own, else ``sources[label]``."""
    out = {}
    for label, ref in given.items():
        ref = ref if isinstance(ref, Reference) else Reference(float(ref))
        default = sources.get(label, Provenance(""))
        out[label] = replace(ref, source=ref.source or default.source, protocol=ref.protocol or default.protocol,
                             epoch=ref.epoch or default.epoch or "best")  # fmt: skip
    return out
