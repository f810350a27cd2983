"""Faults from outside and from the user's own changes: a run dir changed between start and resume, a Hub that fails
while downloading or pushing, a full disk while saving, data that is not clean, one process of several failing.

In-process runs use the tiny setup of tests/test_reliability.py (4 classes of 32-px images, a 2-block VkD student, a
random regnety_002 teacher). A refused command must be one ``error:`` line with the README's exit code and leave the
run dir byte-identical (its files hashed before and after).
"""
import errno
import logging
import re
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import main
from vitkd import cli
from test_reliability import base_args, error_line, no_vitkd_frame, run, snapshot
from test_reliability import data, previous  # noqa: F401  (module fixtures: a tiny image folder, a finished run)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures('one_core')


def _with(args: list, option: str, *values) -> list:
    """``args`` with ``option``'s value(s) replaced (a flag followed by its values up to the next flag)."""
    i = args.index(option)
    j = i + 1
    while j < len(args) and not str(args[j]).startswith('--'):
        j += 1
    return args[:i + 1] + list(values) + args[j:]


# ---- a run changed between its start and its resume -------------------------------------------------------------

IDENTITY_CASES = [  # (option, new values, the old → new the line must show)
    ('--distill', ['dkd'], '--distill kd, this command has --distill dkd (kd → dkd)'),
    ('--teacher', ['regnety_004'], '(regnety_002 → regnety_004)'),
    ('--student-kwargs', ['img_size=32', 'patch_size=4', 'depth=3', 'embed_dim=32', 'num_heads=2'],
     'depth=2 embed_dim=32 num_heads=2 → img_size=32 patch_size=4 depth=3'),
    ('--student', ['deit_tiny_distilled_patch16_224'], '(deit_ti_distilled → deit_tiny_distilled_patch16_224)'),
]


@pytest.mark.parametrize('option,values,shown', IDENTITY_CASES, ids=[c[0] for c in IDENTITY_CASES])
def test_resuming_with_another_method_teacher_or_student_is_refused(option, values, shown, previous, data, capsys):
    before = snapshot(previous)
    args = _with(base_args(data, previous), option, *values) + ['--resume', 'auto']
    code, _, err = run(args, capsys)
    line = error_line(err)
    assert code == 2 and shown in line and option in line and '--overwrite' in line, line
    assert snapshot(previous) == before


def _changed_copy(data: Path, where: Path, change: str) -> Path:
    copy = shutil.copytree(data, where)
    train = copy / 'train'
    if change == 'added':
        shutil.copy(train / 'class0' / '0.png', train / 'class0' / 'extra.png')
    elif change == 'removed':
        (train / 'class1' / '3.png').unlink()
    elif change == 'renamed':
        (train / 'class2' / '3.png').rename(train / 'class2' / 'other.png')
    elif change == 'class added':
        for split in ('train', 'val'):
            shutil.copytree(copy / split / 'class0', copy / split / 'class9')
    return copy


@pytest.mark.parametrize('change,shown', [('added', '16 → 17 images, 1 image added'),
                                          ('removed', '16 → 15 images, 1 image removed'),
                                          ('renamed', 'the same number of images, other files'),
                                          ('class added', 'trained on 4 classes and the data now has 5 (4 → 5)')])
def test_resuming_on_a_changed_training_set_is_refused(change, shown, previous, data, tmp_path, capsys):
    before = snapshot(previous)
    changed = _changed_copy(data, tmp_path / 'data', change)
    code, _, err = run(_with(base_args(data, previous), '--data-path', changed) + ['--resume', 'auto'], capsys)
    line = error_line(err)
    assert code == 2 and shown in line and 'fresh run' in line, line
    assert snapshot(previous) == before


def test_more_epochs_on_a_moved_but_identical_data_set_goes_on_and_says_so(previous, data, tmp_path, capsys):
    """The data folder copied elsewhere keeps its fingerprint (relative paths): the resume is accepted."""
    out = shutil.copytree(previous, tmp_path / 'run')
    moved = shutil.copytree(data, tmp_path / 'moved')
    code, stdout, err = run(_with(base_args(moved, out), '--epochs', '2') + ['--resume', 'auto'], capsys)
    assert code == 0, err[-3000:]
    said = [line for line in stdout.splitlines() if line.startswith('resumed from')]
    assert len(said) == 1 and 'training goes on with --epochs 1 → 2' in said[0], stdout
    assert json.loads((out / 'summary.json').read_text())['steps'] == 8  # 4 more steps of 4 images


