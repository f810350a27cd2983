"""What a run tells: ``log.jsonl``/``epochs.csv`` and the trackers (:class:`MetricLogger`), the console lines and
the final table (:func:`format_heads`, :func:`format_faults`, :func:`summary_table`), the costs recorded in
``summary.json`` (:func:`run_costs`) and ``curves.png`` (:func:`plot_curves`)."""
from __future__ import annotations

import csv
import dataclasses
import json
import resource
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from accelerate import Accelerator

from .config import Config
from .plots import plot_run
from .progress import rounded, warmup_warning
from .validate import distill_spec

if TYPE_CHECKING:
    from .run import Run

__all__ = ['MetricLogger', 'run_costs', 'plot_curves', 'COUNTS', 'format_faults', 'DENSE_METRICS', 'format_heads',
           'summary_table']


class MetricLogger:
    """Per-step and per-epoch records as JSONL (``log.jsonl``) and CSV (``epochs.csv``) in the run dir, and to the
    ``--log-with`` trackers.

    Each tracker value goes to the optimizer step it belongs to: training terms to their step, an epoch's validation
    metrics to the global step at which that epoch ended (``step``), so the curves of a tracker line up with
    ``log.jsonl``. ``epochs.csv`` (the summary a person reads) has its numbers rounded to what they measure
    (:func:`vitkd.progress.rounded`); ``log.jsonl`` and the trackers keep them exact. A warm-up that does not end before
    the run is warned about once, here, before training starts.
    """

    def __init__(self, out_dir: Path, accelerator: Accelerator, cfg: Optional[Config] = None,
                 steps_per_epoch: Optional[int] = None):
        self.out_dir, self.main, self.accelerator = out_dir, accelerator.is_main_process, accelerator
        self.jsonl = open(out_dir / 'log.jsonl', 'a') if self.main else None
        self.trackers = bool(cfg and cfg.log_with)
        self.last_step = 0
        if self.trackers:  # flat, tracker-friendly hyper-parameters
            hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                       for k, v in dataclasses.asdict(cfg).items() if v is not None}
            accelerator.init_trackers('vitkd', config=hparams)
        warning = warmup_warning(cfg, steps_per_epoch) if cfg is not None else None
        if warning:
            accelerator.print(warning)

    def step(self, record: dict) -> None:
        self.last_step = record['step']
        if self.trackers:
            self.accelerator.log({f'train/{k}': v for k, v in record.items() if k != 'step'}, step=record['step'])
        if self.jsonl:
            self.jsonl.write(json.dumps({'kind': 'step', **record}) + '\n')
            self.jsonl.flush()

    def epoch(self, epoch: int, train: dict, val: dict, step: Optional[int] = None) -> None:
        """One epoch's means and validation metrics; ``step``: the global optimizer step at which the epoch ended
        (default: the last step logged by :meth:`step`)."""
        step = self.last_step if step is None else step
        if self.trackers and val:
            self.accelerator.log({f'val/{k}': v for k, v in val.items()}, step=step)
        if not self.main:
            return
        record = {'epoch': epoch, 'step': step, **{f'train_{k}': v for k, v in train.items()},
                  **{f'val_{k}': v for k, v in val.items()}}
        self.jsonl.write(json.dumps({'kind': 'epoch', **record}) + '\n')
        self.jsonl.flush()
        path = self.out_dir / 'epochs.csv'
        rows = list(csv.DictReader(path.open())) if path.exists() else []
        rows.append({k: str(v) for k, v in rounded(record).items()})
        fields = sorted({k for r in rows for k in r}, key=lambda k: ({'epoch': 0, 'step': 1}.get(k, 2), k))
        with path.open('w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    def finish(self) -> None:
        if self.jsonl:
            self.jsonl.close()


def run_costs(r: 'Run', train_stats: dict) -> dict:
    """Throughput, trainable parameters beyond the student (projectors, adapters, banks' heads), peak memory."""
    extra = sum(p.numel() for p in r.distiller_unwrapped.parameters()) - r.student_params
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB
    return dict(img_per_s=round(train_stats.get('img_per_s', 0.0), 1), extra_params=extra,
                peak_memory_mb=round(peak, 1), peak_memory_kind='cuda_allocated' if torch.cuda.is_available() else 'rss')


def plot_curves(out_dir: Path, cfg: Config, accelerator: Accelerator) -> None:
    """``curves.png`` in the run dir: loss terms, lr, accuracy per head (main process)."""
    if accelerator.is_main_process and (out_dir / 'log.jsonl').exists():
        methods = ' + '.join(m.name if m.weight is None else f'{m.name}:{m.weight:g}' for m in distill_spec(cfg))
        plot_run(out_dir / 'log.jsonl', out_dir / 'curves.png', f'{cfg.student} ← {cfg.teacher} ({methods})')


# Integer counts in an epoch's training stats (not means).
COUNTS = ('samples', 'skipped_steps', 'corrupt_images')


def format_faults(train_stats: dict) -> str:
    """'3 unreadable images skipped, 1 non-finite optimizer step skipped' (empty when the epoch had none)."""
    parts = []
    if train_stats.get('corrupt_images'):
        n = train_stats['corrupt_images']
        parts.append(f'{n} unreadable image{"s" * (n != 1)} skipped (see the warnings above)')
    if train_stats.get('skipped_steps'):
        n = train_stats['skipped_steps']
        parts.append(f'{n} optimizer step{"s" * (n != 1)} skipped for non-finite values (nonfinite_step*.json)')
    return ', '.join(parts)


DENSE_METRICS = ('mAP', 'AP50', 'AP75', 'mIoU', 'pixel_acc')  # the headline numbers of dense runs, in percent


def format_heads(metrics: dict, prefix: str = '') -> str:
    """The validation line: top-1 per head (classification) or the dense metrics (``prefix``: ``teacher_``)."""
    dense = [f'{k} {metrics[prefix + k]:.2f}' for k in DENSE_METRICS if prefix + k in metrics]
    if dense:
        return ', '.join(dense)
    parts = [f'{h} {metrics[f"{h}_top1"]:.2f}%' for h in ('cls', 'dist', 'avg') if f'{h}_top1' in metrics]
    if 'ema_avg_top1' in metrics:
        parts.append(f'ema avg {metrics["ema_avg_top1"]:.2f}%')
    return 'top-1 ' + ', '.join(parts)


def summary_table(cfg: Config, summary: dict) -> str:
    s, t = summary['student'], summary['teacher']
    dense = [k for k in DENSE_METRICS if k in s]
    if dense:
        rows = [('teacher', *(f'{t["teacher_" + k]:.2f}' if t else '-' for k in dense)),
                ('student', *(f'{s[k]:.2f}' for k in dense))]
        lines = [f'{"":<10}' + ''.join(f'{k:>10}' for k in dense)] + [f'{r[0]:<10}' + ''.join(f'{v:>10}' for v in r[1:])
                                                                      for r in rows]
        lines.append(f'{summary["epochs_run"]} epochs, {summary["steps"]} steps, {summary["train_seconds"]:.0f} s '
                     f'({summary["stop_reason"]})')
        return '\n'.join(lines)
    rows = [('teacher', f'{t["teacher_top1"]:.2f}' if t else '-', f'{t["teacher_top5"]:.2f}' if t else '-')]
    for head in ('cls', 'dist', 'avg'):
        if f'{head}_top1' in s:
            rows.append((f'student {head}', f'{s[f"{head}_top1"]:.2f}', f'{s[f"{head}_top5"]:.2f}'))
    lines = [f'{"":<14}{"top-1":>8}{"top-5":>8}'] + [f'{a:<14}{b:>8}{c:>8}' for a, b, c in rows]
    lines.append(f'{summary["epochs_run"]} epochs, {summary["steps"]} steps, {summary["train_seconds"]:.0f} s '
                 f'({summary["stop_reason"]})')
    return '\n'.join(lines)
