"""The command line end to end (subprocesses: each costs ~4 s of imports, so they are few)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ['--student-kwargs', 'img_size=28', 'patch_size=4', 'depth=2', 'embed_dim=32', 'num_heads=2', 'in_chans=1']


def run_main(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / 'main.py'), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


def test_list_losses():
    result = run_main('--list-losses')
    assert result.returncode == 0, result.stderr
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert {'deit_hard', 'deit_soft', 'kd', 'none'} <= set(names)


def _fashion_mnist_test_set():
    """The 10k test images and labels read straight from the IDX files (format: 2 zero bytes, type, ndim, dims)."""
    import gzip
    import struct

    import numpy as np
    folder = Path('/usr/share/datasets/fashion-mnist')
    arrays = []
    for stem in ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'):
        path = next(p for p in (folder / stem, folder / f'{stem}.gz') if p.exists())
        with (gzip.open if path.suffix == '.gz' else open)(path, 'rb') as f:
            ndim = struct.unpack('>HBB', f.read(4))[2]
            dims = struct.unpack('>' + 'I' * ndim, f.read(4 * ndim))
            arrays.append(np.frombuffer(f.read(), dtype=np.uint8).reshape(dims))
    return arrays


def test_embedded_default_stops_at_its_time_limit(tmp_path):
    out = tmp_path / 'run'
    result = run_main('--time-limit', '20', '--output-dir', str(out), '--train-subset', '0.1', '--num-workers', '0')
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['stop_reason'] in ('time limit reached', 'epochs done') and summary['steps'] > 0
    if summary['stop_reason'] == 'time limit reached':  # a slow machine: stopped by the budget, not before it
        assert summary['train_seconds'] >= 19 and summary['epochs_run'] < 1
    else:  # a fast machine finished the epoch before the budget ran out
        assert summary['epochs_run'] == 1
    assert {'cls_top1', 'dist_top1', 'avg_top1'} <= set(summary['student'])
    assert (out / 'student' / 'model.safetensors').exists() and (out / 'config.yaml').exists()


@pytest.mark.slow
@pytest.mark.ci_once
def test_embedded_default_for_40_steps_and_its_accuracy_recomputed_from_the_export(tmp_path):
    """The main job's pipeline (tiny student) cut to 40 steps, so the accuracy check never depends on the machine's
    speed; the printed accuracies are recomputed here from the exported student with timm on the raw test files."""
    import numpy as np
    import timm
    import torch

    import vitkd  # noqa: F401  (registers the VkD students with timm)
    out = tmp_path / 'run'
    result = run_main('--max-steps', '40', '--output-dir', str(out), '--train-subset', '0.1', '--num-workers', '0', *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['steps'] == 40 and 'max_steps 40' in summary['stop_reason']
    assert summary['teacher']['teacher_top1'] > 80  # the shipped teacher, loaded through create_teacher
    student = summary['student']
    assert student['avg_top1'] > 30  # 10 classes: chance is 10 %
    model = timm.create_model(f'local-dir:{out / "student"}', pretrained=True).eval()
    config = json.loads((out / 'student' / 'config.json').read_text())['pretrained_cfg']
    images, labels = _fashion_mnist_test_set()
    x = (torch.from_numpy(images.astype(np.float32) / 255)[:, None] - config['mean'][0]) / config['std'][0]
    with torch.no_grad():
        tokens = torch.cat([model.forward_features(x[i:i + 1000]) for i in range(0, len(x), 1000)])
        z_cls, z_dist = model.head(tokens[:, 0]), model.head_dist(tokens[:, 1])
    y = torch.from_numpy(labels.astype(np.int64))
    for head, logits in (('cls', z_cls), ('dist', z_dist), ('avg', (z_cls + z_dist) / 2)):
        top1 = 100 * (logits.argmax(1) == y).double().mean().item()
        assert top1 == pytest.approx(student[f'{head}_top1'], abs=0.02), head
    assert 'student avg' in result.stdout and str(out) in result.stdout


@pytest.mark.parametrize('args,message', [
    (['--distill', 'vkdd'], "unknown loss 'vkdd'"),
    (['--lr', '-1'], '--lr must be a number > 0, got -1'),
    (['--batch-size', '0'], '--batch-size must be an integer >= 1, got 0'),
    (['--student', 'deit_smal_distilled'], "unknown student model 'deit_smal_distilled'"),
    (['--data-path', '/nonexistent/imagenet'], "--data-path '/nonexistent/imagenet' does not exist"),
    (['--loss-opts', 'kd.temperature=2'], "loss 'kd' is not in --distill"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    import main
    code = main.main([*args, '--output-dir', str(tmp_path / 'o'), *TINY])
    err = capsys.readouterr().err
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l.startswith('error')]
    assert len(lines) == 1 and message in lines[0], err[-2000:]
