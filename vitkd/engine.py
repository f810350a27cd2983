"""Train one epoch (the shape of DeiT's engine.py, on Accelerate); evaluation lives in :mod:`vitkd.evaluation`."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from vitkd.ddp import StepModule
from vitkd.evaluation import evaluate, evaluate_teacher
from vitkd.stopping import StopControl
from vitkd.training import EpochBatches, NonFiniteGuard, NonFiniteLossError, TermMeter, TrainState

__all__ = ['train_one_epoch', 'evaluate', 'evaluate_teacher', 'NonFiniteLossError', 'TrainState']


def train_one_epoch(model, batches: EpochBatches, optimizer, scheduler, accelerator, state: TrainState,
                    guard: NonFiniteGuard, clip_grad: Optional[float] = None, ema=None, log_every: int = 50,
                    log_fn: Optional[Callable[[dict], None]] = None,
                    step_hook: Optional[Callable[[bool, bool], bool]] = None,
                    step_module: Optional[StepModule] = None, stop: Optional[StopControl] = None) -> dict:
    """One pass over ``batches`` from ``state.batches_done`` on (or until the step/time budget runs out).

    ``model`` is the prepared :class:`vitkd.distiller.Distiller`; ``batches`` yields its
    :class:`~vitkd.losses.Batch` inputs (mixed, teacher outputs attached when cached). The host reads device
    values only at logging steps (every ``log_every`` optimizer steps and at the epoch's last batch): there ``guard``
    raises, before the update, when a step since the last check was non-finite (``--nan-policy stop``), the terms are
    logged and a multi-process run agrees on signals and deadlines. ``step_hook(last_batch, collective)`` runs after
    every optimizer step (periodic checkpoints, preemption) and returns True to stop the epoch; then ``stop`` (the
    run's :class:`~vitkd.stopping.StopControl`, default one over ``state``) ends the epoch when the step or time budget
    is spent. ``step_module`` drops DDP's search for unused parameters and starts compilation at the first optimizer
    steps that allow it (:mod:`vitkd.ddp`). Returns the epoch means of the logged terms (over the processes), img/s,
    ``samples``, ``skipped_steps`` and, for a data set that counts them, ``corrupt_images``.
    """
    stop = stop if stop is not None else StopControl(accelerator, state)
    model.train()
    meter = TermMeter(accelerator)
    student = accelerator.unwrap_model(model, keep_torch_compile=False).student if ema is not None else None
    params = [p for p in model.parameters() if p.requires_grad]
    check_grads = accelerator.scaler is None  # under fp16 the gradient scaler skips overflowing steps itself
    skipped_before = guard.skipped
    progress = batches.epoch(state)
    for it, batch in progress:
        guard.before_forward()
        if step_module is not None and accelerator.step % accelerator.gradient_accumulation_steps == 0:
            model = step_module.model_for_step(model, batch.progress)  # only at an optimizer step's first batch
        with accelerator.accumulate(model):
            with accelerator.autocast():
                out = model(batch)
            accelerator.backward(out['loss'])
            grad_norm = None
            if accelerator.sync_gradients and clip_grad:
                grad_norm = accelerator.clip_grad_norm_(params, clip_grad)
            elif accelerator.sync_gradients and check_grads:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            terms = {'loss': out['loss'], **out['terms']}
            if 'logits' in out:  # classification: training accuracy (vs y_a under mixup); dense runs have none
                terms['top1'] = (out['logits'].detach().argmax(-1) == batch.labels).float().mean() * 100
            finite = meter.add(terms, batch.images.shape[0])
            skip = guard.check(state, terms, finite, grad_norm, batch, optimizer)
            last = it == len(batches) - 1
            logging_step = accelerator.sync_gradients and ((state.step + 1) % log_every == 0 or last)
            if logging_step:
                guard.raise_if_bad(state)  # before the update: a non-finite logging step is never applied
            if not skip:  # a skipped step: no update, no weight decay, no moments
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            state.step += 1
            scheduler.step_update(num_updates=state.step)
            if ema is not None and not skip:
                ema.update(student, step=state.step)
        state.batches_done = it + 1
        if logging_step:
            record = {'epoch': batch.progress, 'step': state.step, 'lr': optimizer.param_groups[0]['lr'],
                      'img_per_s': meter.rate(), **meter.current()}
            progress.set_postfix({k: v for k, v in record.items() if k not in ('epoch', 'step')})
            if log_fn is not None:
                log_fn(record)
        if accelerator.sync_gradients and step_hook is not None and step_hook(last, logging_step):
            break
        if stop.budget_spent(collective=logging_step):
            break
    progress.close()
    guard.raise_if_bad(state)
    means = meter.means()
    means['skipped_steps'] = guard.skipped - skipped_before
    corrupt = batches.corrupt_images()
    if corrupt is not None:
        means['corrupt_images'] = corrupt
    return means
