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
from ._dense import DenseDistillationLoss, DenseFeatures, align_logits, register_dense_loss
from .base import Batch, DistillationLoss, Head, pick_head, reads_dist_head, register_loss
from .functional import KL_REDUCTIONS, at_least_fp32, kl_div_logits

__all__ = ['KD']


@register_loss('kd')
class KD(DistillationLoss):
    """Hinton KD: T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)), batchmean."""
    paper = 'KD, Hinton et al. 2015, arXiv:1503.02531'

    def __init__(self, temperature: Annotated[float, Positive()] = 4.0, head: Head = 'auto',
                 reduction: Annotated[str, OneOf(*KL_REDUCTIONS)] = 'batchmean'):
        super().__init__()
        self.temperature, self.head, self.reduction = temperature, head, reduction
        self.uses_dist_head = reads_dist_head(self.head)
        self.student_taps = TapSpec(logits=True)
        self.teacher_taps = TapSpec(logits=True)

    def forward(self, student: Features, teacher: Features, batch: Batch) -> dict[str, torch.Tensor]:
        return {'kl': kl_div_logits(pick_head(student, self.head), teacher.logits, self.temperature, self.reduction)}


# ---- dense form (semantic segmentation) ------------------------------------------------------------------------


def pixel_kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T²·(1/(B·H·W))·Σ_pixels KL(softmax(z_t/T) ‖ softmax(z_s/T)): Hinton KD with every pixel a sample.

    Args:
        student_logits: z_s [B, K, H, W].
        teacher_logits: z_t [B, K, H, W] (no gradient expected).
        temperature: T.

    Returns:
        Scalar: the KL summed over the classes, averaged over the B·H·W pixels, times T².
    """
    k = student_logits.shape[1]
    student_rows = student_logits.permute(0, 2, 3, 1).reshape(-1, k)  # [B·H·W, K]
    teacher_rows = teacher_logits.permute(0, 2, 3, 1).reshape(-1, k)  # [B·H·W, K]
    return kl_div_logits(student_rows, teacher_rows.detach(), temperature, 'batchmean')


@register_dense_loss('kd')
class DenseKD(DenseDistillationLoss):
    """Per-pixel KD on segmentation logits: T²·mean over pixels of KL(softmax(z_t/T) ‖ softmax(z_s/T)).

    The teacher's logits are resized (bilinear) to the student's grid when their finest strides differ.
    """
    paper = KD.paper
    needs_logits = True

    def __init__(self, temperature: Annotated[float, Positive()] = 1.0):
        """
        Args:
            temperature: T (1 by default: per-pixel distributions of a segmenter are far less peaked than ImageNet
                classifiers', and pixel KD is commonly run at T = 1).
        """
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, student: DenseFeatures, teacher: DenseFeatures, batch) -> dict[str, torch.Tensor]:
        z_s = at_least_fp32(student.logits)
        return {'kl': pixel_kl_div(z_s, align_logits(z_s, teacher.logits), self.temperature)}


__all__ += ['pixel_kl_div', 'DenseKD']
