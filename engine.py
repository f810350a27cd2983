"""Train one epoch and evaluate — nothing else (the shape of DeiT's engine.py, on Accelerate)."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from vitkd.data import find_epoch_sampler, mix_batch
from vitkd.features import Features
from vitkd.models import student_head_logits


class NonFiniteLossError(RuntimeError):
    """The loss or the gradients became NaN/inf; the message names the terms, the step and the diagnostic file."""


MAX_NONFINITE_REPORTS = 100  # diagnostic files written per process run (a run skipping every step would flood the dir)
# Under --nan-policy skip the buffers a forward updates (BatchNorm statistics, small loss state) are copied before each
# step and restored when it is skipped; larger ones (CRD's memory banks) are not copied every step and are not rolled
# back (CRD writes no non-finite embedding into them).
MAX_RESTORED_BUFFER = 2 ** 20


@dataclass
class TrainState:
    """Counters that survive across epochs (and checkpoints)."""
    epoch: int = 0
    step: int = 0                 # optimizer steps taken
    batches_done: int = 0         # loader batches of the current epoch already trained (a mid-epoch resume skips them)
    max_steps: Optional[int] = None
    deadline: Optional[float] = None  # time.time() after which training stops
    stop_reason: str = ''
    history: list = field(default_factory=list)
    nonfinite_reports: int = 0    # diagnostic files written by this process (not checkpointed)

    def exhausted(self) -> bool:
        if self.max_steps is not None and self.step >= self.max_steps:
            self.stop_reason = f'max_steps {self.max_steps} reached'
        elif self.deadline is not None and time.time() >= self.deadline:
            self.stop_reason = 'time limit reached'
        return bool(self.stop_reason)

    def state_dict(self) -> dict:
        return {'epoch': self.epoch, 'step': self.step, 'batches_done': self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = int(state['epoch']), int(state['step'])
        self.batches_done = int(state.get('batches_done', 0))


def _all_agree_to_stop(state: TrainState, accelerator) -> bool:
    """The step/time budget as the main process decides it, so every rank stops at the same step (ranks that
    disagreed about a wall-clock deadline would leave the others waiting in DDP's all-reduce for ever)."""
    stop = state.exhausted()
    if accelerator.num_processes > 1 and state.deadline is not None:
        from accelerate.utils import broadcast
        stop = bool(broadcast(torch.tensor([float(stop)], device=accelerator.device), from_process=0).item())
        if stop and not state.stop_reason:
            state.stop_reason = 'time limit reached'
    return stop


def train_one_epoch(model, loader, optimizer, scheduler, accelerator, mixup_fn: Callable, state: TrainState,
                    num_classes: int, clip_grad: Optional[float] = None, ema=None, log_every: int = 50,
                    log_fn: Optional[Callable[[dict], None]] = None, teacher_cache=None,
                    step_hook: Optional[Callable[[bool], bool]] = None, nan_policy: str = 'stop',
                    report_dir: Optional[Path] = None) -> dict:
    """One pass over ``loader`` (or until the step/time budget runs out).

    ``model`` is the prepared :class:`vitkd.distiller.Distiller`; ``mixup_fn(images, labels)`` returns the mixed
    images, soft targets and mixup metadata. Returns the epoch means of every logged term and img/s (over the
    batches trained in this call). A resumed epoch skips the ``state.batches_done`` batches already trained.
    ``step_hook(last_batch)`` runs after every optimizer step (periodic checkpoints, preemption); True stops the epoch.
    With an :class:`~vitkd.data.EpochSampler`, each batch's mixup/cutmix draws are seeded by (seed, data epoch, batch)
    so that resumes and the ``teacher_cache`` (:class:`vitkd.teacher_cache.TeacherCache`) see the same mixed images;
    the cache also decides the data epoch (epoch mod its cached epochs) and serves the teacher's taps. On N processes
    the logged terms are the means over the processes (the global-batch values for mean-reduced terms).

    Faults: a non-finite loss term (any micro-batch) or gradient norm (at the optimizer step; not under fp16, whose
    GradScaler skips such steps itself) writes ``<report_dir>/nonfinite_step<N>.json`` (the terms, the step, the lr,
    the batch's sample indices) and then raises :class:`NonFiniteLossError` (``nan_policy='stop'``) or skips the
    optimizer step, zeroing the gradients (``'skip'``: weights, optimizer state and EMA are untouched by that step; the
    schedule advances; buffers the forward updated, e.g. BatchNorm statistics, are restored, up to
    :data:`MAX_RESTORED_BUFFER` elements each). The decision uses values reduced over the processes, so every process
    takes it alike. The
    returned dict adds ``skipped_steps`` and, for an :class:`~vitkd.data.IndexedDataset`, ``corrupt_images`` (the
    unreadable images met this epoch, summed over the processes).
    """
    model.train()
    sums: dict[str, float] = {}
    seen, count, start = 0, 0, time.time()
    skipped, window_bad = 0, False
    restorable = [b for b in accelerator.unwrap_model(model).buffers() if b.numel() <= MAX_RESTORED_BUFFER] \
        if nan_policy == 'skip' else []
    dataset = getattr(loader, 'dataset', None)
    if hasattr(dataset, 'reset_corrupt'):
        dataset.reset_corrupt()  # the workers' flags are in shared memory: this epoch's count starts at 0
    num_batches = len(loader)
    data_epoch = teacher_cache.data_epoch(state.epoch) if teacher_cache is not None else state.epoch
    if hasattr(loader, 'set_epoch'):
        loader.set_epoch(data_epoch)  # the sampler draws this epoch's order and augmentation seeds from (seed, epoch)
    sampler = find_epoch_sampler(loader)
    if teacher_cache is not None:
        if sampler is None:
            raise ValueError('a teacher cache needs the EpochSampler loader of vitkd.build.build_data')
        teacher_cache.begin_epoch(data_epoch, sampler.sample_seeds(data_epoch))
    first = state.batches_done
    if first:
        loader = accelerator.skip_first_batches(loader, first)
    progress = _progress(loader, accelerator, state.epoch)
    for it, (images, labels, index) in enumerate(progress, start=first):
        images, targets, mix, mix_seed = mix_batch(mixup_fn, sampler, data_epoch, images, labels, index)
        epoch_float = state.epoch + it / max(1, num_batches)
        saved = [b.detach().clone() for b in restorable]  # the forward updates BatchNorm statistics in place
        with accelerator.accumulate(model):
            with accelerator.autocast():
                cached = teacher_cache.features(images, index, mix_seed) if teacher_cache is not None else None
                out = model(images, targets, labels, mix['labels_b'], mix['lam'], index, epoch=epoch_float,
                            step=state.step, teacher_features=cached)
            loss = out['loss']
            accelerator.backward(loss)
            grad_norm = None
            if accelerator.sync_gradients:
                if clip_grad:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip_grad)
                elif accelerator.scaler is None:
                    grad_norm = _grad_norm(model)
            top1 = (out['logits'].detach().argmax(-1) == labels).float().mean() * 100  # vs y_a under mixup
            terms = {'loss': loss.detach(), **out['terms'], 'top1': top1}
            if accelerator.num_processes > 1:  # one all-reduce: the mean over processes of every term
                values = accelerator.reduce(torch.stack([v.detach().float().reshape(()) for v in terms.values()]),
                                            'mean')
                terms = dict(zip(terms, values))
            values = {k: float(v) for k, v in terms.items()}
            bad = [k for k, v in values.items() if not math.isfinite(v)]
            if grad_norm is not None and accelerator.scaler is None and not math.isfinite(float(grad_norm)):
                bad.append('gradients')  # DDP has averaged the gradients: every process sees the same norm
            if bad:
                path = _report_nonfinite(report_dir, accelerator, state, nan_policy, it, epoch_float, values, bad,
                                         grad_norm, optimizer, index, mix)
                where = f'non-finite {", ".join(bad)} at epoch {state.epoch} step {state.step + 1}' + (
                    f' (diagnostic: {path})' if path else '')
                if nan_policy == 'stop':
                    raise NonFiniteLossError(where)
                accelerator.print(f'warning: {where}: optimizer step skipped (--nan-policy skip)')
                window_bad = True
                with torch.no_grad():
                    for buffer, value in zip(restorable, saved):
                        buffer.copy_(value)
            if accelerator.sync_gradients and window_bad:
                optimizer.zero_grad(set_to_none=True)  # no optimizer.step(): no update, no weight decay, no moments
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        step_skipped = accelerator.sync_gradients and window_bad
        if accelerator.sync_gradients:
            state.step += 1
            scheduler.step_update(num_updates=state.step)
            if ema is not None and not step_skipped:
                ema.update(accelerator.unwrap_model(model).student, step=state.step)
            skipped += step_skipped
            window_bad = False
        batch = images.shape[0] * accelerator.num_processes
        seen += batch
        if not bad:  # a skipped micro-batch's NaN terms stay out of the epoch means
            count += 1
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
        if accelerator.sync_gradients and not step_skipped and (state.step % log_every == 0 or it == num_batches - 1):
            rate = seen / max(1e-9, time.time() - start)
            record = {'epoch': epoch_float, 'step': state.step, 'lr': optimizer.param_groups[0]['lr'],
                      'img_per_s': rate, **values}
            if hasattr(progress, 'set_postfix'):
                progress.set_postfix({k: f'{v:.3f}' for k, v in values.items()} |
                                     {'lr': f'{record["lr"]:.2e}', 'img/s': f'{rate:.0f}'})
            if log_fn is not None:
                log_fn(record)
        state.batches_done = it + 1
        if accelerator.sync_gradients and step_hook is not None and step_hook(it == num_batches - 1):
            break
        if _all_agree_to_stop(state, accelerator):
            break
    if teacher_cache is not None:  # a fully recorded data epoch is marked complete: later epochs replay it
        teacher_cache.end_epoch(complete=state.batches_done >= num_batches)
    means = {k: v / max(1, count) for k, v in sums.items()}
    means['img_per_s'] = seen / max(1e-9, time.time() - start)
    means['samples'] = seen
    means['skipped_steps'] = skipped
    if hasattr(dataset, 'num_corrupt'):
        corrupt = torch.tensor(float(dataset.num_corrupt), device=accelerator.device)
        if accelerator.num_processes > 1:
            corrupt = accelerator.reduce(corrupt, 'sum')
        means['corrupt_images'] = int(corrupt.item())
    return means


