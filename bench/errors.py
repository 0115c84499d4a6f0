"""Errors a user can fix. The CLI prints them as one line and exits 2 (no traceback)."""

BUILTIN_PACKAGES = ("bench", "methods")  # what registers kdbench's own methods, models and datasets


class BenchError(Exception):
    """Bad input: unknown name, invalid suite field, missing dataset path, ..."""


class DuplicateName(BenchError):
    """A method, model or dataset name registered twice (a plugin clashing with a built-in or another plugin)."""

    def __init__(self, kind: str, name: str, holder: str) -> None:
        self.kind, self.name, self.holder = kind, name, holder  # holder: the module that registered it first
        super().__init__(f"{kind} {name!r} is already registered by {self.describe_holder()}")

    def describe_holder(self) -> str:
        builtin = self.holder.split(".")[0] in BUILTIN_PACKAGES
        return f"a built-in ({self.holder})" if builtin else f"module {self.holder}"
