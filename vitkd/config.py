"""Every option of a run, in one commented dataclass; YAML defaults (``-c``), then command-line overrides.

Resolution order (later wins): the dataclass defaults < the embedded-default preset (only when the data set is the
embedded Fashion-MNIST one) < ``-c file.yaml`` < command-line flags. The resolved config is saved as
``config.yaml`` in the run dir and is enough to re-run (``python main.py -c <run>/config.yaml``).
"""
from __future__ import annotations

from .errors import UsageError
import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

__all__ = ['Config', 'parse_args', 'build_parser', 'ConfigError', 'embedded_default', 'load_yaml', 'resolve']

REPO = Path(__file__).resolve().parents[1]


class ConfigError(UsageError):
    """A bad option value (message is the one-line user error)."""


def option(default: Any = None, help: str = '', aliases: tuple[str, ...] = (), choices=None, nargs=None):
    """A config field with its command-line help."""
    meta = dict(help=help, aliases=aliases, choices=choices, nargs=nargs)
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    # ---- data ------------------------------------------------------------------------------------------------
    dataset: str = option('auto', 'fashion_mnist (the embedded default), cifar10, cifar100, imagefolder; auto = '
                       'imagefolder when --data-path is given, else fashion_mnist',
                       choices=('auto', 'fashion_mnist', 'cifar10', 'cifar100', 'imagefolder'))
    data_path: Optional[str] = option(None, 'ImageFolder root with train/ and val/ (or a torchvision root)',
                                   aliases=('--data_path',))
    num_classes: Optional[int] = option(None, 'expected number of classes (checked against the data and the teacher)')
    train_subset: Optional[str] = option(None, 'train on a fraction (0.01) or on the files listed in a text file')
    input_size: Optional[int] = option(None, 'image side (default: the student\'s / data set\'s)')
    num_workers: int = option(2, 'data loader workers per process', aliases=('--num_workers',))
    threads: Optional[int] = option(None, 'CPU threads of each process (default: every core for a single CPU process, '
                                 'else the launcher\'s OMP_NUM_THREADS)')
    cpu_malloc: str = option('tuned', 'CPU runs: tuned = glibc keeps freed activation memory instead of re-faulting it '
                          'each step (vitkd/cpu_malloc.py; the process keeps its peak heap), system = glibc defaults',
                          choices=('tuned', 'system'))
    skip_corrupt: bool = option(True, 'skip (and count) unreadable images instead of failing')
    # ---- models ----------------------------------------------------------------------------------------------
    student: str = option('deit_s_distilled', 'timm student (deit_{ti,s,b}_distilled = VkD student, '
                       'deit_*_distilled_patch16_224, any timm model)', aliases=('--student-model', '--student_model'))
    student_kwargs: dict = option({}, 'timm kwargs for the student, key=value (e.g. depth=4 embed_dim=96)', nargs='*')
    student_pretrained: bool = option(False, 'start the student from its pretrained timm/Hub weights')
    drop_path: float = option(0.0, 'stochastic depth rate of the student', aliases=('--drop_path',))
    teacher: Optional[str] = option('regnety_160', 'timm name[.tag] (regnety_160 = regnety_160.deit_in1k), '
                                 'hf-hub:org/name, a save_for_hf folder, or a .safetensors file; none = no teacher')
    teacher_arch: Optional[str] = option(None, 'timm architecture of a bare .safetensors teacher')
    teacher_kwargs: dict = option({}, 'timm kwargs for the teacher, key=value', nargs='*')
    teacher_pretrained: bool = option(True, 'load the teacher\'s weights (off only for smoke tests)')
    compile_teacher: bool = option(False, 'torch.compile the teacher\'s forward (inductor; the first batches pay the '
                                   'compilation)', aliases=('--compile',))
    compile_student: bool = option(False, 'torch.compile the student\'s training forward (its taps, logits and '
                                   'backward; inductor; evaluation and export stay eager)')
    teacher_cache: Optional[str] = option(None, 'teacher-output cache folder: epochs not cached yet record the '
                                       'teacher\'s logits/pooled features (fp16) per sample with their augmentation '
                                       'seeds, cached epochs replay them without running the teacher '
                                       '(see vitkd/teacher_cache.py, scripts/cache_teacher.py)')
    teacher_cache_epochs: Optional[int] = option(None, 'distinct epochs of augmentation the cache holds; epoch e '
                                              'uses data epoch e mod this (default: an existing cache\'s, else '
                                              '--epochs: no repetition)')
    teacher_cache_topk: int = option(10, 'teacher logits kept per sample (the rest of the probability mass spread '
                                     'uniformly, as TinyViT); >= the number of classes keeps every logit')
    # ---- distillation ----------------------------------------------------------------------------------------
    distill: list = option(['vkd'], 'methods as name[:weight] (e.g. vkd:1.0 deit_soft:0.5); see --list-losses',
                        nargs='+')
    loss_opts: list = option([], 'method options as name.key=value (e.g. kd.temperature=2 dkd.warmup_epochs=20)',
                          nargs='*', aliases=('--loss-opt',))
    task_weight: Optional[float] = option(None, 'factor on the task CE (default: product of the methods\' choice)')
    # ---- schedule and optimisation ---------------------------------------------------------------------------
    epochs: int = option(300, 'training epochs')
    max_steps: Optional[int] = option(None, 'stop after this many optimizer steps')
    time_limit: Optional[float] = option(None, 'stop training after this many seconds (then evaluate and save)')
    batch_size: int = option(64, 'batch per process', aliases=('--batch_size',))
    grad_accum_steps: int = option(1, 'gradient accumulation steps')
    opt: str = option('adamw', 'timm optimizer name (create_optimizer_v2)')
    lr: float = option(5e-4, 'base learning rate, scaled by global batch / 512 unless --unscale-lr')
    unscale_lr: bool = option(False, 'use --lr as is (no linear scaling with the global batch)')
    weight_decay: float = option(0.05, 'decoupled weight decay (never on norms, biases, tokens, parametrisations)')
    momentum: float = option(0.9, 'SGD momentum / Adam beta1 where applicable')
    sched: str = option('cosine', 'timm scheduler name (create_scheduler_v2)')
    min_lr: float = option(1e-5, 'final learning rate of the schedule')
    warmup_epochs: float = option(5, 'linear warm-up epochs')
    warmup_lr: float = option(1e-6, 'learning rate at the start of the warm-up')
    clip_grad: Optional[float] = option(None, 'clip the gradient norm to this value')
    nan_policy: str = option('stop', 'a non-finite loss or gradient: stop the run, or skip that optimizer step; both '
                             'write <run>/nonfinite_step<N>.json (terms, step, lr, sample indices)',
                             choices=('stop', 'skip'))
    model_ema: bool = option(False, 'keep an EMA of the student (timm ModelEmaV3), evaluated beside it')
    model_ema_decay: float = option(0.99996, 'EMA decay')
    mixed_precision: str = option('no', 'no, bf16 or fp16 (fp16 needs a GPU)', choices=('no', 'bf16', 'fp16'))
    seed: int = option(0, 'random seed (each process adds its rank)')
    ddp_find_unused: Optional[bool] = option(None, 'DDP find_unused_parameters for multi-process runs (default: on '
                                          'when some method can leave parameters without gradient in a step)')
    # ---- augmentation (timm) ---------------------------------------------------------------------------------
    aa: Optional[str] = option('rand-m9-mstd0.5-inc1', 'RandAugment policy (none to disable)')
    three_augment: bool = option(False, 'DeiT III 3-Augment (grayscale / solarize / blur) instead of RandAugment')
    color_jitter: float = option(0.3, 'colour jitter strength')
    scale: list = option([0.08, 1.0], 'RandomResizedCrop scale range', nargs=2)
    hflip: float = option(0.5, 'horizontal flip probability')
    train_interpolation: str = option('bicubic', 'interpolation of the training crops')
    aug_repeats: int = option(1, 'repeated augmentation (DeiT\'s RASampler): each image R times per epoch with its own '
                              'augmentations, the copies on different processes, epoch length unchanged; DeiT uses 3, '
                              '1 = off', aliases=('--aug_repeats',))
    reprob: float = option(0.25, 'random erasing probability')
    remode: str = option('pixel', 'random erasing mode')
    recount: int = option(1, 'random erasing count')
    smoothing: float = option(0.1, 'label smoothing')
    mixup: float = option(0.8, 'mixup alpha (0 = off)')
    cutmix: float = option(1.0, 'cutmix alpha (0 = off)')
    mixup_prob: float = option(1.0, 'probability of mixing a batch')
    mixup_switch_prob: float = option(0.5, 'probability of cutmix instead of mixup')
    mixup_mode: str = option('batch', 'timm Mixup mode', choices=('batch', 'pair', 'elem'))
    eval_crop_ratio: float = option(0.875, 'centre-crop ratio of the evaluation transform')
    # ---- run -------------------------------------------------------------------------------------------------
    output_dir: Optional[str] = option(None, 'run dir (default output/<student>-<methods>-<time>)',
                                    aliases=('--output_dir',))
    overwrite: bool = option(False, 'reuse an output dir that holds another run')
    resume: Optional[str] = option(None, 'auto (newest complete checkpoint in the output dir; none yet = start) or a '
                                'checkpoint folder / run dir')
    save_every_steps: Optional[int] = option(None, 'also save a training checkpoint every N optimizer steps')
    keep_last: int = option(2, 'keep the newest K training checkpoints (checkpoints/best is kept apart)')
    log_with: Optional[str] = option(None, 'Accelerate trackers (tensorboard, wandb, mlflow, comet_ml, aim, all) beside '
                                     'the run dir\'s log.jsonl/epochs.csv; the tracker package must be installed')
    log_every: int = option(50, 'log training terms every N steps')
    eval_every: int = option(1, 'evaluate every N epochs')
    eval_student: bool = option(False, 'only evaluate --student-ckpt', aliases=('--eval_student',))
    student_ckpt: Optional[str] = option(None, 'student to evaluate: export folder, checkpoint, .safetensors, hf-hub:id',
                                      aliases=('--student_ckpt',))
    eval_teacher: bool = option(True, 'report the teacher\'s own accuracy once')
    push_to_hub: bool = option(False, 'upload the exported student with a model card to the Hugging Face Hub')
    hub_model_id: Optional[str] = option(None, 'Hub repo org/name for --push-to-hub (default: <you>/<run dir name>)')
    hub_private: bool = option(False, 'create the Hub repo as private')