def _grad_norm(model) -> torch.Tensor:
    """The total 2-norm of the gradients (non-finite if any gradient is), without touching them."""
    grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def _json_number(value) -> object:
    value = float(value)
    return value if math.isfinite(value) else str(value)  # JSON has no NaN/inf


def _report_nonfinite(report_dir: Optional[Path], accelerator, state: TrainState, policy: str, batch: int,
                      epoch_float: float, values: dict, bad: list, grad_norm, optimizer, index, mix) -> Optional[Path]:
    """Write ``nonfinite_step<N>.json`` (main process; at most :data:`MAX_NONFINITE_REPORTS` per run)."""
    if report_dir is None or not accelerator.is_main_process or state.nonfinite_reports >= MAX_NONFINITE_REPORTS:
        return None
    state.nonfinite_reports += 1
    step = state.step + 1  # the optimizer step being attempted, numbered as log.jsonl numbers steps
    record = dict(step=step, epoch=state.epoch, epoch_float=epoch_float, batch=batch, policy=policy,
                  nonfinite=bad, terms={k: _json_number(v) for k, v in values.items()},
                  grad_norm=None if grad_norm is None else _json_number(grad_norm),
                  lr=[g['lr'] for g in optimizer.param_groups], mixup_lam=_json_number(mix['lam']),
                  sample_indices=[int(i) for i in index.tolist()] if index is not None else None,
                  processes=accelerator.num_processes)
    path = Path(report_dir) / f'nonfinite_step{step}.json'
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(json.dumps(record, indent=1) + '\n')
    os.replace(tmp, path)
    return path


