"""vitkd: distil a frozen teacher into a DeiT-style student.

    python main.py                                   # embedded default: Fashion-MNIST, shipped teacher, ~4 minutes
    accelerate launch main.py --teacher regnety_160 --student deit_s_distilled --data-path /data/imagenet
    python main.py --eval-student --student-ckpt output/run/student
    python main.py ... --output-dir output/run --resume auto      # continue after a kill / preemption (SIGTERM)
    python main.py ... --push-to-hub --hub-model-id org/name      # or later: python scripts/push_to_hub.py output/run
    python main.py --list-losses
"""
from __future__ import annotations

import contextlib
import os

# OpenMP threads that spin while waiting make every step ~10x slower on oversubscribed CPUs (measured here).
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import json
import logging
import sys
import time
from pathlib import Path

import torch

from engine import NonFiniteLossError, TrainState, evaluate, evaluate_teacher, train_one_epoch
from vitkd import run as runlib
from vitkd.checkpoint import Checkpointer, SaveError, resolve_resume
from vitkd.config import parse_args, to_yaml
from vitkd.errors import UsageError
from vitkd.hub import push_run_to_hub

_logger = logging.getLogger('vitkd')


def train(argv=None) -> int:
    """Parse, build, train, evaluate, export. Errors propagate (see :func:`main`)."""
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

    # Everything that can reject the command (options, output dir, data, models, losses, the checkpoint to resume)
    # runs before anything is written: a bad command leaves an existing run dir as it was.
    resume_from = resolve_resume(cfg, log)
    out_dir = runlib.check_output_dir(cfg)
    r = runlib.build_run(cfg, accelerator)
    methods = ', '.join(f'{name}:{e.weight:g}' for name, e in r.distiller_unwrapped.entries.items()) or 'none'
    log(f'student {cfg.student} ({r.student_params / 1e6:.2f} M params), teacher '
        f'{r.teacher.source if r.teacher else "none"}, methods {methods}, '
        f'{len(r.train_loader.dataset)} train / {len(r.val_loader.dataset)} val images, global batch '
        f'{r.global_batch}, lr {r.lr:.2e}')
    ckpt = Checkpointer(cfg, r, out_dir, accelerator, argv)
    ckpt.resume(resume_from)
    out_dir = runlib.prepare_output_dir(cfg, accelerator)
    if accelerator.is_main_process:
        (out_dir / 'config.yaml').write_text(to_yaml(cfg))
    teacher_metrics = {}
    if r.teacher is not None and cfg.eval_teacher:
        with _rng_untouched(accelerator):  # so a resumed run continues from exactly the checkpoint's RNG states
            teacher_metrics = evaluate_teacher(r.teacher, r.val_loader, accelerator)
        log(f'teacher top-1 {teacher_metrics["teacher_top1"]:.2f}%  top-5 {teacher_metrics["teacher_top5"]:.2f}%')

    if cfg.time_limit:
        r.state.deadline = time.time() + cfg.time_limit
    start = time.time()
    logger = runlib.MetricLogger(out_dir, accelerator, cfg)
    metrics, train_stats, stopped = _fit(cfg, r, accelerator, ckpt, logger, out_dir)
    if stopped is not None:
        return stopped
    return _finish(cfg, r, accelerator, ckpt, logger, out_dir, teacher_metrics, metrics, train_stats,
                   time.time() - start)


def _fit(cfg, r, accelerator, ckpt, logger, out_dir) -> tuple[dict, dict, int | None]:
    """The epochs: train, evaluate when due, log, checkpoint. Returns (last metrics, last epoch's train stats, the exit
    code when a signal stopped the run, else None)."""
    log, state = accelerator.print, r.state
    metrics, train_stats = {}, {}
    with ckpt.signals():  # SIGTERM/SIGINT: checkpoint at the next step boundary, then exit
        while state.epoch < cfg.epochs and not state.stop_reason:
            epoch = state.epoch
            r.distiller_unwrapped.teacher and r.distiller_unwrapped.teacher.train(False)
            train_stats = train_one_epoch(r.distiller, r.train_loader, r.optimizer, r.scheduler, accelerator, r.mixer,
                                          state, r.spec.num_classes, cfg.clip_grad, r.ema, cfg.log_every, logger.step,
                                          teacher_cache=r.teacher_cache, step_hook=ckpt.step_hook,
                                          nan_policy=cfg.nan_policy, report_dir=out_dir)
            faults = runlib.format_faults(train_stats)
            if faults:
                log(f'warning: epoch {epoch}: {faults}')
            if ckpt.preempted:  # saved mid-epoch by the step hook
                log(ckpt.preemption_message())
                return metrics, train_stats, ckpt.exit_code()
            if state.batches_done >= len(r.train_loader):  # the epoch is complete (else a step/time budget ran out)
                state.epoch, state.batches_done = state.epoch + 1, 0
            last = state.epoch >= cfg.epochs or bool(state.stop_reason)
            evaluated = not ckpt.stop_requested() and (last or (state.batches_done == 0 and
                                                                state.epoch % cfg.eval_every == 0))
            if evaluated:
                metrics = _evaluate_student(r, accelerator)
                log(f'epoch {epoch}: ' + ', '.join(f'{k} {v:.3f}' for k, v in train_stats.items()
                                                   if k not in runlib.COUNTS) + ' | ' + runlib.format_heads(metrics))
            logger.epoch(epoch, train_stats, metrics)
            ckpt.save(metrics if evaluated else None)
            if ckpt.stop_requested():
                log(ckpt.preemption_message())
                return metrics, train_stats, ckpt.exit_code()
    return metrics, train_stats, None


