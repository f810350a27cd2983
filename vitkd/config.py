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
    task: str = option('classify', 'what the student learns: classify (image classes), detect (boxes: a feature '
                       'pyramid under torchvision\'s FCOS head) or segment (a class per pixel: a semantic FPN head); '
                       'detect/segment without --data-path run the embedded Fashion-MNIST scenes',
                       choices=('classify', 'detect', 'segment'))
    dataset: str = option('auto', 'fashion_mnist (the embedded default; scenes of its items for --task '
                       'detect/segment), cifar10, cifar100, imagefolder, hf (a Hugging Face datasets data set), coco '
                       '(--task detect: annotations/instances_{train,val}.json + train/, val/), segfolder (--task '
                       'segment: classes.txt + {train,val}/{images,masks}/); auto = hf when --data-path is '
                       'hf-hub:org/name, coco / segfolder for --task detect / segment, imagefolder otherwise, '
                       'fashion_mnist without --data-path',
                       choices=('auto', 'fashion_mnist', 'cifar10', 'cifar100', 'imagefolder', 'hf', 'coco',
                                'segfolder'))
    data_path: Optional[str] = option(None, 'ImageFolder root with train/ and val/ (or a torchvision root); with '
                                   '--dataset hf: a Hub id (org/name, hf-hub:org/name), a save_to_disk folder, or '
                                   'parquet files (a folder, a file or a glob)', aliases=('--data-dir',))
    hf_image_column: Optional[str] = option(None, '--dataset hf: the image column (default: the datasets.Image one, '
                                         'else image or img)')
    hf_label_column: Optional[str] = option(None, '--dataset hf: the label column (default: the ClassLabel one, else '
                                         'label)')
    train_split: str = option('train', '--dataset hf: the training split')
    val_split: str = option('validation', '--dataset hf: the validation split (the default falls back to val, then '
                            'test)')
    num_classes: Optional[int] = option(None, 'expected number of classes (checked against the data and the teacher)')
    train_subset: Optional[str] = option(None, 'train on a fraction (0.01) or on the files listed in a text file')
    input_size: Optional[int] = option(None, 'image side: DeiT\'s --input-size 224 or timm\'s C H W (3 224 224, square; '
                                       'the channels are the data\'s) (default: the student\'s / data set\'s)',
                                       aliases=('--img-size',))
    num_workers: Optional[int] = option(None, 'data loader workers per process (default: the CPU cores of the machine '
                                        'shared by its processes, at most 16)', aliases=('--workers', '-j'))
    threads: Optional[int] = option(None, 'CPU threads of each process (default: every core for a single CPU process, '
                                 'else the launcher\'s OMP_NUM_THREADS)')
    cpu_malloc: str = option('tuned', 'CPU runs: tuned = glibc keeps freed activation memory instead of re-faulting it '
                          'each step (vitkd/cpu_malloc.py; the process keeps its peak heap), system = glibc defaults',
                          choices=('tuned', 'system'))
    skip_corrupt: bool = option(True, 'skip (and count) unreadable images instead of failing (classification; a dense '
                                'data set fails on an unreadable image, naming it)')
    ignore_index: int = option(255, '--dataset segfolder: the mask value of unlabelled pixels (0..255; the loss and '
                               'mIoU skip them)')
    # ---- models ----------------------------------------------------------------------------------------------
    student: str = option('deit_s_distilled', 'timm student (deit_{ti,s,b}_distilled = VkD student, '
                       'deit_*_distilled_patch16_224, any timm model)', aliases=('--model', '--student-model'))
    student_kwargs: dict = option({}, 'timm kwargs for the student, key=value (e.g. depth=4 embed_dim=96)', nargs='*')
    student_pretrained: bool = option(False, 'start the student from its pretrained timm/Hub weights')
    drop_path: float = option(0.0, 'stochastic depth rate of the student')
    pyramid_strides: list = option([4, 8, 16, 32], '--task detect/segment: strides of the student\'s feature pyramid '
                                   '(a ViT makes patch×¼, ×½, ×1, ×2; a CNN teacher\'s stages must have them too)',
                                   nargs='+')
    pyramid_channels: int = option(64, '--task detect/segment: channels of every pyramid level')
    teacher: Optional[str] = option('regnety_160', 'timm name[.tag] (regnety_160 = regnety_160.deit_in1k), '
                                 'hf-hub:org/name, a save_for_hf folder, or a .safetensors file; none = no teacher')
    teacher_arch: Optional[str] = option(None, 'timm architecture of a bare .safetensors teacher')
    teacher_kwargs: dict = option({}, 'timm kwargs for the teacher, key=value', nargs='*')
    teacher_pretrained: bool = option(True, 'load the teacher\'s weights (off only for smoke tests)')
    compile_teacher: bool = option(False, 'torch.compile the teacher\'s forward (inductor; the first batches pay the '
                                   'compilation; --compile compiles teacher and student)')
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
    batch_size: int = option(64, 'batch per process', aliases=('-b',))
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
    mixed_precision: Optional[str] = option(None, 'no, bf16 or fp16 (fp16 needs a GPU); unset = the launcher\'s '
                                            '(accelerate launch --mixed_precision, its config file), else no',
                                            choices=('no', 'bf16', 'fp16'))
    cuda_tf32: bool = option(True, 'CUDA: TF32 tensor cores for the fp32 matmuls and convolutions (10-bit mantissa '
                             'inputs, fp32 accumulation; what autocast leaves in fp32)')
    cudnn_benchmark: bool = option(True, 'CUDA: cuDNN autotuning (picks the fastest convolution algorithms for the '
                                   'fixed input shapes of a run)')
    seed: int = option(0, 'random seed (each process adds its rank)')
    ddp_find_unused: Optional[bool] = option(None, 'DDP find_unused_parameters for multi-process runs (default: on '
                                          'when some method can leave parameters without gradient in a step)')
    # ---- augmentation (timm) ---------------------------------------------------------------------------------
    aa: Optional[str] = option('rand-m9-mstd0.5-inc1', 'RandAugment policy (none to disable)')
    three_augment: bool = option(False, 'DeiT III 3-Augment (grayscale / solarize / blur) instead of RandAugment',
                                        aliases=('--ThreeAugment',))
    color_jitter: float = option(0.3, 'colour jitter strength')
    scale: list = option([0.08, 1.0], 'RandomResizedCrop scale range', nargs=2)
    hflip: float = option(0.5, 'horizontal flip probability')
    scale_jitter: list = option([1.0, 1.0], '--task detect/segment: resize each training image by a factor drawn from '
                                '[LOW, HIGH] (0 < LOW <= HIGH <= 4), then cut or pad it back to its size; boxes and '
                                'masks move with it', nargs=2)
    train_interpolation: str = option('bicubic', 'interpolation of the training crops')
    aug_repeats: int = option(1, 'repeated augmentation (DeiT\'s RASampler): each image R times per epoch with its own '
                              'augmentations, the copies on different processes, epoch length unchanged; DeiT uses 3, '
                              '1 = off; --repeated-aug = 3')
    reprob: float = option(0.25, 'random erasing probability')
    remode: str = option('pixel', 'random erasing mode')
    recount: int = option(1, 'random erasing count')
    smoothing: float = option(0.1, 'label smoothing')
    mixup: float = option(0.8, 'mixup alpha (0 = off)')
    cutmix: float = option(1.0, 'cutmix alpha (0 = off)')
    mixup_prob: float = option(1.0, 'probability of mixing a batch')
    mixup_switch_prob: float = option(0.5, 'probability of cutmix instead of mixup')
    mixup_mode: str = option('batch', 'timm Mixup mode', choices=('batch', 'pair', 'elem'))
    eval_crop_ratio: float = option(0.875, 'centre-crop ratio of the evaluation transform', aliases=('--crop-pct',))
    # ---- run -------------------------------------------------------------------------------------------------
    output_dir: Optional[str] = option(None, 'run dir (default output/<student>-<methods>-<time>)',
                                    )
    overwrite: bool = option(False, 'reuse an output dir that holds another run')
    resume: Optional[str] = option(None, 'auto (newest complete checkpoint in the output dir; none yet = start) or a '
                                'checkpoint folder / run dir')
    save_every_steps: Optional[int] = option(None, 'also save a training checkpoint every N optimizer steps')
    keep_last: int = option(1, 'keep the newest K training checkpoints (checkpoints/best is kept apart, as hard '
                                'links when it is one of them); 1 is enough to resume: a save replaces the previous '
                                'checkpoint only once it is complete')
    log_with: Optional[str] = option(None, 'Accelerate trackers (tensorboard, wandb, mlflow, comet_ml, aim, all) beside '
                                     'the run dir\'s log.jsonl/epochs.csv; the tracker package must be installed')
    log_every: int = option(50, 'log training terms every N steps (and a progress line when stdout is not a '
                            'terminal)', aliases=('--log-interval',))
    eval_every: int = option(1, 'evaluate every N epochs')
    eval_student: bool = option(False, 'only evaluate --student-ckpt')
    student_ckpt: Optional[str] = option(None, 'student to evaluate: export folder, checkpoint, .safetensors, hf-hub:id',
                                      )
    eval_teacher: bool = option(True, 'report the teacher\'s own accuracy once')
    push_to_hub: bool = option(False, 'upload the exported student with a model card to the Hugging Face Hub')
    hub_model_id: Optional[str] = option(None, 'Hub repo org/name for --push-to-hub (default: <you>/<run dir name>)')
    hub_private: bool = option(False, 'create the Hub repo as private')
    hub_license: Optional[str] = option(None, 'license of the model card (a Hub license id, e.g. apache-2.0; the '
                                        'student\'s training data and teacher have their own terms); unset = the '
                                        'card says none was given')


