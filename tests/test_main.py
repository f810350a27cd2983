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


def test_embedded_default_on_a_20_second_budget(tmp_path):
    out = tmp_path / 'run'
    result = run_main('--time-limit', '20', '--output-dir', str(out), '--train-subset', '0.1', '--num-workers', '0')
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['stop_reason'] in ('time limit reached', 'epochs done') and summary['steps'] > 0
    assert summary['train_seconds'] < 60  # the 20 s budget (+ one step and the save) bounds training
    assert summary['teacher']['teacher_top1'] > 80  # the shipped teacher, loaded through create_teacher
    assert {'cls_top1', 'dist_top1', 'avg_top1'} <= set(summary['student'])
    if summary['steps'] >= 40:  # on a busy machine 20 s may hold only a few steps
        assert summary['student']['avg_top1'] > 30  # 10 classes: chance is 10 %
    assert 0 <= summary['student']['avg_top1'] <= 100
    assert (out / 'student' / 'model.safetensors').exists() and (out / 'config.yaml').exists()
    assert 'student avg' in result.stdout and str(out) in result.stdout


@pytest.mark.parametrize('args,message', [
    (['--distill', 'vkdd'], "unknown loss 'vkdd'"),
    (['--lr', '-1'], '--lr must be > 0, got -1'),
    (['--batch-size', '0'], '--batch-size must be > 0, got 0'),
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
