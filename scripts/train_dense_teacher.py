"""Train the small CNN teachers that vitkd ships for its dense embedded defaults
(``checkpoints/fmnist_dense_detect_teacher``, ``checkpoints/fmnist_dense_segment_teacher``).

A dense teacher is trained as any dense student is: ``main.py --task detect|segment`` with a CNN backbone
(timm's ``test_resnet``, 0.37 M parameters, its stages at strides 4, 8, 16 through an FPN), no teacher and no
distillation, on the embedded Fashion-MNIST scenes. The run's exported model (timm's ``save_for_hf`` folder: the whole
dense model) is copied to ``--out`` with ``training.json`` (the command, the validation metrics, the wall time), so it
loads through the same ``create_teacher`` path as a classification teacher.

    python scripts/train_dense_teacher.py --task segment --epochs 8
    python scripts/train_dense_teacher.py --task detect --epochs 8
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import main as vitkd_main  # noqa: E402


def teacher_argv(task: str, epochs: int, batch_size: int, lr: float, seed: int, run_dir: str) -> list[str]:
    """The ``main.py`` command that trains the teacher (the embedded preset, with a CNN and no distillation)."""
    return ['--task', task, '--student', 'test_resnet', '--student-kwargs', '--teacher', 'none', '--distill', 'none',
            '--epochs', str(epochs), '--batch-size', str(batch_size), '--lr', str(lr), '--warmup-epochs', '0.5',
            '--seed', str(seed), '--output-dir', run_dir, '--overwrite', '--log-every', '50']


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--task', choices=('detect', 'segment'), required=True)
    p.add_argument('--epochs', type=int, default=8)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--lr', type=float, default=3e-3)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--run-dir', default=None, help='the training run\'s dir (default output/dense_teacher_<task>)')
    p.add_argument('--out', default=None, help='where the teacher goes (default checkpoints/fmnist_dense_<task>_'
                                                'teacher)')
    args = p.parse_args(argv)
    run_dir = args.run_dir or f'output/dense_teacher_{args.task}'
    out = Path(args.out or REPO / 'checkpoints' / f'fmnist_dense_{args.task}_teacher')
    command = teacher_argv(args.task, args.epochs, args.batch_size, args.lr, args.seed, run_dir)
    start = time.time()
    code = vitkd_main.main(command)
    if code != 0:
        return code
    summary = json.loads((Path(run_dir) / 'summary.json').read_text())
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(Path(run_dir) / 'student', out)
    record = dict(task=args.task, backbone='test_resnet', command='python main.py ' + ' '.join(command),
                  validation=summary['student'], epochs=args.epochs, steps=summary['steps'],
                  train_seconds=summary['train_seconds'], wall_seconds=round(time.time() - start),
                  machine='2-core CPU (shared)', date=time.strftime('%Y-%m-%d'))
    (out / 'training.json').write_text(json.dumps(record, indent=2) + '\n')
    print(json.dumps(record))
    return 0


if __name__ == '__main__':
    sys.exit(main())
