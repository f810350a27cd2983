"""Every bad input is a one-line error before anything is written; bad data, non-finite values and a full disk are
survived; nothing executes code from a checkpoint or a Hub repo.

The command-line cases run ``main.main([...])`` in-process on a tiny ImageFolder (4 classes, 32 px) with a 2-block
VkD student and a random regnety_002 teacher, pointed at a finished run (the "previous run") with ``--resume auto`` or
``--overwrite``: every byte of that run dir must be unchanged afterwards. The SIGKILL-10-times test is in
``tests/test_kill_resume.py``.
"""
import ast
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

import main

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures('one_core')
STUDENT = ['--student', 'deit_ti_distilled', '--student-kwargs', 'img_size=32', 'patch_size=4', 'depth=2',
           'embed_dim=32', 'num_heads=2']


# ---- helpers -------------------------------------------------------------------------------------------------------


def no_vitkd_frame(stderr: str) -> bool:
    """No traceback frame of vitkd's own code (``main.py``, the ``vitkd`` package) in ``stderr``: the launcher's own
    summary may name the checkout's paths (a checkout folder may itself be called ``vitkd``), never a frame inside."""
    ours = (f'File "{REPO / "main.py"}"', f'File "{REPO / "vitkd"}{os.sep}')
    return not any(frame in stderr for frame in ours)


def make_image_folder(root: Path, classes: int = 4, train_per_class: int = 4, val_per_class: int = 2) -> Path:
    rng = np.random.default_rng(3)
    for split, n in (('train', train_per_class), ('val', val_per_class)):
        for c in range(classes):
            folder = root / split / f'class{c}'
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f'{i}.png')
    return root


def base_args(data: Path, out: Path, epochs: int = 1) -> list:
    return ['--data-path', str(data), '--input-size', '32', *STUDENT, '--teacher', 'regnety_002',
            '--no-teacher-pretrained', '--distill', 'kd', '--epochs', str(epochs), '--batch-size', '4',
            '--num-workers', '0', '--lr', '1e-3', '--unscale-lr', '--output-dir', str(out)]


def run(args, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str) -> str:
    """The single 'error: …' line of a failed command (and no traceback)."""
    lines = [line for line in err.splitlines() if line.startswith('error:')]
    assert len(lines) == 1 and 'Traceback' not in err, err[-3000:]
    return lines[0]


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else 'dir'
            for p in sorted(root.rglob('*'))}


class Evil:
    """Unpickling this runs a shell command (what a malicious checkpoint does); it must never run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def evil_pickle(path: Path, marker: Path, tensors: dict = None) -> Path:
    torch.save({'evil': Evil(marker), 'state_dict': tensors or {'w': torch.zeros(2)}}, path)  # payload first
    return path


def assert_payload_is_live(path: Path, marker: Path) -> None:
    """Control: the file's pickle really runs its payload when unpickled without the weights_only guard."""
    import pickle

    class Loader(pickle.Unpickler):
        def persistent_load(self, pid):  # tensor storages: not needed to reach the payload
            return None
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith('data.pkl'))
        import io
        try:
            Loader(io.BytesIO(z.read(name))).load()
        except Exception:  # noqa: BLE001 - the storages are fake; the payload has run by then
            pass
    assert marker.exists()
    marker.unlink()


def seed_hub_cache(cache: Path, repo: str, files: dict) -> None:
    """An offline Hugging Face cache holding ``repo`` with the given files (name -> bytes)."""
    folder = cache / f'models--{repo.replace("/", "--")}'
    snap = folder / 'snapshots' / ('b' * 40)
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)
    (folder / 'refs').mkdir()
    (folder / 'refs' / 'main').write_text('b' * 40)


# ---- fixtures -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp('data') / 'folder')


@pytest.fixture(scope='module')
def previous(data, tmp_path_factory):
    """A finished run (1 epoch, 4 steps) that the bad commands point at."""
    out = tmp_path_factory.mktemp('prev') / 'run'
    code = main.main(base_args(data, out))
    assert code == 0
    assert (out / 'checkpoints' / 'step_00000004' / 'trainer_state.json').is_file()
    return out


