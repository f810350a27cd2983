"""Checkpoint writes off the training loop: the step copies the state to the host, a thread writes it.

A checkpoint of DeiT-S with AdamW is ~270 MB (weights, two moments, the EMA, the exported student); written from the
training loop it stalls every GPU of the run for seconds at each ``--save-every-steps``. :class:`BackgroundWriter`
runs one write at a time on a thread; what it writes was captured before training went on (:func:`host_copy`,
:func:`host_module`), so later steps cannot change it. The commit stays atomic (``<name>.tmp`` renamed when
complete, see :mod:`vitkd.checkpoint`): a kill during a background write leaves the same ``.tmp`` folder as a kill
during a foreground one.
"""
from __future__ import annotations

import copy
import itertools
import threading
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

__all__ = ['BackgroundWriter', 'host_copy', 'host_module']


def host_copy(tree: Any) -> Any:
    """A copy of a nested state (dicts, lists, tuples) whose tensors are detached host copies (new storage even for
    CPU tensors: the optimizer and the model update theirs in place)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to('cpu', copy=True)
    if isinstance(tree, dict):
        return type(tree)((k, host_copy(v)) for k, v in tree.items())
    if isinstance(tree, (list, tuple)):
        return type(tree)(host_copy(v) for v in tree)
    return copy.deepcopy(tree)


def host_module(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with its parameters and buffers on the host (no second copy on the device)."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        if id(t) not in memo:
            host = t.detach().to('cpu', copy=True)
            memo[id(t)] = nn.Parameter(host, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else host
    return copy.deepcopy(module, memo)


class BackgroundWriter:
    """One write at a time on a (non-daemon) thread; :meth:`wait` joins it and hands back what it raised.

    The interpreter joins a non-daemon thread before it exits, so a write under way when the run ends (or fails)
    completes; a kill leaves its ``.tmp`` folder, which no resume takes.
    """

    def __init__(self, name: str = 'vitkd-checkpoint-writer'):
        self.name = name
        self._thread: Optional[threading.Thread] = None
        self._result: Any = None
        self._error: Optional[BaseException] = None

    @property
    def busy(self) -> bool:
        return self._thread is not None

    def submit(self, write: Callable[[], Any]) -> None:
        """Start ``write()`` on the thread (the previous write must have been waited for)."""
        if self._thread is not None:
            raise RuntimeError('BackgroundWriter.submit: the previous write was not waited for')

        def run() -> None:
            try:
                self._result = write()
            except BaseException as e:  # handed to the training thread by wait()
                self._error = e

        self._result, self._error = None, None
        self._thread = threading.Thread(target=run, name=self.name, daemon=False)
        self._thread.start()

    def wait(self) -> tuple[Any, Optional[BaseException]]:
        """Join the write under way, if any: (what it returned, what it raised)."""
        if self._thread is None:
            return None, None
        self._thread.join()
        self._thread = None
        return self._result, self._error
