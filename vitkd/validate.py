"""Every option of a run checked before anything is built or written.

:func:`validate_options` runs from :func:`vitkd.config.validate` (so from every ``Config`` the command line or a YAML
file resolves) and :func:`check_yaml_value` from :func:`vitkd.config.load_yaml`. Each check raises a one-line
:class:`~vitkd.config.ConfigError` naming the option (as its ``--flag``), the value and what is accepted. Nothing here
builds a model or reads data: string options go through timm's and Accelerate's own parsers (the same code that will
consume them), loss options are type-checked against the loss class's signature, and the checks of things only the
build knows (the data set's class count, a teacher's head) stay where that knowledge is.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any

__all__ = ['validate_options', 'check_yaml_value', 'check_safetensors', 'read_model_config', 'flag', 'MAX_INT',
           'MAX_SEED']

MAX_INT = 2 ** 31 - 1  # counts beyond a C int overflow torch/numpy index arithmetic long before they mean anything
MAX_SEED = 2 ** 32 - 1  # numpy.random.seed's range; each process adds its rank


def flag(name: str) -> str:
    """The command-line spelling of a Config field (``drop_path`` -> ``--drop-path``)."""
    return '--' + name.replace('_', '-')


def _error(message: str):
    from .config import ConfigError
    return ConfigError(message)


def _number(name: str, value: Any, *, low: float = None, high: float = None, low_open: bool = False,
            high_open: bool = False, integer: bool = False, accepted: str = '', cap: int = MAX_INT) -> None:
    """``value`` is a finite number (an int when ``integer``, at most ``cap`` in size) inside the given bounds, else a
    one-line error."""
    kind = 'an integer' if integer else 'a number'
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise _error(f'{flag(name)} must be {kind}, got {value!r}')
    if not math.isfinite(value):
        raise _error(f'{flag(name)} must be finite, got {value}')
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        lo = '' if low is None else f'{"(" if low_open else "["}{low:g}'
        hi = '' if high is None else f'{high:g}{")" if high_open else "]"}'
        if low is not None and high is not None:
            where = f'in {lo}, {hi}'
        elif low is not None:
            where = f'{">" if low_open else ">="} {low:g}'
        else:
            where = f'{"<" if high_open else "<="} {high:g}'
        raise _error(f'{flag(name)} must be {where}{accepted}, got {value}')
    if integer and abs(value) > cap:
        raise _error(f'{flag(name)} {value} is out of range (at most {cap}){accepted}')


# field name -> bounds; None values of Optional fields are skipped (they mean "unset").
_INTS = dict(num_workers=dict(low=0), threads=dict(low=0, low_open=True), num_classes=dict(low=1),
             input_size=dict(low=1), teacher_cache_epochs=dict(low=1), teacher_cache_topk=dict(low=1),
             epochs=dict(low=1), max_steps=dict(low=1), batch_size=dict(low=1), grad_accum_steps=dict(low=1),
             aug_repeats=dict(low=1, accepted=' (1 = off, DeiT uses 3)'), recount=dict(low=1),
             save_every_steps=dict(low=1), keep_last=dict(low=1), log_every=dict(low=1), eval_every=dict(low=1))
_FLOATS = dict(drop_path=dict(low=0, high=1, high_open=True), task_weight=dict(low=0),
               time_limit=dict(low=0, low_open=True, accepted=' (seconds)'), lr=dict(low=0, low_open=True),
               weight_decay=dict(low=0), momentum=dict(low=0, high=1, high_open=True), min_lr=dict(low=0),
               warmup_epochs=dict(low=0), warmup_lr=dict(low=0), clip_grad=dict(low=0, low_open=True),
               model_ema_decay=dict(low=0, high=1), color_jitter=dict(low=0), hflip=dict(low=0, high=1),
               reprob=dict(low=0, high=1), smoothing=dict(low=0, high=1, high_open=True), mixup=dict(low=0),
               cutmix=dict(low=0), mixup_prob=dict(low=0, high=1), mixup_switch_prob=dict(low=0, high=1),
               eval_crop_ratio=dict(low=0, high=1, low_open=True))
# string fields that name something and cannot be empty when set
_NAMES = ('student', 'teacher_arch', 'opt', 'sched', 'train_interpolation', 'output_dir', 'resume', 'student_ckpt',
          'data_path', 'teacher_cache', 'train_subset', 'hub_model_id', 'hf_image_column', 'hf_label_column',
          'train_split', 'val_split', 'hub_license')


def validate_options(cfg) -> None:
    """Check every option of ``cfg`` (a :class:`vitkd.config.Config`); the first bad one is a one-line error."""
    for name, bounds in _INTS.items():
        value = getattr(cfg, name)
        if value is not None:
            _number(name, value, integer=True, **bounds)
    for name, bounds in _FLOATS.items():
        value = getattr(cfg, name)
        if value is not None:
            _number(name, value, **bounds)
    for name in _NAMES:
        value = getattr(cfg, name, None)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise _error(f'{flag(name)} must be a non-empty string, got {value!r}')
    world = int(os.environ.get('WORLD_SIZE', '1') or 1)
    _number('seed', cfg.seed, integer=True, low=0, cap=MAX_SEED - (world - 1),
            accepted=f' (numpy\'s seed range; each of the {world} process(es) adds its rank)')
    _check_scale(cfg.scale)
    if cfg.task == 'classify' and (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mixup_prob > 0 and cfg.batch_size % 2:
        raise _error(f'--batch-size {cfg.batch_size}: mixup/cutmix pair sample i with sample B-1-i and need an even '
                     'batch per process; use an even --batch-size or --mixup 0 --cutmix 0')
    _check_input_size(cfg)
    _check_timm_strings(cfg)
    _check_log_with(cfg.log_with)
    _check_hub_id(cfg)
    _check_kwargs(cfg)
    _check_task(cfg)
    _check_losses(cfg)


# Options of one kind of run only: a value other than the default in the other kind is refused (a saved config.yaml
# holds every option at its value, so a rerun with -c passes).
CLASSIFY_ONLY = ('aa', 'three_augment', 'color_jitter', 'scale', 'train_interpolation', 'reprob', 'remode', 'recount',
                 'smoothing', 'mixup', 'cutmix', 'mixup_prob', 'mixup_switch_prob', 'mixup_mode', 'eval_crop_ratio',
                 'aug_repeats', 'teacher_cache', 'teacher_cache_epochs', 'teacher_cache_topk', 'model_ema',
                 'model_ema_decay', 'student_pretrained', 'compile_student', 'train_subset', 'push_to_hub',
                 'hub_model_id', 'hub_private', 'hub_license', 'hf_image_column', 'hf_label_column')
DENSE_ONLY = ('pyramid_strides', 'pyramid_channels', 'scale_jitter', 'ignore_index')
DENSE_DATASETS = {'detect': ('fashion_mnist', 'coco'), 'segment': ('fashion_mnist', 'segfolder')}


def _check_task(cfg) -> None:
    """The data set and the options against ``--task``; the dense options' values."""
    import dataclasses
    defaults = {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
                for f in dataclasses.fields(cfg)}
    dense = cfg.task != 'classify'
    accepted = DENSE_DATASETS.get(cfg.task)
    if accepted is not None and cfg.dataset not in accepted:
        raise _error(f'--dataset {cfg.dataset} with --task {cfg.task}: use {" or ".join(accepted)}')
    if not dense and cfg.dataset in ('coco', 'segfolder'):
        raise _error(f'--dataset {cfg.dataset} holds dense labels: use it with --task '
                     f'{"detect" if cfg.dataset == "coco" else "segment"}')
    for name in CLASSIFY_ONLY if dense else DENSE_ONLY:
        if getattr(cfg, name) != defaults[name]:
            kind = 'classification (--task classify)' if dense else 'dense tasks (--task detect / segment)'
            raise _error(f'{flag(name)} {getattr(cfg, name)!r}: this option applies to {kind} only; leave it out '
                         f'with --task {cfg.task}')
    strides = cfg.pyramid_strides
    if (not isinstance(strides, list) or not strides or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                  and v > 0 for v in strides)
            or strides != sorted(set(strides))):
        raise _error(f'--pyramid-strides {strides!r}: give distinct increasing positive integers (e.g. 4 8 16 32)')
    if isinstance(cfg.pyramid_channels, bool) or not isinstance(cfg.pyramid_channels, int) or cfg.pyramid_channels < 1:
        raise _error(f'--pyramid-channels must be an integer >= 1, got {cfg.pyramid_channels!r}')
    if isinstance(cfg.ignore_index, bool) or not isinstance(cfg.ignore_index, int) or not 0 <= cfg.ignore_index <= 255:
        raise _error(f'--ignore-index must be an integer in 0..255 (a grey level of the mask files), got '
                     f'{cfg.ignore_index!r}')
    jitter = cfg.scale_jitter
    if (not isinstance(jitter, (list, tuple)) or len(jitter) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in jitter)
            or not 0 < jitter[0] <= jitter[1] <= 4):
        raise _error(f'--scale-jitter takes two numbers LOW HIGH with 0 < LOW <= HIGH <= 4, got {jitter!r}')


