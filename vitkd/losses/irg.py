"""IRG: instance relationship graph — vertices, edges and transformation (``irg``).

"Knowledge Distillation via Instance Relationship Graph", Liu, Cao, Li, Yuan, Hu, Li, Duan, CVPR 2019 (official code
in Caffe: yufanLIU/IRG). Official code this follows (the Zoo's one-to-one mode): AberHu/Knowledge-Distillation-Zoo @
65470c846c1300d555815da26999cbe2b51fc815, ``kd_losses/irg.py::IRG``, ``train_kd.py --kd_mode irg``.

Inputs: logits z [B, K], pooled vectors f [B, d], two maps per network F¹ (earlier) and F² (later) [B, C, H, W].

* Vertex: L_v = mean-MSE(z_s, z_t).
* Edges: for X ∈ {f, F¹, F²} flattened per sample, E(X)_ij = max(‖X_i − X_j‖², 1e-12) with E_ii = 0, divided by
  its maximum (a [B, B] matrix with max 1); L_e = (1/3)·Σ_X mean-MSE(E(X_s), E(X_t)).
* Transformation: τ_b = max(‖F¹_b − F²_b‖², 1e-12) between the two maps of the **same** network after alignment,
  divided by its batch maximum ([B]); L_tr = mean-MSE(τ_s, τ_t).
  Alignment (:func:`align_pair`): the spatially larger map is average-pooled to the smaller size; the wider map's
  channels are reduced to the narrower count by **parameter-free adaptive average pooling over the channel axis**.
* L = w_v·L_v + w_e·L_e + w_tr·L_tr, defaults 0.1 / 5 / 5 (the Zoo's; its λ is 1). Returned as the three weighted
  terms ``vertex``, ``edge``, ``transformation``.

ViT students (vitkd adaptation): vertex on the distillation head vs z_t (``head='auto'``; the task CE goes to the class
head); edges on pre-logits ↔ t̄ and on the grids of blocks 8 / 12 ↔ s3 / s4 (the default two-tap pairing, positions
2/3 of the depth — see ``_adapt``); the student's transformation G_8 → G_12 has equal shapes (no reduction), the
teacher's s3 (1232, 14²) → s4 (3024, 7²) pools s3 to 7×7 and reduces s4's channels to 1232.

Batch scope: edges and τ's batch maximum use the per-process batch (``scope='local'``, the Zoo); ``'global'``
all-gathers every input first (``_adapt.gather_batch``). Identical on one process.

ViT students (``vit_student_weight`` = 0.01): the paper's CNN-tuned weight overwhelms a ViT student's task loss. On the
table's ViT student (``scripts/reproduce.py``, 150 steps, avg-head top-1 gain over the no-teacher student) weight 1
gave −6.6 points (3 seeds), 0.1 gave −1.5 and 0.01 −0.6 (seed 0), so a ViT student gets weight 0.01 unless the
command gives one (``irg:1`` = the paper's).

Where vitkd differs from the official code:

* **Channel reduction.** The Zoo reduces channels by averaging adjacent channel pairs of the later map, which only
  works when the channel count exactly doubles (and only when the earlier map is the narrower). Here any ratio works
  in both directions; for a ratio of exactly 2 the channel pooling is identical to the Zoo's pair average.
* The Zoo pools only the earlier map (when it is larger); here whichever map is larger is pooled (never upsampled).
* All in at least fp32; the teacher's side is detached.
"""
from __future__ import annotations

from typing import Annotated, Sequence

import torch
import torch.nn.functional as F

from ..domains import NonNegative
from ..features import Features, TapSpec
from ._adapt import LAST_TWO_TAPS, PairedTaps, Scope, align_spatial, as_taps, gather_batch, tap_indices
from .base import Batch, DistillationLoss, Head, pick_head, reads_dist_head, register_loss

__all__ = ['IRG', 'edge_matrix', 'channel_pool', 'align_pair', 'transformation_distance', 'irg_terms']

TwoTaps = tap_indices(min_len=2, max_len=2)  # the earlier and the later map of the transformation term


