"""kdbench: a benchmark and reproduction harness for knowledge distillation."""
__version__ = "0.1.0"
