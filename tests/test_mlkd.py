"""MLKD: the batch- and class-level consistency terms against hand-computed values, and the official code's
confidence masking (median thresholds, ``le``, a batch-averaged loss *scaled* by the kept fraction)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from methods.kd import kd_loss
from methods.mlkd import batch_consistency_loss, class_consistency_loss, confidence_masks, mlkd_loss
from methods.modifiers.ls import standardize_logits
from tests.test_modifiers import composed


def softmax_rows(z: list[list[float]], t: float) -> list[list[float]]:
    out = []
    for row in z:
        e = [math.exp(v / t) for v in row]
        out.append([v / sum(e) for v in e])
    return out


S = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]
T_ = [[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]]


def test_batch_and_class_consistency_match_the_hand_computed_gram_matrices():
    ps, pt = softmax_rows(S, 2.0), softmax_rows(T_, 2.0)
    n, c = 2, 3
    batch = sum((sum(pt[i][k] * pt[j][k] for k in range(c)) - sum(ps[i][k] * ps[j][k] for k in range(c))) ** 2
                for i in range(n) for j in range(n)) / n  # fmt: skip
    klass = sum((sum(pt[i][a] * pt[i][b] for i in range(n)) - sum(ps[i][a] * ps[i][b] for i in range(n))) ** 2
                for a in range(c) for b in range(c)) / c  # fmt: skip
    s, t = torch.tensor(S), torch.tensor(T_)
    assert batch_consistency_loss(s, t, 2.0).item() == pytest.approx(batch, rel=1e-5)
    assert class_consistency_loss(s, t, 2.0).item() == pytest.approx(klass, rel=1e-5)
    assert batch_consistency_loss(t, t, 2.0).item() == 0.0 and class_consistency_loss(t, t, 2.0).item() == 0.0


def test_confidence_masks_keep_samples_and_classes_at_or_below_the_median():
    torch.manual_seed(0)
    for n in (4, 5):  # even: the median interpolates; odd: the median sample itself is kept (le)
        t = torch.randn(n, 6) * 3
        sample, klass = confidence_masks(t)
        p = torch.softmax(t, 1).numpy()
        conf = p.max(1)
        assert np.array_equal(sample.numpy(), conf <= np.percentile(conf, 50))
        assert np.array_equal(klass.numpy(), p.sum(0) <= np.percentile(p.sum(0), 50))
    assert confidence_masks(torch.randn(5, 6))[0].sum().item() == 3


def test_masking_scales_the_batch_averaged_terms_by_the_kept_fraction_as_the_official_code_does():
    torch.manual_seed(1)
    s, t = torch.randn(6, 5), torch.randn(6, 5) * 2
    temps = (4.0, 3.0, 5.0, 2.0, 6.0)
    terms = mlkd_loss(s, t, temps)
    sample, klass = confidence_masks(t)
    kept, kept_c = sample.float().mean(), klass.float().mean()
    assert torch.allclose(terms["kd"], sum(kd_loss(s, t, T) for T in temps) * kept)
    assert torch.allclose(terms["bc"], sum(batch_consistency_loss(s, t, T) for T in temps) * kept)
    assert torch.allclose(terms["cc"], sum(class_consistency_loss(s, t, T) for T in temps) * kept_c)
    # not the per-sample selection of the paper's wording (the code's reduce=False path is commented out)
    selected = sum(kd_loss(s[sample], t[sample], T) for T in temps)
    assert not torch.allclose(terms["kd"], selected, rtol=1e-3)


def test_mlkd_with_ls_standardizes_only_the_instance_level_terms():
    method = composed("mlkd+ls", {"temperatures": [2.0, 3.0, 5.0, 2.0, 6.0], "ce_weight": 1.0, "kd_weight": 9.0})
    plain = composed("mlkd", {"temperatures": [2.0, 3.0, 5.0, 2.0, 6.0], "ce_weight": 1.0, "kd_weight": 9.0})
    x, y = torch.randn(6, 1, 8, 8), torch.arange(6) % 10
    logits, losses = method.train().forward_train(x, y)
    _, raw = plain.train().forward_train(x, y)
    t = method.teacher_features(x).logits
    assert torch.equal(losses["bc"], raw["bc"]) and torch.equal(losses["cc"], raw["cc"])
    expected = mlkd_loss(logits, t, [2.0, 3.0, 5.0, 2.0, 6.0], (standardize_logits(logits), standardize_logits(t)))
    assert torch.allclose(losses["kd"], 9.0 * expected["kd"]) and not torch.allclose(losses["kd"], raw["kd"])
    assert set(losses) == {"ce", "kd", "bc", "cc"}
    sum(losses.values()).backward()
    assert all(p.grad is None for p in method.teacher.parameters())