EMBEDDED_PRESET = REPO / 'scripts' / 'configs' / 'embedded.yaml'
# the embedded default of each dense task: Fashion-MNIST scenes, the shipped dense teacher
EMBEDDED_DENSE_PRESETS = {task: REPO / 'scripts' / 'configs' / f'embedded_{task}.yaml'
                          for task in ('detect', 'segment')}


def embedded_default(task: str = 'classify') -> dict:
    """The embedded-default preset of ``task`` (``scripts/configs/embedded.yaml``, ``embedded_detect.yaml``,
    ``embedded_segment.yaml``), its teacher path made absolute."""
    values = load_yaml(str(EMBEDDED_DENSE_PRESETS.get(task, EMBEDDED_PRESET)))
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
    """argparse whose errors are :class:`ConfigError` (one line, exit code 2 from ``main``), not usage + SystemExit.

    A mistyped flag gets a suggestion only when it is a near-certain typo (``--epoch`` → ``--epochs``): a loose match
    sends a user to an unrelated option (``--amp`` is not ``--mixup``).
    """

    def error(self, message: str):
        if message.startswith('unrecognized arguments:'):
            import difflib
            flags = [s for a in self._actions if a.help != argparse.SUPPRESS for s in a.option_strings
                     if s.startswith('--')]
            hints = []
            for arg in message.split(':', 1)[1].split():
                typed = arg.split('=')[0].replace('_', '-')
                close = difflib.get_close_matches(typed, flags, 1, cutoff=0.85) if arg.startswith('-') else []
                hints += [f'{arg} (did you mean {close[0]}?)'] if close else []
            if hints:
                message += '; ' + ', '.join(hints)
        raise ConfigError(f'{message} (see --help)')


