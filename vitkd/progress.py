"""What a run shows while it trains: the epoch's progress with the run's ETA, and numbers rounded for the logs.

:class:`EpochProgress` wraps one epoch's loader. On a terminal it is a tqdm bar (``epoch 2/5``, batches, the
latest loss terms, the ETA of the whole run); when stdout is not a terminal (a log file, a cluster job) the ``\\r``
redraws of a bar would pile up into one unreadable line, so it prints a plain line every ``log_every`` optimizer
steps instead. Either way the epoch ends with one line giving its duration. Only the local main process shows
anything (every process runs the same loop).

    progress = EpochProgress(loader, accelerator, state.epoch, cfg.epochs, cfg.log_every, lambda: state.step,
                             first=state.batches_done, num_batches=len(full_loader), max_steps=cfg.max_steps,
                             accum=cfg.grad_accum_steps)
    for it, batch in enumerate(progress, start=state.batches_done):
        ...
        progress.set_postfix({'loss': 0.93, 'lr': 1e-3})
    progress.close()
"""
from __future__ import annotations

import math
import sys
import time
from typing import Callable, Iterable, Iterator, Optional

__all__ = ['EpochProgress', 'format_duration', 'rounded', 'warmup_warning']


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m`` (what a person reads at a glance)."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f'{seconds}s'
    if seconds < 3600:
        return f'{seconds // 60}m{seconds % 60:02d}s'
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'


class EpochProgress:
    """One epoch's batches with a progress display and the run's ETA.

    Args:
        loader: the epoch's batches (possibly a loader that skips the ``first`` already trained).
        accelerator: only its ``is_local_main_process`` is used: other processes iterate silently.
        epoch: the 0-based epoch; shown 1-based as ``epoch i/N``.
        epochs: the run's epochs (N).
        log_every: optimizer steps between plain lines when stdout is not a terminal.
        total_steps_done_fn: optimizer steps done in the whole run so far; with ``max_steps`` it bounds the ETA.
        first: batches of this epoch already trained (a mid-epoch resume).
        num_batches: batches of a full epoch (default: ``first + len(loader)``).
        max_steps: the run's ``--max-steps``, if any.
        accum: batches per optimizer step (gradient accumulation).
        stream: where to write (default: ``sys.stdout``, read when the object is made).
        clock: seconds, monotonic (default ``time.monotonic``; the tests pass a fake one).

    The ETA is the remaining batches of the run (this epoch's, the later epochs', or fewer when ``max_steps`` ends the
    run first) times the mean time of a batch since this epoch's first one, which leaves out the first batch's
    one-off costs (worker start-up, compilation).

    The line also shows the share of that time the loop waited for the loader (``data-wait 35%``): on a GPU the host
    runs ahead of the device and blocks where it reads a result, so time spent waiting in the loader is time the GPU
    may have been starved of batches. A large share asks for more ``--num-workers`` (or a teacher cache).
    """

    def __init__(self, loader: Iterable, accelerator, epoch: int, epochs: int, log_every: int = 50,
                 total_steps_done_fn: Optional[Callable[[], int]] = None, *, first: int = 0,
                 num_batches: Optional[int] = None, max_steps: Optional[int] = None, accum: int = 1, stream=None,
                 clock: Optional[Callable[[], float]] = None):
        self.loader, self.epoch, self.epochs = loader, epoch, epochs
        self.log_every, self.steps_done, self.max_steps = max(1, log_every), total_steps_done_fn, max_steps
        self.accum, self.first = max(1, accum), first
        self.total = num_batches if num_batches is not None else first + len(loader)
        self.stream = stream if stream is not None else sys.stdout
        self.show = bool(getattr(accelerator, 'is_local_main_process', True))
        self.tty = self.show and bool(getattr(self.stream, 'isatty', lambda: False)())
        self.postfix: dict = {}
        self.done = first
        self.start = self.first_batch_end = None
        self.clock = clock if clock is not None else time.monotonic
        self.data_wait = 0.0  # seconds spent waiting for the loader since the first batch
        self.bar = None
        self.closed = False

    # ---- the run's ETA --------------------------------------------------------------------------------------------
    def remaining_batches(self) -> int:
        """Batches left in the run after the ones done in this epoch so far."""
        left = (self.total - self.done) + max(0, self.epochs - self.epoch - 1) * self.total
        if self.max_steps is not None and self.steps_done is not None:
            left = min(left, max(0, self.max_steps - self.steps_done()) * self.accum)
        return left

    def eta(self) -> Optional[float]:
        """Seconds until the run's last training batch, or None before two batches have been timed."""
        timed = self.done - self.first - 1
        if self.first_batch_end is None or timed < 1:
            return None
        per_batch = (self.clock() - self.first_batch_end) / timed
        return per_batch * self.remaining_batches()

    def data_wait_share(self) -> Optional[float]:
        """The fraction of the time since the first batch that the loop spent waiting for the loader (None before
        the first batch)."""
        if self.first_batch_end is None:
            return None
        elapsed = self.clock() - self.first_batch_end
        return min(1.0, self.data_wait / elapsed) if elapsed > 0 else 0.0

    # ---- display --------------------------------------------------------------------------------------------------
    def set_postfix(self, terms: dict) -> None:
        """The latest numbers (loss terms, lr, img/s) shown beside the bar and in the plain lines."""
        self.postfix = dict(terms)

    def _terms(self) -> str:
        return '  '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in self.postfix.items())

    def _run_eta(self) -> str:
        eta = self.eta()
        return 'run ETA ' + (format_duration(eta) if eta is not None else '…')

    def _data_wait(self) -> str:
        share = self.data_wait_share()
        return f'data-wait {100 * share:.0f}%' if share is not None else ''

    def _line(self) -> str:
        return (f'epoch {self.epoch + 1}/{self.epochs}  batch {self.done}/{self.total}  {self._terms()}  '
                f'{self._data_wait()}  {self._run_eta()}').replace('    ', '  ')

    def _open_bar(self) -> None:
        from tqdm.auto import tqdm
        self.bar = tqdm(total=self.total, initial=self.first, desc=f'epoch {self.epoch + 1}/{self.epochs}',
                        file=self.stream, leave=False, dynamic_ncols=True, mininterval=1.0,
                        bar_format='{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]'
                                   '{postfix}')

    def __len__(self) -> int:
        return self.total - self.first

    def __iter__(self) -> Iterator:
        self.start = self.clock()
        if self.tty:
            self._open_bar()
        batches = iter(self.loader)
        while True:
            asked = self.clock()
            try:
                batch = next(batches)
            except StopIteration:
                break
            if self.first_batch_end is not None:  # the first batch's wait is the workers' start-up
                self.data_wait += self.clock() - asked
            try:
                yield batch
            finally:  # also when the loop stops at this batch (max steps, time limit, signal): it was trained
                self.done += 1
                if self.first_batch_end is None:
                    self.first_batch_end = self.clock()
            if self.bar is not None:
                self.bar.set_postfix_str(f'{self._terms()}  {self._data_wait()}  {self._run_eta()}'.strip(),
                                         refresh=False)
                self.bar.update(1)
            elif self.show and ((self.done - self.first) % (self.log_every * self.accum) == 0
                                or self.done == self.total):
                print(self._line(), file=self.stream, flush=True)
        self.close()

    def close(self) -> float:
        """End the display with the epoch's time (once; also after a ``break``); returns the epoch's seconds."""
        seconds = self.clock() - self.start if self.start is not None else 0.0
        if self.closed:
            return seconds
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        if self.show:
            eta = self.eta()
            tail = f', run ETA {format_duration(eta)}' if eta is not None and self.remaining_batches() else ''
            wait = self.data_wait_share()
            waited = f' ({100 * wait:.0f}% waiting for data)' if wait is not None else ''
            print(f'epoch {self.epoch + 1}/{self.epochs}: {self.done - self.first} batches in '
                  f'{format_duration(seconds)}{waited}{tail}', file=self.stream, flush=True)
        return seconds

    def __enter__(self) -> 'EpochProgress':
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- numbers in the run's files -------------------------------------------------------------------------------------

