"""Every option of the command line and every key of a YAML config, driven with bad values.

Each option of ``build_parser()`` (iterated from its ``_actions``, so an option added later is fuzzed too) gets a
wrong type, a negative number, zero, nan, inf, a huge number and an empty string; each Config key gets the same in a
YAML file, plus values of the wrong YAML type. ``main.main`` runs in-process and must answer exit code 2, one line
``error: …`` that names the option (or key), no traceback, and leave an existing run dir byte-identical. Values a run
legitimately accepts (0 loader workers, seed 0, a teacher of ``none``…) are listed in :data:`ACCEPTED` with the
reason, and checked to pass validation instead. Validation builds nothing: :func:`vitkd.devices.make_accelerator`, the
first step after it, is replaced by a tripwire, so a value that slips through fails the test at once and cheaply.

Every option of every registered method (read from the registry, so a new method is fuzzed too) gets the same junk
plus its domain's own edges, with the method selected: a value inside the domain (judged by a second reading of the
domain, written apart from :mod:`vitkd.domains`) must validate and reach the method, any other value must be the
one-line exit-2 refusal naming the method, the option and the value. DeiT's flags are driven the same way with a
DeiT method.
"""
import copy
import dataclasses
import hashlib
import math
from pathlib import Path
from typing import Union, get_args, get_origin

import pytest
import yaml

import main
import vitkd.cli
from vitkd.config import Config
from vitkd.arguments import _hints, build_parser, parse_args
from vitkd.errors import ConfigError

BAD_VALUES = ['abc', '-1', '0', 'nan', 'inf', '1e400', '99999999999999999999', '']
NOT_FUZZED = {'help': 'prints the help and exits 0', 'config': 'a file path: the YAML fuzz below drives its keys',
              'list_losses': 'a switch that takes no value', 'debug': 'a switch that takes no value'}
_FREE_NAME = ('a name or path resolved by the build (model registry, file system, Hub); its failures are one-line '
              'errors covered by tests/test_reliability.py CASES')
_ZERO_OFF = 'zero is a documented setting (off / none / no decay)'
_UNBOUNDED = 'no upper bound: any finite value in range is a valid setting'

# (flag, value) -> why the value is legitimately accepted.
ACCEPTED = {
    ('--num-workers', '0'): 'no loader workers: the main process loads',
    ('--seed', '0'): 'a valid seed',
    ('--teacher', 'abc'): _FREE_NAME, ('--teacher', '-1'): _FREE_NAME, ('--teacher', '0'): _FREE_NAME,
    ('--teacher', 'nan'): _FREE_NAME, ('--teacher', 'inf'): _FREE_NAME, ('--teacher', '1e400'): _FREE_NAME,
    ('--teacher', '99999999999999999999'): _FREE_NAME, ('--teacher', ''): 'an empty --teacher means none',
    ('--aa', ''): 'an empty --aa means none (no RandAugment)',
    ('--remode', ''): "timm's RandomErasing treats an empty mode as const",
}
for _flag in ('--teacher-model', '--teacher-path'):  # DeiT's spellings of --teacher / a weights file, resolved later
    for _v in BAD_VALUES:
        ACCEPTED[(_flag, _v)] = _FREE_NAME
for _name in ('student', 'data_path', 'output_dir', 'student_ckpt', 'teacher_cache', 'train_subset',
              'hub_license', 'hub_model_id', 'hf_image_column', 'hf_label_column', 'train_split', 'val_split',
              'finetune'):
    for _v in BAD_VALUES[:-1]:
        ACCEPTED[('--' + _name.replace('_', '-'), _v)] = _FREE_NAME
del ACCEPTED[('--hub-model-id', '-1')]  # a Hub name cannot start with '-': rejected by huggingface_hub's own check
for _name in ('drop_path', 'task_weight', 'weight_decay', 'momentum', 'min_lr', 'warmup_epochs', 'warmup_lr',
              'model_ema_decay', 'color_jitter', 'hflip', 'reprob', 'smoothing', 'mixup', 'cutmix', 'mixup_prob',
              'mixup_switch_prob'):
    ACCEPTED[('--' + _name.replace('_', '-'), '0')] = _ZERO_OFF
