"""vitkd: knowledge distillation into vision transformers, on timm and Accelerate.

``import vitkd`` registers the VkD students (``deit_{ti,s,b}_distilled``) and the dense models
(``vitkd_dense_detector``, ``vitkd_dense_segmenter``) in timm's registry and every distillation method in the loss
registry.
"""
from . import losses, models  # noqa: F401  (registration side effects)
from .dense import models as dense_models  # noqa: F401  (registration side effects)
from .losses import create_loss, list_losses, register_loss
from .models import create_student, create_teacher

__version__ = '0.1.0'
__all__ = ['create_loss', 'list_losses', 'register_loss', 'create_student', 'create_teacher']