@pytest.fixture(scope='module')
def assets(tmp_path_factory, data):
    """Files the bad commands name: bad layouts, teachers of another head, malicious pickles, YAML files."""
    import timm
    from timm.models import save_for_hf
    root = tmp_path_factory.mktemp('assets')
    a = {'root': root, 'marker': root / 'PWNED'}
    flat = root / 'flat' / 'train'
    flat.mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(flat / 'x.png')
    a['flat'] = flat.parent
    (root / 'no_train' / 'images').mkdir(parents=True)
    a['no_train'] = root / 'no_train'
    mism = make_image_folder(root / 'mismatch', classes=3)
    shutil.rmtree(mism / 'val' / 'class2')
    (mism / 'val' / 'other').mkdir()
    shutil.copy(next((mism / 'val' / 'class0').iterdir()), mism / 'val' / 'other' / 'o.png')
    a['class_mismatch'] = mism
    torch.manual_seed(0)
    teacher10 = timm.create_model('regnety_002', num_classes=10)
    save_for_hf(teacher10, root / 'teacher10', safe_serialization=True)
    save_file(teacher10.state_dict(), str(root / 'teacher10.safetensors'))
    a['teacher10'] = root / 'teacher10'
    a['teacher10_file'] = root / 'teacher10.safetensors'
    teacher4 = timm.create_model('regnety_002', num_classes=4)
    tensors = {k: v.clone() for k, v in teacher4.state_dict().items()}
    a['evil_teacher'] = evil_pickle(root / 'evil_teacher.pth', a['marker'], tensors)
    a['evil_student'] = evil_pickle(root / 'evil_student.pth', a['marker'])
    evil_dir = root / 'evil_dir'
    evil_dir.mkdir()
    (evil_dir / 'config.json').write_text((root / 'teacher10' / 'config.json').read_text().replace(
        '"num_classes": 10', '"num_classes": 4'))
    evil_pickle(evil_dir / 'pytorch_model.bin', a['marker'], tensors)
    a['evil_dir'] = evil_dir
    (root / 'unknown.yaml').write_text('lrr: 0.1\nepochs: 1\n')
    (root / 'badtype.yaml').write_text('lr: fast\n')
    (root / 'badchoice.yaml').write_text('mixed_precision: fp8\n')
    a['yaml'] = root
    return a


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, assets):
    """An empty offline Hub cache, plus one repo whose weights are a malicious pickle."""
    import huggingface_hub.constants as constants
    cache = tmp_path / 'hub'
    cache.mkdir()
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    evil = assets['evil_dir']
    seed_hub_cache(cache, 'evil/teacher', {'config.json': (evil / 'config.json').read_bytes(),
                                           'pytorch_model.bin': (evil / 'pytorch_model.bin').read_bytes()})
    seed_hub_cache(cache, 'evil/arch', {'config.json': json.dumps({'architecture': 'evil_remote_arch',
                                                                   'num_classes': 4}).encode(),
                                        'model.safetensors': (assets['teacher10_file']).read_bytes()})
    return cache


# ---- bad inputs: one line, exit 2, nothing written -----------------------------------------------------------------

