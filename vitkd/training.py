"""The pieces a training loop is made of: the train state, the batches of an epoch, the non-finite-loss policy and
the running means of the logged terms.

``vitkd.engine.train_one_epoch`` composes them; none of them waits for the device between logging steps. On a GPU every
host read of a device value (``float(t)``, ``t.item()``, ``bool(t)``, ``int(t)``) stalls the host until the queued
kernels have run, so the next step's kernels are not queued while the current ones run. Here the loss terms, the
accuracy and the finiteness of every step are accumulated on the device and read once per logging step (or at a
checkpoint, or at the end of the epoch); the batch's data-set indices stay on the host where the mixup seed and the
teacher cache need them.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from .data import find_epoch_sampler, mix_batch
from .losses import Batch
from .progress import EpochProgress

__all__ = ['TrainState', 'EpochBatches', 'NonFiniteGuard', 'NonFiniteLossError', 'TermMeter',
           'MAX_NONFINITE_REPORTS', 'MAX_RESTORED_BUFFER']

MAX_NONFINITE_REPORTS = 100  # diagnostic files written per process run (a run skipping every step would flood the dir)
# Under --nan-policy skip the buffers a forward updates (BatchNorm statistics, small loss state) are copied before each
# step and restored when it is skipped; larger ones (CRD's memory banks) are not copied every step and are not rolled
# back (CRD writes no non-finite embedding into them).
MAX_RESTORED_BUFFER = 2 ** 20


class NonFiniteLossError(RuntimeError):
    """The loss or the gradients became NaN/inf; the message names the terms, the step and the diagnostic file."""


@dataclass
class TrainState:
    """Counters that survive across epochs (and checkpoints), and the run's step/time budget (the decisions on it are
    :class:`vitkd.stopping.StopControl`'s)."""
    epoch: int = 0
    step: int = 0                 # optimizer steps taken
    batches_done: int = 0         # loader batches of the current epoch already trained (a mid-epoch resume skips them)
    max_steps: Optional[int] = None
    deadline: Optional[float] = None  # time.time() after which training stops
    stop_reason: str = ''
    nonfinite_reports: int = 0    # diagnostic files written by this process (not checkpointed)

    def state_dict(self) -> dict:
        return {'epoch': self.epoch, 'step': self.step, 'batches_done': self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = int(state['epoch']), int(state['step'])
        self.batches_done = int(state.get('batches_done', 0))


class EpochBatches:
    """The training loader as the step consumes it: device batches, mixed, with the teacher's outputs when cached.

    Per epoch (:meth:`epoch`) it sets the sampler's epoch (the order and every sample's augmentation seed follow from
    (seed, epoch)), skips the batches a resumed epoch already trained, copies each batch to the device without
    blocking the host (pinned loader memory), applies mixup/cutmix seeded by the batch
    (:func:`vitkd.data.mix_batch`) and, with a :class:`vitkd.teacher_cache.TeacherCache`, attaches the teacher's taps
    (recorded live in epochs not cached yet, replayed otherwise; the cache decides the data epoch, epoch mod its
    cached epochs).

    The loader must be prepared with ``device_placement=False``: the batches arrive on the host, the indices stay there
    and only the tensors the step needs are copied.

    Args:
        loader: the prepared training loader, yielding (images, labels, indices).
        accelerator: the run's accelerator (device, autocast for a recording teacher pass, process count).
        mixer: ``mixer(images, labels)`` → (images, soft targets, {'labels_b', 'lam'})
            (:class:`vitkd.data.BatchMixer`).
        teacher_cache: the run's teacher cache, or None.
        epochs, log_every: the run's length and logging interval, for the progress display.
    """

    def __init__(self, loader, accelerator, mixer: Callable, teacher_cache=None, epochs: int = 1, log_every: int = 50):
        self.loader, self.accelerator, self.mixer, self.teacher_cache = loader, accelerator, mixer, teacher_cache
        self.epochs, self.log_every = epochs, log_every
        self.sampler = find_epoch_sampler(loader)
        if teacher_cache is not None and self.sampler is None:
            raise ValueError('a teacher cache needs the EpochSampler loader of vitkd.build.build_data')
        self.dataset = getattr(loader, 'dataset', None)

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, state: TrainState) -> EpochProgress:
        """(batch number, batch) of ``state.epoch`` from ``state.batches_done`` on, with the progress display
        (:class:`vitkd.progress.EpochProgress`: ``set_postfix`` for the logged terms, ``close`` at the end)."""
        return EpochProgress(self._batches(state), self.accelerator, state.epoch, self.epochs, self.log_every,
                             lambda: state.step, first=state.batches_done, num_batches=len(self.loader),
                             max_steps=state.max_steps, accum=self.accelerator.gradient_accumulation_steps)

    def _batches(self, state: TrainState) -> Iterator[tuple[int, Batch]]:
        """The teacher cache's epoch is closed when the generator ends or is closed (a loop that breaks early releases
        it at once), marked complete when every batch of the epoch was trained."""
        cache, device, num_batches = self.teacher_cache, self.accelerator.device, len(self.loader)
        data_epoch = cache.data_epoch(state.epoch) if cache is not None else state.epoch
        if hasattr(self.loader, 'set_epoch'):
            self.loader.set_epoch(data_epoch)
        if hasattr(self.dataset, 'reset_corrupt'):
            self.dataset.reset_corrupt()  # the workers' flags are in shared memory: this epoch's count starts at 0
        if cache is not None:
            cache.begin_epoch(data_epoch, self.sampler.sample_seeds(data_epoch))
        first = state.batches_done
        loader = self.accelerator.skip_first_batches(self.loader, first) if first else self.loader
        try:
            for it, (images, labels, index) in enumerate(loader, start=first):
                host_index = index.numpy()
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                images, targets, mix, mix_seed = mix_batch(self.mixer, self.sampler, data_epoch, images, labels,
                                                           host_index)
                cached = None
                if cache is not None:
                    with self.accelerator.autocast():
                        cached = cache.features(images, host_index, mix_seed, it)
                yield it, Batch(images=images, targets=targets, labels=labels, labels_b=mix['labels_b'],
                                lam=mix['lam'], index=index.to(device, non_blocking=True), host_index=host_index,
                                progress=state.epoch + it / max(1, num_batches), step=state.step,
                                teacher_features=cached)
        finally:
            if cache is not None:  # a fully recorded data epoch is marked complete: later epochs replay it
                cache.end_epoch(complete=state.batches_done >= num_batches)

    def corrupt_images(self) -> Optional[int]:
        """Unreadable images met this epoch, summed over the processes (a collective), or None without the count."""
        if not hasattr(self.dataset, 'num_corrupt'):
            return None
        corrupt = torch.tensor(float(self.dataset.num_corrupt), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            corrupt = self.accelerator.reduce(corrupt, 'sum')
        return int(corrupt.item())


class TermMeter:
    """Running sums of a step's logged terms on the device; read at logging steps and at the end of the epoch.

    A micro-batch with a non-finite term is left out of the epoch means (its terms would make every mean NaN). A term
    may be absent from some steps (a warm-up skips its term at epoch 0): each term's mean is over the micro-batches
    that had it. On N processes the values read are the means over the processes (one all-reduce per read).
    """

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.names: Optional[list[str]] = None      # every term seen this epoch, in order of appearance
        self.last_names: list[str] = []
        self.last: Optional[torch.Tensor] = None    # [T'] this step's terms (last_names)
        self.sums: Optional[torch.Tensor] = None    # [T] sums over the finite micro-batches that had the term
        self.counts: Optional[torch.Tensor] = None  # [T] number of those micro-batches
        self.seen, self.start = 0, time.time()

    def add(self, terms: dict[str, torch.Tensor], batch_size: int) -> torch.Tensor:
        """Accumulate one micro-batch's scalar terms; returns whether all of them are finite (a device bool)."""
        values = torch.stack([v.detach().float().reshape(()) for v in terms.values()])
        finite = torch.isfinite(values).all()
        names = list(terms)
        if self.names is None:
            self.names = names
            self.sums, self.counts = torch.zeros_like(values), torch.zeros_like(values)
        if names == self.names:
            full, present = values, None
        else:  # another set of terms than the first step's: place them by name (host-side indices, no device read)
            new = [n for n in names if n not in self.names]
            self.names = self.names + new
            self.sums = torch.cat([self.sums, self.sums.new_zeros(len(new))])
            self.counts = torch.cat([self.counts, self.counts.new_zeros(len(new))])
            index = torch.tensor([self.names.index(n) for n in names], device=values.device)
            full = torch.zeros_like(self.sums).index_copy(0, index, values)
            present = torch.zeros_like(self.sums).index_fill(0, index, 1.0)
        self.last, self.last_names = values, names
        self.sums += torch.where(finite, full, torch.zeros_like(full))
        self.counts += finite.float() if present is None else finite.float() * present
        self.seen += batch_size * self.accelerator.num_processes
        return finite

    def _read(self, values: torch.Tensor) -> list[float]:
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, 'mean')
        return values.tolist()

    def current(self) -> dict[str, float]:
        """This step's terms (one host read)."""
        return dict(zip(self.last_names, self._read(self.last))) if self.last_names else {}

    def rate(self) -> float:
        return self.seen / max(1e-9, time.time() - self.start)

    def means(self) -> dict[str, float]:
        """The epoch means of the finite micro-batches' terms, and img/s."""
        out = {}
        if self.names:
            read = self._read(torch.cat([self.sums, self.counts]))
            sums, counts = read[:len(self.names)], read[len(self.names):]
            out = {k: v / max(1.0, n) for k, v, n in zip(self.names, sums, counts)}
        out['img_per_s'] = self.rate()
        out['samples'] = self.seen
        return out


