"""Checkpoints: atomic saves, keep-last/best, strict loading, the EMA, and exact resume after SIGKILL / SIGTERM /
SIGINT.

The end-to-end tests train a tiny VkD student (32 px, 2 blocks, width 32) with a random regnety_002 teacher, the VkD
loss (a trainable orthogonal projector, so the checkpoint holds distillation parts), EMA and timm's full DeiT
augmentation (RandAugment, random erasing, mixup/cutmix) on a 64-image ImageFolder, and compare an interrupted +
resumed run with an uninterrupted one tensor by tensor, bit for bit.
"""
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]


# ---- helpers ------------------------------------------------------------------------------------------------------

def make_image_folder(root: Path, classes: int = 8, train_per_class: int = 8, val_per_class: int = 2) -> Path:
    """A tiny RGB ImageFolder (32 px); the last class has one validation image less (an odd count)."""
    rng = np.random.default_rng(0)
    for split, n in (('train', train_per_class), ('val', val_per_class)):
        for c in range(classes):
            folder = root / split / f'class{c}'
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n - (split == 'val' and c == classes - 1)):
                base = np.zeros((32, 32, 3), np.uint8)
                base[..., c % 3] = 30 * (c + 1)
                img = np.clip(base + rng.integers(0, 80, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f'{i}.png')
    return root


def train_args(data: Path, out: Path) -> list[str]:
    return ['--data-path', str(data), '--input-size', '32', '--student', 'deit_ti_distilled',
            '--student-kwargs', 'img_size=32', 'patch_size=4', 'depth=2', 'embed_dim=32', 'num_heads=2',
            '--teacher', 'regnety_002', '--no-teacher-pretrained', '--distill', 'vkd', '--epochs', '2',
            '--batch-size', '8', '--num-workers', '0', '--lr', '1e-3', '--unscale-lr', '--model-ema',
            '--model-ema-decay', '0.9', '--keep-last', '2', '--output-dir', str(out)]


def subprocess_env() -> dict:
    # OMP_WAIT_POLICY=PASSIVE: on shared, oversubscribed cores spinning OpenMP threads make each step ~10x slower
    return dict(os.environ, HF_HUB_OFFLINE='1', PYTHONPATH=str(REPO), OMP_WAIT_POLICY='PASSIVE',
                PYTHONUNBUFFERED='1')


def run_main(args, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / 'main.py'), *args], capture_output=True, text=True,
                          env=subprocess_env(), timeout=timeout, cwd=REPO)


def start_main(args, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / 'main.py'), *args], stdout=log.open('w'),
                            stderr=subprocess.STDOUT, env=subprocess_env(), cwd=REPO)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 180) -> None:
    end = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f'the run ended (code {proc.returncode}) before the condition was met')
        if time.time() > end:
            proc.kill()
            raise AssertionError('timed out waiting for the run')
        time.sleep(0.01)


def assert_same_tensors(a: Path, b: Path) -> int:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    differing = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    assert not differing, f'{len(differing)} tensors differ, e.g. {differing[:5]}'
    return len(ta)


def final_checkpoint(out: Path) -> Path:
    steps = sorted(p for p in (out / 'checkpoints').iterdir() if re.fullmatch(r'step_\d+', p.name))
    return steps[-1]


