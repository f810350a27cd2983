"""How the distiller is wrapped for data-parallel training (PyTorch DDP through Accelerate), and why.

Each setting follows from what a vitkd run's module holds and does:

* **Buffers.** DDP copies rank 0's buffers to every rank when it wraps the module, and by default again before every
  forward. vitkd re-sends them only when some buffer changes from each rank's own batch while training
  (:func:`rank_local_buffers`: BatchNorm running statistics, a method's running estimates). Everything else is
  identical on every rank by construction (the build is seeded identically on every process, and the wrap copies
  rank 0's anyway): DeiT students have no buffers, VkD's orthogonal projector keeps a constant ``base`` (36.6 MB for
  DeiT-S → RegNetY-160), CRD's banks and ND's centres are kept identical by the methods themselves and are on DDP's
  ignore list. Re-sending a constant every step costs bandwidth and a synchronisation before each forward.
* **Gradients as bucket views** (``gradient_as_bucket_view``): each ``.grad`` is a view into DDP's all-reduce buffer,
  which saves a copy per step and one gradient-sized block of memory; the values are the same.
* **Unused parameters** (``find_unused_parameters``): the search walks the autograd graph every step. It is on only
  while a step can leave a parameter without gradient (:func:`vitkd.distiller.idle_parameters_until`: a warm-up's
  first batch, an epoch with the task CE off, methods whose parts idle); :class:`StepModule` then rewraps
  the module without it at the first optimizer step after.
* **No static graph**: it assumes the same graph every step, which warm-ups, staged methods and skipped terms break.
* **Compilation** (``--compile-student``, or the launcher's ``--dynamo_backend``): :class:`StepModule` compiles the
  prepared module as a whole, DDP wrapper included. Dynamo then splits the module's graph where DDP's gradient buckets
  end (its DDP optimiser: a first bucket of 1 MB, then ``bucket_cap_mb``), each piece has its own compiled backward,
  and each bucket's all-reduce starts while the backward of the pieces before it in the forward still runs.
  A compiled backward gives a zero gradient, where eager autograd gives none, to a parameter whose output the step
  computes but its loss ignores (a distillation head while its term warms up from weight 0): AOTAutograd treats an
  output that receives no gradient as one that receives zeros. AdamW then decays that parameter and advances its
  moments, which eager training leaves alone. And a Python number that changes every step (a method weight ramping
  up in a warm-up) cannot reach DDP's split graphs as a tensor: dynamo recompiles for each value and, after its
  ``recompile_limit`` (8), runs the module eagerly. So the module is compiled from the first step at which no
  parameter can be idle (:func:`vitkd.distiller.idle_parameters_until`, the bound the unused-parameter search ends at)
  and no method weight ramps any more, and runs eagerly before it; a run whose every step can leave a parameter idle
  is not compiled. The weights are then those of eager training (``tests/test_multiprocess.py``: 2 processes,
  compiled against eager, bit-identical in float64). Methods whose own arithmetic takes such a number (mixup's λ in
  DKD and ND, their internal ramps) meet the same recompilations; that is torch's limit, not worked around here.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DynamoBackend, TorchDynamoPlugin
from torch.nn.parallel import DistributedDataParallel

__all__ = ['ddp_kwargs', 'sync_buffers_if_needed', 'rank_local_buffers', 'launcher_compile_kwargs', 'StepModule',
           'ddp_of']


def ddp_kwargs(find_unused_parameters: bool) -> DistributedDataParallelKwargs:
    """Accelerate's DDP settings for a run (buffers are set on the wrapper by :func:`sync_buffers_if_needed`)."""
    return DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters, gradient_as_bucket_view=True)


def sync_buffers_if_needed(model: nn.Module) -> nn.Module:
    """Turn off DDP's per-forward copy of rank 0's buffers unless :func:`rank_local_buffers` finds some (the copy at
    wrap time stays: ``broadcast_buffers=False`` at construction would skip it too). Returns ``model``."""
    ddp = ddp_of(model)
    if ddp is not None:
        ddp.forward_sync_buffers = bool(rank_local_buffers(ddp.module))
    return model