# (id, extra arguments (a function of the assets and the previous run), expected fragments of the error line,
#  how the command is pointed at the previous run: 'both' = once with --resume auto, once with --overwrite)
CASES = [
    ('missing data path', lambda a, p: ['--data-path', '/nonexistent/imagenet'],
     ["--data-path '/nonexistent/imagenet' does not exist"], 'both'),
    ('empty data path', lambda a, p: ['--data-path', ''], ['--data-path is empty'], 'both'),
    ('no train folder', lambda a, p: ['--data-path', a['no_train']], ['has no train/ folder', '/train/<class>/<image>'],
     'both'),
    ('no class folders', lambda a, p: ['--data-path', a['flat']], ['holds no class folders'], 'both'),
    ('train/val classes differ', lambda a, p: ['--data-path', a['class_mismatch']],
     ['train/ has 3 classes and val/ has 3', 'train/ only: class2', 'val/ only: other'], 'both'),
    ('classes vs --num-classes', lambda a, p: ['--num-classes', '5'], ['--num-classes 5 but the data set has 4'],
     'both'),
    ('classes vs teacher head (folder)', lambda a, p: ['--teacher', a['teacher10'], '--teacher-pretrained'],
     ['10-way head but the data has 4 classes'], 'both'),
    ('classes vs teacher head (file)', lambda a, p: ['--teacher', a['teacher10_file'], '--teacher-arch', 'regnety_002',
                                                     '--teacher-pretrained'],
     ['do not fit the architecture', 'head.fc.weight [10, 368] in the file vs [4, 368]'], 'both'),
    ('classes vs student head', lambda a, p: ['--student-kwargs', 'img_size=32', 'patch_size=4', 'depth=2',
                                              'embed_dim=32', 'num_heads=2', 'num_classes=10'],
     ['--student-kwargs num_classes=10', 'sizes it from the data'], 'both'),
    ('teacher file without arch', lambda a, p: ['--teacher', a['teacher10_file']], ['also pass --teacher-arch'],
     'both'),
    ('unknown student', lambda a, p: ['--student', 'deit_smal_distilled'],
     ["unknown student model 'deit_smal_distilled'", 'did you mean', 'deit_s_distilled'], 'both'),
    ('unknown teacher', lambda a, p: ['--teacher', 'regnety_16'],
     ["unknown teacher model 'regnety_16'", 'regnety_160'], 'both'),
    ('hub teacher offline', lambda a, p: ['--teacher', 'hf-hub:nobody/teacher'],
     ['HF_HUB_OFFLINE is set', 'hf download nobody/teacher'], 'both'),
    ('hub student offline', lambda a, p: ['--student', 'hf-hub:nobody/student'],
     ['HF_HUB_OFFLINE is set', 'hf download nobody/student'], 'both'),
    ('pretrained teacher offline', lambda a, p: ['--teacher', 'regnety_160', '--teacher-pretrained'],
     ['HF_HUB_OFFLINE is set', 'hf download timm/regnety_160.deit_in1k'], 'both'),
    ('resume another architecture', lambda a, p: ['--student-kwargs', 'img_size=32', 'patch_size=4', 'depth=3',
                                                  'embed_dim=32', 'num_heads=2'],
     ['--student-kwargs', 'depth=2 embed_dim=32 num_heads=2 → img_size=32 patch_size=4 depth=3', 'fresh run'],
     'resume'),
    ('student-ckpt of another architecture', lambda a, p: [
        '--eval-student', '--student', 'resnet18', '--student-kwargs',
        '--student-ckpt', p / 'checkpoints' / 'step_00000004' / 'model.safetensors'],
     ['(as --student resnet18) does not match ResNet', 'missing keys'], 'resume'),
    ('pickled code as --student-ckpt', lambda a, p: ['--eval-student', '--student-ckpt', a['evil_student']],
     ['refused to unpickle', 'weights_only=True'], 'resume'),
    ('pickled code as --teacher file', lambda a, p: ['--teacher', a['evil_teacher'], '--teacher-arch', 'regnety_002',
                                                     '--teacher-pretrained'],
     ['refused to load a pickle', 'weights_only=True'], 'both'),
    ('pickled code in a teacher folder', lambda a, p: ['--teacher', a['evil_dir'], '--teacher-pretrained'],
     ['refused to load a pickle'], 'both'),
    ('pickled code in a Hub repo', lambda a, p: ['--teacher', 'hf-hub:evil/teacher', '--teacher-pretrained'],
     ['refused to load a pickle'], 'both'),
    ('Hub config naming unknown code', lambda a, p: ['--teacher', 'hf-hub:evil/arch', '--teacher-pretrained'],
     ['Unknown model (evil_remote_arch)', 'never runs code'], 'both'),
    ('Hub student naming unknown code', lambda a, p: ['--student', 'hf-hub:evil/arch'],
     ['Unknown model (evil_remote_arch)'], 'both'),
    ('unknown loss', lambda a, p: ['--distill', 'kdd'], ["unknown loss 'kdd'", 'registered:', 'vkd'], 'both'),
    ('unknown loss option', lambda a, p: ['--loss-opts', 'kd.temprature=2'],
     ["loss 'kd' has no option temprature", 'temperature'], 'both'),
    ('loss option for a loss not used', lambda a, p: ['--loss-opts', 'dkd.alpha=2'], ["loss 'dkd' is not in --distill"],
     'both'),
    ('dist token needed', lambda a, p: ['--distill', 'deit_soft', '--student', 'resnet18', '--student-kwargs'],
     ["loss 'deit_soft' needs a student with a distillation token", 'resnet18 has none'], 'both'),
    ('tap out of range', lambda a, p: ['--distill', 'at', '--loss-opts', 'at.student_blocks=[5]'],
     ["loss 'at' taps student block 5, out of range", 'valid: -2..1'], 'both'),
    ('teacher tap out of range', lambda a, p: ['--distill', 'fitnet', '--loss-opts', 'fitnet.teacher_blocks=[9]'],
     ['teacher tap index 9 is out of range'], 'both'),
    ('negative lr', lambda a, p: ['--lr', '-1'], ['--lr must be a number > 0, got -1'], 'both'),
    ('zero lr', lambda a, p: ['--lr', '0'], ['--lr must be a number > 0, got 0'], 'both'),
    ('zero batch size', lambda a, p: ['--batch-size', '0'], ['--batch-size must be an integer >= 1, got 0'], 'both'),
    ('negative epochs', lambda a, p: ['--epochs', '-3'], ['--epochs must be an integer >= 1, got -3'], 'both'),
    ('zero epochs', lambda a, p: ['--epochs', '0'], ['--epochs must be an integer >= 1, got 0'], 'both'),
    ('batch larger than the data', lambda a, p: ['--batch-size', '64'], ['larger than the training set (16 images)'],
     'both'),
    ('output dir holds another run', lambda a, p: [], ['already holds a run', '--resume auto', '--overwrite'], 'none'),
    ('YAML unknown key', lambda a, p: ['-c', a['yaml'] / 'unknown.yaml'], ['unknown keys: lrr (did you mean lr?)'],
     'both'),
    ('YAML wrong type', lambda a, p: ['-c', a['yaml'] / 'badtype.yaml'], ["--lr must be a number > 0, got 'fast'"],
     'both'),
    ('YAML bad choice', lambda a, p: ['-c', a['yaml'] / 'badchoice.yaml'],
     ["--mixed-precision must be one of no, bf16, fp16, got 'fp8'"], 'both'),
    ('fp16 on CPU', lambda a, p: ['--mixed-precision', 'fp16'], ['fp16 needs a GPU'], 'both'),
    ('bad number', lambda a, p: ['--lr', 'abc'], ["argument --lr: invalid float value: 'abc'"], 'both'),
    ('misspelt flag', lambda a, p: ['--lrr', '1'], ['unrecognized arguments: --lrr 1', 'did you mean --lr?'], 'both'),
    ('flag without value', lambda a, p: ['--data-path'], ['argument --data-path', 'expected one argument'], 'both'),
    ('bad choice', lambda a, p: ['--nan-policy', 'ignore'], ["invalid choice: 'ignore'"], 'both'),
    ('student input channels', lambda a, p: ['--student-kwargs', 'img_size=32', 'patch_size=4', 'depth=2',
                                             'embed_dim=32', 'num_heads=2', 'in_chans=1'],
     ["student deit_ti_distilled takes grey (1-channel) images but the data's are RGB (3-channel)", 'in_chans=3'],
     'both'),
]