for _name in ('task_weight', 'time_limit', 'lr', 'weight_decay', 'warmup_epochs', 'clip_grad', 'color_jitter', 'mixup',
              'cutmix'):  # --min-lr and --warmup-lr are bounded by --lr
    for _v in ('1e300', '99999999999999999999'):
        ACCEPTED[('--' + _name.replace('_', '-'), _v)] = _UNBOUNDED


def _actions():
    """One action per option (a hidden alias such as ``--data_path`` shares its option's dest and checks)."""
    seen = set(NOT_FUZZED)
    for action in build_parser()._actions:
        if action.dest not in seen:
            seen.add(action.dest)
            yield action


def _values(action):
    """The bad command-line values of one option (a list of argv tails)."""
    if action.nargs == 0:  # an on/off switch: given a value
        return [[f'{action.option_strings[0]}={v}'] for v in ('abc', '0', '')]
    numeric = action.type in (int, float)
    values = BAD_VALUES + (['1e300'] if action.type is float else [])
    if action.dest == 'scale':
        return [[action.option_strings[0], v, v] for v in values]
    return [[action.option_strings[0], v] for v in values if numeric or v != '1e300']


CLI_CASES = [(action.dest, tail) for action in _actions() for tail in _values(action)]


def _accepted_key(dest: str, tail) -> tuple:
    return (tail[0], tail[1] if len(tail) >= 2 else None)


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else 'dir'
            for p in sorted(root.rglob('*'))}


@pytest.fixture(scope='module')
def previous(tmp_path_factory) -> Path:
    """A run dir with a run's files in it (no real training needed: nothing may touch it)."""
    out = tmp_path_factory.mktemp('fuzz') / 'run'
    ckpt = out / 'checkpoints' / 'step_00000004'
    ckpt.mkdir(parents=True)
    (out / 'config.yaml').write_text(yaml.safe_dump(dataclasses.asdict(Config())))
    (out / 'log.jsonl').write_text('{"kind": "epoch", "epoch": 0}\n')
    (ckpt / 'trainer_state.json').write_text('{"state": {"epoch": 1, "step": 4}}\n')
    return out


@pytest.fixture(autouse=True)
def tripwire(monkeypatch):
    """The first step after validation: reaching it means a bad value was accepted."""
    def reached(*args):
        raise AssertionError('validation accepted the value: make_accelerator was reached')
    monkeypatch.setattr(vitkd.cli, 'make_accelerator', reached)


def _base(out: Path) -> list:
    return ['--data-path', str(out.parent / 'data'), '--output-dir', str(out), '--overwrite']


def _names(dest: str) -> list[str]:
    action = next(a for a in build_parser()._actions if a.dest == dest)
    return [*action.option_strings, dest]


def _assert_rejected(code, err, names, before, previous):
    lines = [line for line in err.splitlines() if line.startswith('error:')]
    assert code == 2 and len(lines) == 1 and 'Traceback' not in err, err[-2000:]
    assert any(n in lines[0] for n in names), (names, lines[0])
    assert snapshot(previous) == before


@pytest.mark.parametrize('dest,tail', CLI_CASES, ids=[' '.join(t) or d for d, t in CLI_CASES])
def test_every_option_rejects_bad_values(dest, tail, previous, capsys):
    if _accepted_key(dest, tail) in ACCEPTED:
        parse_args(_base(previous) + tail)  # a legitimately accepted value (reason in ACCEPTED) passes validation
        return
    before = snapshot(previous)
    capsys.readouterr()
    code = main.main(_base(previous) + tail)
    _assert_rejected(code, capsys.readouterr().err, _names(dest), before, previous)


# ---- YAML ------------------------------------------------------------------------------------------------------------

def _yaml_cases():
    """(key, bad YAML value, the CLI value it corresponds to or None) for every Config field."""
    cases = []
    for f in dataclasses.fields(Config):
        typ = _hints()[f.name]
        optional = get_origin(typ) is Union and type(None) in get_args(typ)
        base = next(t for t in get_args(typ) if t is not type(None)) if get_origin(typ) is Union else typ
        wrong_type = {'a': 1} if base is not dict else 5
        cases.append((f.name, wrong_type, None))
        if not optional:
            cases.append((f.name, None, None))
        if base in (int, float):
            for v, cli in ((-1, '-1'), (0, '0'), (math.nan, 'nan'), (math.inf, 'inf'),
                           (10 ** 20, '99999999999999999999'), ('', ''), ('abc', 'abc')):
                cases.append((f.name, v, cli))
        elif base is bool:
            cases += [(f.name, 'abc', None), (f.name, 1, None)]
        elif base is str:
            cases += [(f.name, '', ''), (f.name, [1], None)]
        elif f.name == 'scale':
            cases += [(f.name, [0.5], None), (f.name, ['a', 'b'], None), (f.name, [math.nan, 1.0], None),
                      (f.name, [0.9, 0.1], None)]
        elif base is list:
            cases += [(f.name, [1], None)]
        elif base is dict:
            cases += [(f.name, ['x'], None)]
    return cases


