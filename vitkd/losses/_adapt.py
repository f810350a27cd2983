"""Helpers shared by the Knowledge-Distillation-Zoo methods (not a method; registers nothing).

The Zoo (AberHu/Knowledge-Distillation-Zoo) distils CIFAR ResNet-110 into ResNet-20: identical C, H, W at every tap,
so most of its losses have no connector and no resizing. vitkd pairs a ViT student (12 blocks of width D_s, one
h×w grid) with a CNN teacher (stages of growing width and shrinking size) or a CNN with a CNN, so every map-based
Zoo method needs the same three decisions, made here once (a vitkd adaptation, not in the official code):

1. **Which taps** (:func:`default_taps`, :func:`pair_taps`, :class:`PairedTaps`). Tap positions are written in
   *thirds of the depth*: ``(1, 2, 3)`` = the Zoo's rb1/rb2/rb3. On a ViT with L blocks position p is block
   ⌊p·L/3 + ½⌋ − 1 (0-indexed), so a 12-block DeiT gets blocks 3/7/11 = G_4/G_8/G_12; on a CNN with S stages
   (tap 0 = stem, taps 1..S = stages) position p is stage S − 3 + ⌊p + ½⌋ (clamped to ≥ 1), so RegNet/ResNet get
   s2/s3/s4. Defaults: three-tap methods ``(1, 2, 3)`` (G_4/G_8/G_12 ↔ s2/s3/s4), single-tap methods ``(2,)``
   (G_8 ↔ s3, both 14×14 at 224 px), two-tap methods ``(2, 3)``. Explicit ``student_blocks`` / ``teacher_blocks``
   options override them (0-indexed tap indices as in :class:`vitkd.features.TapSpec`, negatives count from the
   end). When only one side is given with a different count, the other side takes that many taps spread evenly
   over the depth (positions 3·j/k, j = 1..k); when both are given they must have the same length.
2. **Spatial alignment** (:func:`align_spatial`): adaptive average pooling of the larger map down to the smaller
   size (at 224 px: teacher s2 28→14 for G_4; student 14→7 for s4). Never upsampling.
3. **Channel alignment** (:func:`conv1x1_connector`): a student-side 1×1 conv (= per-token Linear D_s → C_t),
   optionally with BN and ReLU, Kaiming-normal (fan_out, relu) init, BN weight 1 / bias 0 (:func:`init_convs_`).

Also :func:`gather_batch` for batch-relational losses with a global (all-gathered) scope.
"""
from __future__ import annotations

import math
from typing import Annotated, ClassVar, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..domains import Integer, ListOf, OneOf, OrNone
from ..features import Features, TapSpec, _is_vit, num_taps
from .base import LossSpecError

__all__ = ['THREE_TAPS', 'MIDDLE_TAP', 'LAST_TWO_TAPS', 'SCOPES', 'default_taps', 'even_positions', 'pair_taps',
           'PairedTaps', 'as_taps', 'align_spatial', 'pool_to', 'conv1x1_connector', 'init_convs_', 'gather_batch',
           'Blocks', 'Scope', 'tap_indices']

THREE_TAPS = (1.0, 2.0, 3.0)   # Zoo rb1, rb2, rb3 -> G_4/G_8/G_12 ↔ s2/s3/s4
MIDDLE_TAP = (2.0,)            # single-tap methods -> G_8 ↔ s3
LAST_TWO_TAPS = (2.0, 3.0)     # two-tap methods -> G_8/G_12 ↔ s3/s4
SCOPES = ('local', 'global')



def tap_indices(min_len: int = 1, max_len: Optional[int] = None):
    """The annotation of a tap-index option: ``min_len`` to ``max_len`` indices (blocks of a ViT, stem + stages of a
    CNN; negative counts from the end; a lone index stands for one), or None for the method's default taps at thirds
    of the depth (``configure_taps``). Indices beyond the network are refused once the models exist."""
    return Annotated[Optional[Sequence[int]], OrNone(ListOf(Integer(), min_len, max_len, scalar=True))]


Blocks = tap_indices()
#: Batch statistics over this process's batch ('local') or over the batch of every process ('global').
Scope = Annotated[str, OneOf(*SCOPES)]


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def default_taps(model: nn.Module, positions: Sequence[float]) -> tuple[int, ...]:
    """Tap indices of ``model`` at ``positions`` (thirds of the depth, see the module docstring).

    Args:
        model: an unwrapped timm model (ViT: taps are blocks; CNN: taps are stem + stages).
        positions: e.g. ``(1, 2, 3)``; values in (0, 3].

    Returns:
        Non-negative tap indices, one per position (duplicates possible on very shallow models).
    """
    n = num_taps(model)
    if n == 0:
        raise LossSpecError(f'{type(model).__name__} exposes no intermediate taps (no forward_intermediates or '
                            'feature_info); pass student_blocks/teacher_blocks explicitly')
    if _is_vit(model):
        return tuple(min(max(_round_half_up(p * n / 3) - 1, 0), n - 1) for p in positions)
    stages = n - 1  # tap 0 is the stem
    return tuple(min(max(stages - 3 + _round_half_up(p), 1 if stages >= 1 else 0), n - 1) for p in positions)


def even_positions(count: int) -> tuple[float, ...]:
    """``count`` positions spread evenly over the depth, ending at the last tap: 3·j/count, j = 1..count."""
    return tuple(3.0 * j / count for j in range(1, count + 1))