MODES = {'both': ('resume', 'overwrite'), 'resume': ('resume',), 'none': ('none',)}
PAIRS = [(case, mode) for case in CASES for mode in MODES[case[3]]]


@pytest.mark.parametrize('case,mode', PAIRS, ids=[f'{c[0]}-{m}' for c, m in PAIRS])
def test_bad_input_is_one_line_exit_2_and_leaves_an_existing_run_untouched(case, mode, previous, data, assets,
                                                                           hub_cache, capsys):
    name, extra, expected, _ = case
    how = {'resume': ['--resume', 'auto'], 'overwrite': ['--overwrite'], 'none': []}[mode]
    before = snapshot(previous)
    code, out, err = run(base_args(data, previous) + how + extra(assets, previous), capsys)
    assert code == 2, (out[-2000:], err[-2000:])
    line = error_line(err)
    for fragment in expected:
        assert fragment in line, line
    assert snapshot(previous) == before  # no byte of the previous run changed, nothing was added
    assert not assets['marker'].exists()  # no pickled code ran


def test_the_malicious_files_really_carry_a_payload(assets):
    """Controls for the cases above: each malicious pickle runs its command when unpickled without the guard."""
    for path in (assets['evil_student'], assets['evil_teacher'], assets['evil_dir'] / 'pytorch_model.bin'):
        assert_payload_is_live(path, assets['marker'])


def test_bf16_on_a_gpu_without_bf16_is_refused(monkeypatch):
    from vitkd.devices import make_accelerator
    from vitkd.config import Config, ConfigError
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda *a, **k: 'Tesla V100')
    with pytest.raises(ConfigError, match=r'this GPU \(Tesla V100\) cannot do bf16'):
        make_accelerator(Config(mixed_precision='bf16', distill=['kd']))


@pytest.mark.parametrize('target', ['optimizer.bin', 'random_states_0.pkl'])
def test_resume_refuses_pickled_code_in_a_checkpoint(target, previous, data, assets, tmp_path, capsys):
    run_dir = tmp_path / 'run'
    shutil.copytree(previous, run_dir)
    ckpt = run_dir / 'checkpoints' / 'step_00000004'
    evil_pickle(ckpt / target, assets['marker'])
    before = snapshot(run_dir)
    code, out, err = run(base_args(data, run_dir) + ['--resume', 'auto'], capsys)
    assert code == 2
    line = error_line(err)
    assert 'refused to unpickle' in line and target in line, line
    assert not assets['marker'].exists()
    assert snapshot(run_dir) == before


def test_pickle_weights_are_read_with_weights_only(previous, data, tmp_path, capsys):
    """The .pth path is a working feature, not only a refusal: a plain DDP-style state dict evaluates like the
    safetensors export it came from."""
    state = {f'module.{k}': v for k, v in load_file(str(previous / 'student' / 'model.safetensors')).items()}
    torch.save({'model': state, 'epoch': 1}, tmp_path / 'student.pth')
    common = base_args(data, tmp_path / 'eval') + ['--eval-student']
    code, out, err = run(common + ['--student-ckpt', tmp_path / 'student.pth'], capsys)
    assert code == 0, err[-2000:]
    from_pth = json.loads((tmp_path / 'eval' / 'eval_student.json').read_text())['metrics']
    code, out, err = run(common + ['--student-ckpt', previous / 'student'], capsys)
    assert code == 0, err[-2000:]
    assert json.loads((tmp_path / 'eval' / 'eval_student.json').read_text())['metrics'] == from_pth


# ---- run dirs: --overwrite, --resume <dir>, a resume after the last step --------------------------------------------

def test_overwrite_moves_the_previous_run_aside(previous, data, tmp_path, capsys):
    run_dir = tmp_path / 'run'
    shutil.copytree(previous, run_dir)
    old = snapshot(run_dir / 'checkpoints')
    code, out, err = run(base_args(data, run_dir) + ['--overwrite', '--seed', '5'], capsys)
    assert code == 0, err[-2000:]
    aside = list(run_dir.glob('replaced-*'))
    assert len(aside) == 1 and 'were moved to' in out
    assert snapshot(aside[0] / 'checkpoints') == old  # the previous run's checkpoints, byte for byte
    records = [json.loads(line) for line in (run_dir / 'log.jsonl').read_text().splitlines()]
    assert sum(r['kind'] == 'epoch' for r in records) == 1  # this run's log only
    new = load_file(str(run_dir / 'checkpoints' / 'step_00000004' / 'model.safetensors'))
    prev = load_file(str(previous / 'checkpoints' / 'step_00000004' / 'model.safetensors'))
    assert any(not torch.equal(new[k], prev[k]) for k in prev)  # another seed: a new run, not the old files


