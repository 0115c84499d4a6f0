"""The runs of a suite as a pandas frame (``runs.csv``): one row per spec that has an MLflow run, with what
produced it (``PROVENANCE_COLUMNS``, from the run's tags; ``produced_by`` sums them up in one line).

Only runs whose spec hash belongs to the suite as it is now are used (editing a suite never mixes stale runs
in); for each spec the latest finished run counts, else its latest attempt (shown as failed).
"""
from __future__ import annotations

import pandas as pd

from bench.suites import RunSpec
from bench.tracking import Tracker

PROVENANCE_COLUMNS = ["git_commit", "git_dirty", "torch_version", "device", "device_name", "device_count"]
RUN_COLUMNS = [
    "suite", "dataset", "teacher", "student", "method", "label", "fraction", "seed", "status", "top1", "top5", "nll",
    "ece",
    "brier", "best_top1", "best_epoch", "epochs_to_target", "auc_top1", "wall_s", "teacher_top1", "extra_params",
    "spec_hash", "run_id", "error", *PROVENANCE_COLUMNS,
]  # fmt: skip
STATUS_ORDER = {"FINISHED": 0, "RUNNING": 1, "KILLED": 2, "FAILED": 3}


def runs_frame(tracker: Tracker, specs: list[RunSpec]) -> pd.DataFrame:
    """One row per spec of the suite that has an MLflow run (see module docstring for which run)."""
    raw = tracker.search()
    wanted = {s.hash: s for s in specs}
    if raw.empty or "tags.spec_hash" not in raw:
        return pd.DataFrame(columns=RUN_COLUMNS)
    raw = raw[raw["tags.spec_hash"].isin(wanted)].copy()
    raw["_rank"] = raw["status"].map(STATUS_ORDER).fillna(9)
    raw = raw.sort_values(["_rank", "start_time"], ascending=[True, False]).drop_duplicates("tags.spec_hash")
    rows = []
    for _, r in raw.iterrows():
        spec = wanted[r["tags.spec_hash"]]
        row = {
            "suite": spec.suite, "dataset": spec.dataset, "teacher": spec.teacher, "student": spec.student,
            "method": spec.method,
            "label": spec.label, "fraction": spec.fraction, "seed": spec.seed, "status": r["status"].lower(),
            "spec_hash": spec.hash, "run_id": r["run_id"], "error": r.get("tags.error") or "",
            **{c: r.get(f"tags.{c}") for c in PROVENANCE_COLUMNS},
        }  # fmt: skip
        for col in r.index:
            if col.startswith("metrics.") and col[len("metrics.") :] not in row:
                row[col[len("metrics.") :]] = r[col]
        rows.append(row)
    frame = pd.DataFrame(rows)
    extra = [c for c in frame.columns if c not in RUN_COLUMNS and not c.startswith(("train_", "test_", "lr", "epoch"))]
    frame = frame.reindex(columns=RUN_COLUMNS + sorted(extra))
    order = {s.hash: i for i, s in enumerate(specs)}
    return frame.sort_values("spec_hash", key=lambda h: h.map(order)).reset_index(drop=True)


def _listing(values: pd.Series) -> str:
    found = sorted({str(v) for v in values.dropna()})
    return ", ".join(found) if found else "unknown"


def produced_by(frame: pd.DataFrame) -> str:
    """One line on what produced the finished runs: commit(s), dirty or not, hardware, torch version."""
    done = frame[frame.status == "finished"]
    if done.empty:
        return "Produced by: no finished runs."
    dirty = {str(v).lower() for v in done["git_dirty"].dropna()}
    state = ("with uncommitted changes" if dirty == {"true"} else "clean" if dirty == {"false"} else
             "some runs with uncommitted changes" if dirty else "dirty or not: unknown")  # fmt: skip
    hardware = done.drop_duplicates(["device_name", "device"])
    kinds = [f"{r.device_name} ({f'CPU, {r.device_count} cores' if str(r.device) == 'cpu' else r.device})"
             for r in hardware.itertuples() if isinstance(r.device_name, str)]  # fmt: skip
    where = "; ".join(kinds) or "unknown hardware"
    return (f"Produced by kdbench at commit {_listing(done['git_commit'])} ({state}), on {where}, torch "
            f"{_listing(done['torch_version'])}; {len(done)} finished runs (runs.csv has each run's own).")
