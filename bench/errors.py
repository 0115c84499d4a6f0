"""Errors a user can fix. The CLI prints them as one line and exits 2 (no traceback)."""


class BenchError(Exception):
    """Bad input: unknown name, invalid suite field, missing dataset path, ..."""
