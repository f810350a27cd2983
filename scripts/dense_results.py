"""A seeded comparison of dense distillation methods on the embedded scenes: every (method, seed) run of the embedded
``--task`` preset with a step budget, then a table of the validation metric per method (mean ± sd over the seeds)
and the paired gain over ``none`` (per seed: method − none, same seed, same data order), flagged "within noise" when
a two-sided paired t-test at 95 % cannot tell it from zero.

    python scripts/dense_results.py --task segment --methods none vkd kd --seeds 0 1 2 --max-steps 120

Writes ``<out>/<task>_results.json`` and ``<out>/<task>_results.md`` (the command, the machine, the date, every run's
numbers); the runs themselves go to ``--runs`` (not kept in the repository). ``--reuse <earlier results.json>``
takes the runs of the methods that file holds (same task, seeds and step budget; the runs are deterministic on one
machine) instead of running them again, and records where each method's numbers came from and when.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
METRIC = {'segment': 'mIoU', 'detect': 'mAP'}
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # t(0.975, df)


def run_one(task: str, method: str, seed: int, max_steps: int, run_dir: Path) -> dict:
    """One embedded-preset run; returns its final validation metrics, exact (from log.jsonl). A run dir that already
    holds this finished run (same task, method, seed and step budget) is read instead of rerun, so an interrupted
    comparison continues where it stopped."""
    command = [sys.executable, str(REPO / 'main.py'), '--task', task, '--distill', method, '--seed', str(seed),
               '--max-steps', str(max_steps), '--output-dir', str(run_dir), '--overwrite', '--no-eval-teacher']
    if not _finished(run_dir, task, method, seed, max_steps):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f'{" ".join(command)} failed ({done.returncode}): {done.stderr.strip()[-500:]}')
    epochs = [r for r in map(json.loads, (run_dir / 'log.jsonl').read_text().splitlines()) if r['kind'] == 'epoch']
    summary = json.loads((run_dir / 'summary.json').read_text())
    return {**{k[4:]: v for k, v in epochs[-1].items() if k.startswith('val_')},
            'train_seconds': summary['train_seconds'], 'steps': summary['steps']}


def _finished(run_dir: Path, task: str, method: str, seed: int, max_steps: int) -> bool:
    if not (run_dir / 'summary.json').is_file() or not (run_dir / 'config.yaml').is_file():
        return False
    cfg = yaml.safe_load((run_dir / 'config.yaml').read_text())
    summary = json.loads((run_dir / 'summary.json').read_text())
    return ((cfg['task'], cfg['distill'], cfg['seed'], cfg['max_steps']) == (task, [method], seed, max_steps)
            and summary['steps'] == max_steps)


def paired(gains: list[float]) -> dict:
    """Mean and sd of the per-seed gains, and whether a paired t-test at 95 % separates the mean from 0."""
    mean = statistics.fmean(gains)
    sd = statistics.stdev(gains) if len(gains) > 1 else float('nan')
    half_width = T_975.get(len(gains) - 1, 1.96) * sd / math.sqrt(len(gains)) if len(gains) > 1 else float('inf')
    return dict(mean=mean, sd=sd, ci95_half_width=half_width, within_noise=not abs(mean) > half_width)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--task', choices=tuple(METRIC), default='segment')
    p.add_argument('--methods', nargs='+', default=['none', 'vkd', 'kd'])
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    p.add_argument('--max-steps', type=int, default=120)
    p.add_argument('--runs', default='output/dense_results')
    p.add_argument('--out', default=str(REPO / 'docs' / 'dense'))
    p.add_argument('--reuse', metavar='RESULTS_JSON', help='an earlier results file whose methods are not rerun')
    args = p.parse_args(argv)
    if 'none' not in args.methods:
        p.error('--methods must include none (the paired baseline)')
    metric = METRIC[args.task]
    results: dict[str, dict[int, dict]] = {m: {} for m in args.methods}
    today = time.strftime('%Y-%m-%d')
    provenance = {m: dict(date=today, command=None) for m in args.methods}
    if args.reuse:
        earlier = json.loads(Path(args.reuse).read_text())
        if (earlier['task'], earlier['seeds'], earlier['max_steps']) != (args.task, args.seeds, args.max_steps):
            p.error(f'--reuse {args.reuse}: task {earlier["task"]}, seeds {earlier["seeds"]}, '
                    f'{earlier["max_steps"]} steps differ from this comparison')
        for method in set(args.methods) & set(earlier['runs']):
            results[method] = {s: earlier['runs'][method][str(s)] for s in args.seeds}
            kept = earlier.get('provenance', {}).get(method, {})  # runs made by that file's own command: none kept
            provenance[method] = kept if kept.get('command') else dict(date=earlier['date'],
                                                                         command=earlier['command'])
    for method in args.methods:  # one method's seeds after another: an interrupted comparison leaves whole methods
        for seed in args.seeds:
            if seed in results[method]:
                continue
            results[method][seed] = run_one(args.task, method, seed, args.max_steps,
                                            Path(args.runs) / args.task / f'{method}_s{seed}')
            print(f'{method} seed {seed}: {metric} {results[method][seed][metric]:.2f}', flush=True)
    rows = []
    for method in args.methods:
        values = [results[method][s][metric] for s in args.seeds]
        row = dict(method=method, mean=statistics.fmean(values), sd=statistics.stdev(values), values=values)
        if method != 'none':
            row['gain'] = paired([results[method][s][metric] - results['none'][s][metric] for s in args.seeds])
        rows.append(row)
    command = 'python scripts/dense_results.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
    record = dict(command=command, task=args.task, metric=metric, seeds=args.seeds, max_steps=args.max_steps,
                  machine='2-core CPU (shared with other jobs)', date=today, rows=rows, provenance=provenance,
                  runs={m: {str(s): v for s, v in r.items()} for m, r in results.items()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f'{args.task}_results.json').write_text(json.dumps(record, indent=2) + '\n')
    lines = [f'# Dense {args.task}: {metric} on the embedded Fashion-MNIST scenes (validation, 500 scenes)', '',
             f'`{command}` — {record["machine"]}, {record["date"]}; {args.max_steps} steps of the embedded preset per '
             f'run, seeds {", ".join(map(str, args.seeds))}.', '']
    reused = [m for m in args.methods if provenance[m]['command']]
    if reused:
        lines += [f'The {m} runs are those of `{provenance[m]["command"]}` ({provenance[m]["date"]}, same machine).'
                  for m in reused] + ['']
    lines += [f'| method | {metric} mean ± sd | per seed | paired gain over none (mean ± sd, 95 % CI half-width) |',
              '|---|---|---|---|']
    for row in rows:
        gain = row.get('gain')
        shown = '—' if gain is None else (f'{gain["mean"]:+.2f} ± {gain["sd"]:.2f} (±{gain["ci95_half_width"]:.2f})'
                                          + (' within noise' if gain['within_noise'] else ''))
        lines.append(f'| {row["method"]} | {row["mean"]:.2f} ± {row["sd"]:.2f} | '
                     f'{", ".join(f"{v:.2f}" for v in row["values"])} | {shown} |')
    (out / f'{args.task}_results.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