EMBEDDED_PRESET = REPO / 'scripts' / 'configs' / 'embedded.yaml'


def embedded_default() -> dict:
    """The embedded-default preset (``scripts/configs/embedded.yaml``), its teacher path made absolute."""
    values = load_yaml(str(EMBEDDED_PRESET))
    values['teacher'] = str(REPO / values['teacher'])
    return values


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def _kv(items) -> dict:
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in items or []:
        if '=' not in item:
            raise ConfigError(f'expected key=value, got {item!r}')
        k, v = item.split('=', 1)
        out[k.strip()] = _parse_value(v)
    return out


def _hints() -> dict:
    return get_type_hints(Config)


class _ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are :class:`ConfigError` (one line, exit code 2 from ``main``), not usage + SystemExit."""

    def error(self, message: str):
        if message.startswith('unrecognized arguments:'):
            import difflib
            flags = [s for a in self._actions for s in a.option_strings if s.startswith('--')]
            hints = []
            for arg in message.split(':', 1)[1].split():
                close = difflib.get_close_matches(arg.split('=')[0], flags, 1) if arg.startswith('-') else []
                hints += [f'{arg} (did you mean {close[0]}?)'] if close else []
            if hints:
                message += '; ' + ', '.join(hints)
        raise ConfigError(f'{message} (see --help)')


def build_parser() -> argparse.ArgumentParser:
    """argparse over the Config fields; every default is None so only what the user typed is known as set."""
    p = _ArgumentParser(description='vitkd: knowledge distillation into vision transformers',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, argument_default=None)
    p.add_argument('-c', '--config', help='YAML file of defaults (CLI flags override it)')
    p.add_argument('--list-losses', action='store_true', help='list the registered distillation methods and exit')
    hints = _hints()
    for f in dataclasses.fields(Config):
        flag = '--' + f.name.replace('_', '-')
        names = [flag, *f.metadata.get('aliases', ())]
        typ = hints[f.name]
        base = get_args(typ)[0] if get_origin(typ) is Union else typ
        helptext = f.metadata.get('help', '')
        if base is bool:
            p.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        elif base in (list, dict):
            p.add_argument(*names, dest=f.name, nargs=f.metadata.get('nargs') or '*', default=None, help=helptext,
                           type=float if f.name == 'scale' else str)
        else:
            p.add_argument(*names, dest=f.name, type=base if base in (int, float) else str, default=None,
                           choices=f.metadata.get('choices'), help=helptext)
    return p


def load_yaml(path: str) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ConfigError(f'cannot read config {path!r}: {e.strerror}') from None
    except yaml.YAMLError as e:
        raise ConfigError(f'config {path!r} is not valid YAML: {str(e).splitlines()[0]}') from None
    if not isinstance(data, dict):
        raise ConfigError(f'config {path!r} must be a mapping of option: value')
    data = {k.replace('-', '_'): v for k, v in data.items()}
    valid = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(data) - valid)
    if unknown:
        import difflib
        hints = [f'{u} (did you mean {m[0]}?)' if (m := difflib.get_close_matches(u, valid, 1)) else u for u in unknown]
        raise ConfigError(f'config {path!r} has unknown keys: {", ".join(hints)}')
    for key, value in data.items():
        _check_yaml_type(path, key, value)
    return data


def _check_yaml_type(path: str, key: str, value: Any) -> None:
    """A YAML value of the wrong type (``lr: fast``) is a one-line error naming the key and the expected type."""
    typ = _hints()[key]
    optional = get_origin(typ) is Union and type(None) in get_args(typ)
    base = next(t for t in get_args(typ) if t is not type(None)) if get_origin(typ) is Union else typ
    if value is None and optional:
        return
    accepted = {bool: (bool,), int: (int,), float: (int, float), str: (str,), list: (list, str), dict: (dict, list)}
    ok = accepted.get(base)
    if ok is None or (isinstance(value, ok) and not (base in (int, float) and isinstance(value, bool))):
        return
    name = getattr(base, '__name__', str(base))
    raise ConfigError(f'config {path!r}: {key} must be {"a" if name != "int" else "an"} {name}'
                      f'{" or null" if optional else ""}, got {value!r}')


def resolve(cli: dict, yaml_values: Optional[dict] = None) -> Config:
    """Config from explicitly-set CLI values and YAML values (see the module docstring for the order)."""
    yaml_values = yaml_values or {}
    explicit = {**yaml_values, **{k: v for k, v in cli.items() if v is not None}}
    if isinstance(explicit.get('data_path'), str) and not explicit['data_path'].strip():
        raise ConfigError('--data-path is empty (an unset shell variable?); give the folder with train/ and val/, or '
                          'leave --data-path out for the embedded Fashion-MNIST')
    dataset = explicit.get('dataset', 'auto')
    if dataset == 'auto':
        dataset = 'imagefolder' if explicit.get('data_path') else 'fashion_mnist'
    values = embedded_default() if dataset == 'fashion_mnist' and not explicit.get('data_path') else {}
    values.update(explicit)
    values['dataset'] = dataset
    for key in ('student_kwargs', 'teacher_kwargs'):
        if key in values:
            values[key] = _kv(values[key])
    if isinstance(values.get('distill'), str):
        values['distill'] = values['distill'].split()
    if isinstance(values.get('teacher'), str) and values['teacher'].lower() in ('none', ''):
        values['teacher'] = None
    if isinstance(values.get('aa'), str) and values['aa'].lower() in ('none', ''):
        values['aa'] = None
    cfg = Config(**values)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Reject impossible values with a one-line message naming the value and what is accepted."""
    for f in dataclasses.fields(Config):  # choices also bind values that come from a YAML file
        choices, value = f.metadata.get('choices'), getattr(cfg, f.name)
        if choices and value not in choices:
            raise ConfigError(f'--{f.name.replace("_", "-")} {value!r} is not one of {", ".join(choices)}')
    positive = dict(batch_size=cfg.batch_size, epochs=cfg.epochs, grad_accum_steps=cfg.grad_accum_steps,
                    lr=cfg.lr)
    for name, value in positive.items():
        if value is None or value <= 0:
            raise ConfigError(f'--{name.replace("_", "-")} must be > 0, got {value}')
    for name in ('max_steps', 'time_limit', 'clip_grad', 'num_classes', 'save_every_steps', 'teacher_cache_epochs',
                 'threads'):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise ConfigError(f'--{name.replace("_", "-")} must be > 0, got {value}')
    if cfg.weight_decay < 0 or cfg.min_lr < 0 or cfg.warmup_epochs < 0:
        raise ConfigError('--weight-decay, --min-lr and --warmup-epochs must be >= 0')
    if not 0 <= cfg.smoothing < 1:
        raise ConfigError(f'--smoothing must be in [0, 1), got {cfg.smoothing}')
    if cfg.teacher_cache_topk < 1:
        raise ConfigError(f'--teacher-cache-topk must be >= 1, got {cfg.teacher_cache_topk}')
    if cfg.aug_repeats < 1:
        raise ConfigError(f'--aug-repeats must be >= 1 (1 = off, DeiT uses 3), got {cfg.aug_repeats}')
    if cfg.aug_repeats > 1 and cfg.teacher_cache:
        raise ConfigError(f'--aug-repeats {cfg.aug_repeats} with --teacher-cache: the cache keeps one augmentation per '
                          'image and epoch; use --aug-repeats 1 or no cache')
    if cfg.keep_last < 1:
        raise ConfigError(f'--keep-last must be >= 1, got {cfg.keep_last}')
    if cfg.resume not in (None, 'auto') and not Path(cfg.resume).exists():
        raise ConfigError(f'--resume {cfg.resume!r}: no such checkpoint (use auto or a checkpoint folder)')


def parse_args(argv=None) -> tuple[Config, argparse.Namespace]:
    """Parse the command line (+ ``-c`` YAML) into a validated :class:`Config`."""
    args = build_parser().parse_args(argv)
    yaml_values = load_yaml(args.config) if args.config else {}
    cli = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)}
    return resolve(cli, yaml_values), args


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