class _Switch(argparse.Action):
    """``--flag`` / ``--no-flag`` (``--flag_name`` / ``--no_flag_name``): argparse's BooleanOptionalAction without the
    ``(default: None)`` it appends to the help (the help states the real default)."""

    def __init__(self, option_strings, dest, default=None, help=None, **_):
        self.negatives = [('--no_' if '_' in s else '--no-') + s[2:] for s in option_strings if s.startswith('--')]
        self.negatives += [f'--no_{s[2:]}' for s in option_strings if s[2:].isalnum() and s.startswith('--')]
        super().__init__([*option_strings, *self.negatives], dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, option_string not in self.negatives)


class _Refused(argparse.Action):
    """A DeiT/timm flag with no equivalent here: using it is a one-line error that says what to do instead."""

    def __init__(self, option_strings, dest, reason: str = '', **_):
        self.reason = reason
        super().__init__(option_strings, argparse.SUPPRESS, nargs='*', default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None):
        raise ConfigError(f'{option_string}: {self.reason}')


# --help sections in order, each with the Config field that opens it: a field belongs to the section of the last
# opening field above it (a field added to the dataclass joins its neighbours), unless _SECTION_OF places it.
_SECTIONS = {'data': 'dataset', 'student': 'student', 'teacher': 'teacher', 'distillation': 'distill',
             'optimisation': 'epochs', 'augmentation': 'aa', 'run': 'output_dir', 'Hub': 'push_to_hub'}
