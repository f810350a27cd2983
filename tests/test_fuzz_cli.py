"""Every option of the command line and every key of a YAML config, driven with bad values.

Each option of ``build_parser()`` (iterated from its ``_actions``, so an option added later is fuzzed too) gets a
wrong type, a negative number, zero, nan, inf, a huge number and an empty string; each Config key gets the same in a
YAML file, plus values of the wrong YAML type. ``main.main`` runs in-process and must answer exit code 2, one line
``error: …`` that names the option (or key), no traceback, and leave an existing run dir byte-identical. Values a run
legitimately accepts (0 loader workers, seed 0, a teacher of ``none``…) are listed in :data:`ACCEPTED` with the
reason, and checked to pass validation instead. Validation builds nothing: :func:`vitkd.run.make_accelerator`, the
first step after it, is replaced by a tripwire, so a value that slips through fails the test at once and cheaply.
"""
import dataclasses
import hashlib
import math
from pathlib import Path
from typing import Union, get_args, get_origin

import pytest
import yaml

import main
from vitkd import run as runlib
from vitkd.config import Config, _hints, build_parser, parse_args

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
for _name in ('student', 'teacher_arch', 'data_path', 'output_dir', 'student_ckpt', 'teacher_cache', 'train_subset',
              'hub_license', 'hub_model_id', 'hf_image_column', 'hf_label_column', 'train_split', 'val_split',
              'finetune'):
    for _v in BAD_VALUES[:-1]:
        ACCEPTED[('--' + _name.replace('_', '-'), _v)] = _FREE_NAME
del ACCEPTED[('--hub-model-id', '-1')]  # a Hub name cannot start with '-': rejected by huggingface_hub's own check
for _name in ('drop_path', 'task_weight', 'weight_decay', 'momentum', 'min_lr', 'warmup_epochs', 'warmup_lr',
              'model_ema_decay', 'color_jitter', 'hflip', 'reprob', 'smoothing', 'mixup', 'cutmix', 'mixup_prob',
              'mixup_switch_prob'):
    ACCEPTED[('--' + _name.replace('_', '-'), '0')] = _ZERO_OFF
for _name in ('task_weight', 'time_limit', 'lr', 'weight_decay', 'min_lr', 'warmup_epochs', 'warmup_lr', 'clip_grad',
              'color_jitter', 'mixup', 'cutmix'):
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
    def reached(cfg):
        raise AssertionError('validation accepted the value: make_accelerator was reached')
    monkeypatch.setattr(runlib, 'make_accelerator', reached)


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
