"""The loss interface: a registry of distillation methods, one file per method.

A method is

* a pure function on tensors with the paper's math (testable alone), and
* a :class:`DistillationLoss` subclass registered with ``@register_loss('name')`` whose constructor options each
  declare their accepted values beside the default (``temperature: Annotated[float, Positive()] = 4.0``, see
  :mod:`vitkd.domains`; the command line, YAML files and :func:`create_loss` check every value against them), that
  declares the taps it needs (``student_taps`` / ``teacher_taps``), builds its trainable parts in
  :meth:`DistillationLoss.setup` once the shapes are known, and maps (student features, teacher features, batch) to
  named loss terms.

The distiller owns every loss (so projectors, adapters and memory banks are optimised, DDP-synchronised and
checkpointed with the student), applies the task loss once, weights and warms up each method, computes every loss
in fp32 with autocast off, and logs every term.

Generic hooks for methods with a special procedure (no engine branches):

* :meth:`DistillationLoss.task_weight` — how much of the task loss to keep at an epoch (DeiT's 1 − α, AB/FSP's
  initialisation stage with CE off);
* :attr:`Batch.student_forward` / :attr:`Batch.teacher_forward` — extra forwards (adversarial samples, input
  gradients) go through these;
* :attr:`DistillationLoss.needs_input_grad` — the input batch requires grad (Sobolev, LwM);
* :attr:`DistillationLoss.disable_fused_attn` — second-order gradients through attention;
* :attr:`DistillationLoss.may_leave_parameters_unused` — DDP must look for parameters without gradient;
* trainable second networks (DML's peer) are submodules of the loss.
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, ClassVar, Optional, get_type_hints

import numpy as np
import torch
import torch.nn as nn
from timm.data.mixup import mixup_target

from ..domains import Domain, NonNegative, OneOf, OutOfDomain
from ..errors import UsageError
from ..features import Features, TapSpec

__all__ = ['DistillationLoss', 'Batch', 'RunContext', 'RunInfo', 'register_loss', 'create_loss', 'list_losses',
           'get_loss_class', 'LossSpecError', 'LOSS_REGISTRY', 'HEADS', 'Head', 'pick_head', 'reads_dist_head',
           'option_domains', 'COMMON_OPTIONS']

LOSS_REGISTRY: dict[str, type['DistillationLoss']] = {}

#: Which student head a logit method reads: 'auto' = the distillation head when the student has one (DeiT's
#: token distillation), else the only head; 'avg' = the mean of the class and distillation heads.
HEADS = ('auto', 'dist', 'cls', 'avg')
Head = Annotated[str, OneOf(*HEADS)]

#: Options every method takes besides its constructor's, applied by the distiller: ``warmup_epochs`` ramps the
#: method's weight linearly from 0 over that many epochs (0 = full weight from the start).
COMMON_OPTIONS: dict[str, Domain] = {'warmup_epochs': NonNegative()}


def reads_dist_head(head: str) -> bool:
    """Whether :func:`pick_head` reads the distillation head for ``head`` on a student that has one: the method then
    trains that head (its :attr:`DistillationLoss.uses_dist_head`) and the task loss goes to the class head alone."""
    return head in ('auto', 'dist')


def pick_head(student: Features, head: str) -> torch.Tensor:
    """Student logits [B, K] of ``head`` (one of :data:`HEADS`)."""
    if reads_dist_head(head) and student.logits_dist is not None:
        return student.logits_dist
    if head == 'avg':
        return student.head_logits
    return student.logits


class LossSpecError(UsageError):
    """An unknown loss, option or incompatible student (message is the one-line user error)."""


@dataclass
class Batch:
    """One training step's batch: what the loader side yields (:class:`vitkd.training.EpochBatches`), what the
    distiller takes and what every method reads.

    ``labels_b``/``lam`` describe timm's batch-mode mixup: sample i was mixed with sample B−1−i with weight λ
    (``labels_b = labels.flip(0)``); without mixup ``labels_b = labels`` and ``lam = 1``. The time in the run is
    ``progress``, the fractional epoch (phase boundaries may fall inside an epoch); :attr:`epoch` is its whole part
    (the official per-epoch warm-ups). A dense run's batch has ``targets`` of its task and no labels.

    Attributes:
        images: [B, C, H, W] the (mixed) student input, student-normalised, on the device.
        targets: [B, K] soft targets of the task loss (smoothing and mixup folded in); dense: masks [B, S, S] or per
            image ``{'boxes', 'labels'}``.
        labels: [B] the class of each image (y_a under mixup); None in dense runs.
        labels_b: [B] the class of each image's mixing partner (y_b; ``labels`` without mixup).
        lam: the mixup weight of ``labels``.
        index: [B] data-set indices on the device (memory banks), or None.
        host_index: the same indices on the host (the mixup seed, the teacher cache, diagnostics), or None.
        progress: the fractional epoch.
        step: optimizer steps taken before this batch.
        teacher_features: the teacher's taps replayed from the teacher cache; None = the teacher runs live.
        student_forward: an extra student forward with the same taps (adversarial samples, input gradients); the
            distiller sets it.
        teacher_forward: the same for the teacher (its graph kept to the input); the distiller sets it.
    """
    images: torch.Tensor
    targets: Any
    labels: Optional[torch.Tensor] = None
    labels_b: Optional[torch.Tensor] = None
    lam: float = 1.0
    index: Optional[torch.Tensor] = None
    host_index: Optional[np.ndarray] = None
    progress: float = 0.0
    step: int = 0
    teacher_features: Optional[Features] = None
    student_forward: Optional[Callable[[torch.Tensor], Features]] = None
    teacher_forward: Optional[Callable[[torch.Tensor], Features]] = None

    def __post_init__(self):
        if self.labels_b is None:
            self.labels_b = self.labels

    @property
    def epoch(self) -> int:
        """Whole epochs done (the whole part of :attr:`progress`)."""
        return int(self.progress)

    @classmethod
    def from_labels(cls, images: torch.Tensor, labels: torch.Tensor, num_classes: int, smoothing: float = 0.0,
                    progress: float = 0.0, step: int = 0, index: Optional[torch.Tensor] = None) -> 'Batch':
        """A batch without mixup for a loop of your own: the targets are the labels' one-hot vectors with label
        smoothing (timm's ``mixup_target`` at λ = 1, as :class:`vitkd.data.BatchMixer` makes them without mixup).

        Args:
            images: [B, C, H, W] the student's input, on the criterion's device.
            labels: [B] class indices, on the same device.
            num_classes: K, the width of the targets.
            smoothing: label smoothing ε (the run's ``--smoothing``).
            progress: the fractional epoch (method warm-ups and phases read it).
            step: optimizer steps taken before this batch.
            index: [B] data-set indices, for the methods with memory banks (CRD).
        """
        targets = mixup_target(labels, num_classes, 1.0, smoothing)  # [B, K]
        return cls(images=images, targets=targets, labels=labels, index=index, progress=progress, step=step)


@dataclass
class RunInfo:
    """Facts about the run that a loss may need to build itself."""
    num_classes: int
    num_samples: int = 0                  # training-set size (memory banks)
    epochs: int = 1
    steps_per_epoch: int = 1
    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    student_name: str = ''
    student_kwargs: dict = field(default_factory=dict)
    world_size: int = 1
    train_labels: Optional[torch.Tensor] = None  # [N] class of every training sample (CRD's negatives)


@dataclass
class RunContext:
    """What a loss's :meth:`DistillationLoss.prepare_for_run` may use: the whole run, on its device.

    Attributes:
        cfg: the run's :class:`vitkd.config.Config` (data set, transform and seed options).
        teacher: the frozen :class:`vitkd.models.Teacher` on the run's device and precision (None without one).
        spec: the data's :class:`vitkd.data.DataSpec` (classes, input size, normalisation).
        accelerator: the run's Accelerator (device, processes), or None for a single process on the teacher's device.
        cache_dir: a folder for what the preparation caches (None: the loss's default cache).
        train_data: a dense run's training set without augmentation (``(image, target, index)`` samples), for a
            teacher pass over it (dense ND's class centres); None in classification.
    """
    cfg: Any
    teacher: Any
    spec: Any
    accelerator: Any = None
    cache_dir: Optional[str] = None
    train_data: Any = None


class DistillationLoss(nn.Module):
    """Base class of a distillation method. Subclasses set ``paper`` and the taps, and implement ``forward``."""

    name: ClassVar[str] = ''
    paper: ClassVar[str] = ''
    #: the method reads the distillation head (z_dist); the task loss then goes to the class head only
    uses_dist_head: bool = False
    #: the method needs the student's distillation head to exist (DeiT token distillation)
    requires_dist_head: ClassVar[bool] = False
    needs_input_grad: ClassVar[bool] = False
    disable_fused_attn: ClassVar[bool] = False
    #: default weight (a factor on the paper's λ, which the loss keeps) when the student is a ViT and the command gives
    #: none: set where the paper's CNN/CIFAR-tuned λ measurably overwhelms a ViT student's task loss (the method's
    #: docstring gives the measurement); None = 1
    vit_student_weight: ClassVar[Optional[float]] = None
    #: the method needs a teacher; False for teacher-free terms
    needs_teacher: ClassVar[bool] = True
    #: some steps leave trainable parameters without gradient (a stage in which the method's adapters, or the heads
    #: with the task CE off, sit idle): multi-process runs then build DDP with ``find_unused_parameters=True``
    #: (see :func:`vitkd.distiller.may_leave_parameters_unused`; a ``task_weight`` of 0 is detected without it)
    may_leave_parameters_unused: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.student_taps = TapSpec()
        self.teacher_taps = TapSpec()

    def adapt_models(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        """Change the networks' forward (called once by the distiller, before :meth:`configure_taps`).

        For methods whose trainable parts sit inside the student's forward (NORM's foldable feature-transform
        residual) or that change the logits every consumer sees (NORM's optional logit standardisation). Modules
        inserted into the student are trained, DDP-synchronised and checkpointed with it; fold or remove them in
        :meth:`export_student`. The teacher stays frozen: add no parameters to it and keep no reference to it.
        """

    def export_student(self, student: nn.Module) -> nn.Module:
        """The student to export: what :meth:`adapt_models` inserted folded away (a copy), or ``student`` itself."""
        return student

    def ddp_ignored_buffers(self) -> set[str]:
        """Buffer names (relative to this loss) that DDP must not broadcast from rank 0 at every forward.

        For state the loss itself keeps identical on every rank (CRD's memory banks: all-gathered, identical
        updates); the distiller registers them with DDP's ignore list.
        """
        return set()

    def configure_taps(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        """Choose taps that depend on the architectures (called once by the distiller before it merges the taps).

        For taps a constructor cannot know, e.g. "the blocks at 1/3, 2/3, 3/3 of a ViT's depth, or a CNN's last three
        stages": set ``student_taps`` / ``teacher_taps`` here. Only read the models (unwrapped timm models; the
        teacher is None without one): keeping a reference would make the frozen teacher a submodule.
        """

    def setup(self, student: Features, teacher: Features, info: RunInfo) -> None:
        """Build trainable parts from example features (shapes only; called once before the optimizer exists)."""

    def prepare_for_run(self, run: RunContext) -> None:
        """Preparation that needs the run rather than example shapes (called once, after :meth:`setup`, with every
        model on the run's device, before the optimizer and ``accelerator.prepare``): a pass of the teacher over the
        training set (ND's class centres), a file to load and check against the run's teacher. Every process calls
        it; work that can be shared is split across them (see :func:`vitkd.centers.centers_for_run`)."""

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this loss) that must not be weight-decayed (e.g. a parametrisation's hidden
        tensor, whose decay would collapse the map it parametrises). Biases and 1-D parameters are never decayed."""
        return set()

    def task_weight(self, epoch: float) -> float:
        """Factor on the task loss at the fractional ``epoch`` (1 = keep it)."""
        return 1.0

    def forward(self, student: Features, teacher: Features, batch: Batch) -> dict[str, torch.Tensor]:
        """Named loss terms (scalars, fp32). Their sum, times the method weight, enters the total loss."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ', '.join(f'{k}={v}' for k, v in self.options().items())

    def options(self) -> dict[str, Any]:
        """The constructor options with their values (for logs and model cards)."""
        sig = inspect.signature(type(self).__init__)
        return {k: getattr(self, k) for k in sig.parameters if k != 'self' and hasattr(self, k)}


def registrar(registry: dict, kind: str = 'loss'):
    """A class decorator factory that registers a method class into ``registry`` under a name (``kind`` names the
    registry in the error for a name registered twice)."""
    def register(name: str):
        def wrap(cls):
            if name in registry:
                raise ValueError(f'{kind} {name!r} registered twice')
            cls.name = name
            registry[name] = cls
            return cls
        return wrap
    return register


#: class decorator: register a :class:`DistillationLoss` under a name (``@register_loss('kd')``)
register_loss = registrar(LOSS_REGISTRY)


def get_loss_class(name: str) -> type[DistillationLoss]:
    if name not in LOSS_REGISTRY:
        close = difflib.get_close_matches(name, LOSS_REGISTRY, n=3)
        hint = f' (did you mean {", ".join(close)}?)' if close else ''
        raise LossSpecError(f'unknown loss {name!r}{hint}; registered: {", ".join(sorted(LOSS_REGISTRY))}; recipes '
                            'that combine methods (kd++, dist++, deit_tiny_hard …) are presets: -c NAME, files in '
                            'scripts/configs/')
    return LOSS_REGISTRY[name]


def option_domains(loss_class: type[DistillationLoss]) -> dict[str, Optional[Domain]]:
    """Every constructor option of ``loss_class`` with the domain its annotation declares (``Annotated[type,
    Domain]``), in signature order; None for an option that declares none (the registry test refuses those)."""
    hints = get_type_hints(loss_class.__init__, include_extras=True)
    domains = {}
    for name, param in inspect.signature(loss_class.__init__).parameters.items():
        if name == 'self' or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        declared = [m for m in getattr(hints.get(name), '__metadata__', ()) if isinstance(m, Domain)]
        domains[name] = declared[0] if declared else None
    return domains


def construct_checked(loss_class: type[DistillationLoss], name: str, options: dict, kind: str = 'loss'):
    """``loss_class(**options)``, each option checked against its declared domain first (an unknown option or a value
    outside its domain is a :class:`LossSpecError` naming the accepted ones)."""
    domains = option_domains(loss_class)
    unknown = sorted(set(options) - set(domains))
    if unknown:
        raise LossSpecError(f'{kind} {name!r} has no option {", ".join(unknown)}; its options: '
                            f'{", ".join(domains) or "(none)"}')
    checked = {}
    for option, value in options.items():
        try:
            checked[option] = domains[option].check(value) if domains[option] is not None else value
        except OutOfDomain as e:
            raise LossSpecError(f'{name}\'s {option} must be {e}, got {value!r}') from None
    return loss_class(**checked)


def create_loss(name: str, **options: Any) -> DistillationLoss:
    """Build the registered loss ``name`` with ``options`` (see :func:`construct_checked`)."""
    return construct_checked(get_loss_class(name), name, options)


def list_losses() -> list[tuple[str, str]]:
    """(name, paper) of every registered method, sorted by name."""
    return [(n, LOSS_REGISTRY[n].paper) for n in sorted(LOSS_REGISTRY)]
