import math

import pytest
import torch

from bench.metrics import (
    classification_metrics,
    curve_auc,
    epochs_to_target,
    expected_calibration_error,
    topk_accuracy,
)


def brute_force_ece(logits, targets, n_bins):
    probs = logits.softmax(1)
    conf, pred = probs.max(1)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [i for i in range(len(conf)) if (conf[i] > lo or (b == 0 and conf[i] >= 0)) and conf[i] <= hi]
        if not members:
            continue
        acc = sum(float(pred[i] == targets[i]) for i in members) / len(members)
        avg_conf = sum(float(conf[i]) for i in members) / len(members)
        total += len(members) / len(conf) * abs(acc - avg_conf)
    return 100 * total


def test_ece_matches_a_brute_force_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 7, generator=g) * 3
    targets = torch.randint(0, 7, (500,), generator=g)
    assert expected_calibration_error(logits, targets, 15) == pytest.approx(brute_force_ece(logits, targets, 15), abs=1e-4)


def test_ece_is_zero_when_confidence_equals_accuracy():
    # every sample has top-1 confidence 0.75 (two classes: logit gap log 3); exactly 3 of 4 are correct
    logits = torch.tensor([[math.log(3.0), 0.0]] * 400)
    targets = torch.tensor([0, 0, 0, 1] * 100)
    assert expected_calibration_error(logits, targets) == pytest.approx(0.0, abs=1e-4)


def test_ece_of_an_overconfident_model():
    logits = torch.tensor([[10.0, 0.0]] * 100)  # confidence ~1, accuracy 50 %
    targets = torch.tensor([0, 1] * 50)
    assert expected_calibration_error(logits, targets) == pytest.approx(50.0, abs=0.01)


def test_topk_and_nll():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0]])
    targets = torch.tensor([0, 2, 0])
    assert topk_accuracy(logits, targets, 1) == pytest.approx(100 / 3)
    assert topk_accuracy(logits, targets, 2) == pytest.approx(200 / 3)
    m = classification_metrics(logits, targets)
    expected_nll = -torch.log_softmax(logits, 1)[torch.arange(3), targets].mean().item()
    assert m["nll"] == pytest.approx(expected_nll)
    assert m["top5"] == 100.0


def test_convergence_speed_and_auc():
    curve = [10.0, 50.0, 89.9, 90.0, 95.0]
    assert epochs_to_target(curve, 90) == 4
    assert math.isnan(epochs_to_target(curve, 99))
    assert math.isnan(epochs_to_target(curve, None))
    assert curve_auc(curve) == pytest.approx(sum(curve) / 5)
