"""The parts of a vitkd run for a training loop of your own: teacher, student and the distillation criterion.

The options are the command line's (``--distill vkd`` is ``distill='vkd'``, ``--student-kwargs depth=4`` is
``student_kwargs={'depth': 4}``), resolved and checked as the command line resolves them; the criterion is the
:class:`~vitkd.distiller.Distiller` that ``vitkd``'s own loop (:mod:`vitkd.engine`) trains::

    teacher, student, criterion = vitkd.create_distillation(num_classes=10)   # the embedded default's parts
    optimizer = timm.optim.create_optimizer_v2(criterion, 'adamw', lr=1e-3, weight_decay=0.05)
    for images, labels in loader:
        out = criterion(vitkd.Batch.from_labels(images, labels, num_classes=10))
        out['loss'].backward()              # out['terms']: the task CE and every method's terms, unweighted
        optimizer.step()
        optimizer.zero_grad()

The criterion owns the student and every trainable part of the methods (VkD's projector, CRD's memory banks), so
the optimizer, ``accelerator.prepare`` and checkpoints take the criterion; the frozen teacher is held beside it,
never a submodule (move it with ``teacher.to(device)``). Optimise with timm's optimizer factory (or any optimizer
that honours ``criterion.no_weight_decay()``): decaying VkD's orthogonal parametrisation collapses the projection.
Methods that prepare from the whole training set before the first step (ND's class centres) need the run's data
and are built by the command, not here.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .build import (build_distiller, build_losses, build_models, build_student, student_data_spec,
                    use_plain_attention_if_needed)
from .config import Config
from .arguments import resolve
from .data import DataSpec
from .distiller import Distiller
from .models import Teacher

__all__ = ['Parts', 'create_distillation', 'make_config']


class Parts(NamedTuple):
    """What :func:`create_distillation` returns: ``teacher, student, criterion = vitkd.create_distillation(...)``."""
    teacher: Optional[Teacher]  # the frozen teacher (None when the methods need none), not inside the criterion
    student: torch.nn.Module    # the timm student; also ``criterion.student``
    criterion: Distiller        # student + the methods' trainable parts; forward(batch) -> {'loss', 'logits', 'terms'}


def make_config(**options) -> Config:
    """A checked :class:`~vitkd.config.Config` from command-line options by their field names.

    As on the command line, without ``data_path`` or ``dataset`` the embedded default's preset
    (``scripts/configs/embedded.yaml``: Fashion-MNIST, the shipped teacher, the 28-px VkD student) is the base that
    the options override; ``dataset='imagefolder'`` starts from the plain defaults instead (input size and
    normalisation then come from the student's pretrained config).
    """
    return resolve(options)


def create_distillation(config: Optional[Config] = None, *, num_classes: int, device: str | torch.device = 'cpu',
                        precision: str = 'no', num_samples: int = 0, steps_per_epoch: int = 1,
                        train_labels: Optional[torch.Tensor] = None, **options) -> Parts:
    """Teacher, student and criterion, built as the command builds them for a run.

    Args:
        config: a :class:`~vitkd.config.Config` (e.g. ``vitkd.arguments.parse_args(argv)[0]``); or leave it out and
            pass the options by name (:func:`make_config`).
        num_classes: the data's number of classes (the student's heads; a teacher's head must match it).
        device: where the models go (the teacher too).
        precision: the loop's autocast precision, ``no``, ``bf16`` or ``fp16``: the frozen teacher is cast to it once.
        num_samples: training-set size (CRD's memory banks).
        steps_per_epoch: optimizer steps per epoch (methods whose phases are given in epochs).
        train_labels: [N] the training set's labels (methods that use the class counts).
        **options: command-line options by field name, when ``config`` is not given.

    Returns:
        :class:`Parts` ``(teacher, student, criterion)``; the criterion is in train mode.
    """
    if config is not None and options:
        raise TypeError(f'create_distillation() takes a config or options, not both (got '
                        f'{", ".join(sorted(options))})')
    cfg = config if config is not None else make_config(**options)
    entries = build_losses(cfg)
    use_plain_attention_if_needed(entries)
    input_size, mean, std, _ = student_data_spec(cfg, build_student(cfg, num_classes=1))
    spec = DataSpec(num_classes=num_classes, input_size=input_size, mean=mean, std=std,
                    classes=[str(k) for k in range(num_classes)])
    teacher, student = build_models(cfg, spec, device, precision)
    criterion = build_distiller(cfg, student, teacher, spec, num_samples, steps_per_epoch, train_labels=train_labels,
                                entries=entries)
    return Parts(teacher, student, criterion.to(device).train())