class NonFiniteGuard:
    """``--nan-policy``: what a non-finite loss term or gradient norm does.

    * ``stop`` (default): each step's finiteness is recorded on the device, with the first bad step's number, terms
      and sample indices; :meth:`raise_if_bad` reads it at logging steps (before their update), before every
      checkpoint and at the end of the epoch, writes ``<report_dir>/nonfinite_step<N>.json`` and raises
      :class:`NonFiniteLossError`. A bad step's update is never saved: the run stops at the next check and resumes
      from the last checkpoint (with ``--log-every 1`` no bad step is applied at all).
    * ``skip``: the step's finiteness is read at once (one host read per step, the price of deciding before the
      update): a bad step writes the diagnostic file, zeroes the gradients instead of stepping the optimizer (weights,
      optimizer state and EMA untouched; the schedule advances) and restores the buffers the forward updated
      (BatchNorm statistics, up to :data:`MAX_RESTORED_BUFFER` elements each).

    The flag is summed over the processes (DDP has averaged the gradients already), so every process takes the same
    decision. Under fp16 the gradient scaler skips overflowing steps itself and the
    gradients are not checked.
    """

    def __init__(self, policy: str, model: torch.nn.Module, accelerator, report_dir: Optional[Path] = None):
        self.policy, self.accelerator, self.report_dir = policy, accelerator, report_dir
        self.restorable = [b for b in model.buffers() if b.numel() <= MAX_RESTORED_BUFFER] if policy == 'skip' else []
        self.saved: list[torch.Tensor] = []
        self.window_bad = False      # skip: a micro-batch of the current accumulation window was non-finite
        self.first_bad: Optional[dict] = None  # stop: device record of the first non-finite step
        self.skipped = 0

    def before_forward(self) -> None:
        """Snapshot the buffers a forward updates in place (``skip`` only)."""
        self.saved = [b.detach().clone() for b in self.restorable]

    def check(self, state: TrainState, terms: dict[str, torch.Tensor], finite: torch.Tensor,
              grad_norm: Optional[torch.Tensor], batch: Batch, optimizer) -> bool:
        """Record or decide on this micro-batch; True when the optimizer step must be skipped (``skip``, at the
        window's last micro-batch)."""
        checked_grads = grad_norm is not None and self.accelerator.scaler is None
        if checked_grads:
            finite = finite & torch.isfinite(grad_norm)
        if self.accelerator.num_processes > 1:  # one small all-reduce (no host read): every process decides alike
            finite = self.accelerator.reduce((~finite).float(), 'sum') == 0
        if self.policy == 'stop':
            self._record(state, terms, finite, grad_norm if checked_grads else None, batch, optimizer)
            return False
        if not bool(finite):
            path, where = self._report(state.epoch, state.step + 1, self._values(terms, grad_norm if checked_grads
                                                                             else None),
                                       batch.host_index, batch.lam, [g['lr'] for g in optimizer.param_groups], state)
            self.accelerator.print(f'warning: {where}' + (f' (diagnostic: {path})' if path else '')
                                   + ': optimizer step skipped (--nan-policy skip)')
            self.window_bad = True
            with torch.no_grad():
                for buffer, value in zip(self.restorable, self.saved):
                    buffer.copy_(value)
        skip = self.accelerator.sync_gradients and self.window_bad
        if self.accelerator.sync_gradients:
            self.skipped += skip
            self.window_bad = False
        return skip

    def _record(self, state, terms, finite, grad_norm, batch: Batch, optimizer) -> None:
        """Keep the first non-finite step's facts on the device (``torch.where``: no host read)."""
        device = finite.device
        if self.first_bad is None:
            self.first_bad = {'bad': torch.zeros((), dtype=torch.bool, device=device)}
        fb = self.first_bad
        new = ~finite & ~fb['bad']
        # torch.full is a fill kernel; torch.tensor(value, device=...) would be a blocking host-to-device copy
        facts = {'step': torch.full((), state.step + 1, device=device),
                 'epoch': torch.full((), state.epoch, device=device),
                 'lam': torch.full((), float(batch.lam), device=device),
                 'terms': torch.stack([v.detach().float().reshape(()) for v in terms.values()]),
                 'grad_norm': grad_norm.detach().float().reshape(()) if grad_norm is not None
                 else torch.zeros((), device=device)}
        if batch.index is not None:
            facts['index'] = batch.index
        for key, value in facts.items():
            previous = fb.get(key)
            fb[key] = value if previous is None or previous.shape != value.shape else torch.where(new, value, previous)
        fb['bad'] = fb['bad'] | ~finite
        fb['names'] = list(terms)
        fb['lr'] = [g['lr'] for g in optimizer.param_groups]

    def raise_if_bad(self, state: TrainState) -> None:
        """``stop``: one host read of the device record; raise when some step since the start was non-finite."""
        fb = self.first_bad
        if self.policy != 'stop' or fb is None or not bool(fb['bad']):
            return
        step, epoch = int(fb['step']), int(fb['epoch'])
        values = {**dict(zip(fb['names'], fb['terms'].tolist())), '_grad_norm': float(fb['grad_norm'])}
        index = fb['index'].cpu().numpy() if 'index' in fb else None
        path, where = self._report(epoch, step, values, index, float(fb['lam']), fb['lr'], state)
        detected = f', found at step {state.step}' if step < state.step else ''
        raise NonFiniteLossError(where + (f' (diagnostic: {path})' if path else '') + detected)

    @staticmethod
    def _values(terms: dict[str, torch.Tensor], grad_norm: Optional[torch.Tensor]) -> dict[str, float]:
        values = {k: float(v.detach()) for k, v in terms.items()}
        if grad_norm is not None:
            values['_grad_norm'] = float(grad_norm)
        return values

    def _report(self, epoch: int, step: int, values: dict, host_index, lam: float, lrs: list,
                state: TrainState) -> tuple[Optional[Path], str]:
        """Write ``nonfinite_step<N>.json`` (main process; at most :data:`MAX_NONFINITE_REPORTS` per run), N the
        optimizer step attempted as ``log.jsonl`` numbers it. Returns (its path or None, the one-line description)."""
        grad_norm = values.pop('_grad_norm', None)
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if grad_norm is not None and not math.isfinite(grad_norm):
            bad.append('gradients')  # DDP has averaged the gradients: every process sees the same norm
        where = f'non-finite {", ".join(bad)} at epoch {epoch} step {step}'
        if (self.report_dir is None or not self.accelerator.is_main_process
                or state.nonfinite_reports >= MAX_NONFINITE_REPORTS):
            return None, where
        state.nonfinite_reports += 1
        record = dict(step=step, epoch=epoch, policy=self.policy, nonfinite=bad,
                      terms={k: _json_number(v) for k, v in values.items()},
                      grad_norm=None if grad_norm is None else _json_number(grad_norm), lr=lrs,
                      mixup_lam=_json_number(lam),
                      sample_indices=[int(i) for i in host_index] if host_index is not None else None,
                      processes=self.accelerator.num_processes)
        path = Path(self.report_dir) / f'nonfinite_step{step}.json'
        tmp = path.with_name(path.name + '.tmp')
        tmp.write_text(json.dumps(record, indent=1) + '\n')
        os.replace(tmp, path)
        return path, where


def _json_number(value) -> object:
    value = float(value)
    return value if math.isfinite(value) else str(value)  # JSON has no NaN/inf