def _check_scale(scale: Any) -> None:
    if (not isinstance(scale, (list, tuple)) or len(scale) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scale)):
        raise _error(f'--scale takes two numbers LOW HIGH with 0 < LOW <= HIGH <= 1, got {scale!r}')
    low, high = scale
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high <= 1):
        raise _error(f'--scale {low} {high}: the crop-area bounds must satisfy 0 < LOW <= HIGH <= 1')


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
        raise _error(f'{what} {size} is not a multiple of the student\'s patch size {patch}; use '
                     f'{(size // patch) * patch or patch} or {(size // patch + 1) * patch}')


def _check_timm_strings(cfg) -> None:
    """Auto-augment policy, interpolation, random-erasing mode, optimizer and scheduler, through timm's parsers."""
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import str_to_interp_mode
    if cfg.aa is not None and not cfg.three_augment:
        aa = cfg.aa
        parse = (rand_augment_transform if aa.startswith('rand') else
                 augment_and_mix_transform if aa.startswith('augmix') else auto_augment_transform)
        try:
            parse(aa, {'translate_const': 100, 'img_mean': (124, 116, 104)})
        except (AssertionError, KeyError, ValueError, IndexError) as e:
            raise _error(f'--aa {aa!r} is not a timm auto-augment policy ({e or type(e).__name__}); e.g. '
                         'rand-m9-mstd0.5-inc1 (RandAugment), augmix-m5-w4-d2, v0, original, or none') from None
    if cfg.train_interpolation != 'random':
        try:
            str_to_interp_mode(cfg.train_interpolation)
        except KeyError:
            from timm.data.transforms import _str_to_pil_interpolation
            raise _error(f'--train-interpolation {cfg.train_interpolation!r} is not one of '
                         f'{", ".join([*_str_to_pil_interpolation, "random"])}') from None
    try:
        RandomErasing(0.5, mode=cfg.remode, device='cpu')
    except (AssertionError, AttributeError):
        raise _error(f'--remode {cfg.remode!r} is not a timm random-erasing mode (const, rand, pixel)') from None
    _check_opt_and_sched(cfg)


