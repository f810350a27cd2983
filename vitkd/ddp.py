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
  first batch, an epoch with the task CE off, methods whose parts idle); :class:`UnusedParameterSearch` then rewraps
  the module without it at the first optimizer step after.
* **No static graph**: it assumes the same graph every step, which warm-ups, staged methods and skipped terms break.
* **Compilation** (``--compile-student``) compiles the student's pass only (``Distiller.compile_student``): its
  backward runs as one compiled graph, so DDP receives the student's gradients together at its end and their
  all-reduce does not overlap that backward. Compiling the whole prepared module (dynamo's DDP optimiser) would
  overlap them (``accelerate launch --dynamo_backend`` does that), but the distiller's forward reads the fractional
  epoch (warm-ups, phases) as Python numbers, and such a module trains differently from the eager one in a warm-up
  run (``tests/test_multiprocess.py``, an expected failure).
"""
from __future__ import annotations

import math
from typing import Optional

import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch.nn.parallel import DistributedDataParallel

__all__ = ['ddp_kwargs', 'sync_buffers_if_needed', 'rank_local_buffers', 'UnusedParameterSearch', 'ddp_of']


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


def ddp_of(model: nn.Module) -> Optional[DistributedDataParallel]:
    """The DDP wrapper of a prepared model (under a ``torch.compile`` wrapper or not), or None."""
    inner = getattr(model, '_orig_mod', model)
    return inner if isinstance(inner, DistributedDataParallel) else None


class UnusedParameterSearch:
    """DDP's search for parameters without gradient, only for the steps that need it.

    Args:
        accelerator: the run's accelerator (its DDP settings and its compilation settings).
        until: the fractional epoch from which no step leaves a parameter idle
            (:func:`vitkd.distiller.idle_parameters_until`; ``inf``: the search stays on).

    The engine calls :meth:`model_for_step` at the start of every optimizer step; once the step's epoch reaches
    ``until`` it returns the same module wrapped anew without the search (the old wrapper's gradient hooks are
    removed). The gradients, hence the weights, are the same either way: the search only tells DDP which parameters
    to mark ready without a gradient. A module compiled as a whole (not what ``--compile-student`` does) keeps the
    search.
    """

    def __init__(self, accelerator: Accelerator, until: float):
        self.accelerator, self.until = accelerator, until
        self.rewrapped: Optional[nn.Module] = None

    def latest(self, model: nn.Module) -> nn.Module:
        """The module to train from now on: ``model``, or its rewrapped version once :meth:`model_for_step` made it."""
        return self.rewrapped if self.rewrapped is not None else model

    def model_for_step(self, model: nn.Module, epoch: float) -> nn.Module:
        """The module for an optimizer step at fractional ``epoch`` (call it before the step's first batch)."""
        ddp = ddp_of(model)
        if ddp is None or ddp is not model or not ddp.find_unused_parameters or epoch < self.until \
                or math.isinf(self.until):
            return model
        kwargs = dict(self.accelerator.ddp_handler.to_kwargs(), find_unused_parameters=False)
        ddp._remove_autograd_hooks()
        rewrapped = DistributedDataParallel(ddp.module, device_ids=ddp.device_ids, output_device=ddp.output_device,
                                            **kwargs)
        rewrapped.forward_sync_buffers = ddp.forward_sync_buffers
        self.rewrapped = rewrapped
        return rewrapped