_SECTION_OF = {'threads': 'run', 'cpu_malloc': 'run', 'compile_student': 'student', 'max_steps': 'run',
               'time_limit': 'run', 'mixed_precision': 'run', 'seed': 'run', 'ddp_find_unused': 'run',
               'model_ema': 'student', 'model_ema_decay': 'student', 'cuda_tf32': 'run', 'cudnn_benchmark': 'run'}

_LIST_TYPES = {'scale': float, 'scale_jitter': float, 'pyramid_strides': int}  # list options read as numbers

# DeiT (facebookresearch/deit main.py) and timm (train.py) flags that have no field of their own: translated by
# _apply_habits, or refused with the replacement named.
_DEIT_TYPES = {'none': 'none', 'soft': 'deit_soft', 'hard': 'deit_hard'}
_REFUSED = {
    '--channels-last': 'convolutional teachers already run channels_last (automatic, vitkd/models.py); ViT students '
                       'gain nothing from it: leave the flag out',
    '--no-pin-mem': 'loader memory is pinned whenever a GPU is used and is not a switch here: leave the flag out',
    '--torchcompile': 'use --compile (inductor; student and teacher), --compile-teacher or --compile-student',
    '--amp-dtype': 'use --mixed-precision bf16 or fp16',
    '--log-wandb': 'use --log-with wandb',
    '--eval': 'use --eval-student --student-ckpt PATH (an exported student, a checkpoint or a run dir)',
    '--finetune': 'use --student-ckpt with --eval-student to evaluate, or --resume to continue a vitkd run',
    '--output': 'use --output-dir (the run dir itself, not a parent of experiment folders)',
    '--device': 'devices come from the launcher: python main.py (one device) or accelerate launch (several)',
    '--world-size': 'processes come from the launcher: accelerate launch --num_processes N main.py ...',
    '--dist-url': 'processes come from the launcher: accelerate launch main.py ...',
}


def _default_text(f: dataclasses.Field) -> str:
    """The dataclass default as --help shows it (argparse's own defaults are None: see :func:`build_parser`)."""
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if isinstance(value, bool):
        return 'on' if value else 'off'
    if value is None:
        return 'none'
    if isinstance(value, dict):
        return ' '.join(f'{k}={v}' for k, v in value.items()) or '{}'
    if isinstance(value, (list, tuple)):
        return ' '.join(map(str, value)) or '[]'
    return str(value)


def _spellings(names: list[str]) -> list[str]:
    """Every long flag also with underscores (``--data_path``): DeiT's and timm's scripts use both spellings."""
    return ['--' + n[2:].replace('-', '_') for n in names if n.startswith('--') and '-' in n[2:]]


def _add(p, group, names: list[str], **kwargs) -> None:
    """One option in its --help section, plus its underscore spellings hidden from --help."""
    group.add_argument(*names, **kwargs)
    hidden = _spellings(names)
    if hidden:
        p.add_argument(*hidden, **{**kwargs, 'help': argparse.SUPPRESS})


