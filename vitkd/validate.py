"""One validator: a whole :class:`vitkd.config.Config` checked before anything is built or written.

:func:`validate_config` runs from :func:`validate` (below) (so from every ``Config`` the command line, a preset
or a YAML file resolves). Every field is checked against the domain declared beside its default (``option(...,
domain=...)`` in :mod:`vitkd.config`), every method and its options against the domains their constructors declare
(:mod:`vitkd.distill_spec`); then the rules that relate several options. Each check raises a one-line
:class:`~vitkd.errors.ConfigError` (exit code 2) naming the option (as its ``--flag``), the value and what is
accepted. Nothing here builds a model or reads data: string options go through timm's and Accelerate's own parsers
(the same code that will consume them), and the checks of things only the build knows (the data set's class count,
a teacher's head) stay where that knowledge is.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
from pathlib import Path
from typing import Collection

import torch
from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType
from huggingface_hub.utils import HFValidationError, validate_repo_id
from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import _str_to_pil_interpolation, str_to_interp_mode
from timm.optim import get_optimizer_class, list_optimizers
from timm.scheduler import create_scheduler_v2

from .config import Config, check_field, flag, preset_names
from .distill_spec import DistillSpec, parse_distill
from .errors import ConfigError
from .models import WEIGHT_FILES

__all__ = ['validate', 'validate_config', 'distill_spec']


def validate_config(cfg, presets: Collection[str] = ()) -> DistillSpec:
    """Check every option of ``cfg`` (a :class:`vitkd.config.Config`) and return its methods as a checked
    :class:`~vitkd.distill_spec.DistillSpec`; the first bad value is a one-line :class:`ConfigError`. ``presets``:
    the names ``-c`` accepts (the hint when one is given to ``--distill``)."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for name, f in fields.items():
        check_field(name, getattr(cfg, name), f.metadata['domain'])
    world = int(os.environ.get('WORLD_SIZE', '1') or 1)
    last_seed = fields['seed'].metadata['domain'].hi  # numpy's seed range
    if cfg.seed > last_seed - (world - 1):
        raise ConfigError(f'--seed {cfg.seed} is out of range: numpy\'s seeds end at {last_seed} and each of the '
                          f'{world} process(es) adds its rank; use at most {last_seed - (world - 1)}')
    if cfg.task == 'classify' and (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mixup_prob > 0 and cfg.batch_size % 2:
        raise ConfigError(f'--batch-size {cfg.batch_size}: mixup/cutmix pair sample i with sample B-1-i and need an '
                          'even batch per process; use an even --batch-size or --mixup 0 --cutmix 0')
    if cfg.aug_repeats > 1 and cfg.teacher_cache:
        raise ConfigError(f'--aug-repeats {cfg.aug_repeats} with --teacher-cache: the cache keeps one augmentation per '
                          'image and epoch; use --aug-repeats 1 or no cache')
    if cfg.finetune is not None and (cfg.student_pretrained or cfg.eval_student):
        raise ConfigError(f'--finetune {cfg.finetune}: the student\'s weights come from there; leave out '
                          f'{"--student-pretrained" if cfg.student_pretrained else "--eval-student"}')
    if cfg.resume not in (None, 'auto') and not Path(cfg.resume).exists():
        raise ConfigError(f'--resume {cfg.resume!r}: no such checkpoint (use auto or a checkpoint folder)')
    _check_input_size(cfg)
    _check_teacher_arch(cfg)
    _check_schedule_lrs(cfg)
    _check_timm_strings(cfg)
    _check_log_with(cfg.log_with)
    _check_hub_id(cfg)
    _check_task(cfg)
    return parse_distill(cfg.distill, cfg.loss_opts, presets, cfg.task)


# Options of one kind of run only: a value other than the default in the other kind is refused (a saved config.yaml
# holds every option at its value, so a rerun with -c passes).
CLASSIFY_ONLY = ('aa', 'three_augment', 'color_jitter', 'scale', 'train_interpolation', 'reprob', 'remode', 'recount',
                 'smoothing', 'mixup', 'cutmix', 'mixup_prob', 'mixup_switch_prob', 'mixup_mode', 'eval_crop_ratio',
                 'aug_repeats', 'teacher_cache', 'teacher_cache_epochs', 'teacher_cache_topk', 'model_ema',
                 'model_ema_decay', 'student_pretrained', 'compile_student', 'train_subset', 'hf_image_column',
                 'hf_label_column', 'finetune')
DENSE_ONLY = ('pyramid_strides', 'pyramid_channels', 'scale_jitter', 'ignore_index')
DENSE_DATASETS = {'detect': ('fashion_mnist', 'coco'), 'segment': ('fashion_mnist', 'segfolder')}


def _check_task(cfg) -> None:
    """The data set and the options against ``--task`` (each value's own domain is checked with the fields)."""
    defaults = {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
                for f in dataclasses.fields(cfg)}
    dense = cfg.task != 'classify'
    accepted = DENSE_DATASETS.get(cfg.task)
    if accepted is not None and cfg.dataset not in accepted:
        raise ConfigError(f'--dataset {cfg.dataset} with --task {cfg.task}: use {" or ".join(accepted)}')
    if not dense and cfg.dataset in ('coco', 'segfolder'):
        raise ConfigError(f'--dataset {cfg.dataset} holds dense labels: use it with --task '
                          f'{"detect" if cfg.dataset == "coco" else "segment"}')
    for name in CLASSIFY_ONLY if dense else DENSE_ONLY:
        if getattr(cfg, name) != defaults[name]:
            kind = 'classification (--task classify)' if dense else 'dense tasks (--task detect / segment)'
            raise ConfigError(f'{flag(name)} {getattr(cfg, name)!r}: this option applies to {kind} only; leave it '
                              f'out with --task {cfg.task}')
    if cfg.pyramid_strides != sorted(set(cfg.pyramid_strides)):
        raise ConfigError(f'--pyramid-strides {" ".join(map(str, cfg.pyramid_strides))}: give distinct increasing '
                          'strides (e.g. 4 8 16 32)')


def patch_size(cfg) -> int | None:
    """The student's patch size when it is known without building it (``patch_size=`` in ``--student-kwargs``, a
    ``patch<N>`` in a timm name, or vitkd's own ``deit_{ti,s,b}_distilled``, patch 16); None otherwise."""
    size = cfg.student_kwargs.get('patch_size') if isinstance(cfg.student_kwargs, dict) else None
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    if isinstance(size, (list, tuple)) and size and all(isinstance(s, int) for s in size):
        return int(size[0])
    name = cfg.student.split('.')[0]
    m = re.search(r'patch(\d+)', name)
    if m:
        return int(m.group(1))
    return 16 if re.fullmatch(r'deit_(ti|s|b)_distilled', name) else None


def _check_input_size(cfg) -> None:
    size = cfg.input_size
    if size is None:
        size = cfg.student_kwargs.get('img_size') if isinstance(cfg.student_kwargs, dict) else None
        if not isinstance(size, int) or isinstance(size, bool):
            return
    patch = patch_size(cfg)
    if patch and patch > 0 and size % patch:
        what = '--input-size' if cfg.input_size is not None else '--student-kwargs img_size'
        raise ConfigError(f'{what} {size} is not a multiple of the student\'s patch size {patch}; use '
                          f'{(size // patch) * patch or patch} or {(size // patch + 1) * patch}')


def _check_teacher_arch(cfg) -> None:
    """--teacher-arch names the architecture of a bare weights file; any other teacher carries its own."""
    if cfg.teacher_arch is None or cfg.teacher is not None and cfg.teacher.endswith(WEIGHT_FILES):
        return
    teacher = 'the run has no teacher' if cfg.teacher is None else f'--teacher {cfg.teacher} carries its own'
    raise ConfigError(f'--teacher-arch {cfg.teacher_arch} names the architecture of a bare weights file (--teacher '
                      f'FILE{"|".join(WEIGHT_FILES)}), but {teacher}; leave out --teacher-arch')


def scaled_lr(cfg: Config, global_batch: int) -> float:
    """DeiT's linear scaling lr·B_g/512, unless --unscale-lr."""
    return cfg.lr if cfg.unscale_lr else cfg.lr * global_batch / 512.0


def _check_schedule_lrs(cfg) -> None:
    """--min-lr or --warmup-lr above --lr turns the decay (or the warm-up) upside down. They are compared with --lr
    as given, as in DeiT and timm: their defaults (1e-5, 1e-6) are absolute, and DeiT's own runs with a small global
    batch scale --lr below them; a value above --lr itself is a mistake whatever the batch."""
    scaling = '' if cfg.unscale_lr else ' (--min-lr and --warmup-lr are absolute: not scaled by the global batch)'
    if cfg.min_lr > cfg.lr:
        raise ConfigError(f'--min-lr {cfg.min_lr:g} is above --lr {cfg.lr:g}: the schedule would climb instead of '
                          f'decay{scaling}; use a --min-lr of at most {cfg.lr:g}, or a larger --lr')
    if cfg.warmup_epochs > 0 and cfg.warmup_lr > cfg.lr:
        raise ConfigError(f'--warmup-lr {cfg.warmup_lr:g} is above --lr {cfg.lr:g}: the warm-up would descend instead '
                          f'of rise{scaling}; use a --warmup-lr of at most {cfg.lr:g}, a larger --lr, or '
                          '--warmup-epochs 0')


def _check_timm_strings(cfg) -> None:
    """Auto-augment policy, interpolation, random-erasing mode, optimizer and scheduler, through timm's parsers."""
    if cfg.aa is not None and not cfg.three_augment:
        aa = cfg.aa
        parse = (rand_augment_transform if aa.startswith('rand') else
                 augment_and_mix_transform if aa.startswith('augmix') else auto_augment_transform)
        try:
            parse(aa, {'translate_const': 100, 'img_mean': (124, 116, 104)})
        except (AssertionError, KeyError, ValueError, IndexError) as e:
            raise ConfigError(f'--aa {aa!r} is not a timm auto-augment policy ({e or type(e).__name__}); e.g. '
                              'rand-m9-mstd0.5-inc1 (RandAugment), augmix-m5-w4-d2, v0, original, or none') from None
    if cfg.train_interpolation != 'random':
        try:
            str_to_interp_mode(cfg.train_interpolation)
        except KeyError:
            raise ConfigError(f'--train-interpolation {cfg.train_interpolation!r} is not one of '
                              f'{", ".join([*_str_to_pil_interpolation, "random"])}') from None
    try:
        RandomErasing(0.5, mode=cfg.remode, device='cpu')
    except (AssertionError, AttributeError):
        raise ConfigError(f'--remode {cfg.remode!r} is not a timm random-erasing mode (const, rand, pixel)') from None
    _check_opt_and_sched(cfg)


def _check_opt_and_sched(cfg) -> None:
    name = cfg.opt.lower()
    name = name[len('lookahead_'):] if name.startswith('lookahead_') else name
    try:
        get_optimizer_class(name)
    except ValueError:
        close = difflib.get_close_matches(name, list_optimizers(), 3)
        hint = f' (did you mean {", ".join(close)}?)' if close else ''
        raise ConfigError(f'--opt {cfg.opt!r} is not a timm optimizer{hint}; see '
                          'timm.optim.list_optimizers()') from None
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    try:
        scheduler, _ = create_scheduler_v2(probe, sched=cfg.sched, num_epochs=2, updates_per_epoch=1)
    except (AssertionError, ValueError, TypeError):
        scheduler = None
    if scheduler is None:
        raise ConfigError(f'--sched {cfg.sched!r} is not a timm scheduler (cosine, tanh, step, multistep, plateau, '
                          'poly, rsqrt)')


def _check_log_with(log_with) -> None:
    if log_with is None:
        return
    known = [t.value for t in LoggerType]
    if log_with not in known:
        raise ConfigError(f'--log-with {log_with!r} is not an Accelerate tracker; one of {", ".join(known)}')
    if log_with != 'all' and log_with not in [str(getattr(t, 'value', t)) for t in get_available_trackers()]:
        raise ConfigError(f'--log-with {log_with}: the {log_with} package is not installed (pip install {log_with}), '
                          'or leave --log-with out (log.jsonl and epochs.csv are always written)')


def _check_hub_id(cfg) -> None:
    if cfg.hub_model_id is None:
        return
    try:
        validate_repo_id(cfg.hub_model_id)
    except HFValidationError as e:
        raise ConfigError(f'--hub-model-id {cfg.hub_model_id!r} is not a Hub repo id (org/name or name: letters, '
                          f'digits, -_. ; {str(e).splitlines()[0]})') from None


def validate(cfg: Config) -> DistillSpec:
    """Check every option of ``cfg`` against its domain, and the methods' options against theirs (a one-line error
    naming the first bad value and what is accepted); the checked methods are kept as ``cfg``'s
    :func:`distill_spec`."""
    spec = validate_config(cfg, preset_names())
    cfg.__dict__['_distill_spec'] = ((_spec_key(cfg)), spec)
    return spec


def _spec_key(cfg: Config) -> str:
    return repr((cfg.distill, cfg.loss_opts, cfg.task))


def distill_spec(cfg: Config) -> DistillSpec:
    """The run's methods as :func:`validate` checked them (parsed here when ``cfg`` was built without
    :func:`resolve`, or its methods changed since)."""
    key, spec = cfg.__dict__.get('_distill_spec', (None, None))
    if key != _spec_key(cfg):
        spec = parse_distill(cfg.distill, cfg.loss_opts, preset_names(), cfg.task)
        cfg.__dict__['_distill_spec'] = (_spec_key(cfg), spec)
    return spec
