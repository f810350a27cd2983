"""The trained module of a dense run: the dense student plus the methods' dense forms; the frozen teacher beside it.

The dense member of :mod:`vitkd.distiller`, with the same contract: one module holds everything that trains (the
student's backbone, pyramid and head, every projector and regressor), so ``accelerator.prepare``, the optimizer and
the checkpoints see all of it; the teacher is a plain attribute (never wrapped, saved or optimised); ``forward``
returns ``{'loss', 'terms'}`` and the engine sums nothing itself.

Total loss = w_task·Σ (the head's task terms) + Σ_i w_i(e)·Σ_terms L_i, the task terms being FCOS's classification,
box regression and centerness losses (detection) or the pixel cross-entropy (segmentation), w_task = ``--task-weight``
(default 1). Every distillation loss runs in fp32 with autocast off, on fp32 copies of the pyramids and logits.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..distiller import DistillerBase, LossEntry, from_inference
from ..losses import Batch, LossSpecError
from ..losses._dense import DenseDistillationLoss, DenseFeatures
from ..losses.functional import at_least_fp32
from ..models import Teacher
from .models import DenseModel, DenseSegmenter

__all__ = ['DenseDistiller']


class DenseDistiller(DistillerBase):
    """Dense student + the methods' dense forms. ``forward(batch)`` → ``{'loss', 'terms'}``.

    Args:
        student: a :class:`~vitkd.dense.models.DenseDetector` or :class:`~vitkd.dense.models.DenseSegmenter`.
        teacher: the frozen :class:`~vitkd.models.Teacher` around a dense model of the same task (None: no teacher).
        entries: the methods (dense forms) with weights and warm-ups.
        input_size: (C, S, S), for the losses' setup pass.
        task_weight: factor on the task terms (None: product of the methods' ``task_weight``, 1 for every dense form).
    """

    def __init__(self, student: DenseModel, teacher: Optional[Teacher], entries: Sequence[LossEntry],
                 input_size: tuple[int, int, int], task_weight: Optional[float] = None):
        super().__init__(student, teacher, entries, task_weight)
        self.segmentation = isinstance(student, DenseSegmenter)
        for e in entries:
            if not isinstance(e.loss, DenseDistillationLoss):
                raise LossSpecError(f'loss {e.loss.name!r} is not a dense form (build it with --task detect/segment)')
            if e.loss.needs_logits and not self.segmentation:
                raise LossSpecError(f'loss {e.loss.name!r} compares per-pixel class distributions: --task segment '
                                    'only (for detection use fitnet or vkd on the pyramid)')
        if teacher is not None and type(teacher.model) is not type(student):
            raise LossSpecError(f'the teacher {teacher.source} is a {type(teacher.model).__name__}, the student a '
                                f'{type(student).__name__}: a dense run needs a teacher of the same task (a '
                                'vitkd_dense_detector / vitkd_dense_segmenter folder, e.g. from '
                                'scripts/train_dense_teacher.py)')
        self.teacher_logits = any(e.loss.needs_logits for e in entries)
        self.setup_losses(input_size, None)

    def example_student_features(self, images: torch.Tensor) -> DenseFeatures:
        return self.student_features(images)[0]

    def no_teacher_features(self) -> DenseFeatures:
        return DenseFeatures(OrderedDict())

    def student_features(self, images: torch.Tensor) -> tuple[DenseFeatures, object]:
        """(the student's pyramid and segmentation logits, its head outputs)."""
        pyramid = self.student.forward_pyramid(images)
        head = self.student.forward_head(pyramid)
        return DenseFeatures(pyramid, head if self.segmentation else None), head

    def teacher_features(self, images: torch.Tensor) -> DenseFeatures:
        """One frozen teacher pass under ``torch.inference_mode`` on the student's input (re-normalised for the
        teacher), the pyramid and (only when a method compares them) the logits as contiguous fp32 copies."""
        model = self.teacher.model
        with torch.inference_mode():
            pyramid = model.forward_pyramid(self.teacher.prepare_input(images))
            logits = model.forward_head(pyramid) if self.teacher_logits else None
        return DenseFeatures(pyramid, logits).apply(from_inference)

    def forward(self, batch: Batch) -> dict:
        """One training step's losses: ``loss`` (scalar) and ``terms`` (name → detached unweighted value: the task
        terms as ``task.<name>``, the methods' as ``<method>.<term>``). ``batch.targets``: masks [B, S, S] int64
        (segmentation) or per image ``{'boxes', 'labels'}`` (detection), on the device."""
        images = batch.images
        student, head = self.student_features(images)
        teacher = self.teacher_features(images) if self.needs_teacher else self.no_teacher_features()
        with torch.autocast(device_type=images.device.type, enabled=False):
            if self.segmentation:
                task_terms = self.student.task_loss(at_least_fp32(head), batch.targets)
            else:
                head32 = {k: at_least_fp32(v) for k, v in head.items()}
                task_terms = self.student.task_loss(head32, student.pyramid, images, batch.targets)
            task = sum(task_terms.values())
            terms = {f'task.{k}': v.detach() for k, v in task_terms.items()}
            total = self.weighted_total(task, student.apply(at_least_fp32), teacher, batch, terms)
        return {'loss': total, 'terms': terms}

    def export_student(self) -> nn.Module:
        """The whole dense model (backbone, pyramid, head); the methods' parts stay behind."""
        return self.student