YAML_CASES = _yaml_cases()


@pytest.mark.parametrize('key,value,cli', YAML_CASES, ids=[f'{k}={v!r}' for k, v, _ in YAML_CASES])
def test_every_yaml_key_rejects_bad_values(key, value, cli, previous, tmp_path, capsys):
    flag = '--' + key.replace('_', '-')
    path = tmp_path / 'bad.yaml'
    path.write_text(yaml.safe_dump({key: value}))
    argv = _base(previous)
    if key in ('data_path', 'output_dir', 'overwrite'):  # the YAML value is the one under test: no CLI override
        i = argv.index(flag)
        del argv[i:i + (1 if key == 'overwrite' else 2)]
    if cli is not None and (flag, cli) in ACCEPTED:
        parse_args(argv + ['-c', str(path)])  # accepted (reason in ACCEPTED): validation passes
        return
    before = snapshot(previous)
    capsys.readouterr()
    code = main.main(argv + ['-c', str(path)])
    _assert_rejected(code, capsys.readouterr().err, [key, flag], before, previous)


# ---- every option of every registered method, from the registry ------------------------------------------------------

def _accepts(domain, value) -> bool:
    """Whether ``value`` lies in ``domain``: a second reading of the domain's declared bounds and names, written apart
    from :mod:`vitkd.domains`' own ``check`` (so a wrong check there and a wrong wiring here both fail)."""
    kind = type(domain).__name__
    is_number = type(value) in (int, float)
    if kind == 'OrNone':
        return value is None or _accepts(domain.inner, value)
    if kind == 'Either':
        return any(_accepts(d, value) for d in domain.domains)
    if kind in ('Real', 'Integer'):
        if not is_number or value != value or value in (math.inf, -math.inf):
            return False
        if kind == 'Integer' and (type(value) is not int or domain.hi is None and abs(value) >= 2 ** 31):
            return False  # without an upper bound of its own, a count stays within a C int
        low_ok = domain.lo is None or value > domain.lo or (value == domain.lo and not domain.lo_open)
        high_ok = domain.hi is None or value < domain.hi or (value == domain.hi and not domain.hi_open)
        return low_ok and high_ok
    if kind == 'OneOf':
        return any(type(value) is type(n) and value == n for n in domain.names)
    if kind == 'Bool':
        return type(value) is bool
    if kind == 'Text':
        return type(value) is str and (domain.empty or value.strip() != '')
    if kind == 'Kwargs':
        return type(value) is dict and all(type(k) is str and k.isidentifier() for k in value)
    if kind == 'ListOf':
        if domain.scalar and type(value) not in (list, tuple) and domain.min_len <= 1:
            return _accepts(domain.item, value)
        return (type(value) in (list, tuple) and len(value) >= domain.min_len
                and (domain.max_len is None or len(value) <= domain.max_len)
                and all(_accepts(domain.item, v) for v in value))
    raise AssertionError(f'the fuzz test does not know the domain {domain!r}: add it to _accepts')


# values every option meets, beside its domain's own edges: zero, negatives, fractions, NaN, infinities, strings,
# empty, booleans where numbers belong, null, lists, a count beyond a C int
JUNK = [0, -1, 0.5, 1, 3, -2.5, math.nan, math.inf, -math.inf, 'abc', '', True, False, None, [], [1], [1, 2],
        {'a': 1}, 10 ** 20]
# number spellings YAML reads as text: a number to the option
TEXT_NUMBERS = {'nan': math.nan, 'inf': math.inf, '-inf': -math.inf, '1e-4': 1e-4, '1e400': math.inf}


def _method_options():
    from vitkd.losses import get_loss_class, list_losses
    from vitkd.losses.base import COMMON_OPTIONS, option_domains
    for name, _ in list_losses():
        for option, domain in {**option_domains(get_loss_class(name)), **COMMON_OPTIONS}.items():
            yield name, option, domain


