"""The command line's options: argparse over :class:`vitkd.config.Config`, DeiT's and timm's flag habits, presets.

:func:`parse_args` turns ``argv`` (+ ``-c`` YAML file or preset) into a validated :class:`~vitkd.config.Config`;
:func:`resolve` does the same from a dict of values (the library's :func:`vitkd.make_config`). Both end in
:func:`vitkd.validate.validate`, the one validator, before anything is built.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from .config import Config, ConfigError, config_from_values, config_path, load_yaml, preset_names, typed_text
from .distill_spec import check_method_option, method_names
from .domains import Domain, OneOf, OrNone
from .losses import list_losses
from .losses._dense import get_dense_loss_class, list_dense_losses
from .validate import validate

__all__ = ['parse_args', 'resolve', 'build_parser', 'list_methods_and_presets']


def _hints() -> dict:
    return get_type_hints(Config)


class _ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are :class:`ConfigError` (one line, exit code 2 from ``main``), not usage + SystemExit.

    A mistyped flag gets a suggestion only when it is a near-certain typo (``--epoch`` → ``--epochs``): a loose match
    sends a user to an unrelated option (``--amp`` is not ``--mixup``).
    """

    def error(self, message: str):
        if message.startswith('unrecognized arguments:'):
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

# DeiT (facebookresearch/deit main.py) and timm (train.py) flags that have no field of their own: translated by
# _apply_habits, or refused with the replacement named.
_LIST_TYPES = {'scale': float, 'scale_jitter': float, 'pyramid_strides': int}  # list options read as numbers

_DEIT_TYPES = {'none': 'none', 'soft': 'deit_soft', 'hard': 'deit_hard'}
_DEIT_DATA_SETS = {'CIFAR': 'cifar100', 'IMNET': 'imagefolder', 'INAT': None, 'INAT19': None}  # DeiT's CIFAR is CIFAR-100
_REFUSED = {
    '--channels-last': 'convolutional teachers already run channels_last (automatic, vitkd/models.py); ViT students '
                       'gain nothing from it: leave the flag out',
    '--no-pin-mem': 'loader memory is pinned whenever a GPU is used and is not a switch here: leave the flag out',
    '--torchcompile': 'use --compile (inductor; student and teacher), --compile-teacher or --compile-student',
    '--amp-dtype': 'use --mixed-precision bf16 or fp16',
    '--log-wandb': 'use --log-with wandb',
    '--eval': 'use --eval-student --student-ckpt PATH (an exported student, a checkpoint or a run dir)',
    '--output': 'use --output-dir (the run dir itself, not a parent of experiment folders)',
    '--device': 'devices come from the launcher: python main.py (one device) or accelerate launch (several)',
    '--world-size': 'processes come from the launcher: accelerate launch --num_processes N main.py ...',
    '--dist-url': 'processes come from the launcher: accelerate launch main.py ...',
}


def _choices(domain: Domain) -> Optional[tuple]:
    """The names a OneOf domain (or its OrNone) accepts, for argparse's choices and --help."""
    domain = domain.inner if isinstance(domain, OrNone) else domain
    return domain.names if isinstance(domain, OneOf) else None


def _default_text(f: dataclasses.Field) -> str:
    """The dataclass default as --help shows it (argparse's own defaults are None: see :func:`build_parser`)."""
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if isinstance(value, bool):
        return 'on' if value else 'off'
    return typed_text(value, '{}' if isinstance(value, dict) else '[]')


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
                 choices=_choices(f.metadata['domain']), help=helptext)
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
         help='torch.compile the teacher and the trained module (= --compile-teacher --compile-student; either can be '
              'turned off with --no-compile-teacher / --no-compile-student)')
    _add(p, groups['data'], ['--data-set'], dest='habit_data_set', choices=tuple(_DEIT_DATA_SETS), default=None,
         help='DeiT\'s spelling: CIFAR = --dataset cifar100 (torchvision\'s, under --data-path), IMNET = --dataset '
              'imagefolder (--data-path with train/ and val/); INAT/INAT19 are refused (their JSON annotations are not '
              'read: arrange the images as an image folder)')
    _add(p, groups['data'], ['--pin-mem'], dest='habit_pin_mem', action='store_true', default=None,
         help='accepted for DeiT\'s scripts: loader memory is pinned whenever a GPU is used')
    for flag, reason in _REFUSED.items():
        _add(p, p, [flag], action=_Refused, reason=reason)
    return p


