"""Builders that turn a :class:`vitkd.config.Config` into the objects of a run (data, models, losses, optimizer)."""
from __future__ import annotations

import logging
from typing import Optional

import torch
from timm.data import Mixup, create_transform, resolve_data_config
from timm.data.mixup import mixup_target
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader

from .config import Config, ConfigError
from .data import DATASET_STATS, DataSpec, EpochSampler, build_datasets, seed_worker, worker_context
from .hf_data import HFOptions
from .distiller import Distiller, LossEntry
from .losses import LossSpecError, RunInfo, create_loss, get_loss_class
from .losses._dense import create_dense_loss, get_dense_loss_class
from .models import Teacher, create_student, create_teacher

__all__ = ['build_student', 'build_teacher', 'build_data', 'build_losses', 'build_distiller', 'build_optimizer',
           'build_scheduler', 'BatchMixer', 'scaled_lr', 'parse_distill', 'eval_data_config', 'resolve_weights']

_logger = logging.getLogger(__name__)


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


def student_data_spec(cfg: Config, student) -> tuple[tuple[int, int, int], tuple, tuple, Optional[float]]:
    """Input size and normalisation: the embedded data sets' own stats, else the student's pretrained config."""
    if cfg.dataset in DATASET_STATS:
        stats = DATASET_STATS[cfg.dataset]
        c = stats['input_size'][0]
        side = cfg.input_size or cfg.student_kwargs.get('img_size') or stats['input_size'][1]
        return (c, side, side), stats['mean'], stats['std'], None
    data_cfg = resolve_data_config({}, model=student)
    img_size = cfg.student_kwargs.get('img_size')  # a resized student's config still says 224
    side = cfg.input_size or (img_size if isinstance(img_size, int) else None) or data_cfg['input_size'][1]
    return (data_cfg['input_size'][0], side, side), data_cfg['mean'], data_cfg['std'], data_cfg.get('crop_pct')


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

    The training loader keeps its workers between epochs; on CUDA both pin their batches (the step copies them to the
    device without blocking) and keep 4 batches per worker in flight.
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
    val_loader = DataLoader(val, max(1, int(1.5 * cfg.batch_size)), shuffle=False,
                            **{**loader_kwargs, 'persistent_workers': False})  # no idle workers while training
    spec = DataSpec(num_classes=len(classes), input_size=tuple(input_size), mean=tuple(mean), std=tuple(std),
                    classes=classes)
    return train_loader, val_loader, spec


class BatchMixer:
    """timm ``Mixup``/CutMix plus label smoothing, returning the mixup metadata the losses need.

    Returns (images, soft targets [B, K], {'labels_b', 'lam'}). In timm's ``batch`` mode sample i is mixed with
    sample B−1−i with one λ per batch, so ``labels_b = labels.flip(0)``.
    """

    def __init__(self, cfg: Config, num_classes: int):
        self.num_classes, self.smoothing = num_classes, cfg.smoothing
        active = cfg.mixup > 0 or cfg.cutmix > 0
        self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                           switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                           num_classes=num_classes) if active else None
        if self.mixup is not None and cfg.mixup_mode != 'batch':
            raise ConfigError(f'--mixup-mode {cfg.mixup_mode!r}: vitkd supports batch mode (losses need one λ and '
                              'the flip pairing); use --mixup-mode batch')

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        if self.mixup is None:
            targets = mixup_target(labels, self.num_classes, 1.0, self.smoothing)
            return images, targets, {'labels_b': labels, 'lam': 1.0}
        if images.shape[0] % 2:
            raise ConfigError(f'mixup needs an even batch, got {images.shape[0]}')
        lam = self.mixup._mix_batch(images)  # mixes images in place, returns λ (area-corrected for cutmix)
        targets = mixup_target(labels, self.num_classes, lam, self.smoothing)
        return images, targets, {'labels_b': labels.flip(0), 'lam': float(lam)}


def parse_distill(cfg: Config) -> list[tuple[str, Optional[float], dict]]:
    """``name[:weight]`` items + ``name.key=value`` options → [(name, weight or None when not given, options)]."""
    import yaml
    methods: list[tuple[str, Optional[float], dict]] = []
    for item in cfg.distill:
        if isinstance(item, dict):  # YAML form: {name: vkd, weight: 1.0, alpha: 1.0}
            item = dict(item)
            name = item.pop('name', None)
            if not name:
                raise LossSpecError(f'distill entry {item} has no name')
            weight = item.pop('weight', None)
            methods.append((name, None if weight is None else float(weight), item))
            continue
        name, _, weight = str(item).partition(':')
        try:
            methods.append((name, float(weight) if weight else None, {}))
        except ValueError:
            raise LossSpecError(f'--distill {item!r}: the weight after ":" must be a number') from None
    by_name = {m[0]: m for m in methods}
    for name, _, _ in methods:
        # unknown names, or methods without a dense form in a dense run, fail here, listing the registered ones
        (get_loss_class if cfg.task == 'classify' else get_dense_loss_class)(name)
    for item in cfg.loss_opts:
        key, eq, value = str(item).partition('=')
        name, dot, option = key.partition('.')
        if not eq or not dot:
            raise LossSpecError(f'--loss-opts {item!r}: expected name.option=value')
        if name not in by_name:
            raise LossSpecError(f'--loss-opts {item!r}: loss {name!r} is not in --distill ({", ".join(by_name)})')
        by_name[name][2][option] = yaml.safe_load(value)
    return methods


def default_weight(loss_class, student: Optional[torch.nn.Module]) -> float:
    """A method's weight when the command gives none: its ``vit_student_weight`` for a ViT student, else 1."""
    from .features import _is_vit
    vit_weight = getattr(loss_class, 'vit_student_weight', None)
    return vit_weight if vit_weight is not None and student is not None and _is_vit(student) else 1.0


def build_losses(cfg: Config, student: Optional[torch.nn.Module] = None) -> list[LossEntry]:
    """The methods of ``--distill`` with their weights and warm-ups: built once per run, before the models (a bad
    method fails before anything is loaded). Unset weights are resolved for ``student`` when it is given
    (:func:`resolve_weights`), else by :func:`build_distiller` once the student exists."""
    entries = []
    for name, weight, options in parse_distill(cfg):
        options = dict(options)
        warmup = float(options.pop('warmup_epochs', 0.0))
        loss = create_loss(name, **options) if cfg.task == 'classify' else create_dense_loss(name, **options)
        entries.append(LossEntry(loss, 1.0 if weight is None else weight, warmup, weight_given=weight is not None))
    if len({e.loss.name for e in entries}) != len(entries):
        raise LossSpecError(f'--distill lists a method twice: {cfg.distill}')
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
    from .features import INPUT_SUFFIX, num_taps
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


def scaled_lr(cfg: Config, global_batch: int) -> float:
    """DeiT's linear scaling lr·B_g/512, unless --unscale-lr."""
    return cfg.lr if cfg.unscale_lr else cfg.lr * global_batch / 512.0


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