def test_resume_of_a_run_dir_continues_in_it_and_a_run_killed_while_exporting_finishes(previous, data, tmp_path,
                                                                                       monkeypatch, capsys):
    """``--resume <run dir>`` without --output-dir writes into that run (no new default dir), and a run whose last
    checkpoint is complete but whose export and summary are missing (killed while exporting) evaluates the restored
    weights and exports them: same metrics and tensors as the original run."""
    run_dir = tmp_path / 'run'
    shutil.copytree(previous, run_dir)
    shutil.rmtree(run_dir / 'student')
    (run_dir / 'summary.json').unlink()
    monkeypatch.chdir(tmp_path)
    args = [a for a in base_args(data, run_dir)]
    i = args.index('--output-dir')
    del args[i:i + 2]
    code, out, err = run(args + ['--resume', run_dir], capsys)
    assert code == 0, err[-2000:]
    assert not (tmp_path / 'output').exists()
    summary = json.loads((run_dir / 'summary.json').read_text())
    original = json.loads((previous / 'summary.json').read_text())
    assert summary['student'] == original['student'] and summary['student']['avg_top1'] >= 0
    assert summary['resumed_from'].endswith('step_00000004')
    a, b = load_file(str(run_dir / 'student' / 'model.safetensors')), load_file(str(previous / 'student' /
                                                                                     'model.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- bad data during training ---------------------------------------------------------------------------------------

def corrupt_folder(root: Path) -> tuple[Path, list[str]]:
    """4 classes × 4 good images + one random-bytes file and one truncated PNG: 18 train images."""
    make_image_folder(root)
    (root / 'train' / 'class0' / 'zbad.png').write_bytes(os.urandom(300))
    good = (root / 'train' / 'class1' / '0.png').read_bytes()
    (root / 'train' / 'class2' / 'ztrunc.png').write_bytes(good[:len(good) // 2])
    return root, ['zbad.png', 'ztrunc.png']


def test_indexed_dataset_counts_each_unreadable_image_once_across_workers(tmp_path):
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from vitkd.data import IndexedDataset, TransformedDataset, worker_context
    root, bad = corrupt_folder(tmp_path / 'd')
    folder = ImageFolder(str(root / 'train'))
    bad_index = {i for i, (path, _) in enumerate(folder.samples) if Path(path).name in bad}
    ds = IndexedDataset(TransformedDataset(folder, lambda im: torch.tensor(np.asarray(im), dtype=torch.float32)))
    for workers in (0, 2):
        ds.reset_corrupt()
        loader = DataLoader(ds, 3, num_workers=workers, multiprocessing_context=worker_context(workers))
        returned = torch.cat([index for _, _, index in loader]).tolist()
        # every request i comes back as the next readable index; the corrupt ones never come back
        expected = []
        for i in range(len(folder)):
            j = i
            while j in bad_index:
                j = (j + 1) % len(folder)
            expected.append(j)
        assert returned == expected
        assert ds.num_corrupt == len(bad) and set(torch.nonzero(ds.corrupt).flatten().tolist()) == bad_index


@pytest.mark.parametrize('workers', [0, 2])
def test_corrupt_images_are_skipped_and_counted_in_each_epoch_summary(workers, tmp_path, capsys, caplog):
    root, bad = corrupt_folder(tmp_path / 'd')
    out = tmp_path / 'run'
    args = base_args(root, out, epochs=2) + ['--batch-size', '6', '--num-workers', str(workers)]
    with caplog.at_level(logging.WARNING):
        code, stdout, err = run(args, capsys)
    assert code == 0, err[-3000:]
    epochs = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()
              if json.loads(line)['kind'] == 'epoch']
    assert [e['train_corrupt_images'] for e in epochs] == [len(bad), len(bad)]  # every image is read once per epoch
    assert stdout.count(f'{len(bad)} unreadable images skipped') == 2
    if workers == 0:  # the warnings name the files (from worker processes they go to the workers' stderr)
        messages = '\n'.join(r.getMessage() for r in caplog.records)
        assert all(name in messages for name in bad), messages


@pytest.mark.parametrize('workers', [0, 2])
def test_no_skip_corrupt_fails_in_one_line_naming_the_file(workers, tmp_path, capsys):
    root, bad = corrupt_folder(tmp_path / 'd')
    args = base_args(root, tmp_path / 'run') + ['--batch-size', '6', '--num-workers', str(workers),
                                                '--no-skip-corrupt']
    code, out, err = run(args, capsys)
    assert code == 5  # vitkd.errors.DataFailure
    line = error_line(err)
    assert 'unreadable image' in line and any(name in line for name in bad) and '--skip-corrupt' in line, line


def test_unreadable_validation_image_is_left_out_of_the_metrics(tmp_path, capsys, caplog):
    root = make_image_folder(tmp_path / 'd')  # 4 classes x 2 val images
    (root / 'val' / 'class1' / 'zbad.png').write_bytes(os.urandom(200))
    out = tmp_path / 'run'
    with caplog.at_level(logging.WARNING):
        code, _, err = run(base_args(root, out), capsys)
    assert code == 0, err[-3000:]
    best = json.loads((out / 'summary.json').read_text())['best']
    assert best['samples'] == 8 and best['unreadable'] == 1
    assert 'zbad.png' in '\n'.join(r.getMessage() for r in caplog.records)
    code, _, err = run(base_args(root, tmp_path / 'run2') + ['--no-skip-corrupt'], capsys)
    assert code == 5 and 'zbad.png' in error_line(err) and '--skip-corrupt' in error_line(err)


def test_empty_class_folder_is_reported(tmp_path, caplog):
    from vitkd.data import build_datasets
    root = make_image_folder(tmp_path / 'd')
    (root / 'train' / 'class9').mkdir()
    (root / 'val' / 'class9').mkdir()
    (root / 'train' / 'class9' / 'notes.txt').write_text('not an image')
    with caplog.at_level(logging.WARNING):
        train, val = build_datasets('imagefolder', str(root), None, None)
    assert 'class9' in train.dataset.dataset.classes
    reports = [r.getMessage() for r in caplog.records if 'hold no images' in r.getMessage()]
    assert len(reports) == 2 and all('class9' in m for m in reports), reports  # train/ and val/


# ---- numerical faults -----------------------------------------------------------------------------------------------

class Toy(nn.Module):
    """The distiller's interface on a linear model: its 'probe' term turns NaN (or only its gradient does) on batches
    holding a poisoned sample index."""

    def __init__(self, poison=(), mode='loss'):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(12, 3)
        self.bn = nn.BatchNorm1d(3)  # running statistics: a forward changes them even when the step is skipped
        self.poison, self.mode = set(poison), mode

    def forward(self, batch):
        logits = self.bn(self.fc(batch.images.flatten(1)))
        task = F.cross_entropy(logits, batch.labels)
        probe = 0.1 * (logits ** 2).mean()
        if any(int(i) in self.poison for i in batch.host_index):
            if self.mode == 'loss':
                probe = probe * float('nan')
            else:  # value 0, gradient 0 · ∞ = NaN: a finite loss with non-finite gradients
                probe = probe + (self.fc.weight * 0).sqrt().sum()
        return {'loss': task + probe, 'logits': logits, 'terms': {'task': task.detach(), 'probe': probe.detach()}}


class ConstantLr:
    def step_update(self, num_updates):
        pass


def batches(n: int):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 2, 2, generator=g), torch.randint(0, 3, (4,), generator=g),
             torch.arange(4 * b, 4 * b + 4)) for b in range(n)]


