"""``crd``: Contrastive Representation Distillation (Tian, Krishnan & Isola, ICLR 2020, §3; official code
RepDistiller ``crd/memory.py`` + ``crd/criterion.py``, mirrored by mdistiller ``CRD``).

Student and teacher pooled features are embedded by linear heads into a 128-d unit sphere (``g_s``, ``g_t``).
For sample i the *positive* is the other network's embedding of the same sample i; the ``K = 16384``
*negatives* are embeddings of other training samples, read from two memory banks that hold a momentum average
(m = 0.5) of every training sample's student and teacher embedding (the banks are indexed by the sample's
position in the training set). A critic ``h = P/(P + K/N)`` with ``P = exp(g_a·g_b/τ)/Z`` (τ = 0.07, N = training
set size, ``Z`` = a constant set on the first batch to ``mean(exp(·/τ))·N``, as the official code approximates
the partition function) is trained with the NCE objective, symmetrically: student embeddings against the
teacher bank, and teacher embeddings against the student bank. Negatives are drawn as RepDistiller's
``mode="exact"`` data sampler does: uniformly from the training samples of *other* classes, without replacement
unless there are fewer than K (then with replacement).

Total loss (RepDistiller ``--distill crd -a 0 -b 0.8``, mdistiller ``CRD.LOSS``): ``CE + 0.8·L_crd``. The paper's
"CRD+KD" row adds Hinton KD (``-a 1``, T = 4): set ``kd_weight: 1.0``.

Needs each sample's index: ``forward_train(x, y, index)`` where ``index`` is the sample's position in the
training subset (0..N−1, the order of ``Task.train_loader``), and the labels of that subset by position
(``set_train_targets``). ``fit`` binds both from the training loader, which must be able to yield indices.

State: both banks and the two Z constants are persistent buffers, so they are in every checkpoint and a resumed
run continues exactly (negatives are drawn from the global torch RNG, which the engine checkpoints too).
Choice: the contrastive part runs in float32 even under ``recipe.amp`` (exp of dot products / 0.07).

On several data-parallel workers (``prepare_distributed``; our reading, RepDistiller trains in one process): every
worker reads the same banks, then gathers the indices and embeddings of the whole batch (all workers' rows, in
the order of one process's batch) and applies the same momentum update, so the banks stay equal across workers
and are updated as one process's; Z is the mean of the workers' first-batch estimates. Negatives are drawn per
worker (each from its own RNG stream).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.errors import BenchError
from methods.base import Method, MethodContext, register_method
from methods.kd import kd_loss

if TYPE_CHECKING:
    from bench.engine import History, Hooks, Task
    from bench.recipe import Recipe

NCE_EPS = 1e-7  # RepDistiller ContrastLoss


def nce_loss(scores: Tensor, num_data: int) -> Tensor:
    """NCE objective of CRD (RepDistiller ``ContrastLoss``) for a (B, 1+K) matrix of normalised scores
    ``P`` (column 0: the positive pair, columns 1..K: negatives), noise distribution ``P_n = 1/N``:
    ``−(Σ_b log h(pos) + Σ_b Σ_k log(1 − h(neg_k))) / B`` with ``h = P/(P + K·P_n)``."""
    k = scores.shape[1] - 1
    noise = k / num_data
    pos, neg = scores[:, 0], scores[:, 1:]
    log_h_pos = torch.log(pos / (pos + noise + NCE_EPS))
    log_1m_h_neg = torch.log(noise / (neg + noise + NCE_EPS))
    return -(log_h_pos.sum() + log_1m_h_neg.sum()) / scores.shape[0]


def contrast_exp(memory_rows: Tensor, embedding: Tensor, temperature: float) -> Tensor:
    """``exp(m_j · e / τ)`` for each of the (B, 1+K, D) memory rows against its sample's (B, D) embedding."""
    return torch.exp(torch.bmm(memory_rows, embedding.unsqueeze(2)).squeeze(2) / temperature)


