"""Builders that turn a :class:`vitkd.config.Config` into the objects of a run (data, models, losses, optimizer)."""
from __future__ import annotations

import re
from typing import Optional

import torch
from timm.data import create_transform, resolve_data_config
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader

from .config import Config, ConfigError
from .data import DATASET_STATS, DataSpec, EpochSampler, build_datasets, seed_worker, worker_context
from .distiller import Distiller, LossEntry
from .features import INPUT_SUFFIX, _is_vit, num_taps
from .hf_data import HFOptions
from .losses import LossSpecError, RunInfo, create_loss
from .losses._dense import create_dense_loss
from .models import Teacher, create_student, create_teacher, set_fused_attention
from .validate import distill_spec

__all__ = ['build_student', 'build_teacher', 'build_models', 'check_input', 'use_plain_attention_if_needed',
           'build_data', 'build_eval_loader', 'build_losses', 'build_distiller', 'build_optimizer', 'build_scheduler',
           'eval_data_config', 'resolve_weights']



def _reject_head_width(kwargs: dict, role: str) -> None:
    if 'num_classes' in kwargs:
        raise ConfigError(f'--{role}-kwargs num_classes={kwargs["num_classes"]}: the {role}\'s head is not set by hand '
                          + ('(vitkd sizes it from the data set\'s classes; --num-classes checks the count)'
                             if role == 'student' else '(it comes with the teacher\'s weights and must match the '
                             'data set\'s classes)'))


def build_student(cfg: Config, num_classes: int):
    _reject_head_width(cfg.student_kwargs, 'student')
    kwargs = dict(cfg.student_kwargs)
    if cfg.drop_path:
        kwargs.setdefault('drop_path_rate', cfg.drop_path)
    if cfg.input_size and 'img_size' not in kwargs and cfg.student.split('.')[0].startswith(('deit', 'vit')):
        kwargs['img_size'] = cfg.input_size
    return create_student(cfg.student, num_classes, pretrained=cfg.student_pretrained, **kwargs)


def build_teacher(cfg: Config, num_classes: int, student_mean, student_std) -> Optional[Teacher]:
    if cfg.teacher is None:
        return None
    _reject_head_width(cfg.teacher_kwargs, 'teacher')
    teacher = create_teacher(cfg.teacher, num_classes, arch=cfg.teacher_arch, pretrained=cfg.teacher_pretrained,
                             **cfg.teacher_kwargs)
    teacher.set_student_normalization(student_mean, student_std)
    return teacher


def use_plain_attention_if_needed(entries: list[LossEntry]) -> None:
    """Turn timm's fused attention off for models built from now on when a method takes second-order gradients
    through attention (Sobolev, LwM: the fused kernels have no double backward). timm reads the switch when it builds
    an attention layer, so this runs before the student is built."""
    if any(e.loss.disable_fused_attn for e in entries):
        from timm.layers import set_fused_attn
        set_fused_attn(False)


def build_models(cfg: Config, spec: DataSpec, device,
                 precision: str = 'no') -> tuple[Optional[Teacher], torch.nn.Module]:
    """The teacher (None without one) and the student of ``cfg`` for data described by ``spec``, on ``device``.

    Both are checked against one batch of the data's shape (:func:`check_input`). On the CPU attention runs timm's
    unfused path (PyTorch's CPU flash-attention backward is slower in bf16 and no faster in fp32). The frozen teacher
    is cast once to the run's half precision (``precision`` bf16/fp16: autocast would re-cast its fp32 weights every
    step, since it caches casts only for weights that require gradients) and compiled with ``--compile-teacher``.
    """
    student = build_student(cfg, spec.num_classes)
    teacher = build_teacher(cfg, spec.num_classes, spec.mean, spec.std)
    check_input(student, spec.input_size, f'student {cfg.student}')
    if teacher is not None:
        check_input(teacher.model, spec.input_size, f'teacher {teacher.source}', teacher.prepare_input)
    device = torch.device(device)
    if device.type == 'cpu':
        for model in (student, teacher.model if teacher is not None else None):
            if model is not None:
                set_fused_attention(model, False)
    student.to(device)
    if teacher is not None:
        teacher.to(device)
        if precision in ('bf16', 'fp16'):
            teacher.cast(torch.bfloat16 if precision == 'bf16' else torch.float16)
        if cfg.compile_teacher:
            teacher.compile()
    return teacher, student


