"""Accuracy, calibration and convergence-speed metrics.

Classification metrics are computed from the logits of a whole split at once (``classification_metrics``)
so every run reports the same definitions: top-1/top-5 in percent, NLL in nats, Brier score (sum over
classes, batch mean) and ECE (percent, see ``expected_calibration_error``).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

RELIABILITY_FILE = "reliability.json"  # a finished run's reliability bins (run folder and MLflow artifact)


def topk_accuracy(logits: Tensor, targets: Tensor, k: int = 1) -> float:
    """Percent of samples whose target is among the ``k`` largest logits."""
    k = min(k, logits.shape[1])
    hits = logits.topk(k, dim=1).indices.eq(targets[:, None]).any(dim=1)
    return 100.0 * hits.float().mean().item()


def _confidence_bins(logits: Tensor, targets: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per equal-width bin ``(i/n, (i+1)/n]`` of the top-1 confidence: the sample count, the summed confidence
    and the number of correct predictions."""
    confidence, predicted = logits.float().softmax(dim=1).max(dim=1)
    bins = torch.clamp(torch.ceil(confidence * n_bins).long() - 1, 0, n_bins - 1)
    count = torch.bincount(bins, minlength=n_bins).float()
    conf_sum = torch.bincount(bins, weights=confidence, minlength=n_bins)
    return count, conf_sum, torch.bincount(bins, weights=predicted.eq(targets).float(), minlength=n_bins)


def expected_calibration_error(logits: Tensor, targets: Tensor, n_bins: int = 15) -> float:
    """ECE (in percent) of the top-1 prediction with ``n_bins`` equal-width confidence bins.

    ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)|, bins ``(i/n, (i+1)/n]`` (Guo et al. 2017).
    """
    _, conf_sum, acc_sum = _confidence_bins(logits, targets, n_bins)
    return 100.0 * ((conf_sum - acc_sum).abs().sum() / len(targets)).item()


def reliability_bins(logits: Tensor, targets: Tensor, n_bins: int = 15) -> dict[str, list[float]]:
    """Per-bin count, mean confidence and accuracy, for reliability diagrams."""
    count, conf_sum, acc_sum = _confidence_bins(logits, targets, n_bins)
    safe = count.clamp(min=1)
    return {"count": count.tolist(), "confidence": (conf_sum / safe).tolist(), "accuracy": (acc_sum / safe).tolist()}


def classification_metrics(logits: Tensor, targets: Tensor, n_bins: int = 15) -> dict[str, float]:
    logits = logits.float()
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(targets, logits.shape[1]).float()
    return {
        "top1": topk_accuracy(logits, targets, 1),
        "top5": topk_accuracy(logits, targets, 5),
        "nll": F.cross_entropy(logits, targets).item(),
        "brier": (probs - onehot).pow(2).sum(dim=1).mean().item(),
        "ece": expected_calibration_error(logits, targets, n_bins),
    }


def epochs_to_target(curve: Sequence[float], target: float | None) -> float:
    """First epoch (1-based) whose accuracy reaches ``target``; NaN if never (or no target)."""
    if target is None:
        return math.nan
    for epoch, value in enumerate(curve, start=1):
        if value >= target:
            return float(epoch)
    return math.nan


def curve_auc(curve: Sequence[float]) -> float:
    """Area under the accuracy-vs-epoch curve, normalised by the number of epochs (mean accuracy)."""
    return float(sum(curve) / len(curve)) if curve else math.nan
