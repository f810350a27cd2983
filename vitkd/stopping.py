"""When a run stops before its epochs are done, decided alike on every process: :class:`StopControl`.

Two causes stop a run early:

* a signal: SIGTERM (a scheduler's preemption, the launcher passing one on) or SIGINT (Ctrl-C) sets a flag; the run
  saves a checkpoint at the next step boundary and exits with 128 + the signal's number. A second Ctrl-C aborts at
  once, without saving.
* a budget: ``--max-steps`` (optimizer steps) or ``--time-limit`` (a wall-clock deadline); the run ends normally,
  its reason recorded in ``TrainState.stop_reason`` (and so in ``summary.json``).

On N processes every process must stop at the same step: one that stopped alone would leave the others waiting in
DDP's all-reduce for ever. The step budget needs no agreement (every process counts the same steps). A signal may
reach one process only, and a deadline can fall between two processes' checks; both are therefore read only at
``collective`` points (logging steps, the last batch of an epoch, epoch ends), where every process calls the same
collective: the signal flags are summed over the processes, the main process's reading of the clock is broadcast.
Between those points a process's own signal waits.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Iterator, Optional

import torch
from accelerate.utils import broadcast

if TYPE_CHECKING:
    from .training import TrainState

__all__ = ['StopControl', 'SIGNALS']

SIGNALS = (signal.SIGTERM, signal.SIGINT)  # what asks a run to save and stop


class StopControl:
    """The stop decisions of one training run: its signals and its step/time budget, agreed across the processes.

    Args:
        accelerator: the run's accelerator (process count, device for the collectives).
        state: the run's :class:`vitkd.training.TrainState`, whose ``step``, ``max_steps`` and ``deadline`` are the
            budget and whose ``stop_reason`` records a budget stop.
    """

    def __init__(self, accelerator, state: 'TrainState'):
        self.accelerator, self.state = accelerator, state
        self.signum: Optional[int] = None   # the signal this process received
        self.signalled = False              # a signal stop, as the processes agreed on it
        self._previous: dict = {}

    # ---- signals ---------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def handling_signals(self) -> Iterator['StopControl']:
        """SIGTERM/SIGINT handlers for the duration of training (the previous handlers come back after)."""
        if threading.current_thread() is threading.main_thread():  # handlers can only be set from the main thread
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            self._restore_handlers()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                self._restore_handlers()
                raise KeyboardInterrupt
            return  # a repeated SIGTERM (e.g. forwarded by the launcher and sent by the scheduler)
        self.signum = signum
        print(f'\n{signal.Signals(signum).name} received: saving a checkpoint at the next step boundary, then '
              'exiting (Ctrl-C again aborts without saving)', file=sys.stderr, flush=True)

    def _restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def signal_received(self, collective: bool = True) -> bool:
        """Whether a process received SIGTERM/SIGINT. On N processes the flags are summed only when ``collective``
        (every process calls it at the same point); elsewhere the agreed flag of the last collective point stands."""
        flag = self.signum is not None
        if self.accelerator.num_processes > 1:
            if not collective:
                return self.signalled
            t = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
            flag = bool(self.accelerator.reduce(t, reduction='sum').item() > 0)
        self.signalled = self.signalled or flag
        return self.signalled

    def signal_name(self) -> str:
        """The signal that stopped the run, by name."""
        return signal.Signals(self.signum).name if self.signum else 'a signal on another process'

    def exit_code(self) -> int:
        """128 + the signal's number (SIGTERM's when the signal reached another process only)."""
        return 128 + (self.signum or signal.SIGTERM)

    # ---- the budget ------------------------------------------------------------------------------------------------

    def steps_spent(self) -> bool:
        """Whether ``max_steps`` is reached (sets ``stop_reason``). Every process counts the same steps, so it needs
        no agreement: also checked before an epoch starts, for a run resumed at its last step."""
        state = self.state
        if state.max_steps is not None and state.step >= state.max_steps:
            state.stop_reason = f'max_steps {state.max_steps} reached'
            return True
        return False

    def budget_spent(self, collective: bool) -> bool:
        """Whether the step or time budget has run out (sets ``stop_reason``), as the main process decides it for the
        deadline: on N processes the clock is read at ``collective`` points only and rank 0's reading is broadcast."""
        state = self.state
        if self.accelerator.num_processes == 1 or state.deadline is None:
            if not self.steps_spent() and state.deadline is not None and time.time() >= state.deadline:
                state.stop_reason = 'time limit reached'
            return bool(state.stop_reason)
        if self.steps_spent():
            return True
        if not collective:
            return False
        stop = torch.tensor([float(time.time() >= state.deadline)], device=self.accelerator.device)
        if broadcast(stop, from_process=0).item():
            state.stop_reason = 'time limit reached'
        return bool(state.stop_reason)
