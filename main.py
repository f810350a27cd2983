"""vitkd: distil a frozen teacher into a DeiT-style student.

    python main.py                                   # embedded default: Fashion-MNIST, shipped teacher, ~4 minutes
    accelerate launch main.py --teacher regnety_160 --student deit_s_distilled --data-path /data/imagenet
    python main.py --eval-student --student-ckpt output/run/student
    python main.py --list-losses
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from engine import NonFiniteLossError, TrainState, evaluate, evaluate_teacher, train_one_epoch
from vitkd import run as runlib
from vitkd.config import ConfigError, parse_args, to_yaml

_logger = logging.getLogger('vitkd')


def main(argv=None) -> int:
    cfg, args = parse_args(argv)
    if args.list_losses:
        from vitkd.losses import list_losses
        width = max(len(n) for n, _ in list_losses())
        print('\n'.join(f'{n:<{width}}  {paper}' for n, paper in list_losses()))
        return 0
    accelerator = runlib.make_accelerator(cfg)
    log = accelerator.print
    if cfg.eval_student:
        return runlib.eval_student(cfg, accelerator)

    out_dir = runlib.prepare_output_dir(cfg, accelerator)
    r = runlib.build_run(cfg, accelerator)
    log(f'student {cfg.student} ({r.student_params / 1e6:.2f} M params), teacher '
        f'{r.teacher.source if r.teacher else "none"}, methods {", ".join(r.distiller_unwrapped.entries) or "none"}, '
        f'{len(r.train_loader.dataset)} train / {len(r.val_loader.dataset)} val images, global batch '
        f'{r.global_batch}, lr {r.lr:.2e}')
    if accelerator.is_main_process:
        (out_dir / 'config.yaml').write_text(to_yaml(cfg))
    teacher_metrics = {}
    if r.teacher is not None and cfg.eval_teacher:
        teacher_metrics = evaluate_teacher(r.teacher, r.val_loader, accelerator)
        log(f'teacher top-1 {teacher_metrics["teacher_top1"]:.2f}%  top-5 {teacher_metrics["teacher_top5"]:.2f}%')

    state = r.state
    if cfg.time_limit:
        state.deadline = time.time() + cfg.time_limit
    start, best, metrics = time.time(), None, {}
    logger = runlib.MetricLogger(out_dir, accelerator)
    while state.epoch < cfg.epochs and not state.stop_reason:
        r.distiller_unwrapped.teacher and r.distiller_unwrapped.teacher.train(False)
        train_stats = train_one_epoch(r.distiller, r.train_loader, r.optimizer, r.scheduler, accelerator, r.mixer,
                                      state, r.spec.num_classes, cfg.clip_grad, r.ema, cfg.log_every, logger.step)
        state.epoch += 1
        last = state.epoch >= cfg.epochs or bool(state.stop_reason)
        if last or state.epoch % cfg.eval_every == 0:
            metrics = evaluate(r.student, r.val_loader, accelerator)
            if r.ema is not None:
                metrics.update({f'ema_{k}': v for k, v in evaluate(r.ema.module, r.val_loader, accelerator).items()
                                if k != 'samples'})
            if best is None or metrics['avg_top1'] > best['avg_top1']:
                best = dict(metrics, epoch=state.epoch - 1)
            log(f'epoch {state.epoch - 1}: ' + ', '.join(f'{k} {v:.3f}' for k, v in train_stats.items()
                                                           if k not in ('samples',)) +
                ' | ' + runlib.format_heads(metrics))
        logger.epoch(state.epoch - 1, train_stats, metrics)
        runlib.save_checkpoint(r, out_dir, accelerator)
    elapsed = time.time() - start
    export_dir = runlib.export_student(r, out_dir, accelerator, metrics)
    summary = dict(teacher=teacher_metrics, student=metrics, best=best, epochs_run=state.epoch, steps=state.step,
                   train_seconds=round(elapsed, 1), stop_reason=state.stop_reason or 'epochs done',
                   student_export=str(export_dir))
    if accelerator.is_main_process:
        (out_dir / 'summary.json').write_text(json.dumps(summary, indent=2) + '\n')
    logger.finish()
    log(runlib.summary_table(cfg, summary))
    log(f'outputs in {out_dir}')
    accelerator.end_training()
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except (ConfigError, ValueError) as e:  # one-line usage errors (bad names, paths, options)
        if os.environ.get('VITKD_DEBUG'):
            raise
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(3)
