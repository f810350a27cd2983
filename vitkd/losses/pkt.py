"""PKT: probabilistic knowledge transfer (``pkt``), as in the Knowledge-Distillation-Zoo.

Paper: "Learning Deep Representations with Probabilistic Knowledge Transfer", Passalis & Tefas, ECCV 2018
(arXiv 1803.10837).
Official code (the Zoo): AberHu/Knowledge-Distillation-Zoo @ 65470c846c1300d555815da26999cbe2b51fc815,
``kd_losses/pkt.py`` (``PKTCosSim``), ``train_kd.py --kd_mode pkt``.

Formula (pooled features f_s [B, d_s], f_t [B, d_t]; dimensions may differ):
  f̂ = f / (‖f‖₂ + 1e-6) per row (NaNs set to 0);  K = f̂ f̂ᵀ [B, B];  K ← (K + 1)/2;  P_ij = K_ij / Σ_j K_ij;
  L = λ · mean over the B² entries of P^t_ij · log((P^t_ij + 1e-6) / (P^s_ij + 1e-6))
(row-wise KL of the cosine-similarity distributions, averaged over B², diagonal included).
Defaults: λ = 10000 (``lambda_kd``; CIFAR-tuned starting point to re-tune), eps 1e-6 (RepDistiller: 1e-7, β 30000).

Inputs (vitkd adaptation): the student's pre-logits (``forward_head(pre_logits=True)``: (h_cls + h_dist)/2 on a
distilled ViT, the pooled map on a CNN) and the teacher's pooled pre-logits t̄.

Batch-relational: ``scope='local'`` (default, as the official code) uses each process's batch; ``scope='global'``
all-gathers f_s (autograd-aware) and f_t first so the relation spans the global batch (identical on one process).

Where vitkd differs from the official code:
* the row norm is ``torch.linalg.vector_norm``, whose gradient at a zero row is 0 (the Zoo's ``sqrt(sum(f²))`` gives
  NaN gradients there); NaN entries are replaced out of place;
* the scope option; λ lives in the loss (``lambda_kd``); the teacher features are detached.

ViT students (``vit_student_weight`` = 0.01): the Zoo's CIFAR-tuned λ is too strong for a ViT student. On the table's
ViT student (``scripts/reproduce.py``, 150 steps, avg-head top-1 gain over the no-teacher student) weight 1 gave
−1.85 points, 0.1 gave −0.73 and 0.01 −0.21 (seed 0), so a ViT student gets weight 0.01 unless the command gives one
(``pkt:1`` = the Zoo's).
"""
from __future__ import annotations

from typing import Annotated, Callable, Optional

import torch

from ..domains import NonNegative, Positive
from ..features import Features, TapSpec
from ._adapt import Scope, gather_batch
from .base import Batch, DistillationLoss, register_loss

__all__ = ['cosine_probabilities', 'pkt_loss', 'PKT']

PKT_EPS = 1e-6


def cosine_probabilities(features: torch.Tensor, eps: float = PKT_EPS) -> torch.Tensor:
    """Row-normalised shifted cosine similarities P [B, B] of features [B, d]."""
    unit = features / (torch.linalg.vector_norm(features, dim=1, keepdim=True) + eps)  # [B, d]
    unit = torch.where(torch.isnan(unit), torch.zeros_like(unit), unit)
    similarity = (unit @ unit.t() + 1.0) / 2.0  # [B, B] in [0, 1]
    return similarity / similarity.sum(dim=1, keepdim=True)


def pkt_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, eps: float = PKT_EPS,
             gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """mean_{ij} P^t_ij·log((P^t_ij + eps)/(P^s_ij + eps)) for f_s [B, d_s] and sg(f_t) [B, d_t].

    Args:
        gather: maps local [B, d] features to the batch the relation is computed over (None: local batch).
    """
    teacher_features = teacher_features.detach()
    if gather is not None:
        student_features, teacher_features = gather(student_features), gather(teacher_features)
    p_s, p_t = cosine_probabilities(student_features, eps), cosine_probabilities(teacher_features, eps)
    return torch.mean(p_t * torch.log((p_t + eps) / (p_s + eps)))


@register_loss('pkt')
class PKT(DistillationLoss):
    """PKT: λ·KL between the cosine-similarity distributions of student and teacher pre-logits."""
    paper = 'PKT, Passalis & Tefas, ECCV 2018, arXiv:1803.10837 (Knowledge-Distillation-Zoo)'
    vit_student_weight = 0.01

    def __init__(self, lambda_kd: Annotated[float, NonNegative()] = 10000.0,
                 eps: Annotated[float, Positive()] = PKT_EPS,
                 scope: Scope = 'local'):
        """
        Args:
            lambda_kd: λ (Zoo value; CIFAR-tuned starting point).
            eps: the Zoo's 1e-6 (RepDistiller 1e-7), in the row norm and in the log ratio.
            scope: ``local`` (per-process batch, official) or ``global`` (all-gathered batch).
        """
        super().__init__()
        self.lambda_kd, self.eps, self.scope = lambda_kd, eps, scope
        self.student_taps = TapSpec(pooled=True)
        self.teacher_taps = TapSpec(pooled=True)

    def forward(self, student: Features, teacher: Features, batch: Batch) -> dict[str, torch.Tensor]:
        gather = gather_batch if self.scope == 'global' else None
        return {'pkt': self.lambda_kd * pkt_loss(student.pooled, teacher.pooled, self.eps, gather)}