def pair_taps(student: nn.Module, teacher: Optional[nn.Module], student_blocks: Optional[Sequence[int]],
              teacher_blocks: Optional[Sequence[int]], positions: Sequence[float]
              ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (student taps, teacher taps) a map-based method compares pairwise.

    Args:
        student, teacher: the unwrapped models (teacher None: no teacher taps).
        student_blocks, teacher_blocks: explicit tap indices or None for the defaults.
        positions: the method's default positions.

    Returns:
        Two tuples of equal length; entry i of each forms pair i.
    """
    if student_blocks is not None and teacher_blocks is not None and len(student_blocks) != len(teacher_blocks):
        raise LossSpecError(f'student_blocks {tuple(student_blocks)} and teacher_blocks {tuple(teacher_blocks)} '
                            'must have the same length (one student tap per teacher tap)')
    given = student_blocks if student_blocks is not None else teacher_blocks
    if given is not None and len(given) == 0:
        raise LossSpecError('student_blocks/teacher_blocks must name at least one tap')
    if given is not None and len(given) != len(positions):
        positions = even_positions(len(given))
    s = tuple(student_blocks) if student_blocks is not None else default_taps(student, positions)
    if teacher is None:
        return s, ()
    t = tuple(teacher_blocks) if teacher_blocks is not None else default_taps(teacher, positions)
    return s, t


class InitStage:
    """Mixin for the Zoo's two-stage methods (AB, FSP): the term alone, task CE off, for ``init_epochs`` epochs;
    afterwards the term is not computed (Zoo λ = 0) and training is CE only. ``init_epochs = 0`` = a plain term.
    Epochs are fractional (:attr:`Batch.progress`), so a stage may end inside an epoch (e.g. 0.25 of a 1-epoch run)."""
    init_epochs: float = 0

    def in_init_stage(self, epoch: float) -> bool:
        return epoch < self.init_epochs

    def task_weight(self, epoch: float) -> float:
        return 0.0 if self.in_init_stage(epoch) else 1.0

    def stage_done(self, epoch: float) -> bool:
        """True once the initialisation stage is over (the method then returns no term)."""
        return bool(self.init_epochs) and not self.in_init_stage(epoch)


class PairedTaps:
    """Mixin for methods comparing student and teacher maps tap by tap (put it before ``DistillationLoss``).

    The subclass sets ``student_blocks`` / ``teacher_blocks`` (None or tuples) in ``__init__`` and may override
    ``default_positions``; :meth:`configure_taps` (called by the distiller) fills ``student_indices`` /
    ``teacher_indices`` and the TapSpecs; :meth:`map_pairs` returns the paired maps of one forward.
    """
    default_positions: ClassVar[tuple[float, ...]] = THREE_TAPS
    student_blocks: Optional[tuple[int, ...]] = None
    teacher_blocks: Optional[tuple[int, ...]] = None

    def configure_taps(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        self.student_indices, self.teacher_indices = pair_taps(student, teacher, self.student_blocks,
                                                               self.teacher_blocks, self.default_positions)
        self.student_taps = TapSpec(blocks=self.student_indices)
        self.teacher_taps = TapSpec(blocks=self.teacher_indices)

    def map_pairs(self, student: Features, teacher: Features) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(student map [B, C_s, H_s, W_s], teacher map [B, C_t, H_t, W_t]), ...] in pair order (not aligned)."""
        return [(student.block(i), teacher.block(j)) for i, j in zip(self.student_indices, self.teacher_indices)]


def as_taps(blocks: Optional[Sequence[int]]) -> Optional[tuple[int, ...]]:
    """Option value (None, int, list from YAML) → tuple of ints or None."""
    if blocks is None:
        return None
    if isinstance(blocks, int):
        return (blocks,)
    return tuple(int(b) for b in blocks)


def pool_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``x`` [B, C, H, W] adaptive-average-pooled to ``size`` (returned unchanged when it already has it)."""
    return x if tuple(x.shape[-2:]) == tuple(size) else F.adaptive_avg_pool2d(x, size)


def align_spatial(student_map: torch.Tensor, teacher_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both maps at the smaller spatial size (per axis), by adaptive average pooling of the larger one.

    Args:
        student_map: [B, C_s, H_s, W_s].
        teacher_map: [B, C_t, H_t, W_t].

    Returns:
        ([B, C_s, H, W], [B, C_t, H, W]) with H = min(H_s, H_t), W = min(W_s, W_t).
    """
    size = (min(student_map.shape[-2], teacher_map.shape[-2]), min(student_map.shape[-1], teacher_map.shape[-1]))
    return pool_to(student_map, size), pool_to(teacher_map, size)


def init_convs_(module: nn.Module, transposed: bool = True) -> nn.Module:
    """Zoo init in place: Conv2d (and ConvTranspose2d if ``transposed``) Kaiming-normal (fan_out, relu), bias 0;
    BatchNorm2d weight 1, bias 0. Returns ``module``."""
    conv_types = (nn.Conv2d, nn.ConvTranspose2d) if transposed else (nn.Conv2d,)
    for m in module.modules():
        if isinstance(m, conv_types):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


def conv1x1_connector(in_channels: int, out_channels: int, bn: bool = False, relu: bool = False) -> nn.Sequential:
    """Student-side 1×1 conv C_in → C_out (bias only without BN) [+ BN] [+ ReLU], Zoo/Kaiming init.

    Maps [B, C_in, H, W] → [B, C_out, H, W]; on a ViT grid it is a per-token Linear D_s → C_t.
    """
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(out_channels))
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return init_convs_(nn.Sequential(*layers))


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """``x`` [B, ...] concatenated over every process along dim 0 (autograd-aware); identity without a group.

    Every rank computes the same global loss; the all-gather's backward sums the gradients all ranks send to this
    rank's slice, and DDP's averaging then yields the gradient of the single global loss. (Same contract as
    ``vitkd.losses.dist.gather_batch``; kept here so Zoo methods do not import another method's module.)
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(x), dim=0)