def build_parser() -> argparse.ArgumentParser:
    """argparse over the Config fields, in --help sections, with DeiT's and timm's spellings.

    Every argparse default is None so that only what the user typed counts as set (it then overrides ``-c`` YAML
    values); --help states the dataclass default instead. Abbreviations are off: ``--model`` is a flag of its own,
    never a prefix of ``--model-ema``.
    """
    p = _ArgumentParser(description='vitkd: knowledge distillation into vision transformers. Every flag also takes '
                                    'underscores (--data_path). Without --data-path the embedded Fashion-MNIST '
                                    'preset (scripts/configs/embedded.yaml) replaces some defaults.',
                        formatter_class=argparse.HelpFormatter, argument_default=None, allow_abbrev=False)
    p.add_argument('-c', '--config', help='YAML file of defaults (CLI flags override it), or a preset by name: '
                                          f'{", ".join(preset_names())} (scripts/configs/NAME.yaml)')
    _add(p, p, ['--list-losses'], action='store_true', help='list the registered distillation methods and exit')
    p.add_argument('--debug', action='store_true', help='show the traceback of a failure (also VITKD_DEBUG=1)')
    groups = {name: p.add_argument_group(name) for name in _SECTIONS}
    opening = {field: name for name, field in _SECTIONS.items()}
    hints, section = _hints(), 'data'
    for f in dataclasses.fields(Config):
        section = opening.get(f.name, section)
        group = groups[_SECTION_OF.get(f.name, section)]
        names = ['--' + f.name.replace('_', '-'), *f.metadata.get('aliases', ())]
        typ = hints[f.name]
        base = get_args(typ)[0] if get_origin(typ) is Union else typ
        helptext = f'{f.metadata.get("help", "")} (default: {_default_text(f)})'.replace('%', '%%')
        if 'default' in f.metadata.get('help', '') or 'unset =' in f.metadata.get('help', ''):  # says it already
            helptext = f.metadata['help'].replace('%', '%%')
        if base is bool:
            _add(p, group, names, dest=f.name, action=_Switch, default=None, help=helptext)
        elif base in (list, dict):
            _add(p, group, names, dest=f.name, nargs=f.metadata.get('nargs') or '*', default=None, help=helptext,
                 type=_LIST_TYPES.get(f.name, str))
        elif f.name == 'input_size':
            _add(p, group, names, dest=f.name, nargs='+', type=int, default=None, metavar='SIZE', help=helptext)
        else:
            _add(p, group, names, dest=f.name, type=base if base in (int, float) else str, default=None,
                 choices=f.metadata.get('choices'), help=helptext)
    _add(p, groups['teacher'], ['--teacher-model'], dest='habit_teacher_model', default=None, metavar='NAME',
         help='DeiT\'s teacher architecture: = --teacher NAME; with --teacher-path, the architecture of its weights')
    _add(p, groups['teacher'], ['--teacher-path'], dest='habit_teacher_path', default=None, metavar='PATH',
         help='DeiT\'s teacher weights: a .safetensors file (its architecture from --teacher-model), a save_for_hf '
              'folder or hf-hub:org/name')
    _add(p, groups['distillation'], ['--distillation-type'], dest='habit_distillation_type', choices=tuple(_DEIT_TYPES),
         default=None, help='DeiT\'s spelling: none | soft | hard = --distill none | deit_soft | deit_hard')
    _add(p, groups['distillation'], ['--distillation-alpha'], dest='habit_distillation_alpha', type=float,
         default=None, metavar='ALPHA',
         help='DeiT\'s α: the deit_soft / deit_hard weight (task CE × 1 − α) (default: 0.5)')
    _add(p, groups['distillation'], ['--distillation-tau'], dest='habit_distillation_tau', type=float, default=None,
         metavar='TAU',
         help='DeiT\'s τ: the deit_soft temperature (hard distillation has none) (default: 1.0)')
    _add(p, groups['augmentation'], ['--repeated-aug'], dest='habit_repeated_aug', action=_Switch, default=None,
         help='DeiT\'s repeated augmentation: = --aug-repeats 3 (--no-repeated-aug = 1)')
    _add(p, groups['run'], ['--amp'], dest='habit_amp', action='store_true', default=None,
         help='mixed precision: = --mixed-precision bf16 (fp16 with --mixed-precision fp16)')
    _add(p, groups['run'], ['--compile'], dest='habit_compile', action=_Switch, default=None,
         help='torch.compile teacher and student (= --compile-teacher --compile-student; either can be turned off '
              'with --no-compile-teacher / --no-compile-student)')
    _add(p, groups['data'], ['--pin-mem'], dest='habit_pin_mem', action='store_true', default=None,
         help='accepted for DeiT\'s scripts: loader memory is pinned whenever a GPU is used')
    for flag, reason in _REFUSED.items():
        _add(p, p, [flag], action=_Refused, reason=reason)
    return p