def _rounded_number(key: str, value: float) -> float:
    """Accuracies (%) to 3 decimals (one image in 100 000), throughput, seconds and MB to 1 decimal, the fractional
    epoch to 4 decimals, anything else (losses, lr, norms) to 4 significant digits."""
    if not math.isfinite(value):
        return value
    name = key.lower()
    if 'top1' in name or 'top5' in name or name.endswith('acc'):
        return round(value, 3)
    if name.endswith(('per_s', 'seconds', '_mb', '_s')):
        return round(value, 1)
    if name == 'epoch':
        return round(value, 4)
    return float(f'{value:.4g}')


def rounded(record):
    """A copy of a (nested) record with its floats rounded to what they measure (see :func:`_rounded_number`);
    integers, strings and booleans are kept as they are."""
    if isinstance(record, dict):
        return {k: _rounded_number(k, v) if isinstance(v, float) else rounded(v) for k, v in record.items()}
    if isinstance(record, list):
        return [rounded(v) for v in record]
    return record


def warmup_warning(cfg, steps_per_epoch: Optional[int] = None) -> Optional[str]:
    """A warning when the linear warm-up does not end before the run does (the learning rate would never reach
    ``--lr``, and the cosine decay would never start); None when it does. ``steps_per_epoch`` lets ``--max-steps``
    shorten the run."""
    run_epochs = float(cfg.epochs)
    if cfg.max_steps and steps_per_epoch:
        run_epochs = min(run_epochs, cfg.max_steps / steps_per_epoch)
    if not cfg.warmup_epochs or cfg.warmup_epochs < run_epochs:
        return None
    return (f'warning: --warmup-epochs {cfg.warmup_epochs:g} is not shorter than the run ({run_epochs:.3g} epochs): '
            f'the learning rate never reaches --lr and never decays; pass a shorter --warmup-epochs')