def _check_opt_and_sched(cfg) -> None:
    import torch
    from timm.optim import get_optimizer_class, list_optimizers
    from timm.scheduler import create_scheduler_v2
    name = cfg.opt.lower()
    name = name[len('lookahead_'):] if name.startswith('lookahead_') else name
    try:
        get_optimizer_class(name)
    except ValueError:
        import difflib
        close = difflib.get_close_matches(name, list_optimizers(), 3)
        hint = f' (did you mean {", ".join(close)}?)' if close else ''
        raise _error(f'--opt {cfg.opt!r} is not a timm optimizer{hint}; see timm.optim.list_optimizers()') from None
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    try:
        scheduler, _ = create_scheduler_v2(probe, sched=cfg.sched, num_epochs=2, updates_per_epoch=1)
    except (AssertionError, ValueError, TypeError):
        scheduler = None
    if scheduler is None:
        raise _error(f'--sched {cfg.sched!r} is not a timm scheduler (cosine, tanh, step, multistep, plateau, poly, '
                     'rsqrt)')


def _check_log_with(log_with) -> None:
    if log_with is None:
        return
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType
    known = [t.value for t in LoggerType]
    if log_with not in known:
        raise _error(f'--log-with {log_with!r} is not an Accelerate tracker; one of {", ".join(known)}')
    if log_with != 'all' and log_with not in [str(getattr(t, 'value', t)) for t in get_available_trackers()]:
        raise _error(f'--log-with {log_with}: the {log_with} package is not installed (pip install {log_with}), or '
                     'leave --log-with out (log.jsonl and epochs.csv are always written)')