def _progress(loader, accelerator, epoch: int):
    if not accelerator.is_local_main_process:
        return loader
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return loader
    return tqdm(loader, desc=f'epoch {epoch}', leave=False, dynamic_ncols=True, mininterval=2.0)


def _topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """[B, len(ks) + 1] 0/1: label within the top-k of each row, then whether the row counts (label ≥ 0: an
    unreadable validation image comes with label -1, see :class:`vitkd.data.EvalDataset`)."""
    kmax = min(max(ks), logits.shape[-1])
    hit = logits.topk(kmax, dim=-1).indices == labels[:, None]  # [B, kmax]
    return torch.stack([*(hit[:, :min(k, kmax)].any(dim=-1) for k in ks), labels >= 0], dim=-1).float()


@torch.no_grad()
def evaluate(student, loader, accelerator) -> dict:
    """Top-1/top-5 (%) of the class head, the distillation head and their average (the DeiT metric).

    ``student`` is an unwrapped timm model. Per-sample hits are gathered with ``gather_for_metrics`` so each
    validation sample is counted once whatever the number of processes. Students without a distillation head
    report ``cls`` only (= ``avg``).
    """
    student.eval()
    hits = {'cls': [], 'dist': [], 'avg': []}
    for images, labels in loader:
        with accelerator.autocast():
            final = student.forward_features(images)
            z_cls, z_dist = student_head_logits(student, final)
        z_cls = z_cls.float()
        heads = {'cls': z_cls}
        if z_dist is not None:
            heads['dist'] = z_dist.float()
            heads['avg'] = (z_cls + z_dist.float()) / 2
        for name, logits in heads.items():
            hits[name].append(accelerator.gather_for_metrics(_topk_correct(logits, labels)))
    return _summarise(hits)


def _summarise(hits: dict) -> dict:
    out = {}
    for name, parts in hits.items():
        if not parts:
            continue
        h = torch.cat(parts)
        if not h[:, -1].all():
            out['unreadable'] = int((h[:, -1] == 0).sum())
            h = h[h[:, -1] > 0]  # gathered first (equal shapes on every process), then the unreadable images dropped
        out[f'{name}_top1'] = 100.0 * h[:, 0].mean().item()
        out[f'{name}_top5'] = 100.0 * h[:, 1].mean().item()
        out['samples'] = h.shape[0]
    if 'avg_top1' not in out and 'cls_top1' in out:
        out['avg_top1'], out['avg_top5'] = out['cls_top1'], out['cls_top5']
    return out


@torch.no_grad()
def evaluate_teacher(teacher, loader, accelerator) -> dict:
    """Top-1/top-5 (%) of the frozen teacher on the same validation loader."""
    hits = {'teacher': []}
    for images, labels in loader:
        with accelerator.autocast():
            logits = teacher.model(teacher.prepare_input(images)).float()
        hits['teacher'].append(accelerator.gather_for_metrics(_topk_correct(logits, labels)))
    return _summarise(hits)
