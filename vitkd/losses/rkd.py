"""RKD: relational knowledge distillation (``rkd``), as in the Knowledge-Distillation-Zoo.

Paper: "Relational Knowledge Distillation", Park, Kim, Lu, Cho, CVPR 2019 (arXiv 1904.05068).
Official code (the Zoo): AberHu/Knowledge-Distillation-Zoo @ 65470c846c1300d555815da26999cbe2b51fc815,
``kd_losses/rkd.py`` (``RKD``), ``train_kd.py --kd_mode rkd`` (RepDistiller's is identical).

Formula (pooled features f_s [B, d_s], f_t [B, d_t]; dimensions may differ):
* distance: D_ij = √max(‖f_i‖² + ‖f_j‖² − 2⟨f_i, f_j⟩, 1e-12), diagonal set to 0 [B, B], divided by the mean of
  its positive entries; L_d = mean-SmoothL1_{β=1}(D_s, D_t) over B²;
* angle: e_ij = normalize(f_j − f_i) (eps 1e-12; e_ii = 0); cos_ijk = ⟨e_ij, e_ik⟩ [B, B, B];
  L_a = mean-SmoothL1_{β=1}(cos_s, cos_t) over B³;
* L = λ·(w_d·L_d + w_a·L_a).
Defaults: w_dist = 25, w_angle = 50, λ = 1 (``lambda_kd``; CIFAR-tuned starting points to re-tune).

Inputs (vitkd adaptation): the student's pre-logits ((h_cls + h_dist)/2 on a distilled ViT; the pooled map on a CNN) and
the teacher's pooled pre-logits t̄. The angle term needs B×B×d intermediates per network; ``angle_chunk_size = c``
computes it c anchors i at a time, recomputing each student chunk in the backward (activation checkpointing), so
peak memory is c·B·d instead of B²·d (same value and gradient; useful with d = 3024 and large per-GPU batches).

Batch-relational: ``scope='local'`` (default, as the official code) uses each process's batch; ``scope='global'``
all-gathers f_s (autograd-aware) and f_t first (identical on one process).

Where vitkd differs from the official code:
* the chunked angle option and the scope option; λ lives in the loss (``lambda_kd``); the teacher relations are
  computed without gradient (as the official ``no_grad``).
"""
from __future__ import annotations

from typing import Annotated, Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..domains import Integer, NonNegative
from ..features import Features, TapSpec
from ._adapt import Scope, gather_batch
from .base import Batch, DistillationLoss, register_loss

__all__ = ['pairwise_distance', 'normalized_distance', 'angle_cosines', 'rkd_distance_loss', 'rkd_angle_loss',
           'rkd_loss', 'RKD']