def _check_hub_id(cfg) -> None:
    if cfg.hub_model_id is None:
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(cfg.hub_model_id)
    except HFValidationError as e:
        raise _error(f'--hub-model-id {cfg.hub_model_id!r} is not a Hub repo id (org/name or name: letters, digits, '
                     f'-_. ; {str(e).splitlines()[0]})') from None


def _check_kwargs(cfg) -> None:
    for name in ('student_kwargs', 'teacher_kwargs'):
        value = getattr(cfg, name)
        if not isinstance(value, dict) or not all(isinstance(k, str) and k.isidentifier() for k in value):
            raise _error(f'{flag(name)} takes key=value pairs with Python-identifier keys, got {value!r}')


def _check_losses(cfg) -> None:
    """Method names, weights and ``--loss-opts`` values, each option typed like its default in the loss's signature."""
    import inspect

    from .build import parse_distill
    from .losses import get_loss_class
    from .losses._dense import get_dense_loss_class
    loss_class = get_loss_class if cfg.task == 'classify' else get_dense_loss_class  # a dense run: the dense forms
    if not isinstance(cfg.distill, list) or not cfg.distill:
        raise _error(f'--distill takes one or more name[:weight] items (see --list-losses), got {cfg.distill!r}')
    if not isinstance(cfg.loss_opts, list) or not all(isinstance(o, str) for o in cfg.loss_opts):
        raise _error(f'--loss-opts takes name.option=value items, got {cfg.loss_opts!r}')
    from .losses import LossSpecError
    try:
        methods = parse_distill(cfg)
    except LossSpecError as e:
        if '--distill' in str(e) or '--loss-opts' in str(e):
            raise
        raise _error(f'--distill: {e}') from None
    for name, weight, options in methods:
        if weight is not None and not (math.isfinite(weight) and weight >= 0):
            raise _error(f'--distill {name}:{weight}: a method weight must be a finite number >= 0')
        params = inspect.signature(loss_class(name).__init__).parameters
        for option, value in options.items():
            where = f'--loss-opts {name}.{option}={value!r}'
            if option == 'warmup_epochs' and option not in params:  # vitkd's per-method weight warm-up
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                        or value < 0:
                    raise _error(f'{where}: the warm-up must be a finite number of epochs >= 0')
                continue
            if option in params:
                _check_loss_option(where, params[option], value)


def _annotation_types(param) -> tuple[set, bool]:
    """(base type names, None allowed) of a loss option from its annotation (a string under postponed evaluation),
    else from its default's type."""
    text = param.annotation if isinstance(param.annotation, str) else getattr(param.annotation, '__name__', '')
    optional = param.default is None
    if text.startswith('Optional[') and text.endswith(']'):
        text, optional = text[len('Optional['):-1], True
    if text and text != '_empty':
        return {t.strip() for t in text.split('|')} - {'None'}, optional or 'None' in text
    return ({type(param.default).__name__} if param.default not in (None, param.empty) else set()), optional


