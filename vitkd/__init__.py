"""vitkd: knowledge distillation into vision transformers, on timm and Accelerate.

``import vitkd`` registers the VkD students (``deit_{ti,s,b}_distilled``) and the dense models
(``vitkd_dense_detector``, ``vitkd_dense_segmenter``) in timm's registry and every distillation method in the loss
registry. :func:`vitkd.create_distillation` gives a teacher, a student and the distillation criterion for a loop of
your own (see :mod:`vitkd.api`).
"""
import os

# OpenMP threads that spin while waiting make every step ~10x slower on oversubscribed CPUs (measured on a 2-core
# machine). OpenMP reads this when torch loads it, so it is set before torch is imported; a value the user set wins.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

from . import losses, models  # noqa: E402,F401  (registration side effects)
from .dense import models as dense_models  # noqa: E402,F401  (registration side effects)
from .losses import Batch, create_loss, list_losses, register_loss  # noqa: E402
from .models import create_student, create_teacher  # noqa: E402
from .api import Parts, create_distillation, make_config  # noqa: E402
from .version import __version__  # noqa: E402

__all__ = ['create_loss', 'list_losses', 'register_loss', 'create_student', 'create_teacher', 'create_distillation',
           'make_config', 'Parts', 'Batch', '__version__']
