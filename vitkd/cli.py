"""The ``vitkd`` command (also ``python main.py``): distil a frozen teacher into a DeiT-style student.

    vitkd                                            # embedded default: Fashion-MNIST, shipped teacher, ~4 minutes
    accelerate launch -m vitkd --teacher regnety_160 --student deit_s_distilled --data-path /data/imagenet
    vitkd --eval-student --student-ckpt output/run/student
    vitkd ... --output-dir output/run --resume auto      # continue after a kill / preemption (SIGTERM)
    vitkd ... --push-to-hub --hub-model-id org/name      # or later: python scripts/push_to_hub.py output/run
    vitkd --finetune output/run --data-path /data/other  # a new run from a distilled student's weights
    vitkd --list-losses
    vitkd --task segment                             # dense embedded default: Fashion-MNIST scenes (--task detect too)
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
from accelerate.utils import broadcast_object_list

from vitkd.arguments import list_methods_and_presets, parse_args
from vitkd.build import build_losses
from vitkd.checkpoint import Checkpointer, resolve_resume
from vitkd.config import to_yaml
from vitkd.dense.run import build_dense_run, eval_dense_student
from vitkd.devices import make_accelerator
from vitkd.engine import NonFiniteLossError, train_one_epoch
from vitkd.errors import INTERNAL_ERROR, RESOURCE_ERROR, RunDirError, SaveError, VitkdError
from vitkd.eval_student import eval_student
from vitkd.export import export_student
from vitkd.hub import HubPushError, check_push_token, push_run_to_hub
from vitkd.layout import RUN_MARKER
from vitkd.progress import rounded
from vitkd.reports import COUNTS, MetricLogger, format_faults, format_heads, plot_curves, run_costs, summary_table
from vitkd.run import build_run
from vitkd.rundir import RunFinished, check_output_dir, prepare_output_dir, release_all
from vitkd.stopping import StopControl
from vitkd.training import NonFiniteGuard


def train(argv=None) -> int:
    """Parse, build, train, evaluate, export. Errors propagate (see :func:`main`)."""
    cfg, args = parse_args(argv)
    if args.list_losses:  # with --task detect/segment: the methods that have a dense form
        print(list_methods_and_presets(cfg.task))
        return 0
    entries = None if cfg.eval_student else build_losses(cfg)  # the methods, built once for the whole run
    accelerator = make_accelerator(cfg, entries)
    log = accelerator.print
    dense = cfg.task != 'classify'
    if cfg.eval_student:
        return (eval_dense_student if dense else eval_student)(cfg, accelerator)

    # Everything that can reject the command (options, output dir, data, models, losses, the checkpoint to resume)
    # runs before anything is written: a bad command leaves an existing run dir as it was.
    resume_from = resolve_resume(cfg, log)
    out_dir = check_output_dir(cfg)
    if cfg.push_to_hub:
        _check_push_token(cfg, accelerator)
    r = (build_dense_run if dense else build_run)(cfg, accelerator, entries)
    methods = ', '.join(f'{name}:{e.weight:g}' for name, e in r.distiller_unwrapped.entries.items()) or 'none'
    log(f'student {cfg.student} ({r.student_params / 1e6:.2f} M params), teacher '
        f'{r.teacher.source if r.teacher else "none"}, methods {methods}, '
        f'{len(r.train_loader.dataset)} train / {len(r.val_loader.dataset)} val images, global batch '
        f'{r.global_batch}, lr {r.lr:.2e}, precision {accelerator.mixed_precision} on {accelerator.device}'
        f'{" (TF32 on)" if accelerator.device.type == "cuda" and cfg.cuda_tf32 else ""}')
    guard = NonFiniteGuard(cfg.nan_policy, r.distiller_unwrapped, accelerator, out_dir)
    stop = StopControl(accelerator, r.state)
    ckpt = Checkpointer(cfg, r, out_dir, accelerator, argv, before_save=guard.raise_if_bad, background=True, stop=stop)
    ckpt.resume(resume_from)
    out_dir = prepare_output_dir(cfg, accelerator)
    if accelerator.is_main_process:
        (out_dir / RUN_MARKER).write_text(to_yaml(cfg))
    teacher_metrics = {}
    if r.teacher is not None and cfg.eval_teacher:
        with _rng_untouched(accelerator):  # so a resumed run continues from exactly the checkpoint's RNG states
            teacher_metrics = r.evaluate_teacher()
        top1, top5 = teacher_metrics.get('teacher_top1'), teacher_metrics.get('teacher_top5')
        log('teacher ' + (format_heads(teacher_metrics, 'teacher_') if dense else
                          f'top-1 {top1:.2f}%  top-5 {top5:.2f}%'))

    if cfg.time_limit:
        r.state.deadline = time.time() + cfg.time_limit
    start = time.time()
    logger = MetricLogger(out_dir, accelerator, cfg, steps_per_epoch=r.steps_per_epoch)
    metrics, train_stats, stopped = _fit(cfg, r, accelerator, ckpt, stop, logger, guard)
    if stopped is not None:
        return stopped
    return _finish(cfg, r, accelerator, ckpt, logger, out_dir, teacher_metrics, metrics, train_stats,
                   time.time() - start)


def _fit(cfg, r, accelerator, ckpt, stop, logger, guard) -> tuple[dict, dict, int | None]:
    """The epochs: train, evaluate when due, log, checkpoint. Returns (last metrics, last epoch's train stats, the exit
    code when a signal stopped the run, else None)."""
    log, state = accelerator.print, r.state
    metrics, train_stats = {}, {}
    with stop.handling_signals():  # SIGTERM/SIGINT: checkpoint at the next step boundary, then exit
        while state.epoch < cfg.epochs and not state.stop_reason and not stop.steps_spent():
            epoch = state.epoch
            train_stats = train_one_epoch(r.distiller, r.batches, r.optimizer, r.scheduler, accelerator, state, guard,
                                          cfg.clip_grad, r.ema, cfg.log_every, logger.step, step_hook=ckpt.step_hook,
                                          step_module=r.step_module, stop=stop)
            r.distiller = r.step_module.latest(r.distiller)
            faults = format_faults(train_stats)
            if faults:
                log(f'warning: epoch {epoch}: {faults}')
            if ckpt.preempted:  # saved mid-epoch by the step hook
                log(ckpt.preemption_message())
                return metrics, train_stats, stop.exit_code()
            if state.batches_done >= len(r.train_loader):  # the epoch is complete (else a step/time budget ran out)
                state.epoch, state.batches_done = state.epoch + 1, 0
            last = state.epoch >= cfg.epochs or bool(state.stop_reason)
            evaluated = not stop.signal_received() and (last or (state.batches_done == 0 and
                                                                 state.epoch % cfg.eval_every == 0))
            if evaluated:
                metrics = _evaluate_student(r, accelerator)
                log(f'epoch {epoch}: ' + ', '.join(f'{k} {v:.3f}' for k, v in train_stats.items()
                                                   if k not in COUNTS) + ' | ' + format_heads(metrics))
            logger.epoch(epoch, train_stats, metrics, step=state.step)
            ckpt.save(metrics if evaluated else None)  # written in the background while the next epoch trains
            if stop.signal_received():
                ckpt.wait()
                log(ckpt.preemption_message())
                return metrics, train_stats, stop.exit_code()
    ckpt.wait()  # the last checkpoint is complete (or its failure reported) before the export
    return metrics, train_stats, None


def _finish(cfg, r, accelerator, ckpt, logger, out_dir, teacher_metrics, metrics, train_stats, elapsed) -> int:
    """Export the student, write the summary and the curves, print the table, push to the Hub when asked."""
    log = accelerator.print
    if not metrics and r.state.step:  # resumed from the final checkpoint (e.g. killed while exporting): nothing trained
        metrics = _evaluate_student(r, accelerator)
    try:
        export_dir = export_student(r, out_dir, accelerator, metrics)
    except OSError as e:
        raise SaveError(f'could not write the exported student to {out_dir / "student"} ({e.strerror or e}); the '
                        f'last checkpoint {ckpt.last_saved or ckpt.resumed_from} is intact: free space and rerun the '
                        'same command with --resume auto to export it') from None
    summary = dict(teacher=teacher_metrics, student=metrics, best=ckpt.best, epochs_run=r.state.epoch,
                   steps=r.state.step, train_seconds=round(elapsed, 1),
                   stop_reason=r.state.stop_reason or 'epochs done',
                   weights={name: e.weight for name, e in r.distiller_unwrapped.entries.items()},
                   student_export=str(export_dir), resumed_from=str(ckpt.resumed_from) if ckpt.resumed_from else None,
                   **run_costs(r, train_stats if r.state.step else {}))
    if accelerator.is_main_process:
        (out_dir / 'summary.json').write_text(json.dumps(rounded(summary), indent=2) + '\n')
    logger.finish()
    plot_curves(out_dir, cfg, accelerator)
    log(summary_table(cfg, summary))
    log(f'outputs in {out_dir}')
    code = 0
    if cfg.push_to_hub and accelerator.is_main_process:
        code = push_run_to_hub(out_dir, cfg.hub_model_id, cfg.hub_private, log)
    accelerator.wait_for_everyone()  # every process leaves together: none tears the group down under another
    accelerator.end_training()
    return code


def _check_push_token(cfg, accelerator) -> None:
    """``--push-to-hub``: the main process (the one that pushes) asks the Hub whether the token may write, before
    anything is trained; every process raises the same one-line error."""
    failure = None
    if accelerator.is_main_process:
        try:
            check_push_token(cfg.hub_model_id)
        except HubPushError as e:
            failure = str(e)
    failure = broadcast_object_list([failure])[0]
    if failure is not None:
        raise HubPushError(failure)


def _evaluate_student(r, accelerator) -> dict:
    """Validation metrics of the student (and of its EMA)."""
    metrics = r.evaluate_student(r.student)
    if r.ema is not None:
        metrics.update({f'ema_{k}': v for k, v in r.evaluate_student(r.ema.module).items() if k != 'samples'})
    return metrics


@contextlib.contextmanager
def _rng_untouched(accelerator):
    """Run a block without consuming the global torch generators (a data loader draws its base seed from them)."""
    cuda = accelerator.device.type == 'cuda'
    with torch.random.fork_rng(devices=[accelerator.device.index or 0] if cuda else []):
        yield


def _one_line(error: BaseException) -> str:
    """The user's line for ``error``: one line, whatever the message looked like.

    An error raised in a data-loader worker arrives wrapped in the worker's traceback (its last line is the error:
    keep it, without the ``module.Class:`` prefix); an ``OSError`` without a message names its file and strerror;
    any other message has its line breaks folded.
    """
    text = str(error).strip()
    if '\n' in text and 'Traceback' in text:
        text = text.splitlines()[-1]
        text = text.split(': ', 1)[1] if ': ' in text and '.' in text.split(': ', 1)[0] else text
    if isinstance(error, OSError) and error.strerror and not isinstance(error, VitkdError):
        text = f'{error.filename}: {error.strerror}' if error.filename else error.strerror
    return ' '.join(text.split()) or type(error).__name__


def _failure(error: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) of an exception that ended the command (see :mod:`vitkd.errors` for the codes)."""
    if isinstance(error, VitkdError):
        return error.exit_code, _one_line(error)
    if isinstance(error, NonFiniteLossError):
        return 3, (f'{_one_line(error)}; the run stopped (--nan-policy stop) before saving that step: resume from '
                   'the last checkpoint with --resume auto, adding --nan-policy skip to skip such steps')
    if isinstance(error, KeyboardInterrupt):
        return 130, 'interrupted (Ctrl-C) before training started; nothing was saved'
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return RESOURCE_ERROR, (f'out of memory ({_one_line(error)}); lower --batch-size (--grad-accum-steps keeps the '
                                'effective batch) or --num-workers')
    if isinstance(error, OSError):
        return RunDirError.exit_code, (f'{_one_line(error)}; check that the path exists, is readable/writable and '
                                       'that the disk is not full')
    return INTERNAL_ERROR, (f'internal error ({type(error).__name__}: {_one_line(error)}); this is a bug in vitkd: '
                            'rerun with --debug (or VITKD_DEBUG=1) and report the traceback')