@torch.no_grad()
def check_input(model: torch.nn.Module, input_size, what: str, prepare=None) -> None:
    """One eval-mode forward of a [2, C, H, W] zero batch: a model that cannot take the data's images (channels,
    a fixed input size, a patch size that does not divide it) fails here in one line, not in the first step."""
    was_training = model.training
    model.eval()
    x = torch.zeros(2, *input_size, device=next(model.parameters()).device)
    try:
        model(prepare(x) if prepare is not None else x)
    except (RuntimeError, ValueError, AssertionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        channels = re.search(r'to have (\d+) channels, but got (\d+) channels', first)  # torch's convolution message
        if channels:
            kind = {'1': 'grey (1-channel)', '3': 'RGB (3-channel)'}
            takes, data = channels.groups()
            raise ConfigError(f'{what} takes {kind.get(takes, f"{takes}-channel")} images but the data\'s are '
                              f'{kind.get(data, f"{data}-channel")}: use a model made for this data (e.g. --teacher '
                              'regnety_160 for RGB images; the shipped checkpoints/fmnist_regnety_002 is the grey '
                              f'Fashion-MNIST teacher of the embedded default), or in_chans={data} in its '
                              'kwargs') from None
        raise ConfigError(f'{what} cannot take the data\'s {"×".join(map(str, input_size))} images ({first}); '
                          'check --input-size and the model kwargs (img_size, patch_size, in_chans)') from None
    finally:
        model.train(was_training)


def _img_size(value) -> Optional[tuple[int, int]]:
    """``img_size`` as timm's ViT takes it (an int side or an [H, W] pair) as (H, W); None when it is neither."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return int(value[0]), int(value[1])
    return None


def student_data_spec(cfg: Config, student) -> tuple[tuple[int, int, int], tuple, tuple, Optional[float]]:
    """Input size and normalisation: the embedded data sets' own stats, else the student's pretrained config.
    The image side is --input-size, else the student's ``img_size`` kwarg (an int or an [H, W] pair, from the
    command line or a fine-tuned export's config.json), else the data set's or the pretrained config's."""
    if cfg.input_size:
        hw = (cfg.input_size, cfg.input_size)
    else:
        hw = _img_size(cfg.student_kwargs.get('img_size'))  # a resized student's pretrained config still says 224
    if cfg.dataset in DATASET_STATS:
        stats = DATASET_STATS[cfg.dataset]
        h, w = hw or (stats['input_size'][1], stats['input_size'][2])
        return (stats['input_size'][0], h, w), stats['mean'], stats['std'], None
    data_cfg = resolve_data_config({}, model=student)
    h, w = hw or (data_cfg['input_size'][1], data_cfg['input_size'][2])
    return (data_cfg['input_size'][0], h, w), data_cfg['mean'], data_cfg['std'], data_cfg.get('crop_pct')


def build_transforms(cfg: Config, input_size, mean, std):
    """timm's train/eval transforms (RandAugment or 3-Augment, colour jitter, random erasing, crop ratio)."""
    train_kwargs = dict(is_training=True, scale=tuple(cfg.scale), hflip=cfg.hflip, interpolation=cfg.train_interpolation,
                        mean=mean, std=std, re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount,
                        color_jitter=cfg.color_jitter or None, auto_augment=None if cfg.three_augment else cfg.aa)
    if cfg.three_augment:  # DeiT III 3-Augment: one of grayscale / solarize / blur, then colour jitter
        train_kwargs['auto_augment'] = '3a'
    train_tf = create_transform(input_size, **train_kwargs)
    eval_cfg = eval_data_config(cfg, input_size, mean, std)
    eval_tf = create_transform(eval_cfg['input_size'], is_training=False, crop_pct=eval_cfg['crop_pct'],
                               interpolation=eval_cfg['interpolation'], mean=mean, std=std)
    return train_tf, eval_tf


def eval_data_config(cfg: Config, input_size, mean, std) -> dict:
    """The evaluation preprocessing as a timm data config (also recorded in the exported student's config.json)."""
    return dict(input_size=tuple(input_size), mean=tuple(mean), std=tuple(std), crop_pct=cfg.eval_crop_ratio,
                interpolation='bicubic' if cfg.dataset in ('imagefolder', 'hf') else 'bilinear')


def build_data(cfg: Config, input_size, mean, std, world_size: int = 1):
    """(train loader, val loader, DataSpec).

    The training loader keeps its workers between epochs; on CUDA it pins its batches (the step copies them to the
    device without blocking) and keeps 4 batches per worker in flight. The validation loader: :func:`build_eval_loader`.
    """
    train_tf, eval_tf = build_transforms(cfg, input_size, mean, std)
    train, val = build_datasets(cfg.dataset, cfg.data_path, train_tf, eval_tf, cfg.train_subset, cfg.seed,
                                cfg.skip_corrupt, hf=HFOptions.from_config(cfg))
    classes = list(val.classes)
    if cfg.num_classes is not None and cfg.num_classes != len(classes):
        raise ConfigError(f'--num-classes {cfg.num_classes} but the data set has {len(classes)} classes')
    gen = torch.Generator().manual_seed(cfg.seed)  # loader-internal draws never touch the global generators
    sampler = EpochSampler(len(train), cfg.seed, cfg.aug_repeats, cfg.batch_size, world_size)
    workers = cfg.num_workers if cfg.num_workers is not None else 0
    cuda = torch.cuda.is_available()
    loader_kwargs = dict(num_workers=workers, pin_memory=cuda, multiprocessing_context=worker_context(workers),
                         persistent_workers=workers > 0, prefetch_factor=4 if cuda and workers > 0 else None)
    train_loader = DataLoader(train, cfg.batch_size, sampler=sampler, drop_last=True, generator=gen,
                              worker_init_fn=seed_worker, **loader_kwargs)
    if len(train_loader) == 0:
        raise ConfigError(f'--batch-size {cfg.batch_size} is larger than the training set ({len(train)} images)')
    val_loader = build_eval_loader(val, cfg)
    spec = DataSpec(num_classes=len(classes), input_size=tuple(input_size), mean=tuple(mean), std=tuple(std),
                    classes=classes)
    return train_loader, val_loader, spec


def build_eval_loader(dataset, cfg: Config) -> DataLoader:
    """The validation loader (training runs and ``--eval-student``): batches of 1.5 × ``--batch-size`` in order,
    ``--num-workers`` workers kept alive between evaluations (a run evaluates every ``--eval-every`` epochs; starting
    the workers again each time costs seconds), pinned batches on CUDA."""
    workers = cfg.num_workers if cfg.num_workers is not None else 0
    cuda = torch.cuda.is_available()
    return DataLoader(dataset, max(1, int(1.5 * cfg.batch_size)), shuffle=False, num_workers=workers, pin_memory=cuda,
                      multiprocessing_context=worker_context(workers), persistent_workers=workers > 0,
                      prefetch_factor=4 if cuda and workers > 0 else None)


def default_weight(loss_class, student: Optional[torch.nn.Module]) -> float:
    """A method's weight when the command gives none: its ``vit_student_weight`` for a ViT student, else 1."""
    vit_weight = getattr(loss_class, 'vit_student_weight', None)
    return vit_weight if vit_weight is not None and student is not None and _is_vit(student) else 1.0


def build_losses(cfg: Config, student: Optional[torch.nn.Module] = None) -> list[LossEntry]:
    """The methods of ``--distill`` with their weights and warm-ups: built once per run, before the models (a bad
    method fails before anything is loaded). Unset weights are resolved for ``student`` when it is given
    (:func:`resolve_weights`), else by :func:`build_distiller` once the student exists."""
    entries = []
    create = create_loss if cfg.task == 'classify' else create_dense_loss  # a dense run: the methods' dense forms
    for method in distill_spec(cfg):
        loss = create(method.name, **method.options)
        entries.append(LossEntry(loss, 1.0 if method.weight is None else method.weight,
                                 float(method.warmup_epochs or 0.0), weight_given=method.weight is not None))
    if student is not None:
        resolve_weights(entries, student)
    return entries


def resolve_weights(entries: list[LossEntry], student: torch.nn.Module) -> None:
    """Give every method whose weight the command left unset its :func:`default_weight` for ``student``."""
    for e in entries:
        if not e.weight_given:
            e.weight, e.weight_given = default_weight(type(e.loss), student), True


def build_distiller(cfg: Config, student, teacher, spec: DataSpec, num_samples: int, steps_per_epoch: int,
                    world_size: int = 1, train_labels: Optional[torch.Tensor] = None,
                    entries: Optional[list[LossEntry]] = None) -> Distiller:
    """The run's :class:`Distiller`: ``entries`` from :func:`build_losses` (built from ``cfg`` when None), their unset
    weights resolved for ``student``."""
    if entries is None:
        entries = build_losses(cfg)
    resolve_weights(entries, student)
    info = RunInfo(num_classes=spec.num_classes, num_samples=num_samples, epochs=cfg.epochs,
                   steps_per_epoch=steps_per_epoch, input_size=spec.input_size, mean=spec.mean, std=spec.std,
                   student_name=cfg.student, student_kwargs=dict(cfg.student_kwargs), world_size=world_size,
                   train_labels=train_labels)
    distiller = Distiller(student, teacher, entries, info, task_weight=cfg.task_weight)
    check_taps(distiller)
    return distiller


def check_taps(distiller: Distiller) -> None:
    """Every block index and module name a loss taps exists in its network (else a one-line error, before training:
    losses without a ``setup`` would otherwise meet a bad tap only in the first training step)."""
    nets = {'student': distiller.student, 'teacher': distiller.teacher.model if distiller.teacher is not None else None}
    for name, entry in distiller.entries.items():
        for role, model in nets.items():
            taps = getattr(entry.loss, f'{role}_taps', None)
            if model is None or taps is None:
                continue
            n = num_taps(model)
            for i in taps.blocks:
                if not -n <= i < n:
                    raise LossSpecError(f'loss {name!r} taps {role} block {i}, out of range: the {role} '
                                        f'({type(model).__name__}) has {n} taps (valid: {-n}..{n - 1})')
            names = {m for m, _ in model.named_modules()}
            missing = sorted(m for m in taps.modules if m.removesuffix(INPUT_SUFFIX) not in names)
            if missing:
                raise LossSpecError(f'loss {name!r} taps {role} modules that do not exist: {", ".join(missing)} '
                                    f'(see dict({role}.named_modules()))')


FUSED_OPTIMIZERS = ('adam', 'adamw')  # timm names whose torch.optim class has a fused CUDA kernel


def build_optimizer(cfg: Config, model: Distiller, lr: float, fused: bool = False):
    """timm's optimizer factory over the whole distiller; ``model.no_weight_decay()`` keeps tokens, norms, biases and
    every parametrisation (orthogonal projectors) out of weight decay whatever the optimizer.

    ``fused`` (the run's device is CUDA, the parameters already there): Adam/AdamW update every parameter in one
    fused kernel per step instead of a chain of multi-tensor kernels."""
    kwargs = dict(momentum=cfg.momentum) if cfg.opt.lower() in ('sgd', 'momentum', 'nesterov') else {}
    if fused and cfg.opt.lower() in FUSED_OPTIMIZERS:
        kwargs['fused'] = True
    try:
        return create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, **kwargs)
    except (AssertionError, ValueError) as e:
        raise ConfigError(f'--opt {cfg.opt!r}: {e}') from None


def build_scheduler(cfg: Config, optimizer, steps_per_epoch: int):
    """timm scheduler updated per optimizer step (epoch e trains at lr(e), no DeiT off-by-one)."""
    try:
        scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs, min_lr=cfg.min_lr,
                                           warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs,
                                           cooldown_epochs=0, step_on_epochs=False,
                                           updates_per_epoch=steps_per_epoch, warmup_prefix=False)
    except (AssertionError, ValueError) as e:
        raise ConfigError(f'--sched {cfg.sched!r}: {e}') from None
    return scheduler