def assert_same_as_reference(ref: Path, out: Path) -> None:
    assert_same_tensors(ref / 'student' / 'model.safetensors', out / 'student' / 'model.safetensors')
    assert_same_tensors(ref / 'student_ema' / 'model.safetensors', out / 'student_ema' / 'model.safetensors')
    # the whole distiller (student + the VkD projector) and the EMA of the last checkpoint
    n = assert_same_tensors(final_checkpoint(ref) / 'model.safetensors', final_checkpoint(out) / 'model.safetensors')
    assert n > 20
    assert_same_tensors(final_checkpoint(ref) / 'ema.safetensors', final_checkpoint(out) / 'ema.safetensors')
    s_ref, s_out = (json.loads((d / 'summary.json').read_text()) for d in (ref, out))
    assert s_ref['student'] == s_out['student'] and s_ref['steps'] == s_out['steps'] == 16


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='module')
def reference(data, tmp_path_factory) -> Path:
    """An uninterrupted run (no periodic checkpoints)."""
    out = tmp_path_factory.mktemp('ref') / 'run'
    result = run_main(train_args(data, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


# ---- folders, atomicity, strict loading (no training) -----------------------------------------------------------

def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    path = root / 'checkpoints' / f'step_{step:08d}'
    path.mkdir(parents=True)
    (path / 'model.safetensors').write_bytes(b'x')
    if complete:
        (path / 'trainer_state.json').write_text('{}')
    return path


def _loadable_fake_checkpoint(root: Path, step: int) -> Path:
    """A checkpoint folder whose files pass ``checkpoint_problem`` (readable headers and containers), with tiny
    contents: resolving a resume only reads them."""
    import json
    import zipfile

    from safetensors.torch import save_file
    path = _fake_checkpoint(root, step)
    (path / 'trainer_state.json').write_text(json.dumps({'state': {'epoch': 0, 'step': step}, 'world_size': 1}))
    (path / 'student').mkdir()
    for file in (path / 'model.safetensors', path / 'student' / 'model.safetensors'):
        save_file({'w': torch.zeros(1)}, str(file))
    with zipfile.ZipFile(path / 'optimizer.bin', 'w') as z:
        z.writestr('data.pkl', b'x')
    (path / 'random_states_0.pkl').write_bytes(b'x')
    return path


def test_find_latest_and_prune_ignore_incomplete_and_temporary(tmp_path):
    from vitkd.checkpoint import find_checkpoints, latest_checkpoint, prune_checkpoints
    assert latest_checkpoint(tmp_path) is None
    made = {s: _fake_checkpoint(tmp_path, s) for s in (3, 12, 6, 9)}
    _fake_checkpoint(tmp_path, 15, complete=False)                 # no state file: not complete
    (tmp_path / 'checkpoints' / 'step_00000018.tmp').mkdir()        # a save that was killed
    (tmp_path / 'checkpoints' / 'best').mkdir()
    (tmp_path / 'checkpoints' / 'best' / 'trainer_state.json').write_text('{}')
    assert [s for s, _ in find_checkpoints(tmp_path)] == [3, 6, 9, 12]
    assert latest_checkpoint(tmp_path) == made[12]
    deleted = prune_checkpoints(tmp_path, keep_last=2)
    assert {p.name for p in deleted} == {'step_00000003', 'step_00000006', 'step_00000018.tmp'}
    left = sorted(p.name for p in (tmp_path / 'checkpoints').iterdir())
    assert left == ['best', 'step_00000009', 'step_00000012', 'step_00000015']


def test_resolve_resume(tmp_path):
    from vitkd.checkpoint import resolve_resume
    from vitkd.config import Config, ConfigError
    with pytest.raises(ConfigError, match='--resume auto needs --output-dir'):
        resolve_resume(Config(resume='auto'))
    messages = []
    assert resolve_resume(Config(resume='auto', output_dir=str(tmp_path)), messages.append) is None
    assert 'starting from scratch' in messages[0]
    newest = [_loadable_fake_checkpoint(tmp_path / 'run', s) for s in (4, 8)][-1]
    cfg = Config(resume=str(tmp_path / 'run'))  # a run dir: its newest checkpoint, and the run dir as output
    assert resolve_resume(cfg) == newest and Path(cfg.output_dir) == tmp_path / 'run'
    cfg = Config(resume=str(newest))
    assert resolve_resume(cfg) == newest and Path(cfg.output_dir) == tmp_path / 'run'


def test_epoch_sampler_resume_order_and_augmentation_are_exact():
    """A skipped (resumed) pass yields exactly the tail of a full pass, with 0 or 2 workers, and loading in the main
    process leaves the global generators untouched."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader, Dataset

    from vitkd.data import EpochSampler, IndexedDataset

    class Noisy(Dataset):  # an "augmentation" drawing from all three global generators
        def __len__(self):
            return 24

        def __getitem__(self, i):
            return torch.full((2,), float(i)) + torch.rand(2) + random.random() + float(np.random.rand()), i % 3

    accelerator = Accelerator(cpu=True)

    def passes(workers, epoch, skip=0):
        loader = DataLoader(IndexedDataset(Noisy()), 4, sampler=EpochSampler(24, seed=7), drop_last=True,
                            num_workers=workers, generator=torch.Generator().manual_seed(0))
        loader = accelerator.prepare(loader)
        loader.set_epoch(epoch)
        if skip:
            loader = accelerator.skip_first_batches(loader, skip)
        return [(x.clone(), idx.clone()) for x, _, idx in loader]

    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    full = passes(0, epoch=1)
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])
    tail = passes(0, epoch=1, skip=2)
    assert len(full) == 6 and len(tail) == 4
    for (xa, ia), (xb, ib) in zip(full[2:], tail):
        assert torch.equal(ia, ib) and torch.equal(xa, xb)
    for (xa, ia), (xb, ib) in zip(full, passes(2, epoch=1)):  # worker processes: same samples, same noise
        assert torch.equal(ia, ib) and torch.equal(xa, xb)
    order = torch.cat([i for _, i in full])
    assert sorted(order.tolist()) == list(range(24))  # a permutation
    assert not torch.equal(order, torch.cat([i for _, i in passes(0, epoch=0)]))  # a new one each epoch


@pytest.fixture
def small_run(data, tmp_path, monkeypatch):
    """A tiny run built in-process (no training)."""
    monkeypatch.chdir(REPO)
    from vitkd.devices import make_accelerator
    from vitkd.run import build_run
    from vitkd.rundir import prepare_output_dir
    from vitkd.arguments import parse_args
    cfg, _ = parse_args(train_args(data, tmp_path / 'run'))
    accelerator = make_accelerator(cfg)
    out = prepare_output_dir(cfg, accelerator)
    return cfg, build_run(cfg, accelerator), out, accelerator


def test_killed_save_leaves_no_checkpoint_and_strict_load(small_run):
    from vitkd.checkpoint import Checkpointer, find_checkpoints
    from vitkd.export import CheckpointError
    cfg, r, out, accelerator = small_run
    ckpt = Checkpointer(cfg, r, out, accelerator)
    r.state.step, r.state.batches_done = 5, 5
    first = ckpt.save()
    assert [s for s, _ in find_checkpoints(out)] == [5]
    trainer = json.loads((first / 'trainer_state.json').read_text())
    assert trainer['state'] == {'epoch': 0, 'step': 5, 'batches_done': 5}
    weights = load_file(str(first / 'model.safetensors'))
    assert any(k.startswith('losses.vkd.') for k in weights)  # the distillation parts are in the training state
    student_keys = set(load_file(str(first / 'student' / 'model.safetensors')))
    assert student_keys == {k[len('student.'):] for k in weights if k.startswith('student.')}

    original = accelerator.save_state

    def dies_half_way(path, **kwargs):
        Path(path, 'model.safetensors').write_bytes(b'half a file')
        raise KeyboardInterrupt  # as if killed while writing
    accelerator.save_state = dies_half_way
    r.state.step = 9
    with pytest.raises(KeyboardInterrupt):
        ckpt.save()
    accelerator.save_state = original
    assert (out / 'checkpoints' / 'step_00000009.tmp').exists()
    assert [s for s, _ in find_checkpoints(out)] == [5]  # resume auto would take step 5, never the broken one

    # strict loading: a checkpoint with a tensor missing is refused with one line naming it
    broken = dict(weights)
    del broken['student.cls_token']
    save_file(broken, str(first / 'model.safetensors'))
    with pytest.raises(CheckpointError) as err:
        ckpt.resume(first)
    assert 'student.cls_token' in str(err.value) and '\n' not in str(err.value)

    save_file(weights, str(first / 'model.safetensors'))
    with torch.no_grad():
        for p in r.distiller_unwrapped.parameters():
            p.zero_()
    r.state.step, r.state.batches_done = 0, 0
    ckpt.resume(first)
    assert (r.state.step, r.state.batches_done) == (5, 5)
    restored = r.distiller_unwrapped.state_dict()
    assert all(torch.equal(restored[k], v) for k, v in weights.items())

    r.state.step = 9
    ckpt.save()  # the next save of that step replaces the stale .tmp
    assert not (out / 'checkpoints' / 'step_00000009.tmp').exists()
    assert [s for s, _ in find_checkpoints(out)] == [5, 9]


# ---- end to end -------------------------------------------------------------------------------------------------

def test_keep_last_and_best(reference):
    steps = sorted(p.name for p in (reference / 'checkpoints').iterdir() if p.name.startswith('step_'))
    assert steps == ['step_00000008', 'step_00000016']  # two epochs of 8 steps, --keep-last 2
    rows = [json.loads(line) for line in (reference / 'log.jsonl').read_text().splitlines()]
    epochs = [r for r in rows if r['kind'] == 'epoch']
    best_epoch = max(epochs, key=lambda r: (r['val_avg_top1'], -r['epoch']))  # the first epoch reaching the max
    best = json.loads((reference / 'checkpoints' / 'best' / 'metrics.json').read_text())
    assert best['epoch'] == best_epoch['epoch'] and best['avg_top1'] == best_epoch['val_avg_top1']
    state = json.loads((reference / 'checkpoints' / 'best' / 'trainer_state.json').read_text())
    assert state['state']['epoch'] == best_epoch['epoch'] + 1 and state['state']['batches_done'] == 0


def test_resume_after_sigkill_mid_epoch_is_bit_identical(data, reference, tmp_path):
    out = tmp_path / 'run'
    args = train_args(data, out) + ['--save-every-steps', '3']
    proc = start_main(args, tmp_path / 'killed.log')
    wait_for(lambda: (out / 'checkpoints' / 'step_00000003' / 'trainer_state.json').exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / 'student').exists()  # it really died before the end

    result = run_main(args + ['--resume', 'auto'])
    assert result.returncode == 0, result.stderr[-3000:]
    m = re.search(r'resumed from \S+: epoch (\d+), step (\d+), batch (\d+)/(\d+)', result.stdout)
    assert m, result.stdout[-2000:]
    epoch, step, batch, per_epoch = map(int, m.groups())
    assert 0 < batch < per_epoch == 8 and step == 8 * epoch + batch  # a mid-epoch checkpoint
    assert_same_as_reference(reference, out)


def test_ema_follows_the_update_rule_through_the_run(data, tmp_path):
    """The run's EMA (``--model-ema``), read back from per-step checkpoints, against the rule recomputed here:
    E₁ = θ₁ (timm's first update copies), then E_k = d·E_{k−1} + (1 − d)·θ_k for every float tensor, buffers too."""
    out, decay = tmp_path / 'run', 0.75
    args = train_args(data, out) + ['--model-ema-decay', str(decay), '--save-every-steps', '1', '--max-steps', '3',
                                    '--keep-last', '3', '--epochs', '1']
    result = run_main(args)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [out / 'checkpoints' / f'step_{k:08d}' for k in (1, 2, 3)]
    ema = [{k.removeprefix('module.'): v for k, v in load_file(str(s / 'ema.safetensors')).items()} for s in steps]
    student = [{k.removeprefix('student.'): v for k, v in load_file(str(s / 'model.safetensors')).items()
                if k.startswith('student.')} for s in steps]
    assert ema[0].keys() == student[0].keys()
    floats = [k for k, v in ema[0].items() if v.is_floating_point()]
    assert len(floats) > 20
    for k in floats:
        torch.testing.assert_close(ema[0][k], student[0][k], rtol=0, atol=0)
        for i in (1, 2):
            torch.testing.assert_close(ema[i][k], decay * ema[i - 1][k] + (1 - decay) * student[i][k],
                                       rtol=1e-6, atol=1e-6, msg=f'{k} at step {i + 1}')
    moved = [k for k in floats if not torch.equal(ema[2][k], student[2][k])]
    assert len(moved) > len(floats) // 2  # the average really lags the weights
    exported = load_file(str(out / 'student_ema' / 'model.safetensors'))
    assert all(torch.equal(exported[k], ema[2][k]) for k in floats if k in exported)


def test_sigint_saves_at_a_step_boundary_and_resumes_exactly(data, reference, tmp_path):
    """Ctrl-C (SIGINT, main process only; loader workers ignore it): checkpoint at the next step boundary, exit
    128 + SIGINT, and ``--resume auto`` ends bit-identical to the uninterrupted reference."""
    out = tmp_path / 'run'
    args = train_args(data, out) + ['--log-every', '1']
    proc = start_main(args, tmp_path / 'int.log')
    log = out / 'log.jsonl'
    wait_for(lambda: log.exists() and '"step": 2,' in log.read_text(), proc)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    text = (tmp_path / 'int.log').read_text()
    saved = assert_stopped_by(signal.SIGINT, proc, text, out)
    result = run_main(args + ['--resume', 'auto'])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'resumed from {saved}' in result.stdout
    assert_same_as_reference(reference, out)


def assert_stopped_by(signum: int, proc, text: str, out: Path) -> Path:
    """The run stopped with 128 + ``signum``, said so with the step and the checkpoint it saved (at step ≥ 2, complete)
    and exported nothing; returns that checkpoint."""
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, text[-3000:]
    m = re.search(rf'stopped by {name} at epoch (\d+), step (\d+) \(batch (\d+)/8\); checkpoint (\S+)', text)
    assert m, text[-3000:]
    step, saved = int(m.group(2)), Path(m.group(4))
    assert step >= 2 and saved.name == f'step_{step:08d}' and (saved / 'trainer_state.json').exists()
    assert not (out / 'student').exists()
    return saved


def children(pid: int) -> list[int]:
    return [int(c) for t in Path(f'/proc/{pid}/task').iterdir() for c in (t / 'children').read_text().split()]


@pytest.mark.slow
def test_sigterm_saves_at_a_step_boundary_and_the_printed_command_resumes_exactly(data, reference, tmp_path):
    """As a scheduler preempting a job: SIGTERM to the main process and to its loader workers at once. Two workers
    per loader here, none in the reference: the result must not depend on the worker count either."""
    out = tmp_path / 'run'
    args = train_args(data, out) + ['--log-every', '1', '--num-workers', '2']
    proc = start_main(args, tmp_path / 'term.log')
    log = out / 'log.jsonl'
    wait_for(lambda: log.exists() and '"step": 2,' in log.read_text(), proc)
    workers = children(proc.pid)
    assert len(workers) == 4  # the training loader's 2 and the validation loader's 2, alive since the teacher's eval
    for pid in [proc.pid, *workers]:
        os.kill(pid, signal.SIGTERM)
    proc.wait(timeout=120)
    text = (tmp_path / 'term.log').read_text()
    saved = assert_stopped_by(signal.SIGTERM, proc, text, out)
    command = shlex.split(re.search(r'resume with: (.+)', text).group(1))
    assert command[:2] == ['python', 'main.py'] and command[-2:] == ['--resume', 'auto']
    result = run_main(command[2:])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'resumed from {saved}' in result.stdout
    assert_same_as_reference(reference, out)


@pytest.mark.slow
def test_two_process_run_stopped_through_the_launcher_resumes_exactly(data, tmp_path):
    """``accelerate launch`` on 2 CPU processes: SIGTERM to the launcher (it forwards it to both ranks), the ranks
    agree on the step to stop at, and the resumed 2-process run ends bit-identical to an uninterrupted one."""
    def launch(out, *extra):
        cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
               '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', '0',
               'main.py', *train_args(data, out), '--batch-size', '4', *extra]
        return cmd, dict(subprocess_env(), ACCELERATE_USE_CPU='1')

    cmd, env = launch(tmp_path / 'ref')
    ref = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / 'run'
    cmd, env = launch(out, '--log-every', '1')
    with (tmp_path / 'launch.log').open('w') as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    log = out / 'log.jsonl'
    wait_for(lambda: log.exists() and '"step": 3,' in log.read_text(), proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    text = (tmp_path / 'launch.log').read_text()
    m = re.search(r'stopped by SIGTERM at epoch \d+, step (\d+) .*; checkpoint (\S+)', text)
    assert m, text[-3000:]
    saved = Path(m.group(2))
    assert {'random_states_0.pkl', 'random_states_1.pkl', 'trainer_state.json'} <= {p.name for p in saved.iterdir()}
    assert not list((out / 'checkpoints').glob('*.tmp'))
    cmd, env = launch(out, '--resume', 'auto')
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'resumed from {saved}' in result.stdout
    assert_same_tensors(tmp_path / 'ref' / 'student' / 'model.safetensors', out / 'student' / 'model.safetensors')
    assert_same_tensors(final_checkpoint(tmp_path / 'ref') / 'model.safetensors',
                        final_checkpoint(out) / 'model.safetensors')
