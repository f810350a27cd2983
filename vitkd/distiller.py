"""The trained module: the student plus every distillation method's trainable parts; the teacher beside it.

Like timm's ``timm.task`` distillation tasks, everything that trains (student, projectors, adapters, memory banks)
is ONE module, so ``accelerator.prepare``/DDP, the optimizer and checkpoints see all of it, while the frozen teacher
is kept as a plain attribute (not a submodule): never DDP-wrapped, never in a state dict, never optimised.

Total loss = Σ_i w_i(e)·Σ_terms L_i + w_task(e)·L_task, where
* L_task is the cross-entropy of the student against the (smoothed, mixed) soft targets, applied once here: on the
  class head when some method uses the distillation head, otherwise on the averaged heads (timm's behaviour);
* w_i(e) = weight_i · min(1, e / warmup_i) with e the fractional epoch (linear warm-up when warmup_i > 0);
* w_task(e) = the product of the methods' ``task_weight(e)`` (DeiT's 1 − α), unless set explicitly.
Every loss runs in fp32 with autocast off, on fp32 copies of the features (the network bodies may run in bf16).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .features import Features, TapSpec, extract
from .losses import Batch, DistillationLoss, LossSpecError, RunContext, RunInfo
from .losses.functional import at_least_fp32, soft_target_cross_entropy
from .models import Teacher, has_dist_head

__all__ = ['DistillerBase', 'Distiller', 'LossEntry', 'from_inference', 'idle_parameters_until', 'may_leave_parameters_unused']


def _as_loss_input(t: torch.Tensor) -> torch.Tensor:
    """At least fp32, contiguous NCHW (a channels_last teacher's maps would break the losses' ``view`` calls)."""
    return at_least_fp32(t).contiguous()


def from_inference(t: torch.Tensor) -> torch.Tensor:
    """A normal (at least fp32) contiguous copy of an inference-mode tensor (which autograd may not save for
    backward)."""
    return t.to(at_least_fp32(t[:0]).dtype, memory_format=torch.contiguous_format, copy=True)


def idle_parameters_until(entries: Sequence['LossEntry'], epochs: int, task_weight: Optional[float] = None) -> float:
    """The fractional epoch from which no training step leaves a trainable parameter without gradient.

    A step at fractional epoch ``e < idle_parameters_until(...)`` may leave some parameter idle, and DDP must then
    search for such parameters (``find_unused_parameters``); steps at later epochs never do, so the search (a graph
    traversal per step) can stop there. 0 when no step does, ``math.inf`` when any step may.

    * a method that says so (:attr:`DistillationLoss.may_leave_parameters_unused`: FSP/AB/FT stages whose trainable
      parts sit idle), a zero weight (``name:0``: the term is skipped, its projector idles), or a fixed
      ``--task-weight 0`` (nothing trains an unused head): every step (``inf``);
    * a linear warm-up: its weight is 0 only at fractional epoch 0 (the run's first batch), so the bound is the
      smallest epoch above 0;
    * a method whose :meth:`~DistillationLoss.task_weight` is 0 in epoch k (checked at every integer epoch of the run):
      the task CE is off there, which can leave a head idle, until epoch k + 1.
    """
    if task_weight is not None and task_weight == 0:
        return math.inf
    until = 0.0
    for e in entries:
        if e.loss.may_leave_parameters_unused or e.weight == 0:
            return math.inf
        if e.warmup_epochs > 0:
            until = math.nextafter(0.0, 1.0)
    if task_weight is None:
        for epoch in range(max(1, epochs)):
            if any(e.loss.task_weight(epoch) == 0 for e in entries):
                until = max(until, epoch + 1.0)
    return until


def may_leave_parameters_unused(entries: Sequence['LossEntry'], epochs: int,
                                task_weight: Optional[float] = None) -> bool:
    """True when some training step can leave a trainable parameter without gradient (see
    :func:`idle_parameters_until`): DDP must then start with its search for unused parameters."""
    return idle_parameters_until(entries, epochs, task_weight) > 0


@dataclass
class LossEntry:
    """One method in a run: the loss module, its weight and its linear warm-up length in epochs.

    ``weight_given`` is False when the command gave no weight: the weight then depends on the student (see
    :func:`vitkd.build.resolve_weights`) and is 1 until the student is known."""
    loss: DistillationLoss
    weight: float = 1.0
    warmup_epochs: float = 0.0
    weight_given: bool = True

    def weight_at(self, epoch: float) -> float:
        """The weight at fractional ``epoch``: ``weight`` itself once the warm-up is over (a constant, not a
        function of the epoch, for a compiled step)."""
        if epoch < self.warmup_epochs:
            return self.weight * (epoch / self.warmup_epochs)
        return self.weight


class DistillerBase(nn.Module):
    """What every trained module of a run shares, classification (:class:`Distiller`) or dense
    (:class:`vitkd.dense.distiller.DenseDistiller`): one module holds everything that trains (the student and every
    method's parts), so ``accelerator.prepare``, the optimizer and the checkpoints see all of it; the teacher is a
    plain attribute (never wrapped, saved or optimised).

    Args:
        student: the student model.
        teacher: the frozen :class:`Teacher` (None when no method needs one).
        entries: the methods with weights/warm-ups.
        task_weight: fixed factor on the task loss (None: product of the methods' ``task_weight``).
    """

    def __init__(self, student: nn.Module, teacher: Optional[Teacher], entries: Sequence[LossEntry],
                 task_weight: Optional[float] = None):
        super().__init__()
        self.student = student
        object.__setattr__(self, 'teacher', teacher)  # deliberately not a submodule
        self.losses = nn.ModuleDict({e.loss.name: e.loss for e in entries})
        self.entries = {e.loss.name: e for e in entries}
        self.fixed_task_weight = task_weight
        for e in entries:
            if e.loss.needs_teacher and teacher is None:
                raise LossSpecError(f'loss {e.loss.name!r} needs a teacher (--teacher)')
        self.needs_teacher = teacher is not None and any(e.loss.needs_teacher for e in entries)

    def example_student_features(self, images: torch.Tensor):
        """The student's features the losses read, for :meth:`setup_losses`."""
        return self.student_features(images)

    def no_teacher_features(self):
        """The teacher's features when the teacher does not run (empty)."""
        return Features()

    def setup_losses(self, input_size: tuple[int, int, int], info: Optional[RunInfo]) -> None:
        """Let each loss build its trainable parts (projectors, regressors) from the shapes of one example pass of
        both models (batch of 2, the student in eval mode), then tell DDP which of their buffers each rank keeps
        identical itself (rank 0's must not be broadcast over them)."""
        if any(type(e.loss).setup is not DistillationLoss.setup for e in self.entries.values()):
            x = torch.zeros(2, *input_size, device=next(self.student.parameters()).device)
            was_training = self.student.training
            self.student.eval()
            with torch.no_grad():
                student = self.example_student_features(x)
                teacher = self.teacher_features(x) if self.needs_teacher else self.no_teacher_features()
            self.student.train(was_training)
            for e in self.entries.values():
                e.loss.setup(student, teacher, info)
        ignored = sorted(f'losses.{name}.{b}' for name, loss in self.losses.items() for b in loss.ddp_ignored_buffers())
        if ignored:
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, ignored)

    def prepare_for_run(self, run: RunContext) -> None:
        """Each method's :meth:`~vitkd.losses.DistillationLoss.prepare_for_run` (ND's class centres), with every model
        on the run's device."""
        for loss in self.losses.values():
            loss.prepare_for_run(run)

    def task_weight_at(self, epoch: float) -> float:
        """The task loss's factor: ``--task-weight`` when given, else the product of the methods' own."""
        if self.fixed_task_weight is not None:
            return self.fixed_task_weight
        weight = 1.0
        for e in self.entries.values():
            weight *= e.loss.task_weight(epoch)
        return weight

    def weighted_total(self, task: torch.Tensor, student, teacher, batch: Batch, terms: dict) -> torch.Tensor:
        """w_task·task + Σ_i w_i(e)·Σ_terms L_i at ``batch.progress``, each method's terms recorded (detached,
        unweighted) in ``terms`` as ``<method>.<term>``. A zero-weight method is not computed: no cost, and its parts
        get no gradient."""
        epoch = batch.progress
        task_w = self.task_weight_at(epoch)
        total = task_w * task if task_w else task.new_zeros(())
        for name, entry in self.entries.items():
            weight = entry.weight_at(epoch)
            if weight == 0:
                continue
            for term, value in entry.loss(student, teacher, batch).items():
                total = total + weight * value
                terms[f'{name}.{term}'] = value.detach()
        return total

    def no_weight_decay(self) -> set[str]:
        """Full parameter names that must not be decayed.

        The student's ``no_weight_decay()`` (pos_embed, cls_token, dist_token) with the ``student.`` prefix, and every
        parameter of a ``torch.nn.utils.parametrize`` parametrisation (VkD's orthogonal projector: decaying its
        hidden tensor collapses the projection to zero). timm's optimizer factory also skips 1-D params and biases.
        """
        names = {f'student.{n}' for n in getattr(self.student, 'no_weight_decay', lambda: set())()}
        names |= {n for n, _ in self.named_parameters() if '.parametrizations.' in n}
        for name, loss in self.losses.items():
            names |= {f'losses.{name}.{n}' for n in loss.no_weight_decay()}
        return names


class Distiller(DistillerBase):
    """Student + distillation losses. ``forward`` returns ``{'loss', 'logits', 'terms'}``.

    Args:
        student: the timm student.
        teacher: the frozen :class:`Teacher` (None when no method needs one).
        entries: the methods with weights/warm-ups.
        info: run facts for the losses' ``setup``.
        task_weight: fixed factor on the task loss (None: product of the methods' ``task_weight``).
    """

    def __init__(self, student: nn.Module, teacher: Optional[Teacher], entries: Sequence[LossEntry], info: RunInfo,
                 task_weight: Optional[float] = None):
        super().__init__(student, teacher, entries, task_weight)
        self.dist_head = has_dist_head(student)
        for e in entries:
            if e.loss.requires_dist_head and not self.dist_head:
                raise LossSpecError(f'loss {e.loss.name!r} needs a student with a distillation token and head; '
                                    f'{info.student_name or type(student).__name__} has none (use e.g. '
                                    'deit_s_distilled or deit_small_distilled_patch16_224)')
        self.student_spec = TapSpec(logits=True)
        self.teacher_spec = TapSpec()
        for e in entries:
            e.loss.adapt_models(student, teacher.model if teacher is not None else None)
        for e in entries:
            e.loss.configure_taps(student, teacher.model if teacher is not None else None)
            self.student_spec = self.student_spec.merge(e.loss.student_taps)
            self.teacher_spec = self.teacher_spec.merge(e.loss.teacher_taps)
        self.needs_input_grad = any(e.loss.needs_input_grad for e in entries)
        self.setup_losses(info.input_size, info)

    @property
    def task_on_cls_head(self) -> bool:
        """The task loss trains the class head alone when some method trains the distillation head."""
        return self.dist_head and any(e.loss.uses_dist_head for e in self.entries.values())

    def student_features(self, images: torch.Tensor) -> Features:
        """The student's taps and logits on ``images``."""
        return extract(self.student, images, self.student_spec, 'student')

    def teacher_features(self, images: torch.Tensor) -> Features:
        """One frozen teacher pass under ``torch.inference_mode`` on the student's input, taps as contiguous fp32.

        Only what the losses asked for is computed: no logits unless requested, and a teacher tapped only at
        intermediate blocks stops after the deepest one (``extract(only_requested=True)``). The taps leave inference
        mode as plain copies (autograd may not save inference tensors for the losses' backward); the copies are the
        fp32/NCHW conversion the losses need anyway. The engine's autocast covers the teacher (bf16 body under mixed
        precision).
        """
        with torch.inference_mode():
            feats = extract(self.teacher.model, self.teacher.prepare_input(images), self.teacher_spec, 'teacher',
                            only_requested=True)
        return feats.apply(from_inference)

    def _teacher_forward_with_grad(self, images: torch.Tensor) -> Features:
        """Teacher pass that keeps the graph to the input (Sobolev, LwM, BSS); teacher weights stay frozen."""
        feats = extract(self.teacher.model, self.teacher.prepare_input(images), self.teacher_spec, 'teacher',
                        only_requested=True)
        return feats.apply(_as_loss_input)

    def forward(self, batch: Batch) -> dict:
        """One training step's losses.

        Args:
            batch: a :class:`vitkd.losses.Batch`: the (mixed) images [B, C, H, W], soft targets [B, K], the mixup
                metadata, data-set indices, the fractional epoch (warm-ups and phases), the optimizer step and, from
                the teacher-output cache, precomputed teacher taps (else the teacher runs live). The methods get the
                same batch with the input that requires grad (when a method needs it) and the extra forwards.

        Returns:
            ``loss`` (scalar), ``logits`` (the student's averaged logits [B, K], for train accuracy), ``terms``
            (name → detached unweighted value, including ``task``).
        """
        images, targets = batch.images, batch.targets
        if self.needs_input_grad:
            images = images.detach().requires_grad_(True)
        student = self.student_features(images)
        teacher_features = batch.teacher_features
        if teacher_features is None and self.needs_teacher:
            teacher_features = self.teacher_features(images)
        teacher = teacher_features if teacher_features is not None else self.no_teacher_features()
        task_logits = student.logits if self.task_on_cls_head else student.head_logits
        loss_batch = dataclasses.replace(batch, images=images, student_forward=self.student_features,
                                         teacher_forward=self._teacher_forward_with_grad if self.teacher is not None
                                         else None)
        student32 = student.apply(at_least_fp32)
        with torch.autocast(device_type=images.device.type, enabled=False):
            task = soft_target_cross_entropy(at_least_fp32(task_logits), at_least_fp32(targets))
            terms = {'task': task.detach()}
            total = self.weighted_total(task, student32, teacher, loss_batch, terms)
        return {'loss': total, 'logits': student.head_logits, 'terms': terms}

    def export_student(self) -> nn.Module:
        """The student as exported: each loss may fold away what it inserted into it (NORM's feature transform)."""
        student = self.student
        for loss in self.losses.values():
            student = loss.export_student(student)
        return student
