"""Our losses against a peer's: torchdistill 1.1.5's values of the same losses on fixed random tensors, stored
once by ``tests/golden/make_torchdistill_golden.py`` (torchdistill is not needed here), to 1e-5 relative."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from methods.at import at_loss
from methods.crd import contrast_exp, crd_loss
from methods.dist import dist_loss
from methods.fitnet import fitnet_loss
from methods.kd import kd_objective
from methods.reviewkd import reviewkd_loss
from methods.srd import srd_loss

GOLDEN = Path(__file__).resolve().parent / "golden" / "torchdistill_1.1.5.json"
DATA = json.loads(GOLDEN.read_text())
CASES = DATA["cases"]


def tensors(case: dict) -> dict[str, torch.Tensor]:
    return {
        name: torch.tensor(spec["data"], dtype=getattr(torch, spec["dtype"])).reshape(spec["shape"])
        for name, spec in case["inputs"].items()
    }


def kd(t: dict, p: dict) -> torch.Tensor:
    return sum(kd_objective(t["student"], t["teacher"], t["targets"], p["temperature"], p["ce_weight"],
                            p["kd_weight"]).values())  # fmt: skip


def fitnet(t: dict, p: dict) -> torch.Tensor:
    return fitnet_loss(t["student"], t["teacher"])


def at(t: dict, p: dict) -> torch.Tensor:
    n = len(t) // 2
    return at_loss([t[f"s{i}"] for i in range(n)], [t[f"t{i}"] for i in range(n)], p["p"])


def dist(t: dict, p: dict) -> torch.Tensor:
    return dist_loss(t["student"], t["teacher"], p["beta"], p["gamma"], p["temperature"])


def crd(t: dict, p: dict) -> torch.Tensor:
    """Student embeddings scored against the teacher bank and vice versa; Z set from this first batch, as
    ``methods.crd.CRD`` does (mean of the exponentiated scores × the number of training samples)."""
    rows = t["contrast"]
    student_exp = contrast_exp(t["memory_t"][rows], t["student"], p["nce_t"])
    teacher_exp = contrast_exp(t["memory_s"][rows], t["teacher"], p["nce_t"])
    n = p["num_data"]
    return crd_loss(student_exp, teacher_exp, student_exp.mean() * n, teacher_exp.mean() * n, n)


def srd(t: dict, p: dict) -> torch.Tensor:
    return srd_loss(t["student_features"], t["teacher_features"], t["student"], t["teacher"], p["exponent"],
                    p["temperature"])  # fmt: skip


def hcl(t: dict, p: dict) -> torch.Tensor:
    n = len(t) // 2
    return reviewkd_loss([t[f"s{i}"] for i in range(n)], [t[f"t{i}"] for i in range(n)])


OURS = {"kd_crd": kd, "kd_imagenet": kd, "fitnet": fitnet, "at": at, "dist": dist, "crd": crd, "srd": srd, "hcl": hcl}


def test_the_golden_file_is_torchdistill_1_1_5_and_covers_every_shared_loss():
    assert DATA["torchdistill"] == "1.1.5"
    assert set(CASES) == set(OURS)


@pytest.mark.parametrize("name", sorted(OURS))
def test_our_loss_equals_torchdistill(name):
    case = CASES[name]
    got = OURS[name](tensors(case), case["params"]).item()
    assert got == pytest.approx(case["value"], rel=1e-5)
