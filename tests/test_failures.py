"""The error boundary, damaged files, the run dir's guards, image decoding, and 2-process runs.

In-process runs use the tiny setup of tests/test_reliability.py (4 classes of 32-px images, a 2-block VkD student, a
random regnety_002 teacher). Each failure must be one ``error:`` line naming the file or value, with the exit code of
``vitkd.errors``, and leave an existing run dir byte-identical.
"""
import dataclasses
import errno
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import main
import vitkd.cli
from test_reliability import STUDENT, base_args, error_line, make_image_folder, no_vitkd_frame, run, snapshot
from test_reliability import data  # noqa: F401  (module fixture: a tiny image folder)
from vitkd.config import Config
from vitkd.errors import INTERNAL_ERROR, DataFailure, RunDirError, SaveError, UsageError

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures('one_core')


@pytest.fixture(scope='module')
def finished(data, tmp_path_factory) -> Path:
    """A finished 2-epoch run (4 steps each) with its two epoch checkpoints, steps 4 and 8."""
    out = tmp_path_factory.mktemp('fin') / 'run'
    assert main.main(base_args(data, out, epochs=2) + ['--keep-last', '2']) == 0
    assert (out / 'checkpoints' / 'step_00000004').is_dir() and (out / 'checkpoints' / 'step_00000008').is_dir()
    return out


def resumed(data: Path, run_dir: Path) -> list:
    """The finished run's own command with --resume auto."""
    return base_args(data, run_dir, epochs=2) + ['--keep-last', '2', '--resume', 'auto']


# ---- the boundary ---------------------------------------------------------------------------------------------------

def test_exit_codes_are_distinct_and_documented():
    codes = [UsageError.exit_code, SaveError.exit_code, DataFailure.exit_code, RunDirError.exit_code, INTERNAL_ERROR]
    assert codes == [2, 1, 5, 6, 70]
    doc = main.main.__doc__
    assert all(f'{c} ' in doc for c in (1, 2, 3, 4, 5, 6, 7, 70))


def test_an_unexpected_error_is_one_line_and_the_traceback_only_on_request(monkeypatch, capsys):
    def broken(argv):
        raise KeyError('boom')
    monkeypatch.setattr(vitkd.cli, 'parse_args', broken)
    code, out, err = run(['--lr', '1'], capsys)
    line = error_line(err)
    assert code == INTERNAL_ERROR and 'internal error (KeyError' in line and '--debug' in line
    code, out, err = run(['--lr', '1', '--debug'], capsys)
    assert code == INTERNAL_ERROR and 'Traceback' in err and "KeyError: 'boom'" in err
    monkeypatch.setenv('VITKD_DEBUG', '1')
    code, out, err = run(['--lr', '1'], capsys)
    assert code == INTERNAL_ERROR and 'Traceback' in err


def test_an_os_error_names_its_file(monkeypatch, capsys):
    def unreadable(argv):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), '/data/secret.png')
    monkeypatch.setattr(vitkd.cli, 'parse_args', unreadable)
    code, out, err = run([], capsys)
    assert code == RunDirError.exit_code and '/data/secret.png: Permission denied' in error_line(err)


# ---- damaged files --------------------------------------------------------------------------------------------------

