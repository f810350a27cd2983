"""AT: attention transfer (``at``), as in the Knowledge-Distillation-Zoo.

Paper: "Paying More Attention to Attention: Improving the Performance of Convolutional Neural Networks via Attention
Transfer", Zagoruyko & Komodakis, ICLR 2017 (arXiv 1612.03928).
Official code (the Zoo): AberHu/Knowledge-Distillation-Zoo @ 65470c846c1300d555815da26999cbe2b51fc815,
``kd_losses/at.py`` (``AT``), ``train_kd.py --kd_mode at``.

Formula, per tap pair (F_s [B, C_s, H, W], F_t [B, C_t, H, W]; channels may differ, they are reduced):
  A(F) = Σ_c |F_c|^p ∈ ℝ^{B×H·W};  Â = A / (‖A‖_{2, over H·W} + 1e-6)   (eps on the norm, not its square);
  L_pair = mean-MSE(Â_s, Â_t) over B·H·W;   L = λ · mean over the pairs.
Defaults: p = 2, λ = 1000 (``lambda_kd``; CIFAR-tuned starting point: the per-element mean makes the loss
∝ 1/(H·W), re-tune at 14×14 / 7×7). No KD term (Zoo issue #19: the paper combines AT with KD — add ``kd``).

Taps (vitkd adaptation; see :mod:`vitkd.losses._adapt`): three pairs, by default the student blocks
at 1/3, 2/3, 3/3 of its depth (G_4/G_8/G_12 of a 12-block DeiT; the stages s2/s3/s4 of a CNN student) against
the teacher's last three stages s2/s3/s4 (post-ReLU). The larger map of a pair is adaptive-average-pooled to the
smaller size before A is computed (as RepDistiller pools features). No projection: energy over D_s vs over C_t.
A ViT student's block-12 patch tokens get no gradient from the heads (a distilled DeiT's heads read only the cls and
dist tokens, and the final LayerNorm is per token): that pair only shapes the student through AT itself.

One could compute A on LayerNorm-ed tokens (against the few very-high-norm tokens of ViT
residual streams). It is not offered: a LayerNorm without affine makes every token's Σ_c x̂_c² = C·σ²/(σ² + eps) ≈ C,
so for p = 2 the attention map would be flat and the loss constant.

ViT students (``vit_student_weight`` = 0.01): the paper's CNN-tuned weight overwhelms a ViT student's task loss. On the
table's ViT student (``scripts/reproduce.py``, 150 steps, avg-head top-1 gain over the no-teacher student) weight 1
gave −19.4 points (3 seeds), 0.1 gave −3.9 and 0.01 +0.2 (seed 0), so a ViT student gets weight 0.01 unless the
command gives one (``at:1`` = the paper's).

Where vitkd differs from the official code:
* taps and pooling (the Zoo has identical shapes everywhere);
* λ lives in the loss (``lambda_kd``); the teacher maps are detached.
"""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F

from ..domains import NonNegative, Positive
from ..features import Features
from ._adapt import Blocks, PairedTaps, align_spatial, as_taps
from .base import Batch, DistillationLoss, register_loss

__all__ = ['attention_map', 'at_loss', 'AttentionTransfer']

AT_EPS = 1e-6


def attention_map(feature_map: torch.Tensor, p: float = 2.0, eps: float = AT_EPS) -> torch.Tensor:
    """Normalised spatial attention Â = A/(‖A‖₂ + eps), A = Σ_c |F_c|^p.

    Args:
        feature_map: [B, C, H, W].

    Returns:
        [B, H·W].
    """
    energy = feature_map.abs().pow(p).sum(dim=1).flatten(1)  # [B, HW]
    return energy / (energy.norm(dim=1, keepdim=True) + eps)


def at_loss(student_map: torch.Tensor, teacher_map: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """mean-MSE(Â_s, sg(Â_t)) over B·H·W for maps of equal H×W ([B, C_s, H, W], [B, C_t, H, W])."""
    return F.mse_loss(attention_map(student_map, p), attention_map(teacher_map.detach(), p))


@register_loss('at')
class AttentionTransfer(PairedTaps, DistillationLoss):
    """Attention transfer: λ·mean over tap pairs of mean-MSE of normalised Σ_c|F_c|^p maps."""
    paper = 'AT, Zagoruyko & Komodakis, ICLR 2017, arXiv:1612.03928 (Knowledge-Distillation-Zoo)'
    vit_student_weight = 0.01

    def __init__(self, lambda_kd: Annotated[float, NonNegative()] = 1000.0, p: Annotated[float, Positive()] = 2.0,
                 student_blocks: Blocks = None, teacher_blocks: Blocks = None):
        """
        Args:
            lambda_kd: λ (Zoo value; CIFAR-tuned starting point).
            p: exponent of the channel energy.
            student_blocks, teacher_blocks: tap indices (None: blocks at thirds of the depth ↔ last three stages).
        """
        super().__init__()
        self.lambda_kd, self.p = lambda_kd, p
        self.student_blocks, self.teacher_blocks = as_taps(student_blocks), as_taps(teacher_blocks)

    def forward(self, student: Features, teacher: Features, batch: Batch) -> dict[str, torch.Tensor]:
        losses = [at_loss(*align_spatial(s, t), self.p) for s, t in self.map_pairs(student, teacher)]
        return {'at': self.lambda_kd * torch.stack(losses).mean()}
