"""The dense forms of the distillation methods: what they see, their registry, and the pairing of pyramid levels.

A method with a dense form keeps it in its own file (``fitnet.py``, ``vkd.py``, ``kd.py``, ``dist.py``), as a pure
function plus a :class:`DenseDistillationLoss` registered with ``@register_dense_loss('<the method's name>')``: a
dense run (``--task detect`` / ``--task segment``) builds ``--distill vkd:1`` from this registry, a classification
run from :data:`vitkd.losses.base.LOSS_REGISTRY`, with the same ``name[:weight]`` and ``--loss-opts name.key=value``
spec. A dense loss is a :class:`~vitkd.losses.base.DistillationLoss` (weights, warm-ups, weight decay, DDP and
checkpoints treat it alike); its ``forward`` takes :class:`DenseFeatures`.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F

from .base import DistillationLoss, LossSpecError, construct_checked, registrar

__all__ = ['DenseFeatures', 'DenseDistillationLoss', 'DENSE_LOSS_REGISTRY', 'register_dense_loss',
           'get_dense_loss_class', 'create_dense_loss', 'list_dense_losses', 'paired_levels', 'align_logits']

DENSE_LOSS_REGISTRY: dict[str, type['DenseDistillationLoss']] = {}


@dataclass
class DenseFeatures:
    """A dense model's outputs that the losses compare.

    Attributes:
        pyramid: level name (``'s8'`` = stride 8) → [B, C, H/s, W/s], finest first.
        logits: segmentation logits [B, K, h, w] at the finest stride (None for a detector).
    """
    pyramid: 'OrderedDict[str, torch.Tensor]'
    logits: Optional[torch.Tensor] = None

    def apply(self, fn) -> 'DenseFeatures':
        return DenseFeatures(OrderedDict((k, fn(v)) for k, v in self.pyramid.items()),
                             None if self.logits is None else fn(self.logits))


class DenseDistillationLoss(DistillationLoss):
    """Base class of a method's dense form: ``forward(student: DenseFeatures, teacher: DenseFeatures, batch)``."""

    #: the method compares per-pixel class distributions (segmentation logits); a detector has none
    needs_logits: ClassVar[bool] = False

    def setup(self, student: DenseFeatures, teacher: DenseFeatures, info) -> None:  # type: ignore[override]
        """Build trainable parts from one example pass of both models (shapes only)."""

    def forward(self, student: DenseFeatures, teacher: DenseFeatures,  # type: ignore[override]
                batch) -> dict[str, torch.Tensor]:
        """Named loss terms (scalars, fp32) from the two models' :class:`DenseFeatures`."""
        raise NotImplementedError


#: class decorator: register the dense form of a method under the method's name
register_dense_loss = registrar(DENSE_LOSS_REGISTRY, 'dense loss')


def get_dense_loss_class(name: str) -> type[DenseDistillationLoss]:
    if name not in DENSE_LOSS_REGISTRY:
        raise LossSpecError(f'loss {name!r} has no dense form (detection/segmentation); methods with one: '
                            f'{", ".join(sorted(DENSE_LOSS_REGISTRY))}')
    return DENSE_LOSS_REGISTRY[name]


def create_dense_loss(name: str, **options: Any) -> DenseDistillationLoss:
    """Build the dense form of ``name`` with ``options`` (see :func:`vitkd.losses.base.construct_checked`)."""
    return construct_checked(get_dense_loss_class(name), name, options, 'dense loss')


def list_dense_losses() -> list[tuple[str, str]]:
    """(name, paper) of every method with a dense form, sorted by name."""
    return [(n, DENSE_LOSS_REGISTRY[n].paper) for n in sorted(DENSE_LOSS_REGISTRY)]


def paired_levels(student: DenseFeatures, teacher: DenseFeatures, levels: Optional[Sequence[str]],
                  method: str) -> list[str]:
    """The pyramid levels both models have (the same stride: the same spatial size on the same input), or the
    requested ``levels``; an empty or unknown choice is a one-line error."""
    common = [k for k in student.pyramid if k in teacher.pyramid]
    if levels is None:
        if not common:
            raise LossSpecError(f'{method}: the student\'s pyramid levels {list(student.pyramid)} and the teacher\'s '
                                f'{list(teacher.pyramid)} share no stride')
        return common
    missing = [k for k in levels if k not in common]
    if missing:
        raise LossSpecError(f'{method}: levels {missing} are not in both pyramids (common levels: {common})')
    return list(levels)


def align_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """The teacher's logits [B, K, h_t, w_t] bilinearly resized to the student's [B, K, h, w] grid when they differ."""
    if teacher_logits.shape[-2:] == student_logits.shape[-2:]:
        return teacher_logits
    return F.interpolate(teacher_logits, size=student_logits.shape[-2:], mode='bilinear', align_corners=False)
