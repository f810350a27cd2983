"""SIGKILL ten times at random points — while training, while writing a checkpoint, while starting up — and
``--resume auto`` always finds a complete checkpoint and finishes with the weights of an uninterrupted run.

Tiny CPU run in subprocesses (each launch pays ~4 s of imports): VkD student (32 px, 2 blocks, width 32), random
regnety_002 teacher, the VkD loss (its orthogonal projector is part of the checkpoint), EMA, full DeiT augmentation with
mixup/cutmix, 4 epochs × 8 steps, a checkpoint after every step (``--save-every-steps 1``) so that a kill lands in a
save about half of the time. The single-kill version is ``tests/test_checkpoint.py``.
"""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH, EPOCHS = 8, 4


def make_image_folder(root: Path, classes: int = 8, train_per_class: int = 8, val_per_class: int = 2) -> Path:
    rng = np.random.default_rng(7)
    for split, n in (('train', train_per_class), ('val', val_per_class)):
        for c in range(classes):
            folder = root / split / f'class{c}'
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.zeros((32, 32, 3), np.uint8)
                base[..., c % 3] = 30 * (c + 1)
                Image.fromarray(np.clip(base + rng.integers(0, 80, (32, 32, 3)), 0, 255).astype(np.uint8)).save(
                    folder / f'{i}.png')
    return root


def train_args(data: Path, out: Path) -> list:
    return ['--data-path', str(data), '--input-size', '32', '--student', 'deit_ti_distilled',
            '--student-kwargs', 'img_size=32', 'patch_size=4', 'depth=2', 'embed_dim=32', 'num_heads=2',
            '--teacher', 'regnety_002', '--no-teacher-pretrained', '--distill', 'vkd', '--epochs', str(EPOCHS),
            '--batch-size', '8', '--num-workers', '0', '--lr', '1e-3', '--unscale-lr', '--model-ema',
            '--model-ema-decay', '0.9', '--keep-last', '2', '--save-every-steps', '1', '--output-dir', str(out),
            '--resume', 'auto']


def env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE='1', PYTHONPATH=str(REPO), OMP_WAIT_POLICY='PASSIVE', PYTHONUNBUFFERED='1',
                OMP_NUM_THREADS='1')


def start(args, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / 'main.py'), *args], stdout=log.open('w'),
                            stderr=subprocess.STDOUT, env=env(), cwd=REPO)


def steps_on_disk(out: Path, suffix: str = '') -> list[int]:
    root = out / 'checkpoints'
    names = os.listdir(root) if root.is_dir() else []
    return sorted(int(m.group(1)) for n in names if (m := re.fullmatch(rf'step_(\d+){re.escape(suffix)}', n)))


def complete_steps(out: Path) -> list[int]:
    return [s for s in steps_on_disk(out) if (out / 'checkpoints' / f'step_{s:08d}' / 'trainer_state.json').is_file()]


def wait_until(predicate, proc: subprocess.Popen, timeout: float = 150, poll: float = 0.002) -> None:
    end = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f'the run ended (code {proc.returncode}) before it could be killed'
        assert time.time() < end, 'timed out'
        time.sleep(poll)


def assert_loadable(ckpt: Path) -> dict:
    """Every file of a checkpoint reads back (tensors-only unpickling for accelerate's files)."""
    from accelerate.utils import load
    state = json.loads((ckpt / 'trainer_state.json').read_text())
    for name in ('model.safetensors', 'ema.safetensors', 'student/model.safetensors'):
        assert load_file(str(ckpt / name))
    assert load(str(ckpt / 'optimizer.bin'), weights_only=True)['state']
    assert 'torch_manual_seed' in load(str(ckpt / 'random_states_0.pkl'), weights_only=True)
    return state


def assert_same(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    differing = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differing, f'{len(differing)} tensors differ, e.g. {differing[:4]}'


@pytest.mark.slow
@pytest.mark.ci_once
def test_ten_sigkills_at_random_points_then_resume_auto_matches_an_uninterrupted_run(tmp_path):
    data = make_image_folder(tmp_path / 'data')
    total = STEPS_PER_EPOCH * EPOCHS
    ref = tmp_path / 'ref'
    result = subprocess.run([sys.executable, str(REPO / 'main.py'), *train_args(data, ref)], capture_output=True,
                            text=True, env=env(), cwd=REPO, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]

    out = tmp_path / 'run'
    rng = random.Random(9)
    modes = ['startup'] + rng.sample(['save'] * 5 + ['train'] * 4, 9)
    history = []
    for k, mode in enumerate(modes):
        done = complete_steps(out)
        last = done[-1] if done else 0
        proc = start(train_args(data, out), tmp_path / f'kill{k}.log')
        if mode == 'startup':  # importing, building, evaluating the teacher or the first steps
            time.sleep(rng.uniform(0.5, 4.0))
        elif mode == 'save':  # step last+1 is saved; the save of a later step is being written
            wait_until(lambda: any(s >= last + 2 for s in steps_on_disk(out, '.tmp')), proc)
            time.sleep(rng.uniform(0, 0.01))
        else:  # step last+1 is saved; somewhere in the next step(s)
            wait_until(lambda: (complete_steps(out) or [0])[-1] >= last + 1, proc)
            time.sleep(rng.uniform(0, 0.15))
        log = (tmp_path / f'kill{k}.log')
        assert proc.poll() is None, f'kill {k}: the run finished first: {log.read_text()[-2000:]}'
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        mid_save = bool(steps_on_disk(out, '.tmp'))  # a half-written checkpoint was left behind
        done = complete_steps(out)
        if mode != 'startup':
            assert done and done[-1] > last, f'kill {k} ({mode}): no progress'
        for step in done:  # whatever --resume auto may pick is complete and readable
            state = assert_loadable(out / 'checkpoints' / f'step_{step:08d}')
            assert state['state']['step'] == step
        history.append((mode, last, done[-1] if done else 0, mid_save))
    assert not (out / 'student').exists()  # the run never got to its end
    assert sum(mid for *_, mid in history) >= 4, history  # kills inside a checkpoint write really happened
    assert (history[-1][2]) < total

    result = subprocess.run([sys.executable, str(REPO / 'main.py'), *train_args(data, out)], capture_output=True,
                            text=True, env=env(), cwd=REPO, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = re.search(r'resumed from (\S+): epoch \d+, step (\d+)', result.stdout)
    assert resumed and int(resumed.group(2)) == history[-1][2], result.stdout[-2000:]
    assert not list((out / 'checkpoints').glob('*.tmp')) and not list((out / 'checkpoints').glob('*.old'))
    assert (out / 'checkpoints' / 'best' / 'metrics.json').is_file()

    for name in ('student/model.safetensors', 'student_ema/model.safetensors'):
        assert_same(ref / name, out / name)
    final = f'checkpoints/step_{total:08d}'
    for name in ('model.safetensors', 'ema.safetensors'):  # the whole distiller (VkD projector included) and the EMA
        assert_same(ref / final / name, out / final / name)
    s_ref, s_out = (json.loads((d / 'summary.json').read_text()) for d in (ref, out))
    assert s_ref['student'] == s_out['student'] and s_ref['steps'] == s_out['steps'] == total
    assert s_ref['best'] == s_out['best']