def _check_loss_option(where: str, param, value) -> None:
    types, optional = _annotation_types(param)
    if value is None:
        if optional:
            return
        raise _error(f'{where}: needs a value of type {"/".join(sorted(types))}')

    def fits(kind: str, v) -> bool:
        if kind == 'float':
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if kind == 'int':
            return isinstance(v, int) and not isinstance(v, bool) and abs(v) <= MAX_INT
        if kind == 'bool':
            return isinstance(v, bool)
        if kind == 'str':
            return isinstance(v, str)
        if kind == 'dict':
            return isinstance(v, dict)
        m = re.fullmatch(r'(?:Sequence|list|tuple|List|Tuple)\[(\w+)(?:, \.\.\.)?\]', kind)
        if m:
            return isinstance(v, (list, tuple)) and all(fits(m.group(1), x) for x in v)
        return True  # an annotation this check does not model: the loss's own code decides
    if types and not any(fits(kind, value) for kind in types):
        expected = ' or '.join(sorted(types)).replace('Sequence[int]', 'a list of integers')
        raise _error(f'{where}: expected {expected}{" or null" if optional else ""} (finite), got '
                     f'{type(value).__name__}')


def check_yaml_value(path: str, key: str, value: Any) -> None:
    """The parts of a YAML value its top-level type does not say: list/dict items and list lengths."""
    where = f'config {path!r}: {key}'
    if key == 'scale' and isinstance(value, list) and (len(value) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise _error(f'{where} must be a list of two numbers [LOW, HIGH], got {value!r}')
    if key in ('student_kwargs', 'teacher_kwargs'):
        if isinstance(value, list) and not all(isinstance(v, str) and '=' in v for v in value):
            raise _error(f'{where} must be a mapping (or a list of key=value strings), got {value!r}')
        if isinstance(value, dict) and not all(isinstance(k, str) for k in value):
            raise _error(f'{where} must have string keys, got {value!r}')
    if key == 'loss_opts' and isinstance(value, list) and not all(isinstance(v, str) for v in value):
        raise _error(f'{where} must be a list of name.option=value strings, got {value!r}')
    if key == 'distill' and isinstance(value, list) and not all(isinstance(v, (str, dict)) for v in value):
        raise _error(f'{where} must be a list of name[:weight] strings or {{name: ..., weight: ...}} mappings, got '
                     f'{value!r}')


def check_safetensors(path, what: str) -> None:
    """A ``.safetensors`` file whose header and size are consistent (zero-byte, truncated and corrupt files are a
    one-line error naming the file; the tensors are not read)."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework='pt') as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _error(f'{what} {path} is not a readable safetensors file ({detail}); it is empty, truncated or '
                     'corrupt: re-export or re-download it') from None


def read_model_config(path, what: str) -> dict:
    """A timm ``config.json`` (``save_for_hf``'s): a JSON object naming its architecture, with an integer
    ``num_classes`` and mappings for ``model_args``/``pretrained_cfg`` when present; else a one-line error."""
    import json
    from pathlib import Path
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise _error(f'{what}: cannot read {path} ({getattr(e, "strerror", None) or e})') from None
    except json.JSONDecodeError as e:
        raise _error(f'{what}: {path} is not valid JSON ({e.msg} at line {e.lineno})') from None
    problems = []
    if not isinstance(config, dict):
        problems.append(f'a JSON object is expected, got {type(config).__name__}')
    else:
        if not isinstance(config.get('architecture'), str) or not config.get('architecture'):
            problems.append('"architecture" must name a timm model')
        n = config.get('num_classes')
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            problems.append(f'"num_classes" must be an integer >= 0, got {n!r}')
        for key in ('model_args', 'pretrained_cfg'):
            if config.get(key) is not None and not isinstance(config[key], dict):
                problems.append(f'"{key}" must be an object, got {type(config[key]).__name__}')
    if problems:
        raise _error(f'{what}: {path} is not a timm model config: {"; ".join(problems)}')
    return config