def pairwise_distance(features: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """D_ij = √max(‖f_i‖² + ‖f_j‖² − 2⟨f_i, f_j⟩, eps) with a zero diagonal: [B, d] → [B, B]."""
    square = features.pow(2).sum(dim=1)  # [B]
    dist_sq = (square[:, None] + square[None, :] - 2 * features @ features.t()).clamp(min=eps)
    off_diagonal = ~torch.eye(features.shape[0], dtype=torch.bool, device=features.device)
    return dist_sq.sqrt() * off_diagonal


def normalized_distance(features: torch.Tensor) -> torch.Tensor:
    """D / mean of its positive entries: [B, d] → [B, B].

    The entries are ≥ 0, so the sum of the positive ones is the sum of all of them: no boolean selection, whose output
    size the host would have to wait for on a GPU."""
    distance = pairwise_distance(features)
    return distance / (distance.sum() / (distance > 0).sum())


def angle_cosines(features: torch.Tensor, anchors: Optional[slice] = None) -> torch.Tensor:
    """cos_ijk = ⟨e_ij, e_ik⟩ with e_ij = normalize(f_j − f_i) for the anchors i in ``anchors`` (all if None).

    Args:
        features: [B, d].

    Returns:
        [A, B, B] with A the number of anchors.
    """
    anchor_features = features if anchors is None else features[anchors]
    directions = F.normalize(features[None, :, :] - anchor_features[:, None, :], p=2, dim=2)  # [A, B, d]
    return torch.bmm(directions, directions.transpose(1, 2))


def rkd_distance_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """mean-SmoothL1 over B² of the normalised distance matrices (teacher without gradient)."""
    with torch.no_grad():
        teacher_distance = normalized_distance(teacher_features)
    return F.smooth_l1_loss(normalized_distance(student_features), teacher_distance)


def _chunk_angle_sum(student_features: torch.Tensor, teacher_cosines: torch.Tensor, start: int, stop: int
                     ) -> torch.Tensor:
    cosines = angle_cosines(student_features, slice(start, stop))
    return F.smooth_l1_loss(cosines, teacher_cosines, reduction='sum')


def rkd_angle_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, chunk_size: int = 0
                   ) -> torch.Tensor:
    """mean-SmoothL1 over B³ of the angle cosines (teacher without gradient).

    Args:
        chunk_size: anchors per chunk (0: all at once). Chunks of the student are recomputed in the backward.
    """
    batch = student_features.shape[0]
    if chunk_size <= 0 or chunk_size >= batch:
        with torch.no_grad():
            teacher_cosines = angle_cosines(teacher_features)
        return F.smooth_l1_loss(angle_cosines(student_features), teacher_cosines)
    total = student_features.new_zeros(())
    for start in range(0, batch, chunk_size):
        stop = min(start + chunk_size, batch)
        with torch.no_grad():
            teacher_cosines = angle_cosines(teacher_features, slice(start, stop))  # [c, B, B]
        total = total + checkpoint(_chunk_angle_sum, student_features, teacher_cosines, start, stop,
                                   use_reentrant=False)
    return total / batch ** 3


def rkd_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, w_dist: float = 25.0,
             w_angle: float = 50.0, angle_chunk_size: int = 0,
             gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """The two weighted RKD terms {'dist': w_d·L_d, 'angle': w_a·L_a} for f_s [B, d_s], f_t [B, d_t].

    Args:
        gather: maps local [B, d] features to the batch the relations span (None: local batch).
    """
    teacher_features = teacher_features.detach()
    if gather is not None:
        student_features, teacher_features = gather(student_features), gather(teacher_features)
    terms = {}
    if w_dist:
        terms['dist'] = w_dist * rkd_distance_loss(student_features, teacher_features)
    if w_angle:
        terms['angle'] = w_angle * rkd_angle_loss(student_features, teacher_features, angle_chunk_size)
    return terms


@register_loss('rkd')
class RKD(DistillationLoss):
    """RKD: λ·(w_d·distance + w_a·angle) SmoothL1 between student and teacher batch relations."""
    paper = 'RKD, Park et al., CVPR 2019, arXiv:1904.05068 (Knowledge-Distillation-Zoo)'

    def __init__(self, lambda_kd: Annotated[float, NonNegative()] = 1.0, w_dist: Annotated[float, NonNegative()] = 25.0,
                 w_angle: Annotated[float, NonNegative()] = 50.0, angle_chunk_size: Annotated[int, Integer(lo=0)] = 0,
                 scope: Scope = 'local'):
        """
        Args:
            lambda_kd: λ (Zoo value; CIFAR-tuned starting point).
            w_dist, w_angle: weights of the distance and angle terms (a zero weight skips the term).
            angle_chunk_size: anchors per chunk of the angle term (0: unchunked).
            scope: ``local`` (per-process batch, official) or ``global`` (all-gathered batch).
        """
        super().__init__()
        self.lambda_kd, self.w_dist, self.w_angle = lambda_kd, w_dist, w_angle
        self.angle_chunk_size, self.scope = angle_chunk_size, scope
        self.student_taps = TapSpec(pooled=True)
        self.teacher_taps = TapSpec(pooled=True)

    def forward(self, student: Features, teacher: Features, batch: Batch) -> dict[str, torch.Tensor]:
        gather = gather_batch if self.scope == 'global' else None
        terms = rkd_loss(student.pooled, teacher.pooled, self.w_dist, self.w_angle, self.angle_chunk_size, gather)
        return {name: self.lambda_kd * value for name, value in terms.items()}
