"""Classic knowledge distillation (``kd``).

"Distilling the Knowledge in a Neural Network", Hinton, Vinyals, Dean, 2015 (arXiv 1503.02531).
L = T²·KL_batchmean(softmax(z_t/T) ‖ softmax(z_s/T)).

On a student with a distillation token the KD term goes to the distillation head by default (``head='dist'``) and
the task loss to the class head, as in DeiT; ``head='cls'`` or ``'avg'`` put it on the class head or the averaged
heads. On other students it uses the only head.
"""
from __future__ import annotations

import torch

from ..features import Features, TapSpec
from .base import Batch, DistillationLoss, register_loss
from .functional import KL_REDUCTIONS, kl_div_logits

__all__ = ['KD', 'pick_head']

HEADS = ('auto', 'dist', 'cls', 'avg')


def pick_head(student: Features, head: str) -> torch.Tensor:
    """Student logits [B, K] of ``head`` ('auto' = the distillation head when there is one)."""
    if head in ('auto', 'dist') and student.logits_dist is not None:
        return student.logits_dist
    if head == 'avg':
        return student.head_logits
    return student.logits


@register_loss('kd')
class KD(DistillationLoss):
    """Hinton KD: T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)), batchmean."""
    paper = 'KD, Hinton et al. 2015, arXiv:1503.02531'

    def __init__(self, temperature: float = 4.0, head: str = 'auto', reduction: str = 'batchmean'):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f'head must be one of {HEADS}, got {head!r}')
        if reduction not in KL_REDUCTIONS:
            raise ValueError(f'reduction must be one of {KL_REDUCTIONS}, got {reduction!r}')
        self.temperature, self.head, self.reduction = temperature, head, reduction
        self.uses_dist_head = head in ('auto', 'dist')
        self.student_taps = TapSpec(logits=True)
        self.teacher_taps = TapSpec(logits=True)

    def forward(self, student: Features, teacher: Features, batch: Batch) -> dict[str, torch.Tensor]:
        return {'kl': kl_div_logits(pick_head(student, self.head), teacher.logits, self.temperature, self.reduction)}
