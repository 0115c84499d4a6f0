"""File locks that die with their holder: ``flock`` on an open file, released by the kernel when the process
ends, also on SIGKILL. A lock held by a live process is waited for; a lock whose holder died is free."""
from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


@contextmanager
def exclusive_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold ``path`` (created if missing) exclusively for the block; if another live process holds it, call
    ``on_wait`` once and wait for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def held_elsewhere(path: Path) -> bool:
    """Whether a live process (this one included, through another ``exclusive_lock``) holds ``path`` now."""
    if not path.exists():
        return False
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


@contextmanager
def shared_lock(path: Path, when_alone: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold ``path`` shared with other processes for the block. When no other live process holds it, first call
    ``when_alone`` while holding it exclusively (e.g. to remove what processes that ended left behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            if when_alone is not None:
                when_alone()
        fcntl.flock(handle, fcntl.LOCK_SH)  # from exclusive: converted; else waits out a holder's clean-up
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