def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({'zero': b'', 'truncated': data[:len(data) // 2], 'garbage': os.urandom(300)}[how])


@pytest.mark.parametrize('how', ['zero', 'truncated', 'garbage'])
def test_a_damaged_teacher_file_or_folder_is_one_line_naming_it(how, finished, data, tmp_path, capsys):
    import timm
    from timm.models import save_for_hf
    from safetensors.torch import save_file
    teacher = timm.create_model('regnety_002', num_classes=4)
    weights = tmp_path / 'teacher.safetensors'
    save_file(teacher.state_dict(), str(weights))
    save_for_hf(teacher, tmp_path / 'folder', safe_serialization=True)
    _damage(weights, how)
    _damage(tmp_path / 'folder' / 'model.safetensors', how)
    before = snapshot(finished)
    for extra, named in ((['--teacher', weights, '--teacher-arch', 'regnety_002'], weights),
                         (['--teacher', tmp_path / 'folder'], tmp_path / 'folder' / 'model.safetensors')):
        code, out, err = run(resumed(data, finished) + ['--teacher-pretrained'] + extra, capsys)
        line = error_line(err)
        assert code == 2 and str(named) in line and 'safetensors' in line, line
    assert snapshot(finished) == before


def _unreadable_pickle(path: Path, how: str) -> Path:
    good = io.BytesIO()
    torch.save({'w': torch.zeros(4)}, good)
    path.write_bytes({'garbage': b'\x80\x02' + bytes(range(200, 256)) * 4, 'text': b'not a checkpoint\n',
                      'truncated': good.getvalue()[:len(good.getvalue()) // 2], 'zero': b''}[how])
    return path


@pytest.mark.parametrize('flag', ['--finetune', '--teacher', '--student-ckpt'])
@pytest.mark.parametrize('how', ['garbage', 'text', 'truncated', 'zero'])
def test_a_damaged_pickle_is_not_readable_rather_than_refused(flag, how, data, tmp_path, capsys):
    """A .pth that is no checkpoint or a damaged one is 'not a readable checkpoint', not the weights_only refusal
    of a pickle that asks for code."""
    path = _unreadable_pickle(tmp_path / 'weights.pth', how)
    if flag == '--student-ckpt':
        args = ['--eval-student', '--student-ckpt', path, '--data-path', data, '--output-dir', tmp_path / 'eval']
    else:
        args = base_args(data, tmp_path / 'run')
        args[args.index('--teacher') + 1] = path if flag == '--teacher' else 'none'
        if flag == '--teacher':
            args += ['--teacher-arch', 'regnety_002', '--teacher-pretrained']
        else:
            args[args.index('--distill') + 1] = 'none'
            args = [a for a in args if a != '--no-teacher-pretrained'] + ['--finetune', path]
    code, out, err = run(args, capsys)
    line = error_line(err)
    assert code == UsageError.exit_code and 'not a readable checkpoint' in line and str(path) in line, line
    assert 'refused' not in line and 'more than tensors' not in line


@pytest.mark.parametrize('content,problem', [
    ('{"architecture": ', 'not valid JSON'),
    ('[1, 2]', 'a JSON object is expected'),
    ('{"num_classes": 4}', '"architecture" must name a timm model'),
    ('{"architecture": "regnety_002", "num_classes": "four"}', '"num_classes" must be an integer'),
    ('{"architecture": "regnety_002", "model_args": [1]}', '"model_args" must be an object'),
])
def test_a_bad_config_json_is_one_line_naming_it(content, problem, finished, data, tmp_path, capsys):
    export = tmp_path / 'student'
    shutil.copytree(finished / 'student', export)
    (export / 'config.json').write_text(content)
    teacher = tmp_path / 'teacher'
    shutil.copytree(finished / 'student', teacher)
    (teacher / 'config.json').write_text(content)
    before = snapshot(finished)
    for extra in (['--eval-student', '--student-ckpt', export], ['--teacher', teacher, '--teacher-pretrained']):
        code, out, err = run(resumed(data, finished) + extra, capsys)
        line = error_line(err)
        assert code == 2 and 'config.json' in line and problem in line, line
    assert snapshot(finished) == before


def test_resume_of_a_damaged_checkpoint_is_refused_naming_the_file(finished, data, tmp_path, capsys):
    run_dir = tmp_path / 'run'
    shutil.copytree(finished, run_dir)
    bad = run_dir / 'checkpoints' / 'step_00000004' / 'model.safetensors'
    _damage(bad, 'truncated')
    before = snapshot(run_dir)
    code, out, err = run(base_args(data, run_dir, epochs=2) + ['--resume', run_dir / 'checkpoints' / 'step_00000004'],
                         capsys)
    line = error_line(err)
    assert code == 2 and str(bad) in line, line
    assert snapshot(run_dir) == before


def test_resume_auto_skips_a_damaged_newest_checkpoint_and_says_why(finished, data, tmp_path, capsys):
    run_dir = tmp_path / 'run'
    shutil.copytree(finished, run_dir)
    (run_dir / 'checkpoints' / 'step_00000008' / 'optimizer.bin').write_bytes(b'PK\x03\x04 cut short')
    code, out, err = run(base_args(data, run_dir, epochs=3) + ['--resume', 'auto', '--keep-last', '2'], capsys)
    assert code == 0, err[-2000:]
    assert 'skipped step_00000008' in out and 'optimizer.bin is missing or truncated' in out
    assert f'resuming from {run_dir / "checkpoints" / "step_00000004"}' in out
    assert json.loads((run_dir / 'summary.json').read_text())['steps'] == 12  # from step 4: epochs 2 and 3


# ---- the run dir ----------------------------------------------------------------------------------------------------

def test_resume_auto_of_a_finished_run_changes_nothing(finished, data, capsys):
    before = snapshot(finished)
    code, out, err = run(resumed(data, finished), capsys)
    assert code == 0 and 'is a finished run' in out and 'nothing was changed' in out, (out[-2000:], err[-2000:])
    assert snapshot(finished) == before


@pytest.mark.parametrize('extra,expected', [
    (['--student-kwargs', 'depth=-1'], "student 'deit_ti_distilled' cannot be built with the kwargs"),
    (['--student-kwargs', 'embed_dim=0'], 'embed_dim=0 (--student-kwargs): 0.0 cannot be raised'),
    (['--student-kwargs', 'img_size=0'], 'img_size=0 (--student-kwargs): Expected a positive image size'),
    (['--student-kwargs', 'num_heads=7'], 'num_heads=7 (--student-kwargs): dim should be divisible by num_heads'),
    (['--student-kwargs', 'depth=abc'], 'depth=abc'),
    (['--student-kwargs', 'img_size=[32'], "--student-kwargs: 'img_size=[32': the value '[32' is not a YAML value"),
    (['--teacher-kwargs', 'foo=1'], "teacher 'regnety_002' cannot be built with the kwargs foo=1 (--teacher-kwargs): "),
    (['--teacher', 'hf-hub:'], "teacher 'hf-hub:' names no Hub repo: write hf-hub:org/name"),
])
def test_model_kwargs_the_constructor_refuses_are_one_usage_line_naming_them(extra, expected, data, tmp_path, capsys,
                                                                             recwarn):
    """A constructor's refusal of the user's model kwargs is a usage error (exit 2) naming the kwargs and the
    constructor's message; the warnings it gave before failing are not shown."""
    args = base_args(data, tmp_path / 'run')
    if extra[0] == '--student-kwargs':
        args[args.index('--student-kwargs') + 1:args.index('--student-kwargs') + 6] = [
            a for a in STUDENT[3:] if a.split('=')[0] != extra[1].split('=')[0]] + [extra[1]]
    elif extra[0] == '--teacher':
        args[args.index('--teacher') + 1] = extra[1]
    else:
        args += extra
    code, out, err = run(args, capsys)
    line = error_line(err)
    assert code == UsageError.exit_code and expected in line, line
    assert not [w for w in recwarn if 'zero-element' in str(w.message)]
    assert not (tmp_path / 'run').exists()


def test_an_output_dir_under_a_file_is_refused_before_the_build(data, tmp_path, capsys):
    (tmp_path / 'afile').write_text('x')
    code, out, err = run(base_args(data, tmp_path / 'afile' / 'run'), capsys)
    line = error_line(err)
    assert code == RunDirError.exit_code and 'afile is a file' in line and 'student' not in out


@pytest.mark.parametrize('inside', ['.', 'train', 'train/new/run'])
def test_an_output_dir_inside_the_data_is_refused_before_the_build(inside, data, capsys):
    before = snapshot(data)
    code, out, err = run(base_args(data, data / inside), capsys)
    line = error_line(err)
    assert code == RunDirError.exit_code and f'is inside --data-path {data}' in line and 'student' not in out, line
    assert snapshot(data) == before


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into read-only folders: the refusal cannot be observed')
def test_a_read_only_output_dir_is_refused_before_the_build(data, tmp_path, capsys):
    ro = tmp_path / 'ro'
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, out, err = run(base_args(data, ro / 'run'), capsys)
    finally:
        ro.chmod(0o755)
    assert code == RunDirError.exit_code and 'cannot write in' in error_line(err)


def test_a_run_dir_held_by_a_live_process_is_refused_naming_it(finished, data, capsys):
    lock = finished / '.vitkd.lock'
    holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        from vitkd.rundir import _start_time
        lock.write_text(json.dumps(dict(pid=holder.pid, host=socket.gethostname(), start=_start_time(holder.pid),
                                        since='now')))
        before = snapshot(finished)
        code, out, err = run(resumed(data, finished), capsys)
        line = error_line(err)
        assert code == RunDirError.exit_code and f'PID {holder.pid}' in line and 'in use by another vitkd run' in line
        assert snapshot(finished) == before
    finally:
        holder.kill()
        holder.wait()
        lock.unlink(missing_ok=True)


def test_a_stale_lock_is_taken_over_and_released(data, tmp_path, capsys):
    gone = subprocess.Popen([sys.executable, '-c', 'pass'])
    gone.wait()  # its PID is dead now
    out_dir = tmp_path / 'run'
    out_dir.mkdir()
    (out_dir / '.vitkd.lock').write_text(json.dumps(dict(pid=gone.pid, host=socket.gethostname(), start='1')))
    code, out, err = run(base_args(data, out_dir), capsys)
    assert code == 0, err[-2000:]
    assert not (out_dir / '.vitkd.lock').exists()  # released when the command ended


def test_the_lock_is_exclusive_within_a_run(tmp_path):
    from vitkd.rundir import RunLock
    lock = RunLock(tmp_path).acquire()
    try:
        info = json.loads((tmp_path / '.vitkd.lock').read_text())
        assert info['pid'] == os.getpid() and info['host'] == socket.gethostname()
    finally:
        lock.release()
    assert not (tmp_path / '.vitkd.lock').exists()


# ---- images ---------------------------------------------------------------------------------------------------------

def test_randaugment_posterize_never_raises_and_zero_bits_is_black():
    import vitkd.data  # noqa: F401  (installs the posterize fix)
    from timm.data.auto_augment import rand_augment_transform
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    policy = rand_augment_transform('rand-m9-mstd0.5-inc1', {'translate_const': 100, 'img_mean': (124, 116, 104)})
    for seed in range(3000):  # unfixed, Pillow >= 10 raised for ~2 draws in 1000
        random.seed(seed)
        policy(img)
    from vitkd.data import _posterize
    assert np.asarray(_posterize(img, 0)).max() == 0
    for bits in range(1, 8):
        assert np.array_equal(np.asarray(_posterize(img, bits)), np.asarray(ImageOps.posterize(img, bits)))
    with pytest.raises(ValueError):  # the Pillow behaviour the fix is for
        ImageOps.posterize(img, 0)


def test_an_error_inside_an_augmentation_is_not_a_corrupt_image():
    from vitkd.data import IndexedDataset, TransformedDataset

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return Image.new('RGB', (8, 8)), 0

    def broken(img):
        raise ValueError('augmentation bug')
    ds = IndexedDataset(TransformedDataset(Images(), broken))
    with pytest.raises(ValueError, match='augmentation bug'):
        ds[0]
    assert ds.num_corrupt == 0


@pytest.mark.parametrize('mode', ['I;16', 'I', 'F', 'F01', 'P', 'CMYK', 'RGBA', 'LA', '1'])
def test_every_pillow_mode_is_read_with_its_real_range(mode, tmp_path):
    from vitkd.data import load_image
    rng = np.random.default_rng(1)
    if mode == 'I;16':
        a = rng.integers(0, 65536, (6, 6), dtype=np.uint16)
        img, expect = Image.fromarray(a), np.rint(a / 257.0)  # uint16: Pillow's I;16
    elif mode == 'I':
        a = rng.integers(0, 4096, (6, 6)).astype(np.int32)  # a 12-bit scan: beyond 8 bits, within 16
        img, expect = Image.fromarray(a, 'I'), np.rint(a * 255.0 / 65535)
    elif mode == 'F':
        a = rng.uniform(-3, 7, (6, 6)).astype(np.float32)  # no known scale: min..max
        img, expect = Image.fromarray(a, 'F'), np.rint((a.astype(np.float64) - a.min()) * 255 / (a.max() - a.min()))
    elif mode == 'F01':
        a = rng.uniform(0, 1, (6, 6)).astype(np.float32)
        img, expect = Image.fromarray(a, 'F'), np.rint(a.astype(np.float64) * 255)
    elif mode in ('RGBA', 'LA'):
        rgb = rng.integers(0, 256, (6, 6, 3)).astype(np.float64)
        alpha = rng.integers(0, 256, (6, 6)).astype(np.float64)
        if mode == 'LA':
            rgb = np.repeat(rgb[..., :1], 3, axis=2)
            img = Image.fromarray(np.dstack([rgb[..., 0], alpha]).astype(np.uint8), 'LA')
        else:
            img = Image.fromarray(np.dstack([rgb, alpha]).astype(np.uint8), 'RGBA')
        expect = rgb * alpha[..., None] / 255 + 255 * (1 - alpha[..., None] / 255)  # over white
    else:
        base = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
        img = base.convert(mode)
        expect = np.asarray(img.convert('RGB')).astype(np.float64)  # Pillow's conversion is right for these
    path = tmp_path / ('x.tiff' if mode in ('I;16', 'I', 'F', 'F01', 'CMYK') else 'x.png')
    img.save(path)
    got = np.asarray(load_image(str(path))).astype(np.float64)
    assert got.shape == (6, 6, 3)
    expect = expect if expect.ndim == 3 else np.repeat(expect[..., None], 3, axis=2)
    assert np.abs(got - expect).max() <= 1.0, (mode, got[..., 0], expect[..., 0])


def test_a_decompression_bomb_is_skipped_with_a_warning(tmp_path, monkeypatch):
    from vitkd.data import CorruptImage, load_image
    Image.new('RGB', (64, 64)).save(tmp_path / 'big.png')
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 64 * 64 // 4)  # the file is > 2x the limit: Pillow's error
    with pytest.raises(CorruptImage, match='too large'):
        load_image(str(tmp_path / 'big.png'))


def test_symlink_loops_and_dot_folders_in_an_image_folder(tmp_path):
    from vitkd.data import _image_folder
    root = make_image_folder(tmp_path / 'd', classes=2, train_per_class=2, val_per_class=1)
    os.symlink('..', root / 'train' / 'class0' / 'loop')  # class0/loop -> train/: a loop through class0
    (root / 'train' / '.ipynb_checkpoints').mkdir()
    Image.new('RGB', (8, 8)).save(root / 'train' / '.ipynb_checkpoints' / 'x.png')
    Image.new('RGB', (8, 8)).save(root / 'train' / 'class1' / '.hidden.png')
    ds = _image_folder(str(root), 'train', None, 0)
    assert ds.classes == ['class0', 'class1']
    names = sorted(os.path.basename(p) for p, _ in ds.samples)
    # class0 sees its own 2 images and, through the link, train/class1's 2 once; nothing from dot paths
    assert '.hidden.png' not in names and 'x.png' not in names
    assert len(ds.samples) == len({os.path.realpath(p) for p, c in ds.samples if c == 0}) + 2


# ---- 2 CPU processes ------------------------------------------------------------------------------------------------

def _launch(args, tmp_path, script=None):
    from test_multiprocess import _env
    launcher = Path(sys.executable).with_name('accelerate')
    launch = [str(launcher), 'launch'] if launcher.exists() else [sys.executable, '-m', 'accelerate.commands.launch']
    cmd = [*launch, '--multi_gpu', '--num_processes', '2', '--num_machines', '1', '--mixed_precision', 'no',
           '--dynamo_backend', 'no', '--main_process_port', '0', '--num_cpu_threads_per_process', '1',
           str(script or REPO / 'main.py'), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)


def test_two_processes_a_bad_value_is_one_line_printed_once_exit_2(data, tmp_path):
    result = _launch(base_args(data, tmp_path / 'run') + ['--seed', '-5'], tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    seed_domain = {f.name: f for f in dataclasses.fields(Config)}['seed'].metadata['domain']
    assert lines == [f'error: --seed must be {seed_domain.describe()}, got -5'], result.stderr[-3000:]
    # the process that failed first exited 2; torch's launcher then stops the other one, exits 1 itself and prints
    # its own failure summary (a launcher traceback, no frame of vitkd)
    assert 'exitcode  : 2' in result.stderr and result.returncode != 0
    assert no_vitkd_frame(result.stderr)
    assert not (tmp_path / 'run').exists()


FULL_DISK = '''
import errno, os, sys
from pathlib import Path
sys.path.insert(0, os.environ['VITKD_REPO'])
import main
import vitkd.checkpoint as ck
import vitkd.export as export
real = ck.export_model
def full_disk(model, folder, *args, **kwargs):
    if Path(folder).name == 'student' and Path(folder).parent.name != 'step_00000004.tmp':
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))
    return real(model, folder, *args, **kwargs)
ck.export_model = export.export_model = full_disk  # every module that writes an export
sys.exit(main.main(sys.argv[1:]))
'''


def test_two_processes_a_failed_export_is_one_line_printed_once_exit_1(data, tmp_path):
    script = tmp_path / 'full_disk.py'
    script.write_text(FULL_DISK)
    out = tmp_path / 'run'
    result = _launch(base_args(data, out) + ['--batch-size', '2'], tmp_path, script)
    lines = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(lines) == 1 and 'No space left on device' in lines[0] and '--resume auto' in lines[0], result.stderr
    assert 'exitcode  : 1' in result.stderr and 'exitcode  : 70' not in result.stderr
    assert no_vitkd_frame(result.stderr)
    assert (out / 'checkpoints' / 'step_00000004' / 'trainer_state.json').is_file() and not (out / 'student').exists()
