"""The progress display: one line per suite with done / running / failed / pending runs and an ETA.

Executors feed it events (``add`` a run not known in advance, ``start``, ``epoch``, ``end`` with the run's
:class:`~bench.run.jobs.Outcome`); the local executor calls them directly, the Ray executor from the trials'
results on the driver. It knows nothing of how runs execute.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Callable

from bench.run.jobs import SKIPPED, STOPPED, Outcome
from bench.suites import RunSpec
from bench.tracking import FINISHED


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Counts of done / running / failed / pending runs and an ETA, printed by the driver.

    The ETA divides the epochs still to train by the epochs trained per second so far in this session
    (all workers together, so it accounts for parallelism). On a terminal the line is refreshed in place
    every epoch; otherwise (logs, CI) it is appended to the line printed when a run ends."""

    def __init__(
        self,
        name: str,
        specs: list[RunSpec],
        skipped: int,
        log: Callable[[str], None] = print,
        live: bool = False,
        clock: Callable[[], float] = time.monotonic,
        unknown: int = 0,
        unknown_epochs: int = 0,
    ) -> None:
        """``unknown``: jobs not known in advance (sweep trials drawn by Tune), ``unknown_epochs`` each;
        ``add`` makes them known as they start."""
        self.name, self.log, self.live, self.clock = name, log, live, clock
        self.specs = {s.hash: s for s in specs}
        self.remaining = {s.hash: s.recipe.epochs for s in specs}
        self.unknown, self.unknown_epochs = unknown, unknown_epochs
        self.reached: dict[str, int] = {}
        self.skipped, self.finished, self.failed, self.stopped = skipped, 0, 0, 0
        self.running: dict[str, float] = {}
        self.teachers_pending = 0
        self.epochs_trained = 0
        self.first_start: float | None = None

    @property
    def pending(self) -> int:
        return len(self.remaining) - len(self.running) + self.unknown

    def add(self, spec: RunSpec) -> None:
        if spec.hash not in self.specs:
            self.specs[spec.hash] = spec
            self.remaining[spec.hash] = spec.recipe.epochs
            self.unknown = max(self.unknown - 1, 0)

    def eta(self) -> str:
        left = sum(self.remaining.values()) + self.unknown * self.unknown_epochs
        if left == 0:
            return "0s"
        if not self.epochs_trained or self.first_start is None:
            return "?"
        rate = self.epochs_trained / max(self.clock() - self.first_start, 1e-9)
        return _duration(left / rate)

    def line(self) -> str:
        done = self.skipped + self.finished
        total = done + self.failed + self.stopped + len(self.remaining) + self.unknown
        parts = [f"{done}/{total} done" + (f" ({self.skipped} skipped)" if self.skipped else "")]
        parts += [f"{len(self.running)} running", f"{self.failed} failed", f"{self.pending} pending"]
        if self.stopped:
            parts.insert(2, f"{self.stopped} stopped early")
        if self.teachers_pending:
            parts.append(f"{self.teachers_pending} teacher(s) training")
        return f"{self.name}: " + ", ".join(parts) + f", ETA {self.eta()}"

    def _show(self, event: str | None = None) -> None:
        if self.live:
            sys.stdout.write("\r\033[K" + (event + "\n" if event else "") + self.line())
            sys.stdout.flush()
        elif event:
            self.log(f"{event} | {self.line()}")

    def start(self, key: str) -> None:
        if key not in self.remaining or key in self.running:
            return
        self.running[key] = self.clock()
        if self.first_start is None:
            self.first_start = self.clock()
        self._show()

    def epoch(self, key: str, epoch: int) -> None:
        """``epoch``: the number of epochs the run has completed (a resumed run starts above 1)."""
        if key not in self.remaining:
            return
        if key in self.reached:  # the first report of a resumed run is not a whole session's work
            self.epochs_trained += max(epoch - self.reached[key], 0)
        else:
            self.epochs_trained += 1
        self.reached[key] = epoch
        self.remaining[key] = max(self.specs[key].recipe.epochs - epoch, 0)
        if self.live:
            self._show()

    def teacher_done(self) -> None:
        self.teachers_pending = max(self.teachers_pending - 1, 0)

    def end(self, outcome: Outcome) -> None:
        key = outcome.key
        if key not in self.remaining:
            return
        started = self.running.pop(key, None)
        del self.remaining[key]
        if outcome.status in (FINISHED, SKIPPED):
            self.finished += 1
        elif outcome.status == STOPPED:
            self.stopped += 1
        else:
            self.failed += 1
        spec = self.specs[key]
        if outcome.status == FINISHED:
            what = f"top-1 {outcome.metrics.get('top1', math.nan):.2f}"
        elif outcome.status == SKIPPED:
            what = "already finished (its MLflow run)"
        elif outcome.status == STOPPED:
            what = "stopped early by the scheduler"
        else:
            what = outcome.error or "no reason recorded"
        took = f" ({self.clock() - started:.1f} s)" if started is not None else ""
        count = self.finished + self.failed + self.stopped
        total = count + len(self.remaining) + self.unknown
        self._show(f"[{count}/{total}] {outcome.status.lower():8s} {spec.run_name}: {what}{took}")

    def close(self) -> None:
        if self.live:
            sys.stdout.write("\r\033[K" + self.line() + "\n")
            sys.stdout.flush()