def test_a_checkpoint_records_the_training_sets_fingerprint(previous, data):
    """Independent count: the images on disk, their relative paths hashed by hand."""
    import hashlib
    state = json.loads(next((previous / 'checkpoints').glob('step_*/trainer_state.json')).read_text())
    root = data / 'train'
    items = [f'{p.relative_to(root)}\t{c}' for c, folder in enumerate(sorted(root.iterdir()))
             for p in sorted(folder.iterdir())]
    assert state['data'] == {'samples': 16, 'sha256': hashlib.sha256('\n'.join(items).encode()).hexdigest(),
                             'num_classes': 4}


def test_sigterm_while_evaluating_the_last_step_resumes_without_an_extra_step(data, tmp_path, monkeypatch, capsys):
    """--max-steps 2 of a 4-step epoch; SIGTERM arrives during the evaluation after step 2: the checkpoint is step 2
    and the resumed run evaluates and exports it without training a third step."""
    out = tmp_path / 'run'
    args = base_args(data, out) + ['--max-steps', '2']
    real = cli._evaluate_student
    calls = []

    def terminated_while_evaluating(r, accelerator):
        if not calls:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler sets the flag; evaluation goes on
        calls.append(r.state.step)
        return real(r, accelerator)

    monkeypatch.setattr(cli, '_evaluate_student', terminated_while_evaluating)
    code, _, err = run(args, capsys)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert [p.name for p in (out / 'checkpoints').glob('step_*')] == ['step_00000002']
    code, _, err = run(args + ['--resume', 'auto'], capsys)
    assert code == 0, err[-3000:]
    assert calls == [2, 2]
    assert json.loads((out / 'summary.json').read_text())['steps'] == 2
    assert not (out / 'checkpoints' / 'step_00000003').exists()


# ---- the Hub failing: 500, no answer, a dropped connection ---------------------------------------------------------

FAULTS = {'500': 'answered HTTP 500 Internal Server Error', 'hang': 'timed out',
          'drop': 'closed the connection without a complete answer'}


@pytest.fixture(scope='module')
def hub():
    from test_export_hub import FakeHub
    server = FakeHub()
    yield server
    server.close()


@pytest.fixture
def online(hub, tmp_path, monkeypatch):
    """huggingface_hub in this process pointed at the local Hub (with the test's token), online, with its own cache,
    1-second timeouts and its retry pacing shortened: its second try of a download waits 60 s per request and its
    back-off sleeps 1 + 2 + 4 + 8 + 8 s; the same retries run, without the waiting."""
    import huggingface_hub.file_download as file_download
    import huggingface_hub.utils._http as http
    import time
    import types
    from huggingface_hub import constants
    from test_export_hub import TOKEN
    for name, value in dict(ENDPOINT=hub.url,
                            HUGGINGFACE_CO_URL_TEMPLATE=hub.url + '/{repo_id}/resolve/{revision}/{filename}',
                            HF_HUB_OFFLINE=False, HF_HUB_CACHE=str(tmp_path / 'hub_cache'),
                            HF_TOKEN_PATH=str(tmp_path / 'no_token'), HF_HUB_DOWNLOAD_TIMEOUT=1,
                            HF_HUB_ETAG_TIMEOUT=1).items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(file_download, '_ETAG_RETRY_TIMEOUT', 1)
    monkeypatch.setattr(http, 'time', types.SimpleNamespace(sleep=lambda seconds: None, time=time.time,
                                                            monotonic=time.monotonic))
    monkeypatch.setenv('HF_HUB_OFFLINE', '0')
    monkeypatch.setenv('HF_TOKEN', TOKEN)
    yield monkeypatch
    hub.faults, hub.read_only = {}, False


def push_script(args, capsys) -> tuple[int, str, str]:
    """``python scripts/push_to_hub.py ARGS``, in this process."""
    import runpy
    import sys
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, 'argv', ['scripts/push_to_hub.py', *map(str, args)])
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(REPO / 'scripts' / 'push_to_hub.py'), run_name='__main__')
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


