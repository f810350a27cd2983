"""FSP: flow of solution procedure (``fsp``), as in the Knowledge-Distillation-Zoo.

Paper: "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and Transfer Learning", Yim, Joo,
Bae, Kim, CVPR 2017 (no arXiv version).
Official code (the Zoo): AberHu/Knowledge-Distillation-Zoo @ 65470c846c1300d555815da26999cbe2b51fc815,
``kd_losses/fsp.py`` (``FSP``), ``train_kd.py --kd_mode fsp`` (initialisation stage in ``train_init``).

Formula: for consecutive taps (F¹ [B, C1, H1, W1], F²[B, C2, H2, W2]) of one network, the larger map is
adaptive-average-pooled to the smaller size (the Zoo pools F¹), both are flattened to [B, C, HW] and
  G(F¹, F²) = F¹ F²ᵀ / HW ∈ ℝ^{B×C1×C2};   L = λ · mean over pairs of mean-MSE(G_s, G_t) over B·C1·C2.
Each FSP matrix must have the teacher's C1×C2 shape: the student taps are projected by a trainable 1×1 conv to the
paired teacher width (``connector=True``; Kaiming-normal fan_out, no BN as FSP has no connector of its own).
Defaults: λ = 1 (``lambda_kd``; CIFAR-tuned starting point to re-tune).

Procedure (the Zoo's two stages; its stage 2 sets λ = 0, so the teacher is dropped), in one vitkd run:
1. epochs [0, ``init_epochs``) (default 50): the initialisation stage — λ·FSP only, the task CE is off
   (:meth:`task_weight` returns 0, so the class head gets no gradient from FSP's phase);
2. from ``init_epochs`` on: FSP's weight is 0 (the loss returns no term) and the run continues with the task CE
   — the Zoo's CE-only stage 2 when ``fsp`` is the only method. Other methods of the run (e.g. ``kd``/``deit_soft``
   for the DeiT preset that keeps dist-token KD) are unaffected by FSP's phases, in both stages.
``init_epochs=0`` turns the phases off: FSP is then an ordinary term next to CE for the whole run (vitkd option).

Taps (vitkd adaptation; :mod:`vitkd.losses._adapt`): three taps per network, by default student
blocks at 1/3, 2/3, 3/3 of its depth (G_4/G_8/G_12) and the teacher's last three stages (s2/s3/s4), giving the
pairs (G_4, G_8) ↔ (s2, s3) and (G_8, G_12) ↔ (s3, s4). Not recommended for a ViT student (its taps all have width
D_s, so the "flow" largely reflects the projections); cost C1×C2 = 1232×3024 per sample for RegNetY-160.

Where vitkd differs from the official code:
* the student projections (the Zoo requires equal channels; ``connector=False`` reproduces that and checks it);
* the Zoo's init-stage learning-rate sequence (0.1/0.01/0.001 × lr for 30/10/10 epochs, a separate schedule) is not
  reproduced: the loss cannot change the optimizer's lr; the run's scheduler applies;
* the teacher is still evaluated in stage 2 (the distiller runs it whenever a method needs one) although no term
  uses it; without DDP this costs time only. Under DDP the projections get no gradient in stage 2 (and the heads
  none in stage 1): prepare with ``find_unused_parameters=True``;
* λ lives in the loss (``lambda_kd``); the teacher maps are detached.
"""
from __future__ import annotations

from typing import Annotated, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..domains import Bool, NonNegative
from ..features import Features
from ._adapt import InitStage, tap_indices, PairedTaps, as_taps, conv1x1_connector, pool_to
from .base import Batch, DistillationLoss, LossSpecError, RunInfo, register_loss

__all__ = ['fsp_matrix', 'fsp_loss', 'FSP']

PairsOfTaps = tap_indices(min_len=2)  # consecutive taps form the FSP pairs: at least two


def fsp_matrix(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """G = F¹F²ᵀ/HW [B, C1, C2] of two maps of one network ([B, C1, H1, W1], [B, C2, H2, W2]).

    The larger map is adaptive-average-pooled to the smaller spatial size first.
    """
    size = (min(first.shape[-2], second.shape[-2]), min(first.shape[-1], second.shape[-1]))
    first, second = pool_to(first, size).flatten(2), pool_to(second, size).flatten(2)  # [B, C1, HW], [B, C2, HW]
    return torch.bmm(first, second.transpose(1, 2)) / first.shape[-1]


def fsp_loss(student_maps: Sequence[torch.Tensor], teacher_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over consecutive pairs (k, k+1) of mean-MSE(G(S_k, S_k+1), sg(G(T_k, T_k+1))).

    Args:
        student_maps: n ≥ 2 student maps, already with the teacher's channel counts.
        teacher_maps: the n paired teacher maps.
    """
    losses = [F.mse_loss(fsp_matrix(student_maps[k], student_maps[k + 1]),
                         fsp_matrix(teacher_maps[k].detach(), teacher_maps[k + 1].detach()))
              for k in range(len(student_maps) - 1)]
    return torch.stack(losses).mean()


@register_loss('fsp')
class FSP(InitStage, PairedTaps, DistillationLoss):
    """FSP: λ·mean-MSE between Gram matrices of consecutive maps; CE-off init stage, then off (Zoo)."""
    paper = 'FSP, Yim et al., CVPR 2017 (Knowledge-Distillation-Zoo)'
    # connectors or heads sit idle in one of the two stages: DDP needs find_unused_parameters
    may_leave_parameters_unused = True

    def __init__(self, lambda_kd: Annotated[float, NonNegative()] = 1.0,
                 init_epochs: Annotated[float, NonNegative()] = 50,
                 connector: Annotated[bool, Bool()] = True, student_blocks: PairsOfTaps = None,
                 teacher_blocks: PairsOfTaps = None):
        """
        Args:
            lambda_kd: λ (Zoo value; CIFAR-tuned starting point).
            init_epochs: length of the FSP-only initialisation stage (CE off; fractional epochs allowed); FSP is
                off afterwards. 0: no phases, FSP next to CE for the whole run.
            connector: project each student tap to the paired teacher width (False: widths must be equal).
            student_blocks, teacher_blocks: ≥ 2 tap indices each (None: thirds of the depth ↔ last three stages).
        """
        super().__init__()
        self.lambda_kd, self.init_epochs, self.connector = lambda_kd, init_epochs, connector
        self.student_blocks, self.teacher_blocks = as_taps(student_blocks), as_taps(teacher_blocks)
        self.connectors = nn.ModuleList()

    def setup(self, student: Features, teacher: Features, info: RunInfo) -> None:
        self.connectors = nn.ModuleList()
        for s, t in self.map_pairs(student, teacher):
            if self.connector:
                self.connectors.append(conv1x1_connector(s.shape[1], t.shape[1]))
            elif s.shape[1] != t.shape[1]:
                raise LossSpecError(f'fsp with connector=False needs equal widths at every tap, got student '
                                    f'{s.shape[1]} and teacher {t.shape[1]}; use connector=True')

    def forward(self, student: Features, teacher: Features, batch: Batch) -> dict[str, torch.Tensor]:
        if self.stage_done(batch.progress):
            return {}  # stage 2: λ = 0 (Zoo), the term is not computed
        pairs = self.map_pairs(student, teacher)
        student_maps = [self.connectors[k](s) if self.connector else s for k, (s, _) in enumerate(pairs)]
        return {'fsp': self.lambda_kd * fsp_loss(student_maps, [t for _, t in pairs])}