def _debug_requested(argv) -> bool:
    return '--debug' in argv or os.environ.get('VITKD_DEBUG', '').lower() not in ('', '0', 'false', 'no')


def _is_main_process() -> bool:
    """Rank 0 of an ``accelerate launch``/torchrun job (the launcher's RANK), or a single process."""
    return os.environ.get('RANK', '0') == '0'


def _job_store(timeout_s: float):
    """A client of the launcher's key-value store (torchrun's rendezvous TCPStore at ``MASTER_ADDR:MASTER_PORT``),
    under a prefix of this job and restart; None for a single process or when there is no store to reach."""
    if int(os.environ.get('WORLD_SIZE', '1')) <= 1 or not os.environ.get('MASTER_PORT'):
        return None
    try:
        store = dist.TCPStore(os.environ.get('MASTER_ADDR', '127.0.0.1'), int(os.environ['MASTER_PORT']),
                              is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError):  # DistStoreError is a RuntimeError
        return None
    job = f'vitkd/{os.environ.get("TORCHELASTIC_RUN_ID", "")}/{os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")}/'
    return dist.PrefixStore(job, store)


def _report_failure(line: str, timeout_s: float = 10.0) -> None:
    """Print a failure's line once per job, whichever process failed.

    A process that fails alone leaves the others waiting in a collective (a gradient all-reduce, a barrier), and only
    it knows why: so on N processes the first process to fail prints its line, whatever its rank, and marks it done in
    the launcher's store. A process that fails after it (every process, for a bad option) prints nothing and waits up
    to ``timeout_s`` for that line to be out before it exits, since the launcher stops the whole job as soon as one
    process ends. The processes still waiting in a collective are then stopped by the launcher (SIGTERM, then
    SIGKILL after its grace period), not by the collective's 30-minute timeout. Without a store to reach, the main
    process prints.
    """
    store = _job_store(timeout_s)
    if store is None:
        if _is_main_process():
            print(line, file=sys.stderr, flush=True)
        return
    try:
        first = store.add('failed', 1) == 1
        if first:
            print(line, file=sys.stderr, flush=True)
            store.set('printed', '1')
        else:
            store.wait(['printed'])
    except RuntimeError:  # the store went away (the launcher is stopping the job): exit with our own code anyway
        if _is_main_process():
            print(line, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    """The command line, and the one error boundary of vitkd.

    Every failure ends in one line ``error: ...`` on stderr, naming the bad value or file and what is accepted or
    what to do, and the exit code of :mod:`vitkd.errors` (0 done; 1 an output could not be written, the last
    checkpoint is intact; 2 a usage error, nothing written; 3 a non-finite loss under --nan-policy stop; 4 a Hub
    failure; 5 unreadable data; 6 an I/O failure or an unusable run dir; 7 out of memory; 70 a bug; 128+N stopped
    by signal N). Tracebacks only with ``--debug`` or ``VITKD_DEBUG=1``. Under ``accelerate launch`` every process
    returns the same code (the checks before the build run on every process, a failed save is agreed on by all)
    and the line is printed once, by the first process that failed (:func:`_report_failure`).
    """
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        return train(argv)
    except SystemExit:  # argparse's --help
        raise
    except RunFinished as e:  # --resume auto on a finished run: nothing to do, not a failure
        if _is_main_process():
            print(e, flush=True)
        return e.exit_code
    except BaseException as e:  # noqa: BLE001 - the boundary: every failure becomes one line and an exit code
        code, message = _failure(e)
        if _debug_requested(argv):
            traceback.print_exc()
        _report_failure(f'error: {message}')
        return code
    finally:
        release_all()  # the run dir's lock (vitkd/rundir.py), however the command ended
        # DDP's reducer and hooks form reference cycles that keep the process group and its last gloo work alive; left
        # to the interpreter's shutdown, their C++ destructors run without Python and abort the process (SIGABRT,
        # "terminate called without an active exception") now and then. Collected here, they go while Python runs.
        gc.collect()