@pytest.mark.parametrize('mode', list(FAULTS))
def test_a_failing_hub_while_downloading_the_teacher_is_one_line_saying_what_happened(mode, hub, online, data, tmp_path,
                                                                                       capsys):
    out = tmp_path / 'run'
    hub.faults = {r'^/org/teacher-' + mode: mode}
    code, _, err = run([*_with(base_args(data, out), '--teacher', f'hf-hub:org/teacher-{mode}'),
                        '--teacher-pretrained'], capsys)
    line = error_line(err)
    assert code == 4, err[-3000:]
    assert FAULTS[mode] in line and f'hf-hub:org/teacher-{mode}' in line and hub.url in line, line
    assert 'cannot be reached' not in line and 'rerun the same command' in line
    assert any(f.startswith(mode) for f in hub.faulted)
    assert not out.exists()  # the teacher is built before anything is written


@pytest.mark.parametrize('mode', ['500', 'drop'])
def test_a_failing_hub_while_downloading_a_student_or_a_data_set_is_one_line(mode, hub, online, data, tmp_path,
                                                                             capsys):
    hub.faults = {f'^/(api/)?(datasets/)?org/(student|data)-{mode}': mode}
    code, _, err = run(['--eval-student', '--student-ckpt', f'hf-hub:org/student-{mode}', '--data-path', data,
                        '--num-workers', '0', '--output-dir', tmp_path / 'eval'], capsys)
    line = error_line(err)
    assert code == 4 and FAULTS[mode] in line and f'hf-hub:org/student-{mode}' in line, line
    import datasets
    online.setattr(datasets.config, 'HF_ENDPOINT', hub.url)
    online.setattr(datasets.config, 'HF_HUB_OFFLINE', False)
    online.setattr(datasets.config, 'HF_DATASETS_OFFLINE', False)
    online.setattr(datasets.config, 'HF_DATASETS_CACHE', tmp_path / 'datasets_cache')
    code, _, err = run(_with(base_args(data, tmp_path / 'run'), '--data-path', f'hf-hub:org/data-{mode}'), capsys)
    line = error_line(err)
    assert code == 4 and FAULTS[mode] in line and f'hf-hub:org/data-{mode}' in line, line
    assert not (tmp_path / 'run').exists()


