"""Distillation methods: the registry and one module per method (imported here so each registers itself)."""
import importlib
import pkgutil

from .base import (LOSS_REGISTRY, Batch, DistillationLoss, LossSpecError, RunContext, RunInfo, create_loss, get_loss_class,
                   list_losses, register_loss)

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ('base', 'functional'):
        importlib.import_module(f'{__name__}.{_module.name}')

__all__ = ['LOSS_REGISTRY', 'Batch', 'DistillationLoss', 'LossSpecError', 'RunContext', 'RunInfo', 'create_loss', 'get_loss_class',
           'list_losses', 'register_loss']
