"""Training-step throughput: vitkd vs timm.task, student-only vs live teacher vs cached teacher (not a test).

Every variant runs in its own worker process, as a user runs it (vitkd's variants with vitkd's CPU process settings,
:func:`vitkd.cpu_malloc.tune_malloc`; timm.task with the C library's defaults), on the same student, teacher,
batches and precision. The parent interleaves them in rounds (one process computes at a time, so a change of machine
load hits every variant alike) after ≥ 3 warm-up steps each, and reports the median img/s of a full training step
(forward, backward, AdamW step), the ratios as medians of the per-round ratios with their quartiles, the peak memory
and the minor page faults per step:

* ``student_only``  — vitkd's Distiller with ``none`` (task CE only; no teacher).
* ``vitkd_live``    — vitkd's Distiller with ``deit_hard`` (α = 0.5), teacher run live (channels_last CNN teacher,
  logits only), configured as ``vitkd.run.build_run`` does: on CPU the attention runs timm's unfused path
  (:func:`vitkd.models.set_fused_attention`).
* ``vitkd_live_fused`` (CPU only) — the same with timm's fused attention kept (isolates that choice).
* ``vitkd_live_nchw`` — the same as ``vitkd_live`` with the teacher left in NCHW (isolates the channels_last gain).
* ``vitkd_cached``  — the same step with the teacher outputs replayed from a :class:`vitkd.teacher_cache.TeacherCache`
  (memory-mapped files in a temp dir; the read and the logit rebuild are inside the timed step).
* ``vitkd_compiled``, ``timm_task_compiled`` (``--compiled``) — ``vitkd_live`` with ``--compile`` and
  ``--compile-student`` (inductor: the teacher's forward paths and the student's training pass) against timm.task's
  own ``compile()`` (its student module and its teacher); warm-up steps pay the compilation.
* ``timm_task_tuned_malloc`` — timm.task in a process with vitkd's glibc heap settings (isolates that choice).
* ``timm_task``     — timm's own loop: ``timm.task.TokenDistillationTask(distill_type='hard', task_loss_weight=0.5)``
  with ``SoftTargetCrossEntropy`` on the same soft targets (the same loss as vitkd's deit_hard), its teacher wrapped in
  ``timm.task.DistillationTeacher``; ``create_optimizer_v2`` AdamW for both.

Setups (``--setup``): ``embedded`` (default) — the embedded student (``deit_ti_distilled`` img 28, patch 4, depth 4,
embed 96, 3 heads, 1 channel) and a random ``regnety_002`` (1 channel, 10 classes) teacher, batch 128, where the teacher
is ~9 % of a step; ``deit_ti_regnety160`` — DeiT's own pair at 224 px, timm's ``deit_tiny_distilled_patch16_224``
student and a random ``regnety_160`` teacher (1000 classes), batch 16, where the teacher is most of the step. fp32 and
bf16 autocast, every core by default (as one vitkd CPU process runs). Targets stated:
vitkd step ≥ 1.2× timm.task's; cached-teacher step ≥ 0.9× student-only. Memory: the worker process's peak RSS
(``getrusage``: the import, the models and the steps of one loop) and its minor page faults per timed step; on CUDA
``torch.cuda.max_memory_allocated``.

    python benchmarks/bench_train_step.py                      # writes output/bench_train_step.json
    python benchmarks/bench_train_step.py --precisions bf16 --rounds 3 --threads 1
    python benchmarks/bench_train_step.py --setup deit_ti_regnety160 --precisions fp32 --rounds 3 --steps 2 \
        --warmup 2 --compiled --out output/bench_train_step_224.json
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
import torch  # noqa: E402

from _common import build_models, make_batches as common_batches, peak_rss_mb, rates, speed_ratios  # noqa: E402
from _common import timm_task_step, vitkd_step, write_report  # noqa: E402
from vitkd.cpu_malloc import tune_malloc  # noqa: E402

TARGETS = {'vitkd_live / timm_task': 1.2, 'vitkd_compiled / timm_task_compiled': 1.2,
           'vitkd_cached / student_only': 0.9}
RATIOS = [('vitkd_live', 'timm_task'), ('vitkd_live_fused', 'timm_task'), ('vitkd_live_nchw', 'timm_task'),
          ('vitkd_live', 'timm_task_tuned_malloc'), ('vitkd_compiled', 'timm_task'),
          ('vitkd_compiled', 'timm_task_compiled'), ('vitkd_cached', 'student_only'), ('vitkd_live', 'student_only'),
          ('vitkd_cached', 'vitkd_live')]
SETUPS = {
    'embedded': dict(student='deit_ti_distilled', teacher='regnety_002', img=28, in_chans=1, classes=10, batch=128,
                     student_kwargs=dict(img_size=28, patch_size=4, depth=4, embed_dim=96, num_heads=3, in_chans=1)),
    'deit_ti_regnety160': dict(student='deit_tiny_distilled_patch16_224', teacher='regnety_160', img=224, in_chans=3,
                               classes=1000, batch=16, student_kwargs={}),
}


def build(args, device):
    return build_models(args.student, args.student_kwargs, args.teacher, args.classes, args.in_chans, device)


def make_batches(args, device):
    return common_batches(args.batches, args.batch, args.in_chans, args.img, args.classes, device)


def vitkd_variant(student, teacher, loss: str, args, device, precision, cache_dir=None, channels_last=None,
                  fused_attention=None, compiled=False):
    """Step function of a vitkd Distiller (``_common.vitkd_step``, reading the loss on the host every step as the
    engine's CPU path does); with ``cache_dir`` the teacher outputs are replayed from a cache."""
    step = vitkd_step(student, teacher, args.teacher, loss, make_batches(args, device), device, precision,
                      cache_dir=cache_dir, channels_last=channels_last, fused_attention=fused_attention,
                      compiled=compiled)
    return lambda batch_no, batch: step(batch_no)


def timm_task_variant(student, teacher, args, device, precision, compiled=False):
    step = timm_task_step(student, teacher, make_batches(args, device), device, precision, compiled=compiled)
    return lambda batch_no, batch: step(batch_no)


def build_variant(name: str, args, device, precision, tmp: Path):
    """The step function of one variant (see the module docstring), built inside its worker process."""
    student, teacher = build(args, device)
    if name == 'student_only':
        return vitkd_variant(student, None, 'none', args, device, precision)
    if name == 'vitkd_live':
        return vitkd_variant(student, teacher, 'deit_hard', args, device, precision)
    if name == 'vitkd_live_fused':
        return vitkd_variant(student, teacher, 'deit_hard', args, device, precision, fused_attention=True)
    if name == 'vitkd_live_nchw':
        return vitkd_variant(student, teacher, 'deit_hard', args, device, precision, channels_last=False)
    if name == 'vitkd_cached':
        return vitkd_variant(student, teacher, 'deit_hard', args, device, precision, cache_dir=tmp / precision)
    if name == 'vitkd_compiled':
        return vitkd_variant(student, teacher, 'deit_hard', args, device, precision, compiled=True)
    if name.startswith('timm_task'):
        return timm_task_variant(student, teacher, args, device, precision, compiled=name == 'timm_task_compiled')
    raise ValueError(name)


def worker(conn, name: str, args, tmp: str) -> None:
    """One variant in its own process, as a user would run it: vitkd's variants with vitkd's CPU process settings
    (:func:`vitkd.cpu_malloc.tune_malloc`, as ``vitkd.devices.make_accelerator`` applies them), timm.task with the C
    library's defaults (``timm_task_tuned_malloc``: with vitkd's). Answers the parent's commands over ``conn``."""
    torch.set_num_threads(args.threads)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if device.type == 'cpu' and (not name.startswith('timm_task') or name.endswith('_tuned_malloc')):
        tune_malloc()
    batches = make_batches(args, device)
    steps = {}
    while True:
        command, precision = conn.recv()
        if command == 'stop':
            return
        if command == 'warmup':
            steps[precision] = build_variant(name, args, device, precision, Path(tmp))
            for i in range(args.warmup):
                steps[precision](i % args.batches, batches[i % args.batches])
            conn.send(None)
            continue
        step = steps[precision]
        if device.type == 'cuda':
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        for i in range(args.steps):
            step(i % args.batches, batches[i % args.batches])
        if device.type == 'cuda':
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.steps
        memory = dict(peak_rss_mb=peak_rss_mb(),
                      page_faults_per_step=(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.steps)
        if device.type == 'cuda':
            memory['cuda_max_allocated_mb'] = torch.cuda.max_memory_allocated() / 2 ** 20
        conn.send((seconds, memory))


def variant_names(args, precision: str, device_type: str) -> list[str]:
    names = ['student_only', 'vitkd_live', 'vitkd_live_fused', 'vitkd_live_nchw', 'vitkd_cached', 'timm_task',
             'timm_task_tuned_malloc']
    if device_type != 'cpu':  # identical to vitkd_live and timm_task there (both choices are for CPU runs only)
        names.remove('vitkd_live_fused')
        names.remove('timm_task_tuned_malloc')
    if args.compiled:
        names += ['vitkd_compiled', 'timm_task_compiled']
    return names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--setup', default='embedded', choices=list(SETUPS), help='student, teacher, size and batch')
    p.add_argument('--batch', type=int, default=None, help='batch size (default: the setup\'s)')
    p.add_argument('--precisions', nargs='+', default=['fp32', 'bf16'], choices=['fp32', 'bf16'])
    p.add_argument('--batches', type=int, default=4, help='distinct batches cycled through (the cached "epoch")')
    p.add_argument('--warmup', type=int, default=3, help='untimed steps per variant and precision')
    p.add_argument('--rounds', type=int, default=5, help='interleaved rounds; each times --steps steps per variant')
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--threads', type=int, default=os.cpu_count() or 1,
                   help='intra-op threads of each worker (default: every core, as one vitkd CPU process runs)')
    p.add_argument('--compiled', action='store_true', help='add the torch.compile variants (vitkd and timm.task)')
    p.add_argument('--out', default='output/bench_train_step.json')
    args = p.parse_args(argv)
    for key, value in SETUPS[args.setup].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    device_type = 'cuda' if torch.cuda.is_available() else 'cpu'
    load_before = os.getloadavg()
    results = {}
    context = multiprocessing.get_context('spawn')
    with tempfile.TemporaryDirectory() as tmp:
        all_names = list(dict.fromkeys(n for pr in args.precisions for n in variant_names(args, pr, device_type)))
        workers = {}
        for name in all_names:
            parent_end, child_end = context.Pipe()
            process = context.Process(target=worker, args=(child_end, name, args, tmp), daemon=True)
            process.start()
            workers[name] = (process, parent_end)
        try:
            for precision in args.precisions:
                names = variant_names(args, precision, device_type)
                for name in names:  # one at a time: warm-up (and compilation) never overlaps a timed round
                    workers[name][1].send(('warmup', precision))
                    workers[name][1].recv()
                times = {name: [] for name in names}
                memory = {name: {} for name in names}
                for r in range(args.rounds):
                    for name in names[r % len(names):] + names[:r % len(names)]:  # rotated: no variant always first
                        workers[name][1].send(('round', precision))
                        seconds, mem = workers[name][1].recv()
                        times[name].append(seconds)
                        for key, value in mem.items():
                            memory[name][key] = max(memory[name].get(key, value), value)
                img_per_s, spread = rates(times, args.batch)
                # per-round ratios (a drift of the machine's speed cancels within a round)
                ratios, ratio_quartiles = speed_ratios(times, RATIOS)
                results[precision] = dict(img_per_s=img_per_s, img_per_s_range=spread, memory=memory, ratios=ratios,
                                          ratio_quartiles=ratio_quartiles)
        finally:
            for process, conn in workers.values():
                if process.is_alive():
                    conn.send(('stop', None))
                process.join(timeout=30)
    load_after = os.getloadavg()
    kwargs = ' '.join(f'{k} {v}' for k, v in args.student_kwargs.items())
    setup = dict(name=args.setup, student=f'{args.student} {kwargs}'.strip(), img=args.img,
                 teacher=f'{args.teacher} in_chans {args.in_chans} (random weights)',
                 batch=args.batch, classes=args.classes, threads=args.threads, device=device_type,
                 rounds=args.rounds, steps_per_round=args.steps, warmup=args.warmup, torch=torch.__version__,
                 timm=timm.__version__, cpu_count=os.cpu_count(), load_avg_before=load_before,
                 load_avg_after=load_after)
    report = dict(setup=setup, targets=TARGETS, results=results)
    print(f'setup: {setup["student"]}, teacher {setup["teacher"]}, batch {args.batch}, {args.threads} thread(s), '
          f'{device_type}')
    print(f'NOTE: load average {load_before[0]:.1f} → {load_after[0]:.1f} on {os.cpu_count()} cores; '
          'absolute img/s are noisy, the per-round ratios less so (their quartiles in brackets)')
    for precision, res in results.items():
        print(f'\n[{precision}]  {"variant":<23}{"img/s":>9}{"peak RSS MB":>13}{"faults/step":>13}')
        for name, rate in res['img_per_s'].items():
            m = res['memory'][name]
            print(f'{"":<8}{name:<23}{rate:>9.{0 if rate >= 100 else 2}f}{m["peak_rss_mb"]:>13.0f}'
                  f'{m["page_faults_per_step"]:>13.0f}')
        for name, value in res['ratios'].items():
            target = TARGETS.get(name)
            low, high = res['ratio_quartiles'][name]
            verdict = '' if target is None else f'  (target ≥ {target}: {"met" if value >= target else "NOT met"})'
            print(f'{"":<8}{name:<40}{value:>6.2f}×  [{low:.2f}–{high:.2f}]{verdict}')
    write_report(report, args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
