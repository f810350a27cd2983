"""The whole program on real JPEGs: loader-only, step-only and end-to-end img/s of DeiT-S ← RegNetY-160 (bf16).

1. Writes an ImageFolder (``train/`` and ``val/``, 10 classes) of JPEG files with ImageNet-like sizes (500×375,
   375×500, 500×333, 640×480, …; quality 90) in a temp dir, with a process pool. Each image is a smooth random colour
   field (bicubic upsampling of a coarse random grid) with mild pixel noise, so the files have the texture, size on
   disk (tens of KB) and decode cost of photographs rather than of flat colour.
2. **loader-only**: vitkd's own train loader (``vitkd.build.build_data`` from the same command line as step 4: DeiT's
   augmentation ``rand-m9-mstd0.5-inc1``, colour jitter 0.3, random erasing 0.25, bicubic RandomResizedCrop to
   224 px) iterated as the engine iterates it: each batch copied to the device and mixed there
   (mixup 0.8 / cutmix 1.0, ``vitkd.data.mix_batch``). The first batches (worker start-up) are not timed.
3. **step-only**: the training step on synthetic device batches (``bench_gpu_step``'s ``vitkd_live`` variant in a
   worker process: Distiller with ``deit_hard``, live teacher, AdamW), timed in rounds after warm-up.
4. **end-to-end**: a real ``main.py`` run over the ImageFolder (``--max-steps``, no teacher evaluation, one final
   evaluation and the export); its training img/s from the run's ``log.jsonl`` past the first logged step (the
   steady state: the first steps pay the loader's start-up), beside ``summary.json``'s whole-epoch figure.

Goal line: end-to-end ≥ 0.9 × step-only. ``--tiny`` runs everything on CPU at 32 px in seconds.

    python benchmarks/bench_jpeg_e2e.py --out docs/bench/gpu/bench_jpeg_e2e.json          # GPU machine: ≤ 3 min
    python benchmarks/bench_jpeg_e2e.py --tiny --out output/bench_jpeg_e2e_tiny.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

import _common as C
import bench_gpu_step

REPO = Path(__file__).resolve().parents[1]
SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 400), (640, 480), (480, 640), (500, 500))
FULL = dict(student='deit_small_distilled_patch16_224', student_kwargs={}, teacher='regnety_160', img=224,
            batch=128, steps=60, train_images=60 * 128 + 256, val_images=512, log_every=10, sizes=SIZES)
TINY = dict(student='deit_tiny_distilled_patch16_224',
            student_kwargs=dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2), teacher='regnety_002',
            img=32, batch=8, steps=6, train_images=64, val_images=16, log_every=2, sizes=((64, 48), (48, 64)))
CLASSES = 10
GOAL = ('end_to_end / step_only', 0.9)


def write_jpeg(job: tuple[str, int, int, int]) -> int:
    """Write one smooth random JPEG (path, width, height, seed); returns its size in bytes."""
    path, w, h, seed = job
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, h // 48), max(2, w // 48), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
    pixels = np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return os.path.getsize(path)


def make_imagefolder(root: Path, train: int, val: int, sizes, workers: int) -> dict:
    """``root/{train,val}/class_k/*.jpg``, images spread evenly over :data:`CLASSES` classes, sizes drawn from
    ``sizes``, written by ``workers`` processes. Returns what was written."""
    rng = np.random.default_rng(0)
    jobs = []
    for split, count in (('train', train), ('val', val)):
        for k in range(CLASSES):
            (root / split / f'class_{k}').mkdir(parents=True, exist_ok=True)
        for i in range(count):
            w, h = sizes[rng.integers(len(sizes))]
            jobs.append((str(root / split / f'class_{i % CLASSES}' / f'{i:06d}.jpg'), int(w), int(h), len(jobs)))
    start = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        nbytes = list(pool.map(write_jpeg, jobs, chunksize=max(1, len(jobs) // (8 * workers))))
    return dict(train_images=train, val_images=val, classes=CLASSES, mean_kb=round(sum(nbytes) / len(nbytes) / 1024, 1),
                seconds=round(time.perf_counter() - start, 1))


def main_args(setup: dict, data: Path, out_dir: Path, workers: int, precision: str) -> list[str]:
    """The ``main.py`` command line of the end-to-end run (the loader-only measurement parses the same one)."""
    args = ['--data-path', str(data), '--student', setup['student'], '--teacher', setup['teacher'],
            '--no-teacher-pretrained', '--no-eval-teacher', '--distill', 'deit_hard', '--max-steps',
            str(setup['steps']), '--epochs', '1', '--batch-size', str(setup['batch']), '--mixed-precision',
            precision, '--num-workers', str(workers), '--eval-every', '1000', '--log-every', str(setup['log_every']),
            '--aa', 'rand-m9-mstd0.5-inc1', '--reprob', '0.25', '--output-dir', str(out_dir)]
    if setup['student_kwargs']:
        args += ['--student-kwargs', *(f'{k}={v}' for k, v in setup['student_kwargs'].items()),
                 '--input-size', str(setup['img'])]
    return args


def loader_only(argv: list[str], batches: int, skip: int) -> dict:
    """img/s of vitkd's train loader as the engine consumes it (``vitkd.training.EpochBatches``: each batch copied to
    the device without blocking, mixed there)."""
    import torch
    from accelerate import Accelerator
    from vitkd.build import build_data, build_student, student_data_spec
    from vitkd.data import BatchMixer
    from vitkd.arguments import parse_args
    from vitkd.training import EpochBatches, TrainState
    cfg, _ = parse_args(argv)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    input_size, mean, std, _ = student_data_spec(cfg, build_student(cfg, num_classes=1))
    loader, _, spec = build_data(cfg, input_size, mean, std)
    epoch = EpochBatches(loader, accelerator, BatchMixer(cfg, spec.num_classes)).epoch(TrainState())
    seen, start = 0, None
    for i, batch in epoch:
        if i == skip:
            C.synchronize(accelerator.device)
            start = time.perf_counter()
        seen += batch.images.shape[0] if i >= skip else 0
        if i + 1 >= skip + batches:
            break
    C.synchronize(accelerator.device)
    seconds = time.perf_counter() - start
    epoch.close()
    del epoch, loader
    return dict(img_per_s=seen / seconds, images=seen, untimed_batches=skip, workers=cfg.num_workers)


def step_only(setup: dict, precision: str, warmup: int, rounds: int, steps: int) -> dict:
    """img/s of the training step on synthetic device batches (one worker process, rounds after warm-up)."""
    gpu_setup = dict(teacher=setup['teacher'], img=setup['img'], in_chans=3, classes=CLASSES, batch=setup['batch'],
                     student_kwargs=setup['student_kwargs'])
    kwargs = dict(variant='vitkd_live', student=setup['student'], setup=gpu_setup, batches=4, precision=precision,
                  compiled=False, host_sync=False)
    with C.WorkerPool(1, os.cpu_count() or 1) as pool:
        error = pool.build({0: (bench_gpu_step.build_variant, kwargs)}, warmup, parallel=False)[0]
        if error:
            raise RuntimeError(f'step-only: {error}')
        times, memory = C.interleave(pool, {'step_only': 0}, rounds, steps)
    return dict(img_per_s=C.rates(times, setup['batch'])[0]['step_only'], seconds_per_step=times['step_only'],
                memory=memory['step_only'])


def steady_rate(log_path: Path) -> dict:
    """Training img/s of a one-process run from its ``log.jsonl`` step records, past the first one.

    Each step record's ``img_per_s`` is the epoch's running rate, seen / elapsed with seen = step · B in the first
    epoch, so the elapsed time at a record is step · B / rate; between the first record (rate r_a at step a) and the
    last (r_b at step b) the rate is B·(b − a) / (B·b / r_b − B·a / r_a) = (b − a) / (b / r_b − a / r_a) img/s.
    """
    steps = [json.loads(line) for line in log_path.read_text().splitlines() if '"kind": "step"' in line]
    steps = [s for s in steps if s['epoch'] < 1]
    if len(steps) < 2:
        return dict(img_per_s=steps[-1]['img_per_s'] if steps else None, from_step=None)
    a, b = steps[0], steps[-1]
    seconds_per_image = b['step'] / b['img_per_s'] - a['step'] / a['img_per_s']
    return dict(img_per_s=(b['step'] - a['step']) / seconds_per_image, from_step=a['step'], to_step=b['step'])


def end_to_end(argv: list[str], out_dir: Path) -> dict:
    """A ``main.py`` run (its own process, as a user starts it): wall time and its training img/s."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / 'main.py'), *argv], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f'main.py exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}')
    summary = json.loads((out_dir / 'summary.json').read_text())
    steady = steady_rate(out_dir / 'log.jsonl')
    return dict(img_per_s=steady['img_per_s'], steady_from_step=steady['from_step'],
                summary_img_per_s=summary.get('img_per_s'), steps=summary.get('steps'), wall_s=round(wall, 1), train_seconds=summary.get('train_seconds'),
                peak_memory_mb=summary.get('peak_memory_mb'), peak_memory_kind=summary.get('peak_memory_kind'))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--tiny', action='store_true', help='CPU-sized run: 64×48 JPEGs, 32 px student, regnety_002')
    p.add_argument('--precision', default='bf16', choices=['bf16', 'no'], help='--mixed-precision of the runs')
    p.add_argument('--num-workers', type=int, default=None, help='loader workers (default: every core)')
    p.add_argument('--steps', type=int, default=None, help='training steps of the main.py run (default 60; tiny 6)')
    p.add_argument('--loader-batches', type=int, default=None, help='timed loader batches (default: --steps)')
    p.add_argument('--keep-data', default=None, help='write the ImageFolder here and keep it (default: a temp dir)')
    p.add_argument('--out', default='output/bench_jpeg_e2e.json')
    args = p.parse_args(argv)
    start = time.time()
    setup = dict(TINY if args.tiny else FULL)
    if args.steps:
        setup.update(steps=args.steps, train_images=max(setup['train_images'], (args.steps + 2) * setup['batch']))
    workers = args.num_workers if args.num_workers is not None else os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix='vitkd_jpeg_'))
    data = Path(args.keep_data) if args.keep_data else tmp / 'data'
    try:
        written = make_imagefolder(data, setup['train_images'], setup['val_images'], setup['sizes'],
                                   max(1, os.cpu_count() or 1))
        print(f'wrote {written["train_images"]} + {written["val_images"]} JPEGs (mean {written["mean_kb"]} KB) in '
              f'{written["seconds"]} s', flush=True)
        precision = 'bf16' if args.precision == 'bf16' else 'fp32'
        step = step_only(setup, precision, warmup=3, rounds=3, steps=max(2, setup['steps'] // 6))
        print(f'step-only: {step["img_per_s"]:.1f} img/s', flush=True)
        run_dir = tmp / 'run'
        argv_main = main_args(setup, data, run_dir, workers, args.precision)
        loader = loader_only(argv_main, args.loader_batches or setup['steps'], skip=min(4, workers + 1))
        print(f'loader-only: {loader["img_per_s"]:.1f} img/s ({workers} workers)', flush=True)
        e2e = end_to_end(argv_main, run_dir)
        print(f'end-to-end: {e2e["img_per_s"]:.1f} img/s (main.py wall {e2e["wall_s"]} s)', flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = {'end_to_end / step_only': e2e['img_per_s'] / step['img_per_s'],
              'loader_only / step_only': loader['img_per_s'] / step['img_per_s']}
    goal = dict(goal=f'{GOAL[0]} ≥ {GOAL[1]}', value=round(ratios[GOAL[0]], 3), met=ratios[GOAL[0]] >= GOAL[1])
    report = dict(setup=dict({k: v for k, v in setup.items() if k != 'sizes'}, image_sizes=setup['sizes'],
                             precision=args.precision, num_workers=workers, tiny=args.tiny,
                             device=C.device_now().type, main_py=['python', 'main.py', *argv_main],
                             machine=C.machine(), date=time.strftime('%Y-%m-%d'),
                             wall_s=round(time.time() - start, 1)),
                  images=written, loader_only=loader, step_only=step, end_to_end=e2e, ratios=ratios, goal=goal)
    print(f'goal {goal["goal"]}: {goal["value"]:.2f} {"met" if goal["met"] else "NOT met"}; loader-only / step-only '
          f'{ratios["loader_only / step_only"]:.2f}')
    C.write_report(report, args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
