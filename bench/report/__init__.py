"""The report: reads a suite's runs from MLflow and writes its files (tables, plots, calibration, sweep outputs).
It imports nothing of the training code (engine, methods, executors)."""
from bench.report.frame import runs_frame
from bench.report.tables import write_tables

__all__ = ["runs_frame", "write_tables"]