def train(model, loader, report_dir=None, policy='stop'):
    from accelerate import Accelerator

    from vitkd.engine import TrainState, train_one_epoch
    from vitkd.training import EpochBatches, NonFiniteGuard
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)  # decay: a zero-grad step moves
    state = TrainState()
    accelerator = Accelerator(cpu=True)

    def mix(images, labels):
        return images, F.one_hot(labels, 3).float(), {'labels_b': labels, 'lam': 1.0}
    stats = train_one_epoch(model, EpochBatches(loader, accelerator, mix), optimizer, ConstantLr(), accelerator, state,
                            NonFiniteGuard(policy, model, accelerator, report_dir), log_every=1)
    return stats, state


@pytest.mark.parametrize('mode', ['loss', 'gradients'])
def test_skip_policy_leaves_the_weights_exactly_as_without_that_step(mode, tmp_path):
    data = batches(3)
    poisoned = Toy(poison={5}, mode=mode)  # batch 1 holds sample 5
    stats, state = train(poisoned, data, tmp_path, policy='skip')
    clean = Toy()
    train(clean, [data[0], data[2]])  # an independent run that never saw batch 1
    for (name, a), (_, b) in zip(poisoned.state_dict().items(), clean.state_dict().items()):
        assert torch.isfinite(a.float()).all() and torch.equal(a, b), name  # weights and BatchNorm statistics
    assert stats['skipped_steps'] == 1 and state.step == 3
    assert all(np.isfinite(v) for k, v in stats.items() if isinstance(v, float))  # the NaN stays out of the means
    report = json.loads((tmp_path / 'nonfinite_step2.json').read_text())
    assert report['step'] == 2 and report['policy'] == 'skip' and report['lr'] == [0.1]
    assert report['sample_indices'] == [4, 5, 6, 7]
    if mode == 'loss':
        assert {'probe', 'loss'} <= set(report['nonfinite']) and report['terms']['probe'] == 'nan'
        assert np.isfinite(report['terms']['task'])
    else:
        assert report['nonfinite'] == ['gradients'] and report['grad_norm'] == 'nan'


def test_stop_policy_raises_after_writing_the_diagnostic_without_stepping(tmp_path):
    from vitkd.engine import NonFiniteLossError
    data = batches(3)
    poisoned = Toy(poison={5})
    with pytest.raises(NonFiniteLossError) as err:
        train(poisoned, data, tmp_path)
    assert 'probe' in str(err.value) and 'step 2' in str(err.value) and 'nonfinite_step2.json' in str(err.value)
    clean = Toy()
    train(clean, data[:1])
    assert all(torch.equal(a, b) for a, b in zip(poisoned.parameters(), clean.parameters()))
    assert json.loads((tmp_path / 'nonfinite_step2.json').read_text())['policy'] == 'stop'