@pytest.fixture(scope='module')
def finished_export(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('export') / 'run'
    assert main.main(base_args(data, out)) == 0
    return out


@pytest.mark.parametrize('mode', list(FAULTS))
def test_a_failing_hub_while_pushing_keeps_the_export_and_its_retry_command_works(mode, hub, online, finished_export,
                                                                                  capsys):
    import shlex
    out = finished_export
    repo = f'org/push-{mode}'
    before = {p.name: p.read_bytes() for p in (out / 'student').iterdir() if p.name != 'README.md'}
    hub.faults = {f'^/api/models/{repo}/': mode}
    code, _, err = push_script([out, '--hub-model-id', repo], capsys)
    hub.faults = {}
    line = error_line(err)
    assert code == 4 and FAULTS[mode] in line and 'export is intact' in line, err[-3000:]
    if mode == 'hang':
        assert 'after 1 s; HF_HUB_DOWNLOAD_TIMEOUT' in line
    assert {p.name: p.read_bytes() for p in (out / 'student').iterdir() if p.name != 'README.md'} == before
    assert 'model.safetensors' not in hub.repos.get(repo, {})
    retry = shlex.split(line.split('retry with: ', 1)[1])
    assert retry[:2] == ['python', 'scripts/push_to_hub.py']
    code, _, err = push_script(retry[2:], capsys)
    assert code == 0, err[-3000:]
    assert hub.repos[repo]['model.safetensors'] == before['model.safetensors']


def test_a_failed_push_at_the_end_of_training_keeps_the_run_and_prints_the_retry(hub, online, data, tmp_path, capsys):
    out = tmp_path / 'run'
    hub.faults = {'^/api/models/org/end-500/': '500'}
    code, _, err = run(base_args(data, out) + ['--push-to-hub', '--hub-model-id', 'org/end-500'], capsys)
    line = error_line(err)
    assert code == 4 and FAULTS['500'] in line, err[-3000:]
    assert f'retry with: python scripts/push_to_hub.py {out} --hub-model-id org/end-500' in line
    assert (out / 'student' / 'model.safetensors').is_file() and (out / 'summary.json').is_file()


@pytest.mark.parametrize('case', ['missing', 'invalid', 'read-only', 'hub 500'])
def test_push_to_hub_with_a_bad_token_is_refused_before_training(case, hub, online, data, tmp_path, capsys):
    out = tmp_path / 'run'
    if case == 'missing':
        online.delenv('HF_TOKEN')
    elif case == 'invalid':
        online.setenv('HF_TOKEN', 'hf_notTheRightToken')
    hub.faults = {'^/api/whoami': '500'} if case == 'hub 500' else {}
    hub.read_only = case == 'read-only'
    code, stdout, err = run(base_args(data, out) + ['--push-to-hub', '--hub-model-id', 'org/token'], capsys)
    line = error_line(err)
    expected = {'missing': 'no Hugging Face token', 'invalid': 'refused the token (HTTP 401',
                'read-only': 'is read-only', 'hub 500': 'checking the token failed: the Hub'}[case]
    assert code == 4 and expected in line and 'nothing was trained or written' in line, line
    assert 'scripts/push_to_hub.py <run dir> --hub-model-id org/token' in line
    if case == 'hub 500':
        assert FAULTS['500'] in line
    assert not out.exists() and 'epoch' not in stdout


# ---- a full disk in the middle of a checkpoint ---------------------------------------------------------------------

@pytest.mark.parametrize('writer,step', [('export_model', 6), ('_save_safetensors', 6), ('_copy_tree_linked', 4)])
def test_a_full_disk_mid_save_leaves_no_tmp_folder_and_the_previous_checkpoint_intact(writer, step, data, tmp_path,
                                                                                      monkeypatch, capsys):
    """One writer of checkpoint ``step`` (its student export, its EMA weights, its copy into best/) writes half a
    file, then fails with ENOSPC: no ``*.tmp`` folder stays, the checkpoint before is byte-identical and complete,
    and the run goes on to its last checkpoint."""
    import vitkd.checkpoint as ck
    out = tmp_path / 'run'
    real = getattr(ck, writer)
    name, previous = f'step_{step:08d}', out / 'checkpoints' / f'step_{step - 2:08d}'
    seen = {}

    def full_disk(*args, **kwargs):
        if 'failed' not in seen and any(name in str(a) for a in args):
            seen['failed'] = True
            seen['previous'] = snapshot(previous)
            folder = Path(args[1]) if writer != '_save_safetensors' else Path(args[1]).parent  # what it writes into
            folder.mkdir(parents=True, exist_ok=True)
            (folder / 'half-written').write_bytes(b'x' * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))
        return real(*args, **kwargs)
    monkeypatch.setattr(ck, writer, full_disk)
    args = base_args(data, out, epochs=2) + ['--save-every-steps', '2', '--keep-last', '10', '--model-ema',
                                             '--model-ema-decay', '0.9']
    code, stdout, err = run(args, capsys)
    assert code == 0, err[-3000:]
    assert seen.get('failed') and 'No space left on device' in stdout, stdout[-3000:]
    assert not list((out / 'checkpoints').glob('*.tmp')) and not list((out / 'checkpoints').rglob('half-written'))
    assert snapshot(previous) == seen['previous'] and ck.checkpoint_problem(previous) is None
    assert ck.checkpoint_problem(out / 'checkpoints' / 'step_00000008') is None  # the run went on


# ---- one process of two failing ------------------------------------------------------------------------------------

ONE_RANK_FAILS = '''
import os, sys
sys.path.insert(0, os.environ['VITKD_REPO'])
import torch
import main
from vitkd import cli
import vitkd.distiller as distiller
RANK, KIND = sys.argv.pop(1), sys.argv.pop(1)
real = distiller.Distiller.forward
calls = []
def forward(self, *args, **kwargs):  # the second training step of one process fails
    calls.append(1)
    if os.environ.get('RANK') == RANK and len(calls) == 2:
        if KIND == 'oom':
            raise torch.OutOfMemoryError('injected: tried to allocate 64.00 GiB')
        raise RuntimeError('injected failure')
    return real(self, *args, **kwargs)
distiller.Distiller.forward = forward
sys.exit(main.main(sys.argv[1:]))
'''


@pytest.mark.slow
@pytest.mark.ci_once
@pytest.mark.parametrize('rank,kind,code,shown', [('1', 'error', 70, 'internal error (RuntimeError: injected failure)'),
                                                  ('0', 'oom', 7, 'out of memory (injected: tried to allocate')])
