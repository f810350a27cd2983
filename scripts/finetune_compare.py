"""Fine-tuning the distilled student vs training the same student from scratch, on a new task with the same budget.

    python scripts/finetune_compare.py --out docs/finetune     # about 10 minutes on 2 CPU cores

The source is the embedded default's student (``python main.py``: VkD from the shipped RegNetY teacher, grey
Fashion-MNIST, 28 px, 10 classes) trained for ``--source-steps`` steps. The new task is 2 classes, "tops" (T-shirt,
pullover, coat, shirt) vs the rest, as an RGB image folder made from Fashion-MNIST's *test* images (the source never
trained on them): ``--train-images`` for training, the next ``--val-images`` for validation. Each cell is the same
``main.py`` command at 32 px without a teacher, one epoch, one seed; the fine-tuning cells add ``--finetune <source>``
(new heads for 2 classes, the input convolution adapted from 1 to 3 channels, the position embeddings resampled from
7×7 to 8×8), the scratch cells start from a random student of the same architecture. Writes ``results.md`` and
``results.json`` (top-1 of the averaged heads per seed, mean ± std, the paired gain) in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from PIL import Image  # noqa: E402

import main  # noqa: E402
from vitkd.config import embedded_default  # noqa: E402
from vitkd.data import find_fashion_mnist, read_idx  # noqa: E402

TOPS = (0, 2, 4, 6)  # Fashion-MNIST's T-shirt/top, pullover, coat, shirt
# the new task's recipe, the same for both kinds of cell: light augmentation for 32-px grey images, no warm-up
RECIPE = ['--input-size', '32', '--teacher', 'none', '--distill', 'none', '--epochs', '1', '--batch-size', '64',
          '--lr', '1e-3', '--unscale-lr', '--warmup-epochs', '0', '--min-lr', '1e-5', '--weight-decay', '0.05',
          '--aa', 'none', '--reprob', '0', '--mixup', '0', '--cutmix', '0', '--color-jitter', '0', '--scale', '0.7',
          '1.0', '--smoothing', '0.1', '--eval-crop-ratio', '1.0', '--num-workers', '1']


def make_task(root: Path, train_images: int, val_images: int) -> Path:
    """The 2-class image folder from Fashion-MNIST's test split (PNG, RGB)."""
    if (root / 'val').is_dir():
        return root
    folder = find_fashion_mnist(None)
    images = read_idx(folder / 't10k-images-idx3-ubyte.gz')
    labels = read_idx(folder / 't10k-labels-idx1-ubyte.gz')
    for split, indices in (('train', range(train_images)), ('val', range(train_images, train_images + val_images))):
        for i in indices:
            target = root / split / ('tops' if labels[i] in TOPS else 'others')
            target.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).convert('RGB').save(target / f'{i:05d}.png')
    return root


def run(args: list[str], out: Path) -> dict:
    """One ``main.py`` run (skipped when its summary exists); returns its summary."""
    if not (out / 'summary.json').is_file():
        code = main.main([*args, '--output-dir', str(out), '--overwrite'])
        if code != 0:
            raise SystemExit(f'{out}: main.py exited {code}')
    return json.loads((out / 'summary.json').read_text())


def main_compare() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', type=Path, default=REPO / 'docs' / 'finetune')
    parser.add_argument('--work', type=Path, default=REPO / 'output' / 'finetune_compare',
                        help='where the runs and the image folder go (not evidence: only --out is kept)')
    parser.add_argument('--source-steps', type=int, default=150)
    parser.add_argument('--train-images', type=int, default=2000)
    parser.add_argument('--val-images', type=int, default=2000)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    args = parser.parse_args()
    start = time.time()
    source = args.work / 'source'
    source_summary = run(['--max-steps', str(args.source_steps)], source)
    data = make_task(args.work / 'tops_vs_rest', args.train_images, args.val_images)
    student = embedded_default()
    arch = ['--student', student['student'], '--student-kwargs',
            *[f'{k}={v}' for k, v in student['student_kwargs'].items() if k not in ('img_size', 'in_chans')]]
    cells = {}
    for seed in args.seeds:
        common = ['--data-path', str(data), *RECIPE, '--seed', str(seed)]
        cells[('finetune', seed)] = run([*common, '--finetune', str(source)], args.work / f'finetune_s{seed}')
        cells[('scratch', seed)] = run([*common, *arch], args.work / f'scratch_s{seed}')
    top1 = {kind: [cells[(kind, s)]['student']['avg_top1'] for s in args.seeds] for kind in ('finetune', 'scratch')}
    gains = [f - s for f, s in zip(top1['finetune'], top1['scratch'])]

    def spread(values):
        return f'{statistics.mean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}'

    command = 'python scripts/finetune_compare.py ' + ' '.join(sys.argv[1:])
    steps = cells[('finetune', args.seeds[0])]['steps']
    lines = ['# Fine-tuning the distilled student vs the same student from scratch', '',
             f'New task: Fashion-MNIST test images relabelled tops vs the rest (2 classes, RGB image folder, '
             f'{args.train_images} train / {args.val_images} val images, 32 px). Source: the embedded default\'s '
             f'VkD student after {source_summary["steps"]} steps (10-class avg-head top-1 '
             f'{source_summary["student"]["avg_top1"]:.2f} on Fashion-MNIST\'s test set). Each cell: {steps} steps of '
             'batch 64 (one epoch), no teacher, same recipe and seed for both kinds.', '',
             '| seed | fine-tuned avg top-1 | scratch avg top-1 | gain |', '|---|---|---|---|']
    lines += [f'| {s} | {f:.2f} | {c:.2f} | {f - c:+.2f} |' for s, f, c in zip(args.seeds, top1['finetune'],
                                                                                 top1['scratch'])]
    lines += [f'| mean ± std | {spread(top1["finetune"])} | {spread(top1["scratch"])} | {spread(gains)} |', '',
              f'Command: `{command}` ({(time.time() - start) / 60:.0f} min wall for the runs made now, '
              f'{time.strftime("%d %b %Y")}, this 2-core CPU machine).', '']
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / 'results.md').write_text('\n'.join(lines))
    (args.out / 'results.json').write_text(json.dumps(dict(command=command, seeds=args.seeds, top1=top1, gains=gains,
                                                           steps=steps, source_steps=source_summary['steps'],
                                                           source_top1=source_summary['student']['avg_top1']),
                                                      indent=2) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main_compare()