def edge_matrix(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Max-normalised squared Euclidean distances between samples.

    Args:
        x: [B, ...] (flattened per sample).

    Returns:
        E [B, B] with zero diagonal and maximum 1.
    """
    x = x.flatten(1)
    sq = x.pow(2).sum(1)  # [B]
    dist = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * x @ x.t()).clamp(min=eps)  # [B, B]
    dist = dist * (1 - torch.eye(x.shape[0], device=x.device, dtype=x.dtype))
    return dist / dist.max()


def channel_pool(x: torch.Tensor, channels: int) -> torch.Tensor:
    """[B, C, H, W] → [B, channels, H, W] by adaptive average pooling over the channel axis (parameter-free)."""
    if x.shape[1] == channels:
        return x
    b, c, h, w = x.shape
    pooled = F.adaptive_avg_pool1d(x.permute(0, 2, 3, 1).reshape(b * h * w, 1, c), channels)  # [B·H·W, 1, channels]
    return pooled.reshape(b, h, w, channels).permute(0, 3, 1, 2)


def align_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two maps of one network brought to a common [B, min C, min H, min W] (pooling only, no parameters)."""
    a, b = align_spatial(a, b)
    channels = min(a.shape[1], b.shape[1])
    return channel_pool(a, channels), channel_pool(b, channels)


def transformation_distance(first: torch.Tensor, second: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """τ [B]: per-sample squared distance between two aligned maps of one network, divided by its batch maximum."""
    first, second = align_pair(first, second)
    dist = (first - second).flatten(1).pow(2).sum(1).clamp(min=eps)  # [B]
    return dist / dist.max()


def irg_terms(logits_s: torch.Tensor, logits_t: torch.Tensor, pooled_s: torch.Tensor, pooled_t: torch.Tensor,
              maps_s: Sequence[torch.Tensor], maps_t: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The three unweighted IRG terms.

    Args:
        logits_s, logits_t: [B, K].
        pooled_s, pooled_t: [B, d_s], [B, d_t].
        maps_s, maps_t: (F¹, F²) of each network, [B, C, H, W] each, F¹ the earlier tap.

    Returns:
        ``vertex``, ``edge`` (mean over the three edge types), ``transformation``.
    """
    logits_t, pooled_t = logits_t.detach(), pooled_t.detach()
    maps_t = [m.detach() for m in maps_t]
    vertex = F.mse_loss(logits_s, logits_t)
    edge = sum(F.mse_loss(edge_matrix(s), edge_matrix(t))
               for s, t in zip([pooled_s, *maps_s], [pooled_t, *maps_t])) / (1 + len(maps_s))
    transformation = F.mse_loss(transformation_distance(*maps_s), transformation_distance(*maps_t))
    return {'vertex': vertex, 'edge': edge, 'transformation': transformation}


@register_loss('irg')
class IRG(PairedTaps, DistillationLoss):
    """Instance relationship graph: logit vertices, pairwise-distance edges, intra-network transformation."""
    paper = 'IRG, Liu et al., CVPR 2019'
    vit_student_weight = 0.01
    default_positions = LAST_TWO_TAPS

    def __init__(self, w_vertex: Annotated[float, NonNegative()] = 0.1, w_edge: Annotated[float, NonNegative()] = 5.0,
                 w_transformation: Annotated[float, NonNegative()] = 5.0, student_blocks: TwoTaps = None,
                 teacher_blocks: TwoTaps = None, scope: Scope = 'local', head: Head = 'auto'):
        """
        Args:
            w_vertex, w_edge, w_transformation: term weights (Zoo: 0.1, 5, 5).
            student_blocks, teacher_blocks: the two map taps (earlier, later) of each network; None = 2/3 and 3/3
                of the depth (ViT G_8/G_12, CNN s3/s4).
            scope: ``local`` or ``global`` batch for the relational terms.
            head: student head of the vertex term (``auto`` = distillation head if any).
        """
        super().__init__()
        self.w_vertex, self.w_edge, self.w_transformation = w_vertex, w_edge, w_transformation
        self.student_blocks, self.teacher_blocks = as_taps(student_blocks), as_taps(teacher_blocks)
        self.scope, self.head = scope, head
        self.uses_dist_head = reads_dist_head(self.head)

    def configure_taps(self, student, teacher) -> None:
        super().configure_taps(student, teacher)
        self.student_taps = self.student_taps.merge(TapSpec(logits=True, pooled=True))
        self.teacher_taps = self.teacher_taps.merge(TapSpec(logits=True, pooled=True))

    def forward(self, student: Features, teacher: Features, batch: Batch) -> dict[str, torch.Tensor]:
        pairs = self.map_pairs(student, teacher)
        inputs = [pick_head(student, self.head), teacher.logits, student.pooled, teacher.pooled,
                  *[s for s, _ in pairs], *[t for _, t in pairs]]
        if self.scope == 'global':
            inputs = [gather_batch(x) for x in inputs]
        z_s, z_t, f_s, f_t, map_s1, map_s2, map_t1, map_t2 = inputs
        terms = irg_terms(z_s, z_t, f_s, f_t, (map_s1, map_s2), (map_t1, map_t2))
        return {'vertex': self.w_vertex * terms['vertex'], 'edge': self.w_edge * terms['edge'],
                'transformation': self.w_transformation * terms['transformation']}
