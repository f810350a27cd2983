"""GPU training-step throughput: DeiT-Ti/S/B distilled ← RegNetY-160 at 224 px in bf16, vitkd against timm.task.

Interleaved in one run (``benchmarks/_common.py``: one worker process per variant, warm-up steps, rotated timing
rounds, ratios as medians of per-round ratios with their quartiles), for each student:

* ``student_only`` — vitkd's :class:`~vitkd.distiller.Distiller` with ``none`` (task CE only; no teacher).
* ``vitkd_live``   — the Distiller with ``deit_hard`` (α = 0.5), the teacher run live.
* ``vitkd_cached`` — the same step with the teacher's logits replayed from a :class:`vitkd.teacher_cache.TeacherCache`
  (top-10 logits, vitkd's ``--teacher-cache-topk`` default; the read and the rebuild are inside the timed step).
* ``timm_task``    — ``timm.task.TokenDistillationTask`` (hard distillation, task weight 0.5) on the same student,
  teacher, batches and precision.

The vitkd variants take the calls ``vitkd.engine.train_one_epoch`` makes for a step (``_common.vitkd_step``): Distiller
forward under bf16 autocast with the teacher cast to bf16 (as ``build_run`` does), backward, the step's extras (the
gradient norm, the terms' bookkeeping, the non-finite guard's record), AdamW; ``--ablation`` adds a DeiT-S group that
times ``vitkd_live`` without each extra and without any (each one's share of the step: 1 − t(without) / t(with), per
round). Every variant, timm's included, runs with TF32 and cuDNN autotuning on (``_common.cuda_settings``: vitkd's
defaults, and what timm users set). Both vitkd and timm.task use timm's ``create_optimizer_v2`` AdamW with
torch's fused kernel on CUDA (``fused=True``; on CPU torch's default). Students ``deit_{tiny,small,base}_distilled_
patch16_224`` and the teacher ``regnety_160`` have random weights (``pretrained=False``: nothing is downloaded), 1000
classes, batch 128, 224 px. With ``--compiled`` the DeiT-S group runs again compiled: vitkd as with ``--compile``
(the teacher's forward paths and the student's training pass), timm.task with its own ``compile()`` (its student and its
teacher). The DeiT-S group also times VkD (``vkd``, α = γ = 1) with each projector
map of ``--vkd-maps`` (``vitkd/losses/vkd.py``: ``orthogonal`` = torch's Householder parametrisation, the paper's;
``orthogonal_cayley``; ``orthogonal_matrix_exp``) and with a plain ``linear`` projector: the map's share of the step is
1 − t(linear) / t(map) per round (the orthogonal parametrisation's forward and backward; the projection matmul itself
is in both).

Reported: img/s (median over the rounds, slowest and fastest round), peak GPU memory of each variant's timed steps
(``torch.cuda.max_memory_allocated``, reset per round; on CPU the worker's peak RSS), speed ratios with quartiles and
the goal lines: vitkd_live ≥ 1.3× timm_task (DeiT-S), vitkd_cached ≥ 0.95× student_only (DeiT-S), vitkd_live's peak
memory ≤ timm_task's. ``--budget-s`` skips the groups (and rounds) that would start after it and lists them.

    python benchmarks/bench_gpu_step.py --compiled --ablation --out docs/bench/gpu/bench_gpu_step.json  # H200: ≤ 4 min
    python benchmarks/bench_gpu_step.py --tiny --students small --rounds 2 --steps 1 --warmup 1   # CPU smoke run
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import _common as C

VARIANTS = ('student_only', 'vitkd_live', 'vitkd_cached', 'timm_task')
VKD_MAPS = ('orthogonal', 'orthogonal_cayley', 'orthogonal_matrix_exp')
STUDENTS = {'tiny': 'deit_tiny_distilled_patch16_224', 'small': 'deit_small_distilled_patch16_224',
            'base': 'deit_base_distilled_patch16_224'}
FULL = dict(teacher='regnety_160', img=224, in_chans=3, classes=1000, batch=128, student_kwargs={})
TINY = dict(teacher='regnety_002', img=32, in_chans=3, classes=10, batch=8,
            student_kwargs=dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2))
GOALS = {'vitkd_live / timm_task': ('≥', 1.3), 'vitkd_cached / student_only': ('≥', 0.95),
         'peak memory vitkd_live / timm_task': ('≤', 1.0)}
PAIRS = [('vitkd_live', 'timm_task'), ('vitkd_cached', 'student_only'), ('vitkd_cached', 'timm_task'),
         ('vitkd_live', 'student_only'), ('timm_task', 'student_only')]
CACHE_TOPK = 10
ABLATION = ('vitkd_live', *(f'vitkd_live-no_{e}' for e in C.STEP_EXTRAS), 'vitkd_live-no_extras')


def build_variant(tmp: Path, variant: str, student: str, setup: dict, batches: int, precision: str, compiled: bool,
                  host_sync: bool) -> C.Step:
    """The step function of ``variant`` (see the module docstring), built inside its worker process."""
    device = C.device_now()
    student_model, teacher_model = C.build_models(student, setup['student_kwargs'], setup['teacher'],
                                                  setup['classes'], setup['in_chans'], device)
    data = C.make_batches(batches, setup['batch'], setup['in_chans'], setup['img'], setup['classes'], device)
    common = dict(compiled=compiled, fused_adamw=device.type == 'cuda', host_sync=host_sync)
    if variant == 'timm_task':
        return C.timm_task_step(student_model, teacher_model, data, device, precision, **common)
    if variant == 'student_only':
        return C.vitkd_step(student_model, None, setup['teacher'], 'none', data, device, precision, **common)
    if variant == 'vitkd_live':
        return C.vitkd_step(student_model, teacher_model, setup['teacher'], 'deit_hard', data, device, precision,
                            **common)
    if variant == 'vitkd_cached':
        return C.vitkd_step(student_model, teacher_model, setup['teacher'], 'deit_hard', data, device, precision,
                            cache_dir=tmp, cache_topk=CACHE_TOPK, **common)
    if variant.startswith('vitkd_live-'):  # the ablation: vitkd_live without one of the step's extras, or any
        dropped = variant.removeprefix('vitkd_live-no_')
        extras = () if dropped == 'extras' else tuple(e for e in C.STEP_EXTRAS if e != dropped)
        return C.vitkd_step(student_model, teacher_model, setup['teacher'], 'deit_hard', data, device, precision,
                            extras=extras, **common)
    if variant.startswith('vkd_'):
        return C.vitkd_step(student_model, teacher_model, setup['teacher'], 'vkd', data, device, precision,
                            loss_opts={'projector': variant.removeprefix('vkd_')}, **common)
    raise ValueError(f'unknown variant {variant!r}')


def groups(args) -> list[dict]:
    """The groups of variants timed together, in the order they run (a budget cuts from the end): the eager DeiT-S
    group (the goals), the other eager students, then the compiled DeiT-S group (its warm-up pays the compilation)."""
    vkd = [f'vkd_{m}' for m in args.vkd_maps] + (['vkd_linear'] if args.vkd_maps else [])
    out = [dict(name='deit_small eager', student='small', compiled=False, variants=[*VARIANTS, *vkd])
           ] if 'small' in args.students else []
    out += [dict(name=f'deit_{s} eager', student=s, compiled=False, variants=list(VARIANTS))
            for s in ('tiny', 'base') if s in args.students]
    if args.ablation and 'small' in args.students:
        out.append(dict(name='deit_small extras', student='small', compiled=False, variants=list(ABLATION)))
    if args.compiled and 'small' in args.students:
        out.append(dict(name='deit_small compiled', student='small', compiled=True, variants=list(VARIANTS)))
    return out


def summarize(times: dict, memory: dict, batch: int, vkd_maps) -> dict:
    """img/s, memory, speed ratios (quartiles) and, with VkD variants, the projector map's share of the step."""
    img_per_s, img_per_s_range = C.rates(times, batch)
    pairs = PAIRS + [(f'vkd_{m}', 'vitkd_live') for m in (*vkd_maps, 'linear')]
    ratios, ratio_quartiles = C.speed_ratios(times, pairs)
    peak = {name: m.get('cuda_max_allocated_mb', m.get('peak_rss_mb')) for name, m in memory.items() if m}
    if peak.get('vitkd_live') and peak.get('timm_task'):
        ratios['peak memory vitkd_live / timm_task'] = peak['vitkd_live'] / peak['timm_task']
    share, share_quartiles = {}, {}
    for m in vkd_maps:
        ta, tl = times.get(f'vkd_{m}'), times.get('vkd_linear')
        if ta and tl:
            per_round = [1 - lin / t for t, lin in zip(ta, tl)]
            share[m], share_quartiles[m] = statistics.median(per_round), C.quartiles(per_round)
    result = dict(seconds_per_step=times, img_per_s=img_per_s, img_per_s_range=img_per_s_range, peak_memory_mb=peak,
                  memory=memory, ratios=ratios, ratio_quartiles=ratio_quartiles)
    if share:
        result['projector_share_of_step'] = share
        result['projector_share_quartiles'] = share_quartiles
    extras = {}
    for e in (*C.STEP_EXTRAS, 'extras'):  # 1 − t(without it) / t(the engine's step), per round
        t_all, t_without = times.get('vitkd_live'), times.get(f'vitkd_live-no_{e}')
        if t_all and t_without and len(t_all) == len(t_without):
            per_round = [1 - w / a for a, w in zip(t_all, t_without)]
            extras[e] = dict(share=statistics.median(per_round), quartiles=C.quartiles(per_round))
    if extras:
        result['extras_share_of_step'] = extras
    return result


