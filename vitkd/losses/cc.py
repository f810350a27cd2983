"""CC: correlation congruence between samples, Taylor-expanded Gaussian RBF kernel (``cc``).

"Correlation Congruence for Knowledge Distillation", Peng, Jin, Liu, Li, Wu, Liu, Zhou, Zhang, ICCV 2019
(arXiv 1904.01802). Official code (the Zoo variant this follows): AberHu/Knowledge-Distillation-Zoo @
65470c846c1300d555815da26999cbe2b51fc815, ``kd_losses/cc.py::CC``, ``train_kd.py --kd_mode cc``.

Formula (f [B, d] pooled features, d_s and d_t may differ)::

    f̂ = f / max(‖f‖₂, 1e-12) per row                          # [B, d]
    S = f̂ f̂ᵀ                                                   # [B, B] cosine similarities
    C = Σ_{p=0}^{P} e^{−2γ} (2γ)^p / p! · S^{∘p}               # [B, B] element-wise powers, S^{∘0} = 1
    L = mean-MSE(C_s, C_t)                                     # over B²

C is the order-P Taylor expansion of the Gaussian RBF kernel exp(−γ‖f̂_i − f̂_j‖²) = e^{−2γ}·e^{2γ S_ij} of unit
vectors. No instance congruence term and no special batch sampler (as the Zoo). Defaults γ = 0.4, P = 2; the Zoo's
λ is 100 (``--distill cc:100``; a CIFAR value, re-tune).

ViT students: the student vector is the pre-logits ``forward_head(pre_logits=True)`` (the mean of the final-normed
cls and dist tokens for a distilled DeiT), the teacher's is its pooled pre-logits t̄ (vitkd adaptation).

Batch scope: ``scope='local'`` (default, as the Zoo) builds C over the per-process batch; ``'global'`` all-gathers
both feature sets first (autograd-aware, ``_adapt.gather_batch``) so the loss does not depend on the number of
processes. Identical on one process.

Where vitkd differs from the official code: computed in fp32 with autocast off; the ``global`` scope is a vitkd
option. RepDistiller's "CC" is a different, embedding-based loss and is not what this implements.
"""
from __future__ import annotations

import math

from typing import Annotated

import torch
import torch.nn.functional as F

from ..domains import Integer, Positive
from ..features import Features, TapSpec
from ._adapt import Scope, gather_batch
from .base import Batch, DistillationLoss, register_loss

__all__ = ['CC', 'correlation_matrix', 'cc_loss']


def correlation_matrix(features: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    """Order-``order`` Taylor expansion of the RBF kernel on the L2-normalised rows.

    Args:
        features: f [B, d].
        gamma: γ of exp(−γ‖f̂_i − f̂_j‖²).
        order: P, the highest power kept.

    Returns:
        C [B, B].
    """
    f = F.normalize(features, p=2, dim=1, eps=1e-12)
    sim = f @ f.t()  # [B, B]
    corr = torch.zeros_like(sim)
    power = torch.ones_like(sim)  # S^{∘0}
    for p in range(order + 1):
        corr = corr + math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * power
        power = power * sim
    return corr


def cc_loss(features_s: torch.Tensor, features_t: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    """mean-MSE(C_s, C_t) over B² (the teacher side detached)."""
    return F.mse_loss(correlation_matrix(features_s, gamma, order), correlation_matrix(features_t.detach(), gamma,
                                                                                        order))


@register_loss('cc')
class CC(DistillationLoss):
    """Correlation congruence of pooled features (local batch by default)."""
    paper = 'CC, Peng et al., ICCV 2019, arXiv:1904.01802'

    def __init__(self, gamma: Annotated[float, Positive()] = 0.4, order: Annotated[int, Integer(lo=0)] = 2,
                 scope: Scope = 'local'):
        """
        Args:
            gamma: RBF γ.
            order: Taylor order P.
            scope: ``local`` (per-process batch, the Zoo) or ``global`` (all-gathered batch).
        """
        super().__init__()
        self.gamma, self.order, self.scope = gamma, order, scope
        self.student_taps = TapSpec(pooled=True)
        self.teacher_taps = TapSpec(pooled=True)

    def forward(self, student: Features, teacher: Features, batch: Batch) -> dict[str, torch.Tensor]:
        f_s, f_t = student.pooled, teacher.pooled  # [B, d_s], [B, d_t]
        if self.scope == 'global':
            f_s, f_t = gather_batch(f_s), gather_batch(f_t)
        return {'correlation': cc_loss(f_s, f_t, self.gamma, self.order)}