def load_yaml(path: str) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ConfigError(f'cannot read config {path!r}: {e.strerror}') from None
    except UnicodeDecodeError:
        raise ConfigError(f'config {path!r} is not a text (UTF-8) file') from None
    except yaml.YAMLError as e:
        raise ConfigError(f'config {path!r} is not valid YAML: {str(e).splitlines()[0]}') from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ConfigError(f'config {path!r} must be a mapping of option: value (option names as keys)')
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
    if ok is not None and not (isinstance(value, ok) and not (base in (int, float) and isinstance(value, bool))):
        name = getattr(base, '__name__', str(base))
        raise ConfigError(f'config {path!r}: {key} must be {"a" if name != "int" else "an"} {name}'
                          f'{" or null" if optional else ""}, got {value!r}')
    from .validate import check_yaml_value
    check_yaml_value(path, key, value)


def resolve(cli: dict, yaml_values: Optional[dict] = None) -> Config:
    """Config from explicitly-set CLI values and YAML values (see the module docstring for the order)."""
    yaml_values = yaml_values or {}
    explicit = {**yaml_values, **{k: v for k, v in cli.items() if v is not None}}
    if isinstance(explicit.get('data_path'), str) and not explicit['data_path'].strip():
        raise ConfigError('--data-path is empty (an unset shell variable?); give the folder with train/ and val/, or '
                          'leave --data-path out for the embedded Fashion-MNIST')
    dataset, task = explicit.get('dataset', 'auto'), explicit.get('task', 'classify')
    if dataset == 'auto':
        data_path = explicit.get('data_path')
        folder = {'detect': 'coco', 'segment': 'segfolder'}.get(task, 'imagefolder')
        dataset = ('hf' if str(data_path).startswith('hf-hub:') else folder) if data_path else 'fashion_mnist'
    values = embedded_default(task) if dataset == 'fashion_mnist' and not explicit.get('data_path') else {}
    values.update(explicit)
    values['dataset'] = dataset
    for key in ('student_kwargs', 'teacher_kwargs'):
        if key in values:
            try:
                values[key] = _kv(values[key])
            except ConfigError as e:
                raise ConfigError(f'--{key.replace("_", "-")}: {e}') from None
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
        if choices and value is not None and value not in choices:
            raise ConfigError(f'--{f.name.replace("_", "-")} {value!r} is not one of {", ".join(choices)}')
    positive = dict(batch_size=cfg.batch_size, epochs=cfg.epochs, grad_accum_steps=cfg.grad_accum_steps,
                    lr=cfg.lr)
    for name, value in positive.items():
        if not isinstance(value, (int, float)) or value <= 0:
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
    from .validate import validate_options
    validate_options(cfg)


PRESETS = REPO / 'scripts' / 'configs'


def preset_names() -> list[str]:
    """The presets ``-c NAME`` accepts: the YAML files of ``scripts/configs/`` by stem (``kd++``, ``vkd_deit_s``)."""
    return sorted(path.stem for path in PRESETS.glob('*.yaml'))


def config_path(spec: str) -> str:
    """``-c`` value → a YAML file: an existing path as given, else the preset of that name."""
    if Path(spec).exists() or spec.endswith(('.yaml', '.yml')) and not (PRESETS / spec).is_file():
        return spec
    name = spec[:-5] if spec.endswith('.yaml') else spec
    if (PRESETS / f'{name}.yaml').is_file():
        return str(PRESETS / f'{name}.yaml')
    raise ConfigError(f'-c {spec!r}: no such file and no preset of that name; presets (scripts/configs/): '
                      f'{", ".join(preset_names())}')