def crd_loss(
    student_exp: Tensor, teacher_exp: Tensor, z_student: Tensor | float, z_teacher: Tensor | float, num_data: int
) -> Tensor:
    """CRD loss (both directions): NCE of the student embeddings' scores against the teacher bank plus NCE of
    the teacher embeddings' scores against the student bank, each ``exp(·/τ)`` divided by its constant Z."""
    return nce_loss(student_exp / z_student, num_data) + nce_loss(teacher_exp / z_teacher, num_data)


def sample_negatives(
    anchor_labels: Tensor, sorted_index: Tensor, class_start: Tensor, class_count: Tensor, k: int
) -> Tensor:
    """(B, k) training-set positions drawn uniformly from the samples whose class differs from each anchor's.

    ``sorted_index`` lists the positions grouped by class; class c occupies ``[class_start[c], +class_count[c])``,
    and a draw ``u`` in ``[0, N − n_c)`` (the pool of anchor class c) skips that block. As RepDistiller, a pool
    smaller than k is drawn with replacement and any other without. Without replacement: a pool of at least 2k
    samples by re-drawing duplicates until none is left (few rounds, as collisions are rare); a pool between k
    and 2k as the k smallest of random keys over the pool (memory B × 2k at most). Both give a uniform k-subset.
    """
    n = sorted_index.numel()
    start, count = class_start[anchor_labels], class_count[anchor_labels]
    pool = n - count  # (B,)
    device = sorted_index.device
    draw = (torch.rand(anchor_labels.numel(), k, device=device) * pool.unsqueeze(1)).long()
    draw = torch.minimum(draw, (pool - 1).unsqueeze(1))  # float rounding at the top end
    keyed = ((pool >= k) & (pool < 2 * k)).nonzero().squeeze(1)
    if keyed.numel():
        width = int(pool[keyed].max())
        keys = torch.rand(keyed.numel(), width, device=device)
        keys.masked_fill_(torch.arange(width, device=device) >= pool[keyed].unsqueeze(1), 2.0)
        draw[keyed] = keys.topk(k, dim=1, largest=False).indices
    rejecting = (pool >= 2 * k).unsqueeze(1)
    while k > 1:
        ordered, perm = draw.sort(dim=1)
        dup = (ordered[:, 1:] == ordered[:, :-1]) & rejecting
        if not bool(dup.any()):
            break
        rows, cols = dup.nonzero(as_tuple=True)
        fresh = (torch.rand(rows.numel(), device=device) * pool[rows]).long()
        draw[rows, perm[rows, cols + 1]] = torch.minimum(fresh, pool[rows] - 1)
    position = draw + (draw >= start.unsqueeze(1)).long() * count.unsqueeze(1)
    return sorted_index[position]


