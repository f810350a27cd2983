"""DeiT token distillation: ``none``, ``deit_soft``, ``deit_hard``.

"Training data-efficient image transformers & distillation through attention", Touvron et al., ICML 2021
(arXiv 2012.12877); official code facebookresearch/deit ``losses.py`` (``DistillationLoss``).

L = (1 − α)·L_task(z_cls) + α·L_distill(z_dist), α = 0.5, with
  soft: T²·KL(softmax(z_t/T) ‖ softmax(z_dist/T)), T = 1;   hard: CE(z_dist, argmax z_t).
The (1 − α) factor is applied through :meth:`task_weight`; the distillation term is returned already times α.

Where vitkd differs from the official code:
* the soft KL is reduced with ``batchmean`` by default; DeiT divides the summed KL by B·K (``numel``, its issue 61),
  which makes the term K× smaller. ``reduction='numel'`` reproduces DeiT (the ``deit-soft`` preset sets it).
* hard labels are the argmax of fp32 teacher logits (DeiT takes them from fp16 logits).
* ``none`` on a student with a distillation token trains the averaged logits (timm's behaviour) so no untrained head
  is ever evaluated (DeiT trains only the class head and still averages both at evaluation).
"""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F

from ..domains import Interval, OneOf, Positive
from ..features import Features, TapSpec
from ._dense import DenseDistillationLoss, register_dense_loss
from .base import Batch, DistillationLoss, register_loss
from .functional import KL_REDUCTIONS, kl_div_logits

__all__ = ['deit_hard_loss', 'NoDistillation', 'DeiTSoft', 'DeiTHard']


def deit_hard_loss(dist_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """CE(z_dist [B, K], argmax_k z_t [B, K]), mean over the batch, no label smoothing."""
    return F.cross_entropy(dist_logits, teacher_logits.argmax(dim=-1))


@register_loss('none')
class NoDistillation(DistillationLoss):
    """No teacher: the task loss alone (on the averaged heads of a distilled student)."""
    paper = 'baseline (no distillation)'
    needs_teacher = False

    def forward(self, student: Features, teacher: Features, batch: Batch) -> dict[str, torch.Tensor]:
        return {}


class _DeiTTokenDistillation(DistillationLoss):
    """Shared shape of the two DeiT variants: the distillation head against teacher logits, task weight 1 − α."""
    requires_dist_head = True
    uses_dist_head = True

    def __init__(self, alpha: Annotated[float, Interval(0, 1)] = 0.5):
        super().__init__()
        self.alpha = alpha
        self.student_taps = TapSpec(logits=True)
        self.teacher_taps = TapSpec(logits=True)

    def task_weight(self, epoch: float) -> float:
        return 1.0 - self.alpha


@register_loss('deit_soft')
class DeiTSoft(_DeiTTokenDistillation):
    """DeiT soft distillation: α·T²·KL(p_t ‖ p_dist) on the distillation head (Touvron et al., ICML 2021)."""
    paper = 'DeiT soft, Touvron et al. ICML 2021, arXiv:2012.12877'

    def __init__(self, alpha: Annotated[float, Interval(0, 1)] = 0.5, temperature: Annotated[float, Positive()] = 1.0,
                 reduction: Annotated[str, OneOf(*KL_REDUCTIONS)] = 'batchmean'):
        super().__init__(alpha)
        self.temperature, self.reduction = temperature, reduction

    def forward(self, student: Features, teacher: Features, batch: Batch) -> dict[str, torch.Tensor]:
        kl = kl_div_logits(student.logits_dist, teacher.logits, self.temperature, self.reduction)
        return {'soft': self.alpha * kl}


@register_loss('deit_hard')
class DeiTHard(_DeiTTokenDistillation):
    """DeiT hard distillation: α·CE(z_dist, argmax z_t) (Touvron et al., ICML 2021)."""
    paper = 'DeiT hard, Touvron et al. ICML 2021, arXiv:2012.12877'

    def forward(self, student: Features, teacher: Features, batch: Batch) -> dict[str, torch.Tensor]:
        return {'hard': self.alpha * deit_hard_loss(student.logits_dist, teacher.logits)}


# ---- dense form (detection / segmentation) ---------------------------------------------------------------------


@register_dense_loss('none')
class DenseNoDistillation(DenseDistillationLoss):
    """No teacher: the dense head's task loss alone (the baseline of a dense comparison)."""
    paper = NoDistillation.paper
    needs_teacher = False

    def forward(self, student, teacher, batch) -> dict[str, torch.Tensor]:
        return {}
