"""Speed and accuracy regression benchmarks (pytest-benchmark): ``make bench`` / ``make nightly``, not ``make test``."""