def test_a_diverging_run_stops_or_skips_from_the_command_line_never_a_nan_model(data, tmp_path, capsys):
    """lr 1e30: the first step sends the weights to ~1e30 and every later loss is NaN."""
    diverge = ['--lr', '1e30', '--warmup-epochs', '0', '--epochs', '2']
    code, out, err = run(base_args(data, tmp_path / 'stop') + diverge, capsys)
    assert code == 3
    line = error_line(err)
    m = re.search(r'non-finite (.+) at epoch 0 step (\d+) \(diagnostic: (\S+)\)', line)
    assert m and 'nan-policy skip' in line, line
    report = json.loads(Path(m.group(3)).read_text())
    assert report['step'] == int(m.group(2)) and 'loss' in report['nonfinite'] and report['lr'][0] > 1e29
    assert not (tmp_path / 'stop' / 'student').exists()

    out_dir = tmp_path / 'skip'
    code, out, err = run(base_args(data, out_dir) + diverge + ['--nan-policy', 'skip'], capsys)
    assert code == 0, err[-2000:]
    epochs = [json.loads(l) for l in (out_dir / 'log.jsonl').read_text().splitlines() if '"epoch"' in l]
    skipped = sum(e.get('train_skipped_steps', 0) for e in epochs if e['kind'] == 'epoch')
    assert skipped >= 6 and len(list(out_dir.glob('nonfinite_step*.json'))) == skipped
    assert 'optimizer steps skipped for non-finite values' in out
    for path in [out_dir / 'student' / 'model.safetensors', *out_dir.glob('checkpoints/step_*/model.safetensors')]:
        assert all(torch.isfinite(t).all() for t in load_file(str(path)).values()), path


# ---- a full disk ----------------------------------------------------------------------------------------------------

def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint_and_training_goes_on(data, tmp_path, monkeypatch,
                                                                                       capsys):
    out = tmp_path / 'run'
    real_save = torch.save
    seen = {}

    def full_disk_save(obj, f, *args, **kwargs):
        if 'step_00000004.tmp' in str(f) and 'failed' not in seen:
            seen['failed'] = True
            seen['step2'] = snapshot(out / 'checkpoints' / 'step_00000002')
            Path(f).write_bytes(b'half of an optimizer state')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, 'save', full_disk_save)
    args = base_args(data, out, epochs=2) + ['--save-every-steps', '2', '--keep-last', '10']
    code, stdout, err = run(args, capsys)
    assert code == 0, err[-2000:]
    assert seen.get('failed')
    m = re.search(r'could not save checkpoint step_00000004 \(No space left on device\); the previous checkpoint '
                  r'(\S+) is intact', stdout)
    assert m and Path(m.group(1)).name == 'step_00000002', stdout[-2000:]
    assert snapshot(out / 'checkpoints' / 'step_00000002') == seen['step2']
    names = sorted(p.name for p in (out / 'checkpoints').iterdir())
    assert names == ['best', 'step_00000002', 'step_00000006', 'step_00000008'], names  # no step 4, no .tmp left
    assert json.loads((out / 'checkpoints' / 'best' / 'metrics.json').read_text())['step'] == 8


def test_full_disk_while_exporting_is_one_line_and_the_resume_exports(data, tmp_path, monkeypatch, capsys):
    import vitkd.checkpoint as ck
    import vitkd.export as export
    out = tmp_path / 'run'
    real_export = ck.export_model

    def full_disk_export(model, folder, *args, **kwargs):
        if Path(folder) == out / 'student':
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))
        return real_export(model, folder, *args, **kwargs)
    for module in (ck, export):  # every module that writes an export
        monkeypatch.setattr(module, 'export_model', full_disk_export)
    code, stdout, err = run(base_args(data, out), capsys)
    assert code == 1
    line = error_line(err)
    assert 'No space left on device' in line and 'step_00000004 is intact' in line and '--resume auto' in line, line
    assert not (out / 'student').exists()
    for module in (ck, export):
        monkeypatch.setattr(module, 'export_model', real_export)
    code, stdout, err = run(base_args(data, out) + ['--resume', 'auto'], capsys)
    assert code == 0, err[-2000:]
    exported = load_file(str(out / 'student' / 'model.safetensors'))
    trained = load_file(str(out / 'checkpoints' / 'step_00000004' / 'model.safetensors'))
    assert all(torch.equal(v, trained[f'student.{k}']) for k, v in exported.items())
    last_epoch = [json.loads(l) for l in (out / 'log.jsonl').read_text().splitlines() if '"kind": "epoch"' in l][0]
    assert json.loads((out / 'summary.json').read_text())['student']['avg_top1'] == last_epoch['val_avg_top1']


# ---- kills while pruning or updating best (the random version: tests/test_kill_resume.py) ---------------------------

def fake_checkpoint(root: Path, name: str, files=('model.safetensors', 'optimizer.bin', 'trainer_state.json')) -> Path:
    folder = root / 'checkpoints' / name
    folder.mkdir(parents=True)
    for f in files:
        (folder / f).write_text(f'{name}/{f}')
    return folder


