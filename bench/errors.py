"""Errors a user can fix. The CLI prints them as one line and exits 2 (no traceback)."""


class BenchError(Exception):
    """Bad input: unknown name, invalid suite field, missing dataset path, ..."""


class DuplicateName(BenchError):
    """A method, model or dataset name registered twice (a plugin clashing with a built-in or another plugin)."""

    def __init__(self, kind: str, name: str, holder: str) -> None:
        super().__init__(f"{kind} {name!r} is already registered by {holder}")
        self.kind, self.name, self.holder = kind, name, holder
