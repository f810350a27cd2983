"""VID: variational information distillation — a Gaussian likelihood of the teacher maps (``vid``).

"Variational Information Distillation for Knowledge Transfer", Ahn, Hu, Damianou, Lawrence, Dai, CVPR 2019
(arXiv 1904.05835). Official code this follows (modified by the Zoo from RepDistiller):
AberHu/Knowledge-Distillation-Zoo @ 65470c846c1300d555815da26999cbe2b51fc815, ``kd_losses/vid.py::VID``,
``train_kd.py --kd_mode vid``.

Per stage (student map s [B, C_s, H, W], teacher map t [B, C_t, H, W] after spatial alignment)::

    μ(s) = Conv1×1(C_s→M) → ReLU → Conv1×1(M→M) → ReLU → Conv1×1(M→C_t)   (no bias, no BN; M = ⌊sf·C_t⌋)
    σ_c² = softplus(α_c) + 1e-6,   α_c initialised to log(exp(init_var − 1e-6) − 1), so σ_c² = init_var   # [C_t]
    L_stage = mean over B·C_t·H·W of ½·(log σ_c² + (t − μ(s))² / σ_c²)
    L = mean over the stages

Defaults: sf = 1, init_var = 5 (the Zoo's; its λ is 1). Regressor convs Kaiming-normal (fan_out, relu). The
regressors and the variance parameters α live in this loss (trained with the student, in the training checkpoint,
not in the export); α is 1-D and therefore not weight-decayed (vitkd never decays 1-D parameters).

ViT students (vitkd adaptation): regressors on the grids of blocks 4 / 8 / 12 ↔ teacher stages s2 / s3 / s4 (positions
1/2/3 thirds of the depth, see ``_adapt``); the larger map of each pair is average-pooled to the smaller size before
the regressor (teacher s2 28→14, student 14→7 for s4). At s4 with sf = 1 a regressor has ≈ D_s·3024 + 2·3024² ≈ 18 M
parameters: use ``sf`` < 1 for ViT presets.

Where vitkd differs from the official code:

* Spatial alignment by pooling (the Zoo assumes equal shapes); RepDistiller/mdistiller also pool, use eps 1e-5 and
  sum the stages. mdistiller never registers the variance parameters (so they never train): here they are
  ``nn.Parameter``s of this module and train.
* fp32 with autocast off.
"""
from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..domains import Positive, Real
from ..features import Features
from ._adapt import THREE_TAPS, Blocks, PairedTaps, align_spatial, as_taps, init_convs_
from .base import Batch, DistillationLoss, RunInfo, register_loss

__all__ = ['VID', 'VIDRegressor', 'vid_nll', 'softplus_inverse']

VARIANCE_EPS = 1e-6


def softplus_inverse(y: float) -> float:
    """α with softplus(α) = y (y > 0)."""
    return math.log(math.expm1(y))


def vid_nll(mean: torch.Tensor, target: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """Gaussian negative log-likelihood without the constant, averaged over every element.

    Args:
        mean: μ [B, C, H, W].
        target: t [B, C, H, W] (detached by the caller or here).
        variance: σ² [C] (one per channel).

    Returns:
        mean of ½·(log σ_c² + (t − μ)²/σ_c²).
    """
    var = variance.view(1, -1, 1, 1)
    return 0.5 * (torch.log(var) + (target.detach() - mean) ** 2 / var).mean()


class VIDRegressor(nn.Module):
    """μ(·) (three 1×1 convs without bias, ReLU between) and the per-channel variance σ² = softplus(α) + 1e-6."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int, init_var: float):
        super().__init__()
        self.mean = init_convs_(nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid_channels, mid_channels, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid_channels, out_channels, 1, bias=False)))
        self.alpha = nn.Parameter(torch.full((out_channels,), softplus_inverse(init_var - VARIANCE_EPS)))

    def variance(self) -> torch.Tensor:
        """σ² [C_t]."""
        return F.softplus(self.alpha) + VARIANCE_EPS

    def forward(self, student_map: torch.Tensor) -> torch.Tensor:
        return self.mean(student_map)


@register_loss('vid')
class VID(PairedTaps, DistillationLoss):
    """Variational information distillation with per-stage regressors and learned per-channel variances."""
    paper = 'VID, Ahn et al., CVPR 2019, arXiv:1904.05835'
    default_positions = THREE_TAPS

    def __init__(self, sf: Annotated[float, Positive()] = 1.0,
                 init_var: Annotated[float, Real(lo=VARIANCE_EPS, lo_open=True)] = 5.0, student_blocks: Blocks = None,
                 teacher_blocks: Blocks = None):
        """
        Args:
            sf: width factor of the regressors' hidden layers, M = max(1, ⌊sf·C_t⌋).
            init_var: initial σ² of every channel.
            student_blocks, teacher_blocks: paired taps; None = 1/3, 2/3, 3/3 of the depth (ViT G_4/G_8/G_12,
                CNN s2/s3/s4).
        """
        super().__init__()
        self.sf, self.init_var = sf, init_var
        self.student_blocks, self.teacher_blocks = as_taps(student_blocks), as_taps(teacher_blocks)
        self.regressors = nn.ModuleList()

    def setup(self, student: Features, teacher: Features, info: RunInfo) -> None:
        device = student.logits.device
        for s, t in self.map_pairs(student, teacher):
            c_s, c_t = s.shape[1], t.shape[1]
            self.regressors.append(VIDRegressor(c_s, c_t, max(1, int(self.sf * c_t)), self.init_var).to(device))

    def forward(self, student: Features, teacher: Features, batch: Batch) -> dict[str, torch.Tensor]:
        losses = []
        for regressor, (s, t) in zip(self.regressors, self.map_pairs(student, teacher)):
            s, t = align_spatial(s, t)
            losses.append(vid_nll(regressor(s), t, regressor.variance()))
        return {'nll': torch.stack(losses).mean()}