def test_a_kill_while_pruning_never_leaves_a_half_deleted_checkpoint_that_looks_complete(tmp_path, monkeypatch):
    import vitkd.checkpoint as ck
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, f'step_{step:08d}')
    real_rmtree = shutil.rmtree

    def killed_while_deleting(path, *args, **kwargs):  # deletes the weights, then the process dies
        if not Path(path).exists():
            return
        Path(path, 'model.safetensors').unlink()
        raise KeyboardInterrupt
    monkeypatch.setattr(ck.shutil, 'rmtree', killed_while_deleting)
    with pytest.raises(KeyboardInterrupt):
        ck.prune_checkpoints(tmp_path, keep_last=1)
    monkeypatch.setattr(ck.shutil, 'rmtree', real_rmtree)
    listed = ck.find_checkpoints(tmp_path)
    assert all((path / 'model.safetensors').is_file() for _, path in listed), listed
    assert [s for s, _ in listed] == [4, 6]  # step 2 was being deleted: not offered to --resume
    ck.prune_checkpoints(tmp_path, keep_last=1)  # the next save finishes the job
    assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['step_00000006']


@pytest.mark.parametrize('new_copy_finished', [True, False])
def test_best_lost_between_the_renames_of_its_update_is_recovered(new_copy_finished, tmp_path):
    import vitkd.checkpoint as ck
    fake_checkpoint(tmp_path, 'step_00000008')
    fake_checkpoint(tmp_path, 'best.old', ('model.safetensors', 'trainer_state.json', 'metrics.json'))
    fake_checkpoint(tmp_path, 'best.tmp', ('model.safetensors', 'trainer_state.json') +
                    (('metrics.json',) if new_copy_finished else ()))
    ck.prune_checkpoints(tmp_path, keep_last=2)
    best = tmp_path / 'checkpoints' / 'best'
    expected = 'best.tmp' if new_copy_finished else 'best.old'
    assert (best / 'metrics.json').read_text() == f'{expected}/metrics.json'
    assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['best', 'step_00000008']


# ---- security -------------------------------------------------------------------------------------------------------

def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func), {k.arg: k.value for k in node.keywords}, node


def test_no_unsafe_deserialisation_in_the_code():
    """Every torch.load passes weights_only=True; no pickle/marshal/unsafe-YAML/allow_pickle/remote-code loads.

    The shipped code (everything but tests/) is scanned; the scan itself is checked on a sample of violations."""
    def violations(source: str) -> list[str]:
        found = []
        for name, kw, node in _calls(ast.parse(source)):
            const = kw.get('weights_only')
            is_torch_load = name in ('torch.load', 'torch.serialization.load')
            if is_torch_load and not (isinstance(const, ast.Constant) and const.value is True):
                found.append(f'{node.lineno}: torch.load without weights_only=True')
            if name in ('pickle.load', 'pickle.loads', 'marshal.loads', 'dill.load', 'dill.loads', 'cloudpickle.load'):
                found.append(f'{node.lineno}: {name}')
            if name == 'yaml.load' and 'SafeLoader' not in ast.unparse(node):
                found.append(f'{node.lineno}: yaml.load without SafeLoader')
            for key in ('allow_pickle', 'trust_remote_code'):
                if isinstance(kw.get(key), ast.Constant) and kw[key].value is True:
                    found.append(f'{node.lineno}: {key}=True')
        return found

    sample = ('import torch, pickle, yaml\nx = torch.serialization.load(p)\ny = torch.load(p, weights_only=False)\n'
              'z = torch.load(p, weights_only=True)\npickle.loads(b)\nyaml.load(s)\nnp.load(p, allow_pickle=True)\n'
              'm(trust_remote_code=True)\n')
    assert [v.split(':')[0] for v in violations(sample)] == ['2', '3', '5', '6', '7', '8']
    files = []
    for folder, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in ('.venv', 'tests', '.git', 'output', '__pycache__')]
        files += [Path(folder) / n for n in names if n.endswith('.py')]
    assert len(files) > 30
    import gc
    gc.disable()  # the ASTs are many small objects: collections would walk every object earlier tests left behind
    try:
        bad = {str(p.relative_to(REPO)): v for p in files if (v := violations(p.read_text()))}
    finally:
        gc.enable()
    assert not bad, bad


def test_rgb_data_with_the_shipped_grey_teacher_says_what_to_do(tmp_path, capsys):
    """A 10-class RGB ImageFolder (the head width matches) with the 1-channel Fashion-MNIST teacher of the embedded
    default: the message names both channel counts and the way out."""
    data = make_image_folder(tmp_path / 'd', classes=10, train_per_class=1, val_per_class=1)
    args = base_args(data, tmp_path / 'run') + ['--teacher', str(REPO / 'checkpoints' / 'fmnist_regnety_002')]
    code, _, err = run(args, capsys)
    line = error_line(err)
    assert code == 2 and not (tmp_path / 'run').exists(), err
    assert "takes grey (1-channel) images but the data's are RGB (3-channel)" in line
    assert '--teacher regnety_160' in line and 'fmnist_regnety_002 is the grey Fashion-MNIST teacher' in line