def _apply_habits(args: argparse.Namespace, cli: dict) -> None:
    """Turn DeiT's and timm's flags that are no Config field (``--teacher-model``, ``--amp``, ``--input-size 3 224
    224`` …) into the fields they mean; a flag that contradicts the explicit field it maps to is an error."""
    def take(name: str, value: Any, flag: str) -> None:
        if cli.get(name) is not None and cli[name] != value:
            shown = ' '.join(map(str, cli[name])) if isinstance(cli[name], list) else cli[name]
            raise ConfigError(f'{flag} contradicts --{name.replace("_", "-")} {shown}: give one of them')
        cli[name] = value

    size = cli.get('input_size')
    if isinstance(size, list):
        if len(size) == 1:
            cli['input_size'] = size[0]
        elif len(size) == 3 and size[1] == size[2]:
            cli['input_size'] = size[1]
        else:
            raise ConfigError(f'--input-size {" ".join(map(str, size))}: give one side (224) or C H W with H = W '
                              '(3 224 224); images are square crops')
    model, path = args.habit_teacher_model, args.habit_teacher_path
    if path is not None:
        if '://' in path or path.endswith(('.pth', '.pt', '.bin', '.tar')):
            raise ConfigError(f'--teacher-path {path}: teachers load from safetensors, never from pickled checkpoints; '
                              'DeiT\'s RegNetY-16GF is timm\'s regnety_160.deit_in1k: use --teacher-model regnety_160 '
                              '(downloads its weights), or a .safetensors file with --teacher-model ARCH')
        take('teacher', path, f'--teacher-path {path}')
        if model is not None and path.endswith('.safetensors'):
            take('teacher_arch', model, f'--teacher-model {model}')
    elif model is not None:
        take('teacher', model, f'--teacher-model {model}')
    if args.habit_distillation_type is not None:
        kind = args.habit_distillation_type
        take('distill', [_DEIT_TYPES[kind]], f'--distillation-type {kind}')
    if args.habit_amp:
        take('mixed_precision', 'bf16', '--amp')
    if args.habit_repeated_aug is not None:
        take('aug_repeats', 3 if args.habit_repeated_aug else 1,
             '--repeated-aug' if args.habit_repeated_aug else '--no-repeated-aug')
    if args.habit_compile is not None:
        for name in ('compile_teacher', 'compile_student'):
            cli[name] = args.habit_compile if cli[name] is None else cli[name]


def _method_names(cfg: Config) -> list[str]:
    return [m.get('name', '') if isinstance(m, dict) else str(m).partition(':')[0] for m in cfg.distill]


def _apply_deit_options(args: argparse.Namespace, cfg: Config) -> None:
    """``--distillation-alpha`` / ``--distillation-tau`` → the options of the run's DeiT method (after ``-c`` and
    ``--distill`` are resolved, so they also apply to a preset's deit_hard)."""
    alpha, tau = args.habit_distillation_alpha, args.habit_distillation_tau
    if alpha is None and tau is None:
        return
    names = _method_names(cfg)
    deit = [n for n in names if n in ('deit_soft', 'deit_hard')]
    if not deit:
        raise ConfigError(f'--distillation-alpha/--distillation-tau set DeiT\'s deit_soft/deit_hard options, but the '
                          f'methods are {" ".join(names)}; add --distillation-type soft|hard, or set another '
                          'method\'s options with --loss-opts NAME.OPTION=VALUE')
    extra = [f'{n}.alpha={alpha}' for n in deit if alpha is not None]
    extra += [f'deit_soft.temperature={tau}' for n in deit if n == 'deit_soft' and tau is not None]
    cfg.loss_opts = [*cfg.loss_opts, *extra]


def parse_args(argv=None) -> tuple[Config, argparse.Namespace]:
    """Parse the command line (+ ``-c`` YAML or preset) into a validated :class:`Config`."""
    args = build_parser().parse_args(argv)
    yaml_values = load_yaml(config_path(args.config)) if args.config else {}
    cli = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)}
    _apply_habits(args, cli)
    presets = set(preset_names())
    for name in (str(m).partition(':')[0] for m in cli['distill'] or ()):
        if name in presets:
            raise ConfigError(f'--distill {name}: {name} is a preset (scripts/configs/{name}.yaml), not a method; run '
                              f'it with -c {name}')
    cfg = resolve(cli, yaml_values)
    _apply_deit_options(args, cfg)
    return cfg, args


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