def resolve(cli: dict, yaml_values: Optional[dict] = None) -> Config:
    """Config from explicitly-set CLI values and YAML values (see the module docstring for the order), validated."""
    cfg = config_from_values(cli, yaml_values or {})
    validate(cfg)
    return cfg


def list_methods_and_presets(task: str = 'classify') -> str:
    """``--list-losses``: the registered methods that work for ``task`` (each works with ``--distill NAME``; a dense
    task lists the methods with a dense form, detection those that need no per-pixel class logits) with their
    papers, then the presets made for ``task`` (``-c NAME``; a preset that shares a method's name runs that method
    with its paper's recipe)."""
    if task == 'classify':
        methods = list_losses()
    else:
        methods = [(n, paper) for n, paper in list_dense_losses()
                   if task == 'segment' or not get_dense_loss_class(n).needs_logits]
    width = max(len(n) for n, _ in methods)
    lines = ['methods (--distill NAME[:WEIGHT], options with --loss-opts NAME.OPTION=VALUE):']
    lines += [f'  {n:<{width}}  {paper}' for n, paper in methods]
    presets = [n for n in preset_names() if load_yaml(config_path(n)).get('task', 'classify') == task]
    lines += ['presets (-c NAME: scripts/configs/NAME.yaml):',
              '  ' + (' '.join(presets) or '(none)')]
    return '\n'.join(lines)


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
    if args.habit_data_set is not None:
        name = args.habit_data_set
        if _DEIT_DATA_SETS[name] is None:
            raise ConfigError(f'--data-set {name}: DeiT\'s iNaturalist loader (its JSON annotations) is not part of '
                              'vitkd; arrange the images as train/CLASS/*.jpg and val/CLASS/*.jpg and use --dataset '
                              'imagefolder --data-path ROOT')
        take('dataset', _DEIT_DATA_SETS[name], f'--data-set {name}')
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


def _apply_deit_options(args: argparse.Namespace, cfg: Config) -> None:
    """``--distillation-alpha`` / ``--distillation-tau`` → the options of the run's DeiT method (after ``-c`` and
    ``--distill`` are resolved, so they also apply to a preset's deit_hard); each value is checked against the
    domain its method declares, naming the flag."""
    alpha, tau = args.habit_distillation_alpha, args.habit_distillation_tau
    if alpha is None and tau is None:
        return
    names = method_names(cfg.distill, preset_names())
    deit = [n for n in names if n in ('deit_soft', 'deit_hard')]
    if not deit:
        raise ConfigError(f'--distillation-alpha/--distillation-tau set DeiT\'s deit_soft/deit_hard options, but the '
                          f'methods are {" ".join(names)}; add --distillation-type soft|hard, or set another '
                          'method\'s options with --loss-opts NAME.OPTION=VALUE')
    if tau is not None and 'deit_soft' not in deit:
        raise ConfigError(f'--distillation-tau {tau}: {" ".join(deit)} takes the teacher\'s argmax, no temperature; '
                          'the temperature is deit_soft\'s (--distillation-type soft), or leave out --distillation-tau')
    extra = []
    for name in deit:
        if alpha is not None:
            check_method_option(name, 'alpha', alpha, f'--distillation-alpha {alpha}')
            extra.append(f'{name}.alpha={alpha}')
        if tau is not None and name == 'deit_soft':
            check_method_option(name, 'temperature', tau, f'--distillation-tau {tau}')
            extra.append(f'{name}.temperature={tau}')
    cfg.loss_opts = [*cfg.loss_opts, *extra]


def parse_args(argv=None) -> tuple[Config, argparse.Namespace]:
    """Parse the command line (+ ``-c`` YAML or preset) into a :class:`Config` validated as a whole (its fields,
    its methods, their options; DeiT's flags included) before anything is built."""
    args = build_parser().parse_args(argv)
    yaml_values = load_yaml(config_path(args.config)) if args.config is not None else {}
    cli = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)}
    _apply_habits(args, cli)
    cfg = config_from_values(cli, yaml_values)
    _apply_deit_options(args, cfg)
    validate(cfg)
    return cfg, args