def rank_local_buffers(model: nn.Module) -> list[str]:
    """Names of the buffers a training step may change from the rank's own batch (DDP must then keep them in step).

    These are BatchNorm-style running statistics anywhere (a BatchNorm student, NORM's TokenBatchNorm, OFD's
    connectors), and every buffer of a distillation method except those on DDP's ignore list (the method keeps them
    identical itself) and those of a parametrisation (VkD's orthogonal ``base``: fixed when the projector is built).
    A student's other buffers (timm's position tables) are constants.
    """
    ignored = set(getattr(model, '_ddp_params_and_buffers_to_ignore', ()))
    names = []
    for module_name, module in model.named_modules():
        running_stats = isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats
        for buffer_name, _ in module.named_buffers(recurse=False):
            full = f'{module_name}.{buffer_name}' if module_name else buffer_name
            method_state = full.startswith('losses.') and '.parametrizations.' not in full
            if full not in ignored and (running_stats or method_state):
                names.append(full)
    return names


def launcher_compile_kwargs() -> Optional[dict]:
    """``torch.compile``'s arguments as the launcher asks for them (``accelerate launch --dynamo_backend …`` or its
    config file, which Accelerate passes on as ``ACCELERATE_DYNAMO_*``), or None when it asks for no compilation.
    vitkd compiles the module itself (:class:`StepModule`) rather than letting ``accelerator.prepare`` do it."""
    plugin = TorchDynamoPlugin()
    return None if plugin.backend == DynamoBackend.NO else plugin.to_kwargs()


def ddp_of(model: nn.Module) -> Optional[DistributedDataParallel]:
    """The DDP wrapper of a prepared model (under a ``torch.compile`` wrapper or not), or None."""
    inner = getattr(model, '_orig_mod', model)
    return inner if isinstance(inner, DistributedDataParallel) else None


class StepModule:
    """The module each optimizer step trains: DDP's search for unused parameters only while a step needs it, and the
    compiled module once no step leaves a parameter idle.

    Args:
        accelerator: the run's accelerator (its DDP settings).
        search_until: the fractional epoch from which DDP drops its search
            (:func:`vitkd.distiller.idle_parameters_until` or the ``--ddp-find-unused`` choice; ``inf``: never).
        compile_from: the fractional epoch from which the module is compiled
            (:func:`vitkd.distiller.idle_parameters_until`; ``inf``: never), or None when the run does not compile.
        compile_kwargs: ``torch.compile``'s arguments (the launcher's dynamo settings; none: inductor's defaults).

    The engine calls :meth:`model_for_step` at the start of every optimizer step. Once the step's epoch reaches
    ``search_until`` it wraps the same module anew without the search (the old wrapper's gradient hooks are removed);
    the gradients, hence the weights, are the same either way: the search only tells DDP which parameters to mark ready
    without a gradient. Once the epoch reaches ``compile_from`` it returns the module (its DDP wrapper on several
    processes) under ``torch.compile``; why not before: :mod:`vitkd.ddp`.
    """

    def __init__(self, accelerator: Accelerator, search_until: float, compile_from: Optional[float] = None,
                 compile_kwargs: Optional[dict] = None):
        self.accelerator, self.search_until = accelerator, search_until
        self.compile_from, self.compile_kwargs = compile_from, compile_kwargs or {}
        self.current: Optional[nn.Module] = None

    def latest(self, model: nn.Module) -> nn.Module:
        """The module to train from now on: ``model``, or the one :meth:`model_for_step` last made from it."""
        return self.current if self.current is not None else model

    def model_for_step(self, model: nn.Module, epoch: float) -> nn.Module:
        """The module for an optimizer step at fractional ``epoch`` (call it before the step's first batch)."""
        inner = getattr(model, '_orig_mod', model)
        rewrapped = self._without_search(inner, epoch)
        compile_now = self.compile_from is not None and epoch >= self.compile_from
        if rewrapped is inner and (inner is not model or not compile_now):
            return model
        self.current = torch.compile(rewrapped, **self.compile_kwargs) if compile_now else rewrapped
        return self.current

    def _without_search(self, model: nn.Module, epoch: float) -> nn.Module:
        """``model``, or its module wrapped anew without DDP's search once ``epoch`` reaches ``search_until``."""
        ddp = ddp_of(model)
        if ddp is None or not ddp.find_unused_parameters or epoch < self.search_until:
            return model
        kwargs = dict(self.accelerator.ddp_handler.to_kwargs(), find_unused_parameters=False)
        ddp._remove_autograd_hooks()
        rewrapped = DistributedDataParallel(ddp.module, device_ids=ddp.device_ids, output_device=ddp.output_device,
                                            **kwargs)
        rewrapped.forward_sync_buffers = ddp.forward_sync_buffers
        return rewrapped
