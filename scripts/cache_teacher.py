"""Record the teacher-output cache up front (TinyViT-style), without training a student.

Takes exactly the options of ``main.py`` (the same YAML / flags: data, augmentation, mixup, seed, batch size,
precision, teacher, methods) plus ``--teacher-cache DIR``, and runs the teacher over ``--teacher-cache-epochs`` data
epochs (default ``--epochs``) with the augmentation and mixup each training epoch will draw, storing what the selected
methods need (see :mod:`vitkd.teacher_cache`). A later ``main.py`` run with the same options and ``--teacher-cache DIR``
then replays every epoch without a teacher forward. Launch it the way training will be launched: the mixup pairing is
inside each process's batch, so the number of processes and the per-process batch must match.

    python scripts/cache_teacher.py --teacher-cache cache/fmnist --teacher-cache-epochs 4
    accelerate launch --num_processes 2 scripts/cache_teacher.py -c run.yaml --teacher-cache /data/cache

Epochs already complete are skipped (an interrupted recording resumes where its last complete epoch ended). Prints
img/s and the bytes stored per sample per epoch.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from vitkd.arguments import parse_args  # noqa: E402
from vitkd.config import ConfigError  # noqa: E402
from vitkd.devices import make_accelerator  # noqa: E402
from vitkd.errors import UsageError  # noqa: E402
from vitkd.run import build_run  # noqa: E402
from vitkd.training import TrainState  # noqa: E402


def record(argv=None) -> int:
    cfg, _ = parse_args(argv)
    if not cfg.teacher_cache:
        raise ConfigError('scripts/cache_teacher.py needs --teacher-cache DIR')
    accelerator = make_accelerator(cfg)
    r = build_run(cfg, accelerator)
    cache = r.teacher_cache
    todo = [e for e in range(cache.epochs) if not cache.is_complete(e)]
    accelerator.print(f'teacher {r.teacher.source}: recording data epochs {todo or "(none: all complete)"} of '
                      f'{cache.epochs} into {cache.root} ({len(r.train_loader.dataset)} images, '
                      f'{accelerator.num_processes} process(es) × batch {cfg.batch_size})')
    seen, start = 0, time.time()
    with torch.no_grad():
        for data_epoch in todo:
            # the training loop's batches (device copies, seeded mixup, the cache recording each batch's teacher
            # outputs), without a student step
            state = TrainState(epoch=data_epoch)
            progress = r.batches.epoch(state)
            for it, _ in progress:
                state.batches_done = it + 1
                seen += cfg.batch_size * accelerator.num_processes
            progress.close()
            accelerator.print(f'data epoch {data_epoch} recorded')
    elapsed = time.time() - start
    accelerator.print(f'{seen} images in {elapsed:.1f} s ({seen / max(elapsed, 1e-9):.0f} img/s); '
                      f'{cache.dtype.itemsize} bytes per sample per epoch')
    accelerator.end_training()
    return 0


def main(argv=None) -> int:
    try:
        return record(argv)
    except UsageError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