def goal_lines(results: dict) -> list[dict]:
    """The goals, judged on the eager DeiT-S group (the compiled group's values are listed beside them)."""
    lines = []
    for key, (op, target) in GOALS.items():
        for group in ('deit_small eager', 'deit_small compiled'):
            value = results.get(group, {}).get('ratios', {}).get(key)
            if value is None:
                continue
            met = value >= target if op == '≥' else value <= target
            lines.append(dict(goal=f'{key} {op} {target}', group=group, value=round(value, 3), met=met))
    return lines


def print_report(report: dict) -> None:
    setup = report['setup']
    print(f'teacher {setup["teacher"]}, {setup["img"]} px, batch {setup["batch"]}, {setup["precision"]}, '
          f'{setup["device"]}, optimizer {setup["optimizer"]}')
    for group, res in report['results'].items():
        print(f'\n[{group}]  {"variant":<28}{"img/s":>9}{"peak MB":>10}')
        for name, rate in res['img_per_s'].items():
            print(f'{"":<4}{name:<28}{rate:>9.{0 if rate >= 100 else 2}f}{res["peak_memory_mb"].get(name, 0):>10.0f}')
        for name, value in res['ratios'].items():
            low, high = res['ratio_quartiles'].get(name, (value, value))
            print(f'{"":<4}{name:<44}{value:>6.2f}×  [{low:.2f}–{high:.2f}]')
        for e, value in res.get('extras_share_of_step', {}).items():
            low, high = value['quartiles']
            print(f'{"":<4}{e + " share of the step":<44}{100 * value["share"]:>6.1f}%  '
                  f'[{100 * low:.1f}–{100 * high:.1f}]')
        for m, value in res.get('projector_share_of_step', {}).items():
            low, high = res['projector_share_quartiles'][m]
            print(f'{"":<4}{"vkd " + m + " map share of the step":<44}{100 * value:>6.1f}%  '
                  f'[{100 * low:.1f}–{100 * high:.1f}]')
    for name, error in report['failed'].items():
        print(f'FAILED {name}: {error}')
    if report['skipped']:
        print(f'skipped (--budget-s {setup["budget_s"]}): {", ".join(report["skipped"])}')
    for line in report['goals']:
        print(f'goal {line["goal"]} ({line["group"]}): {line["value"]:.2f} {"met" if line["met"] else "NOT met"}')


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--tiny', action='store_true', help='CPU-sized smoke run: 32 px students of 2 blocks, regnety_002')
    p.add_argument('--students', nargs='+', default=list(STUDENTS), choices=list(STUDENTS))
    p.add_argument('--batch', type=int, default=None, help='batch size (default 128; --tiny 8)')
    p.add_argument('--precision', default='bf16', choices=['bf16', 'fp32'])
    p.add_argument('--compiled', action='store_true', help='add the compiled DeiT-S group (vitkd and timm.task)')
    p.add_argument('--vkd-maps', nargs='*', default=list(VKD_MAPS), choices=list(VKD_MAPS),
                   help='VkD projector maps timed on DeiT-S (none: no VkD variants)')
    p.add_argument('--batches', type=int, default=4, help='distinct batches cycled through (the cached "epoch")')
    p.add_argument('--warmup', type=int, default=3, help='untimed steps per variant (compiled: pays compilation)')
    p.add_argument('--rounds', type=int, default=7, help='interleaved rounds; each times --steps steps per variant '
                   f'(the quartiles lie inside the data from {C.MIN_ROUNDS_FOR_QUARTILES} rounds on)')
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--ablation', action='store_true',
                   help='add the DeiT-S group timing vitkd_live without each of the step\'s extras '
                        f'({", ".join(C.STEP_EXTRAS)}) and without any')
    p.add_argument('--host-sync', action='store_true',
                   help='read the loss on the host every step (both vitkd and timm.task)')
    p.add_argument('--threads', type=int, default=None, help='intra-op threads per worker (default: cores / workers)')
    p.add_argument('--budget-s', type=float, default=230.0,
                   help='no group or round starts after this many seconds; what is left is listed as skipped')
    p.add_argument('--out', default='output/bench_gpu_step.json')
    args = p.parse_args(argv)
    start = time.time()
    setup = dict(TINY if args.tiny else FULL)
    if args.batch:
        setup['batch'] = args.batch
    plan = groups(args)
    size = max(len(g['variants']) for g in plan)
    cuda = C.device_now().type == 'cuda'
    threads = args.threads or max(1, (os.cpu_count() or 1) // size)
    results, failed, skipped = {}, {}, []
    with C.WorkerPool(size, threads) as pool:
        for group in plan:
            if time.time() - start > args.budget_s:
                skipped.append(group['name'])
                continue
            kwargs = dict(student=STUDENTS[group['student']], setup=setup, batches=args.batches,
                          precision=args.precision, compiled=group['compiled'], host_sync=args.host_sync)
            jobs = {i: (build_variant, dict(kwargs, variant=v)) for i, v in enumerate(group['variants'])}
            errors = pool.build(jobs, args.warmup, parallel=True)
            workers = {v: i for i, v in enumerate(group['variants']) if errors[i] is None}
            failed.update({f'{group["name"]} {v}': errors[i] for i, v in enumerate(group['variants']) if errors[i]})
            times, memory = C.interleave(pool, workers, args.rounds, args.steps, deadline=start + args.budget_s)
            pool.release(list(jobs))
            results[group['name']] = summarize(times, memory, setup['batch'], args.vkd_maps)
            print(f'{group["name"]}: done at {time.time() - start:.0f} s', flush=True)
    report = dict(
        setup=dict(setup, students={s: STUDENTS[s] for s in args.students}, precision=args.precision,
                   device='cuda' if cuda else 'cpu', tiny=args.tiny, batches=args.batches, warmup=args.warmup,
                   rounds=args.rounds, steps_per_round=args.steps, host_sync=args.host_sync, threads=threads,
                   budget_s=args.budget_s, teacher_cache_topk=CACHE_TOPK, weights='random (pretrained=False)',
                   cuda=C.cuda_settings(), step_extras=list(C.STEP_EXTRAS),
                   teacher_dtype_vitkd='bf16 (cast, as vitkd)' if args.precision == 'bf16' else 'fp32',
                   optimizer='timm create_optimizer_v2 adamw, ' + ('torch fused kernel' if cuda else 'torch default'),
                   machine=C.machine(), date=time.strftime('%Y-%m-%d'), wall_s=round(time.time() - start, 1)),
        results=results, failed=failed, skipped=skipped, goals=goal_lines(results))
    print_report(report)
    if args.rounds < C.MIN_ROUNDS_FOR_QUARTILES:
        print(f'note: with {args.rounds} rounds the quartiles are the slowest and fastest rounds')
    C.write_report(report, args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