METHOD_OPTIONS = list(_method_options())


def _same(a, b) -> bool:
    return type(a) is type(b) and (a == b or (a != a and b != b))


def _cases(domain) -> list[tuple[str, object]]:
    """(text as typed after ``=``, the value it stands for) for every junk value and edge of ``domain``."""
    values = JUNK + domain.edges()
    cases = [(yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('\n...').strip(), v) for v in values]
    return cases + list(TEXT_NUMBERS.items())


def _check_refusal(argv, words, capsys) -> None:
    """``main.main(argv)`` ends with exit 2 and one ``error:`` line holding every one of ``words``."""
    capsys.readouterr()
    code = main.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith('error:')]
    assert code == 2 and len(lines) == 1 and 'Traceback' not in err, (argv, err[-2000:])
    assert all(w in lines[0] for w in words), (words, lines[0])


def _method_base(tmp_path: Path) -> list[str]:
    return ['--data-path', str(tmp_path / 'data'), '--output-dir', str(tmp_path / 'run')]


@pytest.mark.parametrize('name,option,domain', METHOD_OPTIONS, ids=[f'{n}.{o}' for n, o, _ in METHOD_OPTIONS])
def test_every_method_option_accepts_its_domain_and_refuses_the_rest(name, option, domain, tmp_path, capsys):
    """``--distill NAME --loss-opts NAME.OPTION=VALUE`` (the option is live): inside the domain the config validates
    and the method gets the value; outside it is a one-line usage error (exit 2) naming the method, the option and
    the value as typed. The first refusal runs the whole command line (``main.main``), the rest the validator on the
    parsed command's Config (the same check, without rebuilding the parser for each value)."""
    from vitkd.validate import distill_spec, validate
    argv = _method_base(tmp_path) + ['--distill', name]
    cfg, _ = parse_args(argv)
    seen, whole_command = set(), True
    for text, value in _cases(domain):
        if text in seen:
            continue
        seen.add(text)
        item = f'{name}.{option}={text}'
        trial = copy.copy(cfg)
        trial.loss_opts = [item]
        if _accepts(domain, value):
            validate(trial)
            method = distill_spec(trial).methods[0]
            given = method.warmup_epochs if option == 'warmup_epochs' else method.options[option]
            assert _same(given, value) or list(given) == list(value), (text, given, value)
        elif whole_command:
            _check_refusal(argv + ['--loss-opts', item], [item, f"{name}'s {option} must be"], capsys)
            whole_command = False
        else:
            with pytest.raises(ConfigError) as refused:
                validate(trial)
            message = str(refused.value)
            assert refused.value.exit_code == 2 and '\n' not in message, message
            assert message.startswith(f'--loss-opts {item}: {name}\'s {option} must be '), message


DEIT_FLAGS = [('soft', '--distillation-alpha', 'deit_soft', 'alpha'),
              ('hard', '--distillation-alpha', 'deit_hard', 'alpha'),
              ('soft', '--distillation-tau', 'deit_soft', 'temperature')]


@pytest.mark.parametrize('kind,flag,name,option', DEIT_FLAGS, ids=[f'{k}{f}' for k, f, _, _ in DEIT_FLAGS])
def test_deit_flags_accept_the_domain_of_the_option_they_set(kind, flag, name, option, tmp_path, capsys):
    """DeiT's ``--distillation-alpha/-tau`` with ``--distillation-type`` (the option is live) go through the domain of
    the method option they stand for, and a refusal names the flag and its value."""
    from vitkd.validate import distill_spec
    from vitkd.losses import get_loss_class
    from vitkd.losses.base import option_domains
    domain = option_domains(get_loss_class(name))[option]
    base = _method_base(tmp_path) + ['--distillation-type', kind]
    for value in [v for v in JUNK + domain.edges() if type(v) in (int, float)] + list(TEXT_NUMBERS.values()):
        number = float(value)  # argparse's type=float
        argv = base + [f'{flag}={value}']
        if _accepts(domain, number):
            cfg, _ = parse_args(argv)
            assert _same(distill_spec(cfg).methods[0].options[option], number)
        else:
            _check_refusal(argv, [f'{flag} {number}', f"{name}'s {option} must be"], capsys)
