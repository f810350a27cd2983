"""FitNet: hints (``fitnet``), as in the Knowledge-Distillation-Zoo.

Paper: "FitNets: Hints for Thin Deep Nets", Romero, Ballas, Kahou, Chassang, Gatta, Bengio, ICLR 2015
(arXiv 1412.6550).
Official code (the Zoo): AberHu/Knowledge-Distillation-Zoo @ 65470c846c1300d555815da26999cbe2b51fc815,
``kd_losses/fitnet.py`` (``Hint``), ``train_kd.py --kd_mode fitnet``.

Formula (one tap pair; F_s [B, C_s, H, W], F_t [B, C_t, H, W] post-ReLU):
  L = λ · mean-MSE(r(F_s), F_t) over B·C_t·H·W,  r = Conv1×1(C_s → C_t) + BN + ReLU (the regressor).
Defaults: λ = 0.1 (``lambda_kd``; CIFAR-tuned starting point to re-tune). One stage, no hint pre-training, no KD
term (Zoo README, issue #7).

Taps (vitkd adaptation; :mod:`vitkd.losses._adapt`): one pair, by default the student block at 2/3 of
its depth (G_8 of a 12-block DeiT, stage s3 of a CNN student) against the teacher's stage s3 (1232 channels, 14×14
for RegNetY-160 at 224 px: no pooling). Other sizes: the larger map is adaptive-average-pooled to the smaller
(e.g. ``student_blocks=[11], teacher_blocks=[4]``: G_12 pooled 2×2 to s4's 7×7), then the regressor runs.

The regressor is RepDistiller's ``ConvReg`` for equal spatial size (conv + BN + ReLU: the target is non-negative);
Kaiming-normal (fan_out, relu), BN 1/0; it trains with the student (same optimizer, weights decayed) and is saved in
training checkpoints, never in the exported student. ``regressor=False`` is the Zoo's plain MSE between identically
shaped maps (e.g. a CNN student of the teacher's architecture).

Where vitkd differs from the official code:
* the trainable regressor (the Zoo has none: identical shapes), the taps and the pooling;
* λ lives in the loss (``lambda_kd``); the teacher map is detached.
"""
from __future__ import annotations

from typing import Annotated, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..domains import Bool, ListOf, NonNegative, OrNone, Text
from ..features import Features
from ._adapt import Blocks, MIDDLE_TAP, PairedTaps, align_spatial, as_taps, conv1x1_connector
from ._dense import DenseDistillationLoss, DenseFeatures, paired_levels, register_dense_loss
from .base import Batch, DistillationLoss, LossSpecError, RunInfo, register_loss

__all__ = ['hint_loss', 'FitNet']


def hint_loss(regressed: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """mean-MSE over every element of r(F_s) [B, C, H, W] against sg(F_t) [B, C, H, W]."""
    return F.mse_loss(regressed, teacher_map.detach())


@register_loss('fitnet')
class FitNet(PairedTaps, DistillationLoss):
    """FitNet hints: λ·mean-MSE(regressor(F_s), F_t) on one tap pair."""
    paper = 'FitNet, Romero et al., ICLR 2015, arXiv:1412.6550 (Knowledge-Distillation-Zoo)'
    default_positions = MIDDLE_TAP

    def __init__(self, lambda_kd: Annotated[float, NonNegative()] = 0.1, regressor: Annotated[bool, Bool()] = True,
                 student_blocks: Blocks = None, teacher_blocks: Blocks = None):
        """
        Args:
            lambda_kd: λ (Zoo value; CIFAR-tuned starting point).
            regressor: learn a Conv1×1 + BN + ReLU regressor on the student map (False: maps must be identical).
            student_blocks, teacher_blocks: one tap index each (None: block at 2/3 of the depth ↔ stage s3).
        """
        super().__init__()
        self.lambda_kd, self.regressor = lambda_kd, regressor
        self.student_blocks, self.teacher_blocks = as_taps(student_blocks), as_taps(teacher_blocks)
        self.regressors = nn.ModuleList()

    def setup(self, student: Features, teacher: Features, info: RunInfo) -> None:
        self.regressors = nn.ModuleList()
        for s, t in self.map_pairs(student, teacher):
            if self.regressor:
                self.regressors.append(conv1x1_connector(s.shape[1], t.shape[1], bn=True, relu=True))
            elif s.shape[1:] != t.shape[1:]:
                raise LossSpecError(f'fitnet with regressor=False needs identical maps, got student '
                                    f'{tuple(s.shape[1:])} and teacher {tuple(t.shape[1:])}; use regressor=True')

    def forward(self, student: Features, teacher: Features, batch: Batch) -> dict[str, torch.Tensor]:
        losses = []
        for k, (s, t) in enumerate(self.map_pairs(student, teacher)):
            s, t = align_spatial(s, t)
            if self.regressor:
                s = self.regressors[k](s)
            losses.append(hint_loss(s, t))
        return {'hint': self.lambda_kd * torch.stack(losses).mean()}


# ---- dense form (detection / segmentation) ---------------------------------------------------------------------


def dense_hint_loss(regressed: Sequence[torch.Tensor], teacher_levels: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over the pyramid levels of mean-MSE(r_l(F_s^l), sg(F_t^l)), each level [B, C_t, H_l, W_l].

    Each level counts once whatever its size (a mean over every element of every level would let the finest level,
    16× the pixels of the level two strides coarser, decide alone)."""
    return torch.stack([hint_loss(s, t) for s, t in zip(regressed, teacher_levels)]).mean()


@register_dense_loss('fitnet')
class DenseFitNet(DenseDistillationLoss):
    """FitNet hints on every shared pyramid level: λ·mean_l mean-MSE(Conv1×1_l(F_s^l), F_t^l).

    Dense form (vitkd adaptation): the hint is each pyramid level of the student against the teacher's level of the
    same stride, through one learned 1×1 convolution per level (linear: pyramid features are not post-ReLU, so the
    classification regressor's BN + ReLU would clip half the target away).
    """
    paper = FitNet.paper

    def __init__(self, lambda_kd: Annotated[float, NonNegative()] = 1.0,
                 levels: Annotated[Optional[Sequence[str]], OrNone(ListOf(Text()))] = None):
        """
        Args:
            lambda_kd: λ.
            levels: pyramid levels to match (``['s8', 's16']``); None = every level both models have.
        """
        super().__init__()
        self.lambda_kd, self.levels = lambda_kd, None if levels is None else [str(k) for k in levels]
        self.regressors = nn.ModuleDict()

    def setup(self, student: DenseFeatures, teacher: DenseFeatures, info) -> None:
        self.matched = paired_levels(student, teacher, self.levels, 'fitnet')
        self.regressors = nn.ModuleDict({k: nn.Conv2d(student.pyramid[k].shape[1], teacher.pyramid[k].shape[1], 1)
                                         for k in self.matched})

    def forward(self, student: DenseFeatures, teacher: DenseFeatures, batch) -> dict[str, torch.Tensor]:
        regressed = [self.regressors[k](student.pyramid[k]) for k in self.regressors]
        return {'hint': self.lambda_kd * dense_hint_loss(regressed, [teacher.pyramid[k] for k in self.regressors])}


__all__ += ['dense_hint_loss', 'DenseFitNet']
