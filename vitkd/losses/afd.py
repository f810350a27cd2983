"""AFD: attention feature distillation — channel-attention-weighted matching of normalised maps (``afd``).

"Pay Attention to Features, Transfer Learn Faster CNNs", Wang, Gao, Zhang, Xu, Xu, ICLR 2020 (OpenReview
ryxyCeHtPB; the AFD part of AFDS). Official code this follows: AberHu/Knowledge-Distillation-Zoo @
65470c846c1300d555815da26999cbe2b51fc815, ``kd_losses/afd.py::AFD`` (the paper's spatial-MLP attention is commented out
there as unstable and replaced by an SE-style block), ``train_kd.py --kd_mode afd``.

Per stage (student map s, teacher map t [B, C, H, W] — equal channels, see below)::

    ρ = sigmoid(MLP(GAP(t))),  ρ ← ρ / Σ_c ρ_c                       # [B, C] positive, sums to 1 per sample
        MLP = Conv1×1(C → M, bias) → ReLU → Conv1×1(M → C, bias),  M = max(1, ⌊att_f·C⌋)
    F̂ = F / (‖F‖_{2 over H,W} + 1e-6) per channel                    # both maps
    L_stage = mean_b Σ_c ρ_bc · mean_{H,W} (F̂_s − F̂_t)²
    L = mean over the stages

The attention MLP (Kaiming-normal fan_out/relu, bias 0) is trained with the student on the same loss it weights, so
it may shift ρ towards channels whose discrepancy is already small (the Zoo has no guard; neither has vitkd).
Defaults: att_f = 1.0 (the Zoo's; its λ is 500, ``--distill afd:500``, a CIFAR value).

Channels. The Zoo requires equal student/teacher channels and has no connector. vitkd adds a student-side 1×1 conv
connector (C_s → C_t, with bias, no BN, Kaiming init; ``_adapt.conv1x1_connector``) for a stage whose channel counts
differ — always for a ViT student (D_s vs the teacher stage width) — and none when they are equal. The larger map of
each pair is average-pooled to the smaller size.

ViT students (vitkd adaptation): blocks 4 / 8 / 12 ↔ s2 / s3 / s4 by default (positions 1/2/3 thirds of the depth,
``_adapt``). At s4 with att_f = 1 the MLP has ≈ 2·3024² ≈ 18 M parameters: ViT presets should use att_f ≪ 1 (e.g.
1/16).

ViT students (``vit_student_weight`` = 0.01): the paper's CNN-tuned weight overwhelms a ViT student's task loss. On the
table's ViT student (``scripts/reproduce.py``, 150 steps, avg-head top-1 gain over the no-teacher student) weight 1
gave −17.4 points (3 seeds), 0.1 gave −5.9 and 0.01 +0.2 (seed 0), so a ViT student gets weight 0.01 unless the
command gives one (``afd:1`` = the paper's).

Where vitkd differs from the official code:

* Explicit reshapes instead of ``squeeze()`` (the Zoo's ``squeeze()`` breaks at B = 1).
* The connector and the spatial pooling above (vitkd adaptation); fp32 with autocast off.
"""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..domains import Positive
from ..features import Features
from ._adapt import THREE_TAPS, Blocks, PairedTaps, align_spatial, as_taps, conv1x1_connector, init_convs_
from .base import Batch, DistillationLoss, RunInfo, register_loss

__all__ = ['AFD', 'ChannelAttention', 'channel_attention_weights', 'afd_loss']


class ChannelAttention(nn.Module):
    """SE-style attention on the teacher map: ρ [B, C] = normalised sigmoid(MLP(GAP(t)))."""

    def __init__(self, channels: int, att_f: float):
        super().__init__()
        mid = max(1, int(channels * att_f))
        self.mlp = init_convs_(nn.Sequential(nn.Conv2d(channels, mid, 1, bias=True), nn.ReLU(inplace=True),
                                             nn.Conv2d(mid, channels, 1, bias=True)))

    def forward(self, teacher_map: torch.Tensor) -> torch.Tensor:
        logits = self.mlp(F.adaptive_avg_pool2d(teacher_map, 1)).flatten(1)  # [B, C]
        return channel_attention_weights(logits)


def channel_attention_weights(logits: torch.Tensor) -> torch.Tensor:
    """sigmoid, then normalised to sum 1 over the channels: [B, C] → [B, C]."""
    rho = torch.sigmoid(logits)
    return rho / rho.sum(dim=1, keepdim=True)


def afd_loss(student_map: torch.Tensor, teacher_map: torch.Tensor, rho: torch.Tensor,
             eps: float = 1e-6) -> torch.Tensor:
    """mean_b Σ_c ρ_bc·mean_{HW}(F̂_s − F̂_t)² with per-channel spatial L2 normalisation.

    Args:
        student_map: [B, C, H, W].
        teacher_map: [B, C, H, W] (detached here).
        rho: [B, C].
        eps: added to each channel's norm.
    """
    def normalise(x: torch.Tensor) -> torch.Tensor:
        return x / (x.norm(dim=(2, 3), keepdim=True) + eps)
    per_channel = (normalise(student_map) - normalise(teacher_map.detach())).pow(2).mean(dim=(2, 3))  # [B, C]
    return (rho * per_channel).sum(dim=1).mean()


@register_loss('afd')
class AFD(PairedTaps, DistillationLoss):
    """Attention-weighted per-channel distance between spatially normalised maps."""
    paper = 'AFD (AFDS), Wang et al., ICLR 2020, OpenReview ryxyCeHtPB (Zoo SE-attention variant)'
    vit_student_weight = 0.01
    default_positions = THREE_TAPS

    def __init__(self, att_f: Annotated[float, Positive()] = 1.0, student_blocks: Blocks = None,
                 teacher_blocks: Blocks = None):
        """
        Args:
            att_f: hidden width factor of the attention MLP.
            student_blocks, teacher_blocks: paired taps; None = 1/3, 2/3, 3/3 of the depth.
        """
        super().__init__()
        self.att_f = att_f
        self.student_blocks, self.teacher_blocks = as_taps(student_blocks), as_taps(teacher_blocks)
        self.attentions = nn.ModuleList()
        self.connectors = nn.ModuleList()

    def setup(self, student: Features, teacher: Features, info: RunInfo) -> None:
        device = student.logits.device
        for s, t in self.map_pairs(student, teacher):
            c_s, c_t = s.shape[1], t.shape[1]
            self.connectors.append((nn.Identity() if c_s == c_t else conv1x1_connector(c_s, c_t)).to(device))
            self.attentions.append(ChannelAttention(c_t, self.att_f).to(device))

    def forward(self, student: Features, teacher: Features, batch: Batch) -> dict[str, torch.Tensor]:
        losses = []
        for connector, attention, (s, t) in zip(self.connectors, self.attentions, self.map_pairs(student, teacher)):
            s, t = align_spatial(s, t)
            losses.append(afd_loss(connector(s), t, attention(t)))
        return {'afd': torch.stack(losses).mean()}