def _finish(cfg, r, accelerator, ckpt, logger, out_dir, teacher_metrics, metrics, train_stats, elapsed) -> int:
    """Export the student, write the summary and the curves, print the table, push to the Hub when asked."""
    log = accelerator.print
    if not metrics and r.state.step:  # resumed from the final checkpoint (e.g. killed while exporting): nothing trained
        metrics = _evaluate_student(r, accelerator)
    try:
        export_dir = runlib.export_student(r, out_dir, accelerator, metrics)
    except OSError as e:
        raise SaveError(f'could not write the exported student to {out_dir / "student"} ({e.strerror or e}); the '
                        f'last checkpoint {ckpt.last_saved or ckpt.resumed_from} is intact: free space and rerun the '
                        'same command with --resume auto to export it') from None
    summary = dict(teacher=teacher_metrics, student=metrics, best=ckpt.best, epochs_run=r.state.epoch,
                   steps=r.state.step, train_seconds=round(elapsed, 1), stop_reason=r.state.stop_reason or 'epochs done',
                   weights={name: e.weight for name, e in r.distiller_unwrapped.entries.items()},
                   student_export=str(export_dir), resumed_from=str(ckpt.resumed_from) if ckpt.resumed_from else None,
                   **runlib.run_costs(r, train_stats if r.state.step else {}))
    if accelerator.is_main_process:
        (out_dir / 'summary.json').write_text(json.dumps(summary, indent=2) + '\n')
    logger.finish()
    runlib.plot_curves(out_dir, cfg, accelerator)
    log(runlib.summary_table(cfg, summary))
    log(f'outputs in {out_dir}')
    code = 0
    if cfg.push_to_hub and accelerator.is_main_process:
        code = push_run_to_hub(out_dir, cfg.hub_model_id, cfg.hub_private, log)
    accelerator.end_training()
    return code


def _evaluate_student(r, accelerator) -> dict:
    """Validation metrics of the student (and of its EMA)."""
    metrics = evaluate(r.student, r.val_loader, accelerator)
    if r.ema is not None:
        metrics.update({f'ema_{k}': v for k, v in evaluate(r.ema.module, r.val_loader, accelerator).items()
                        if k != 'samples'})
    return metrics


@contextlib.contextmanager
def _rng_untouched(accelerator):
    """Run a block without consuming the global torch generators (a data loader draws its base seed from them)."""
    cuda = accelerator.device.type == 'cuda'
    with torch.random.fork_rng(devices=[accelerator.device.index or 0] if cuda else []):
        yield


def _one_line(error: BaseException) -> str:
    """One line: an error raised in a data-loader worker arrives wrapped in the worker's traceback (keep its last
    line); any other message has its line breaks folded."""
    text = str(error).strip()
    if '\n' in text and 'Traceback' in text:
        text = text.splitlines()[-1]
        text = text.split(': ', 1)[1] if ': ' in text and '.' in text.split(': ', 1)[0] else text
    return ' '.join(text.split())


def main(argv=None) -> int:
    """The command line. Exit codes: 0 done; 2 a usage error (one line on stderr, before anything is written;
    VITKD_DEBUG=1 shows tracebacks); 3 a non-finite loss under --nan-policy stop; 1 an output that could not be
    written (e.g. a full disk; the last checkpoint is intact); 4 a failed --push-to-hub; 128+N stopped by signal N."""
    try:
        return train(argv)
    except UsageError as e:
        if os.environ.get('VITKD_DEBUG'):
            raise
        print(f'error: {_one_line(e)}', file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f'error: {e}; the run stopped (--nan-policy stop) without applying that step: resume from the last '
              'checkpoint with --resume auto, adding --nan-policy skip to skip such steps', file=sys.stderr)
        return 3
    except SaveError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
