"""The suite files kdbench ships; installed as the package data of ``kdbench_suites`` (``bench.suites`` finds them
with ``importlib.resources``). The YAML files are the content; this file only makes the folder a package."""
