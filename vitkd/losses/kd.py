"""Classic knowledge distillation (``kd``).

"Distilling the Knowledge in a Neural Network", Hinton, Vinyals, Dean, 2015 (arXiv 1503.02531).
L = T²·KL_batchmean(softmax(z_t/T) ‖ softmax(z_s/T)).

On a student with a distillation token the KD term goes to the distillation head by default (``head='dist'``) and
the task loss to the class head, as in DeiT; ``head='cls'`` or ``'avg'`` put it on the class head or the averaged
heads. On other students it uses the only head.
"""
from __future__ import annotations

from typing import Annotated

import torch

from ..domains import OneOf, Positive
from ..features import Features, TapSpec
from .base import Batch, DistillationLoss, Head, pick_head, register_loss
from .functional import KL_REDUCTIONS, kl_div_logits

__all__ = ['KD']


@register_loss('kd')
class KD(DistillationLoss):
    """Hinton KD: T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)), batchmean."""
    paper = 'KD, Hinton et al. 2015, arXiv:1503.02531'

    def __init__(self, temperature: Annotated[float, Positive()] = 4.0, head: Head = 'auto',
                 reduction: Annotated[str, OneOf(*KL_REDUCTIONS)] = 'batchmean'):
        super().__init__()
        self.temperature, self.head, self.reduction = temperature, head, reduction
        self.uses_dist_head = head in ('auto', 'dist')
        self.student_taps = TapSpec(logits=True)
        self.teacher_taps = TapSpec(logits=True)

    def forward(self, student: Features, teacher: Features, batch: Batch) -> dict[str, torch.Tensor]:
        return {'kl': kl_div_logits(pick_head(student, self.head), teacher.logits, self.temperature, self.reduction)}