def test_one_process_failing_ends_the_job_with_its_line_once_and_its_code(rank, kind, code, shown, data, tmp_path):
    """The other process waits in the gradient all-reduce of that step: the job still ends (the subprocess timeout
    bounds it far below the collective's 30-minute timeout), the failure's line is printed once, by the process that
    failed, and the launcher names that process's exit code as the root cause."""
    from test_failures import _launch
    script = tmp_path / 'one_rank_fails.py'
    script.write_text(ONE_RANK_FAILS)
    result = _launch([rank, kind, *base_args(data, tmp_path / 'run', epochs=2), '--batch-size', '2'], tmp_path, script)
    lines = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(lines) == 1 and shown in lines[0], result.stderr[-4000:]
    root = result.stderr.split('Root Cause', 1)[1]
    assert f'rank      : {rank} ' in root and f'exitcode  : {code} ' in root, result.stderr[-3000:]
    assert no_vitkd_frame(result.stderr)


# ---- a teacher whose weights do not fit its architecture -----------------------------------------------------------

@pytest.fixture(scope='module')
def teacher_folder(tmp_path_factory) -> Path:
    """A 4-class regnety_002 in timm's save_for_hf format."""
    import timm
    from timm.models import save_for_hf
    folder = tmp_path_factory.mktemp('teacher') / 'regnety_002'
    save_for_hf(timm.create_model('regnety_002', num_classes=4), folder, safe_serialization=True)
    return folder


def _other_config(folder: Path, tmp_path: Path, how: str) -> list:
    """Teacher arguments whose weights are regnety_002's and whose architecture is another one."""
    import timm
    from timm.models import save_for_hf
    if how == 'bare file, another --teacher-arch':
        return ['--teacher', folder / 'model.safetensors', '--teacher-arch', 'regnety_004']
    copy = shutil.copytree(folder, tmp_path / 'teacher')
    if how == 'config names another timm model':
        config = json.loads((copy / 'config.json').read_text())
        config['architecture'] = 'regnety_004'
        (copy / 'config.json').write_text(json.dumps(config))
    else:  # the whole config.json of another model
        other = tmp_path / 'resnet'
        save_for_hf(timm.create_model('resnet10t', num_classes=4), other, safe_serialization=True)
        shutil.copy(other / 'config.json', copy / 'config.json')
    return ['--teacher', copy]


@pytest.mark.parametrize('how', ['config names another timm model', 'config.json of another model',
                                 'bare file, another --teacher-arch'])
def test_teacher_weights_that_do_not_fit_their_architecture_are_one_line_exit_2(how, teacher_folder, previous, data,
                                                                               tmp_path, capsys):
    before = snapshot(previous)
    args = base_args(data, previous) + _other_config(teacher_folder, tmp_path, how)  # the last --teacher counts
    code, _, err = run(args + ['--teacher-pretrained', '--overwrite'], capsys)
    line = error_line(err)
    assert code == 2 and 'do not fit the architecture' in line and ('missing keys' in line or 'shape' in line), line
    assert snapshot(previous) == before


# ---- data that is not clean ----------------------------------------------------------------------------------------

def _nan_tiff(path: Path, bad=float('nan')) -> Path:
    pixels = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    pixels[5, 7] = bad
    Image.fromarray(pixels, mode='F').save(path)
    return path


@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -float('inf')])
def test_a_float_image_with_nan_or_inf_pixels_is_unreadable_not_guessed(bad, tmp_path):
    from vitkd.data import CorruptImage, load_image
    path = _nan_tiff(tmp_path / 'x.tiff', bad)
    assert Image.open(path).mode == 'F' and not np.isfinite(np.asarray(Image.open(path))).all()  # control
    with pytest.raises(CorruptImage, match=r'1 of its 1024 float pixels are NaN or infinite'):
        load_image(str(path))
    clean = _nan_tiff(tmp_path / 'clean.tiff', 0.5)
    assert np.asarray(load_image(str(clean)))[5, 7, 0] == round(0.5 * 255)  # the same image without it reads


def test_nan_images_stray_files_and_empty_classes_in_a_training_run(data, tmp_path, caplog, capsys):
    """A run on a folder with a NaN TIFF, a notes file, a CSV and an empty class folder: the TIFF is skipped and
    counted in the epoch's warning, the two stray files are counted and named once, the empty class is reported."""
    folder = shutil.copytree(data, tmp_path / 'data')
    _nan_tiff(folder / 'train' / 'class1' / 'scan.tiff')
    (folder / 'train' / 'class0' / 'notes.txt').write_text('labelled by hand')
    (folder / 'train' / 'class2' / 'labels.csv').write_text('a,b\n')
    for split in ('train', 'val'):
        (folder / split / 'class9').mkdir()
    with caplog.at_level(logging.WARNING, logger='vitkd.data'):
        code, stdout, err = run(_with(base_args(data, tmp_path / 'run'), '--data-path', folder), capsys)
    assert code == 0, err[-3000:]
    strays = [r.getMessage() for r in caplog.records if 'not images by their extension' in r.getMessage()]
    assert len(strays) == 1 and 'ignored 2 file(s)' in strays[0], strays
    assert 'class0/notes.txt' in strays[0] and 'class2/labels.csv' in strays[0]
    skipped = [r.getMessage() for r in caplog.records if 'skipping unreadable image' in r.getMessage()]
    assert skipped and all('scan.tiff' in m and 'NaN or infinite' in m for m in skipped)
    assert re.search(r'warning: epoch 0: .*1 unreadable', stdout), stdout[-2000:]
    assert any('hold no images: class9' in r.getMessage() for r in caplog.records)