class Embed(nn.Module):
    """CRD's embedding head: linear map to ``dim`` followed by L2 normalisation."""

    def __init__(self, in_features: int, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


@dataclass
class CRDHparams:
    feat_dim: int = 128
    nce_k: int = 16384
    nce_t: float = 0.07
    nce_m: float = 0.5
    ce_weight: float = 1.0
    crd_weight: float = 0.8
    kd_weight: float = 0.0  # 1.0 gives the paper's "CRD+KD"
    kd_temperature: float = 4.0

    def validate(self, where: str) -> None:
        checks = [
            (self.feat_dim >= 1, "feat_dim", "must be >= 1"),
            (self.nce_k >= 1, "nce_k", "must be >= 1"),
            (self.nce_t > 0, "nce_t", "must be > 0"),
            (0 <= self.nce_m < 1, "nce_m", "must be in [0, 1)"),
            (self.kd_temperature > 0, "kd_temperature", "must be > 0"),
            (min(self.ce_weight, self.crd_weight, self.kd_weight) >= 0, "weights", "must be >= 0"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise BenchError(f"{where}.{name}: {msg}")


@register_method
class CRD(Method):
    name = "crd"
    Hparams = CRDHparams
    needs_indices: ClassVar[bool] = True  # forward_train(x, y, index)

    def __init__(self, student, teacher, hparams: CRDHparams, context: MethodContext) -> None:
        super().__init__(student, teacher, hparams, context)
        self.num_data = context.num_train
        dim = hparams.feat_dim
        self.embed_s = Embed(student.feature_dim, dim)
        self.embed_t = Embed(teacher.feature_dim, dim)
        stdv = 1.0 / math.sqrt(dim / 3)  # RepDistiller's initialisation: rows of norm ~1
        self.register_buffer("memory_s", torch.rand(self.num_data, dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("memory_t", torch.rand(self.num_data, dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("z", torch.full((2,), -1.0))  # Z of the student / teacher scores; < 0: not set yet
        for name in ("train_labels", "sorted_index", "class_start", "class_count"):
            self.register_buffer(name, torch.empty(0, dtype=torch.long), persistent=False)
        self._distributed = None  # bench.distributed.TorchDistributed of a data-parallel run

    def prepare_distributed(self, distributed, sync_bn: bool) -> None:
        self._distributed = distributed

    def set_train_targets(self, targets: Tensor) -> None:
        """Labels of the training subset by position (what ``index`` in ``forward_train`` refers to)."""
        if targets.numel() != self.num_data:
            raise BenchError(f"crd: {targets.numel()} training labels for a memory bank of {self.num_data} samples")
        labels = targets.detach().long().to(self.memory_s.device)
        counts = torch.bincount(labels)
        self.train_labels = labels
        self.sorted_index = torch.argsort(labels, stable=True)
        self.class_count = counts
        self.class_start = counts.cumsum(0) - counts

    def fit(self, task: "Task", recipe: "Recipe", hooks: "Hooks | None" = None) -> "History":
        loader = task.train_loader
        if not hasattr(loader, "with_indices"):
            raise BenchError(f"crd: the training loader {type(loader).__name__} cannot yield sample indices")
        loader.with_indices = True
        self.set_train_targets(loader.targets)
        return super().fit(task, recipe, hooks)

    def forward_train(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if index is None:
            raise BenchError("crd: forward_train needs each sample's index in the training set")
        if self.train_labels.numel() == 0:
            raise BenchError("crd: set_train_targets was not called (the memory bank needs the training labels)")
        feats = self.student.forward_features(x)
        t_feats = self.teacher_features(x)
        losses = {"ce": self.hp.ce_weight * F.cross_entropy(feats.logits, y)}
        with torch.autocast(x.device.type, enabled=False):
            e_s = self.embed_s(feats.feature.float())
            e_t = self.embed_t(t_feats.feature.float())
            negatives = sample_negatives(
                self.train_labels[index], self.sorted_index, self.class_start, self.class_count, self.hp.nce_k
            )
            contrast = torch.cat([index.unsqueeze(1), negatives], dim=1)
            student_exp = contrast_exp(self.memory_t[contrast], e_s, self.hp.nce_t)
            teacher_exp = contrast_exp(self.memory_s[contrast], e_t, self.hp.nce_t)
            if self.z[0] < 0:
                z = torch.stack([student_exp.mean(), teacher_exp.mean()]).detach() * self.num_data
                self.z.copy_(self._distributed.all_mean(z) if self._distributed is not None else z)
            losses["crd"] = self.hp.crd_weight * crd_loss(student_exp, teacher_exp, self.z[0], self.z[1], self.num_data)
            self._update_memory(index, e_s.detach(), e_t.detach())
        if self.hp.kd_weight > 0:
            losses["kd"] = self.hp.kd_weight * kd_loss(feats.logits, t_feats.logits, self.hp.kd_temperature)
        return feats.logits, losses

    @torch.no_grad()
    def _update_memory(self, index: Tensor, e_s: Tensor, e_t: Tensor) -> None:
        """Momentum update of the batch's rows, re-normalised to unit length (RepDistiller ContrastMemory); on
        several workers, of the rows of every worker's share of the batch."""
        if self._distributed is not None:
            index, e_s, e_t = (self._distributed.gather(t) for t in (index, e_s, e_t))
        m = self.hp.nce_m
        for bank, emb in ((self.memory_s, e_s), (self.memory_t, e_t)):
            bank.index_copy_(0, index, F.normalize(bank[index] * m + emb * (1 - m), dim=1))
