"""The whole program on CPU: ``main.py`` end to end against a plain script built from timm's own pieces.

Both jobs do the same work on the same ImageFolder of small JPEGs (written at benchmark time, 10 classes): start-up,
one evaluation of the (random) ``regnety_002`` teacher on the validation set, ``--steps`` training steps of DeiT-hard
distillation (α = 0.5, batch 128, DeiT's augmentation ``rand-m9-mstd0.5-inc1``, colour jitter 0.3, random erasing
0.25, mixup 0.8 / cutmix 1.0, label smoothing 0.1, AdamW with timm's cosine schedule) into a ~1.2 M-parameter DeiT at
32 px (patch 4, depth 6, width 128, 4 heads), the student's evaluation, the export of the student:

* ``vitkd``: ``python main.py --data-path … --distill deit_hard --max-steps N …`` as a user types it.
* ``timm``: :func:`timm_job` — timm's ``ImageDataset`` and ``create_loader`` (its transforms and augmentation),
  ``Mixup``, ``timm.task.TokenDistillationTask(distill_type='hard')``, ``create_optimizer_v2``/``create_scheduler_v2``
  and ``save_for_hf``: the script a timm user would write.

Each job runs in its own process, 2 rounds interleaved (vitkd, timm, then timm, vitkd). Reported per job: wall time
(process start to exit), training img/s over the steps past the first logged one (the steady state, from vitkd's
``log.jsonl`` and the same step marks in the timm job), peak RSS of the job's largest process (``getrusage`` of a
wrapper's children: the main process or a loader worker) and the machine's load average (the cores may be shared).

    python benchmarks/bench_whole_program.py --out docs/bench/whole_program_cpu.json
    python benchmarks/bench_whole_program.py --tiny --out output/bench_whole_program_tiny.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C
from bench_jpeg_e2e import REPO, make_imagefolder, steady_rate

STUDENT = 'deit_tiny_distilled_patch16_224'
FULL = dict(student_kwargs=dict(img_size=32, patch_size=4, depth=6, embed_dim=128, num_heads=4), img=32, batch=128,
            steps=100, log_every=10, train_images=100 * 128 + 128, val_images=1000, workers=2)
TINY = dict(student_kwargs=dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2), img=32, batch=8,
            steps=4, log_every=2, train_images=48, val_images=16, workers=0)
SIZES = ((40, 40), (48, 36), (36, 48))
TEACHER = 'regnety_002'
# Runs a job and prints the peak RSS of its largest process (ru_maxrss of the waited-for children, KiB on Linux).
WRAPPER = ('import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; '
           'print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)')


def vitkd_argv(setup: dict, data: Path, out_dir: Path) -> list[str]:
    return [str(REPO / 'main.py'), '--data-path', str(data), '--student', STUDENT, '--student-kwargs',
            *(f'{k}={v}' for k, v in setup['student_kwargs'].items()), '--input-size', str(setup['img']),
            '--teacher', TEACHER, '--no-teacher-pretrained', '--distill', 'deit_hard', '--max-steps',
            str(setup['steps']), '--epochs', '1', '--batch-size', str(setup['batch']), '--num-workers',
            str(setup['workers']), '--log-every', str(setup['log_every']), '--output-dir', str(out_dir)]


def timm_job(data: str, out_dir: str, setup_json: str) -> None:
    """The timm script (run as ``bench_whole_program.py --timm-job DATA OUT SETUP``): the same job from timm's pieces.

    Writes ``OUT/timm_job.json`` with its steady training img/s (past the first logged step, as for vitkd), the
    teacher's and the student's top-1 and the steps taken.
    """
    import timm
    import torch
    from timm.data import ImageDataset, Mixup, create_loader, resolve_data_config
    from timm.loss import SoftTargetCrossEntropy
    from timm.models import save_for_hf
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.task import DistillationTeacher, TokenDistillationTask
    setup, out = json.loads(setup_json), Path(out_dir)
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    student = timm.create_model(STUDENT, num_classes=10, **setup['student_kwargs'])
    teacher = timm.create_model(TEACHER, num_classes=10, pretrained=False)
    cfg = resolve_data_config({}, model=student)
    size = (3, setup['img'], setup['img'])
    common = dict(input_size=size, mean=cfg['mean'], std=cfg['std'], num_workers=setup['workers'],
                  use_prefetcher=False, persistent_workers=setup['workers'] > 0)
    train = create_loader(ImageDataset(str(Path(data) / 'train')), batch_size=setup['batch'], is_training=True,
                          auto_augment='rand-m9-mstd0.5-inc1', color_jitter=0.3, re_prob=0.25, re_mode='pixel',
                          interpolation='bicubic', **common)
    val = create_loader(ImageDataset(str(Path(data) / 'val')), batch_size=int(1.5 * setup['batch']),
                        is_training=False, crop_pct=0.875, interpolation='bicubic', **common)

    def top1(model) -> float:
        model.eval()
        hits = total = 0
        with torch.no_grad():
            for x, y in val:
                out = model(x)
                hits += int((out.argmax(-1) == y).sum())
                total += len(y)
        return 100.0 * hits / total

    teacher_top1 = top1(teacher)
    task = TokenDistillationTask(student, DistillationTeacher(teacher), criterion=SoftTargetCrossEntropy(),
                                 distill_type='hard', task_loss_weight=0.5, verbose=False)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    optimizer = create_optimizer_v2(task.trainable_module, 'adamw', lr=5e-4 * setup['batch'] / 512, weight_decay=0.05)
    scheduler, _ = create_scheduler_v2(optimizer, sched='cosine', num_epochs=1, warmup_epochs=0, min_lr=1e-5,
                                       step_on_epochs=False, updates_per_epoch=len(train))
    task.train()
    marks, step = {}, 0
    for x, y in train:
        x, targets = mixup(x, y)
        loss = task(x, targets)['loss']
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        scheduler.step_update(num_updates=step)
        if step % setup['log_every'] == 0:
            marks[step] = time.perf_counter()
        if step >= setup['steps']:
            break
    student_top1 = top1(student)
    save_for_hf(student, out / 'student')
    first, last = min(marks), max(marks)
    rate = setup['batch'] * (last - first) / (marks[last] - marks[first]) if last > first else None
    (out / 'timm_job.json').write_text(json.dumps(dict(img_per_s=rate, from_step=first, steps=step,
                                                       teacher_top1=teacher_top1, student_top1=student_top1)))


def run_job(name: str, setup: dict, data: Path, out_dir: Path) -> dict:
    """One job in its own process (through :data:`WRAPPER`): wall time, training img/s, peak RSS."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    job = (vitkd_argv(setup, data, out_dir) if name == 'vitkd' else
           [str(Path(__file__).resolve()), '--timm-job', str(data), str(out_dir), json.dumps(setup)])
    env = dict(os.environ, OMP_WAIT_POLICY='PASSIVE')
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, '-c', WRAPPER, sys.executable, *job], cwd=REPO, capture_output=True,
                          text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f'{name} job exited {proc.returncode}: {proc.stderr.strip().splitlines()[-3:]}')
    peak_kb = int(proc.stdout.strip().splitlines()[-1].split()[1])
    if name == 'vitkd':
        rate = steady_rate(out_dir / 'log.jsonl')['img_per_s']
    else:
        rate = json.loads((out_dir / 'timm_job.json').read_text())['img_per_s']
    return dict(wall_s=wall, train_img_per_s=rate, peak_rss_mb=peak_kb / 1024)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--tiny', action='store_true', help='a seconds-long run: 4 steps of batch 8, a 2-block student')
    p.add_argument('--rounds', type=int, default=2)
    p.add_argument('--timm-job', nargs=3, metavar=('DATA', 'OUT', 'SETUP'), help=argparse.SUPPRESS)
    p.add_argument('--out', default='output/bench_whole_program.json')
    args = p.parse_args(argv)
    if args.timm_job:
        timm_job(*args.timm_job)
        return 0
    setup = dict(TINY if args.tiny else FULL)
    load_before = os.getloadavg()
    start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix='vitkd_whole_'))
    try:
        images = make_imagefolder(tmp / 'data', setup['train_images'], setup['val_images'], SIZES, os.cpu_count() or 1)
        runs = {'vitkd': [], 'timm': []}
        for r in range(args.rounds):
            for name in (['vitkd', 'timm'] if r % 2 == 0 else ['timm', 'vitkd']):
                result = run_job(name, setup, tmp / 'data', tmp / name)
                runs[name].append(result)
                print(f'round {r} {name}: {result["wall_s"]:.1f} s, {result["train_img_per_s"]:.1f} img/s, '
                      f'peak RSS {result["peak_rss_mb"]:.0f} MB', flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    medians = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    per_round = {k: [v[k] / t[k] for v, t in zip(runs['vitkd'], runs['timm'])]
                 for k in ('wall_s', 'train_img_per_s', 'peak_rss_mb')}
    ratios = {f'vitkd / timm {k}': statistics.median(v) for k, v in per_round.items()}
    report = dict(setup=dict(setup, student=STUDENT, teacher=f'{TEACHER} (random weights)', image_sizes=SIZES,
                             rounds=args.rounds, machine=C.machine(), load_avg_before=load_before,
                             load_avg_after=os.getloadavg(), date=time.strftime('%Y-%m-%d'),
                             wall_s=round(time.time() - start, 1)),
                  images=images, runs=runs, medians=medians, ratios=ratios,
                  ratio_range={f'vitkd / timm {k}': [min(v), max(v)] for k, v in per_round.items()})
    for name, value in ratios.items():
        print(f'{name}: {value:.2f}×')
    C.write_report(report, args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