def test_unicode_class_names_are_kept_exactly_in_the_exports_label_names(tmp_path, capsys):
    import unicodedata
    names = ['猫', 'собака', unicodedata.normalize('NFD', 'café'), 'Ελληνικά', 'קוף', 'ab cd']
    root = tmp_path / 'data'
    rng = np.random.default_rng(0)
    for split, n in (('train', 2), ('val', 1)):
        for name in names:
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f'{i}.png')
    out = tmp_path / 'run'
    code, _, err = run(_with(base_args(root, out), '--data-path', root), capsys)
    assert code == 0, err[-3000:]
    exported = json.loads((out / 'student' / 'config.json').read_text(encoding='utf-8'))['label_names']
    assert exported == sorted(names) and exported[sorted(names).index(names[2])].encode() == names[2].encode()


@pytest.fixture(scope='module')
def hf_rows():
    import datasets
    rng = np.random.default_rng(1)

    def png(i):
        import io
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format='PNG')
        return buf.getvalue()
    import io
    tiff = io.BytesIO()
    pixels = np.full((32, 32), 0.25, np.float32)
    pixels[0, 0] = float('nan')
    Image.fromarray(pixels, mode='F').save(tiff, format='TIFF')
    images = [{'bytes': png(i), 'path': None} for i in range(8)]
    images[2] = None                                               # an empty cell
    images[4] = {'bytes': tiff.getvalue(), 'path': None}          # float pixels with a NaN
    images[6] = {'bytes': png(6)[:40], 'path': None}               # a truncated PNG
    features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(names=['a', 'b'])})
    return datasets, datasets.Dataset.from_dict({'image': images, 'label': [i % 2 for i in range(8)]},
                                                features=features)


def test_parquet_rows_that_fail_to_decode_are_skipped_and_counted(hf_rows, tmp_path):
    from vitkd.data import IndexedDataset, build_datasets
    from vitkd.errors import DataFailure
    from vitkd.hf_data import HFOptions
    datasets, rows = hf_rows
    (tmp_path / 'data').mkdir()
    for split in ('train', 'validation'):
        rows.to_parquet(str(tmp_path / 'data' / f'{split}-00000-of-00001.parquet'))
    train, val = build_datasets('hf', str(tmp_path / 'data'), np.asarray, np.asarray, hf=HFOptions())
    got = [train[i][2] for i in range(len(train))]
    assert train.num_corrupt == 3 and [int(i) for i in train.corrupt.nonzero()] == [2, 4, 6]
    assert got == [0, 1, 3, 3, 5, 5, 7, 7]  # each bad row is replaced by the next readable one
    assert [val[i][1] for i in range(8)] == [0, 1, -1, 1, -1, 1, -1, 1]  # left out of the metrics
    for row in (2, 4, 6):
        with pytest.raises(DataFailure, match=rf'unreadable image .* row {row} '):
            IndexedDataset(train.dataset, skip_corrupt=False)[row]


def test_a_missing_label_or_image_column_is_named_with_the_columns_present(hf_rows, tmp_path):
    from vitkd.hf_data import HFDataError, load_hf_splits
    datasets, rows = hf_rows
    for drop, option in (('label', '--hf-label-column'), ('image', '--hf-image-column')):
        kept = rows.remove_columns(drop).add_column('note', ['x'] * len(rows))
        datasets.DatasetDict(train=kept, validation=kept).save_to_disk(str(tmp_path / drop))
        with pytest.raises(HFDataError) as e:
            load_hf_splits(str(tmp_path / drop))
        assert option in str(e.value) and f'its columns are {"image" if drop == "label" else "label"}, note' in str(
            e.value), e.value
