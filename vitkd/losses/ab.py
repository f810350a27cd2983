"""AB: activation boundaries (``ab``), as in the Knowledge-Distillation-Zoo.

Paper: "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons", Heo, Lee, Yun, Choi,
AAAI 2019 (arXiv 1811.03233).
Official code (the Zoo): AberHu/Knowledge-Distillation-Zoo @ 65470c846c1300d555815da26999cbe2b51fc815,
``kd_losses/ab.py`` (``AB``), ``train_kd.py --kd_mode ab`` (initialisation in ``train_init``).

Formula, element-wise on a student pre-activation s and the teacher's pre-activation t, margin m:
  ℓ = (s + m)²·[s > −m ∧ t ≤ 0] + (s − m)²·[s ≤ m ∧ t > 0];
  L_pair = mean(ℓ) over every element;  L = λ · mean over the tap pairs.
Defaults: m = 2.0, λ = 10 (``lambda_kd``; CIFAR-tuned starting points to re-tune for ViT/ImageNet). (RepDistiller:
m = 1.0, stage weights, sum/B/1000.)

Student side (vitkd adaptation): a connector Conv1×1(C_s → C_t) + BN per pair (Kaiming-normal
fan_out, BN 1/0; trained with the student) on the student map; AB acts on the connector output, which is a
pre-activation. The Zoo has no connector (identical shapes, pre-ReLU student taps); vitkd always uses one, as a CNN
student's stage outputs are post-ReLU and a ViT's grids have the wrong width.

Teacher side: the loss only reads the teacher's activation *pattern* [t > 0], and for a ReLU output r = max(t, 0),
[r > 0] = [t > 0] exactly, so the post-ReLU stage outputs give the same loss as the Zoo's pre-ReLU taps. When the
teacher map is larger than the student's it is adaptive-average-pooled first (``_adapt``), so a pooled position
counts as active when any of its inputs is (with pre-ReLU maps it would be the sign of their mean).

Taps (:mod:`vitkd.losses._adapt`): three pairs, by default student blocks at 1/3, 2/3, 3/3 of its depth
(G_4/G_8/G_12) ↔ the teacher's last three stages (s2/s3/s4, the Zoo's rb1..rb3).

Procedure (the Zoo's two stages; its stage 2 sets λ = 0, so the teacher is dropped), in one vitkd run:
1. epochs [0, ``init_epochs``) (default 50): AB initialisation — λ·AB only, the task CE is off (:meth:`task_weight`
   = 0; the class head gets no gradient from this phase);
2. from ``init_epochs`` on: AB's weight is 0 (no term) and training continues with the task CE — the Zoo's CE-only
   stage 2 when ``ab`` is the only method; the DeiT preset adds ``deit_soft``/``kd``, which AB's phases do not touch.
``init_epochs=0`` turns the phases off (AB next to CE for the whole run; vitkd option).

Where vitkd differs from the official code:
* the connector and the teacher's post-ReLU taps (identical loss, see above);
* the Zoo's init-stage lr sequence (0.1/0.01/0.001 × lr) is not reproduced: the run's scheduler applies;
* the teacher still runs in stage 2; under DDP the connectors get no gradient in stage 2 (and the heads none in stage
  1): prepare with ``find_unused_parameters=True``;
* λ lives in the loss (``lambda_kd``).
"""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn as nn

from ..domains import NonNegative
from ..features import Features
from ._adapt import Blocks, InitStage, PairedTaps, align_spatial, as_taps, conv1x1_connector
from .base import Batch, DistillationLoss, RunInfo, register_loss

__all__ = ['ab_loss', 'ActivationBoundaries']


def ab_loss(student_preact: torch.Tensor, teacher_preact: torch.Tensor, margin: float = 2.0) -> torch.Tensor:
    """Mean over every element of the activation-boundary loss.

    Args:
        student_preact: s, any shape.
        teacher_preact: t of the same shape (only its sign pattern [t > 0] is used; detached).
        margin: m.
    """
    teacher_active = teacher_preact.detach() > 0
    push_down = (student_preact > -margin) & ~teacher_active  # should be inactive, is not below −m
    push_up = (student_preact <= margin) & teacher_active      # should be active, is not above m
    loss = (student_preact + margin).pow(2) * push_down + (student_preact - margin).pow(2) * push_up
    return loss.mean()


@register_loss('ab')
class ActivationBoundaries(InitStage, PairedTaps, DistillationLoss):
    """Activation-boundary transfer through student connectors; CE-off init stage, then off (Zoo)."""
    paper = 'AB, Heo et al., AAAI 2019, arXiv:1811.03233 (Knowledge-Distillation-Zoo)'
    # connectors or heads sit idle in one of the two stages: DDP needs find_unused_parameters
    may_leave_parameters_unused = True

    def __init__(self, lambda_kd: Annotated[float, NonNegative()] = 10.0, margin: Annotated[float, NonNegative()] = 2.0,
                 init_epochs: Annotated[float, NonNegative()] = 50, student_blocks: Blocks = None,
                 teacher_blocks: Blocks = None):
        """
        Args:
            lambda_kd: λ (Zoo value; CIFAR-tuned starting point).
            margin: m.
            init_epochs: length of the AB-only initialisation stage (CE off; fractional epochs allowed); AB is off
                afterwards. 0: no phases.
            student_blocks, teacher_blocks: tap indices (None: thirds of the depth ↔ last three stages).
        """
        super().__init__()
        self.lambda_kd, self.margin, self.init_epochs = lambda_kd, margin, init_epochs
        self.student_blocks, self.teacher_blocks = as_taps(student_blocks), as_taps(teacher_blocks)
        self.connectors = nn.ModuleList()

    def setup(self, student: Features, teacher: Features, info: RunInfo) -> None:
        self.connectors = nn.ModuleList(conv1x1_connector(s.shape[1], t.shape[1], bn=True)
                                        for s, t in self.map_pairs(student, teacher))

    def forward(self, student: Features, teacher: Features, batch: Batch) -> dict[str, torch.Tensor]:
        if self.stage_done(batch.progress):
            return {}  # stage 2: λ = 0 (Zoo), the term is not computed
        losses = []
        for connector, (s, t) in zip(self.connectors, self.map_pairs(student, teacher)):
            s, t = align_spatial(s, t)
            losses.append(ab_loss(connector(s), t, self.margin))
        return {'ab': self.lambda_kd * torch.stack(losses).mean()}
