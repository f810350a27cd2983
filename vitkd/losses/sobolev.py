"""Sobolev / Jacobian matching: match the input gradients of the target-class logit (``sobolev``).

"Sobolev Training for Neural Networks", Czarnecki, Osindero, Jaderberg, Świrszcz, Pascanu, NeurIPS 2017
(arXiv 1706.04859), and "Knowledge Transfer with Jacobian Matching", Srinivas & Fleuret, ICML 2018 (arXiv 1803.00443).
Official code (the Zoo variant this follows): AberHu/Knowledge-Distillation-Zoo @
65470c846c1300d555815da26999cbe2b51fc815, ``kd_losses/sobolev.py::Sobolev``, ``train_kd.py --kd_mode sobolev``.

Formula (x [B, C, H, W] the student's input, y [B] labels, z_s / z_t [B, K] logits)::

    g_s = ∂ z_s[b, y_b] / ∂x   (create_graph: the loss back-propagates through it — double backward)  # [B, C·H·W]
    g_t = ∂ z_t[b, y_b] / ∂x   (first order, no graph)                                              # [B, C·H·W]
    ĝ = g / max(‖g‖₂, 1e-12) per sample
    L = mean-MSE(ĝ_s, sg(ĝ_t))   over B·C·H·W

The Zoo's λ is 20 (``--distill sobolev:20``; a CIFAR value, re-tune). The README warns that Sobolev alone is unstable.

ViT students: the target logit is the averaged heads' logit (``head='auto'``, trained by the task CE too:
the term alone cannot train a classifier head (in the
  reproduce.py table a distillation head reached only by it stayed near chance); ``head='dist'``: the distillation head's, the task CE then going to the class head); the teacher logit is the one of the same class. The label is the dominant one under mixup
(y_a if λ ≥ 0.5 else y_b). PyTorch's fused attention kernels have no double backward, so the student's
attention must run the explicit path: :meth:`Sobolev.adapt_models` sets ``fused_attn = False`` on every timm attention
module of the student (``disable_fused_attn`` makes the builder call ``set_fused_attn(False)``, which only reaches
models built afterwards). The distillation head's bias receives no gradient (an input gradient does not depend on
it; the task CE is on the class head): ``may_leave_parameters_unused`` tells DDP. Both gradients are taken w.r.t.
the student-normalised input (the teacher's re-normalisation is part of its graph), so they live in the same space.

Where vitkd differs from the official code:

* **Teacher gradient.** The teacher's input gradient is computed without ``create_graph`` (the Zoo builds a second-order
  graph and then detaches the result), on its own leaf copy of the input, so nothing of the teacher's graph is kept.
  Evaluation never asks for input gradients (the distiller is not used for evaluation).
* The teacher needs a gradient-enabled pass (``batch.teacher_forward``); the distiller's own no-grad teacher pass
  still runs (its logits are unused here).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..features import Features, TapSpec
from .base import Batch, DistillationLoss, Head, pick_head, reads_dist_head, register_loss

__all__ = ['Sobolev', 'target_logit_input_gradient', 'sobolev_loss']


def _dominant_labels(batch: Batch) -> torch.Tensor:
    """[B] the label with the larger mixup weight: y_a if λ ≥ 0.5 else y_b."""
    return batch.labels if batch.lam >= 0.5 else batch.labels_b


def target_logit_input_gradient(logits: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor,
                                create_graph: bool) -> torch.Tensor:
    """∂ z[b, y_b] / ∂x for every sample, flattened.

    Args:
        logits: z [B, K], a function of ``inputs`` (samples independent, e.g. eval-mode BN or LayerNorm).
        inputs: x [B, C, H, W] with ``requires_grad``.
        labels: y [B].
        create_graph: keep the graph of the gradient (needed when a loss on it must train the network).

    Returns:
        [B, C·H·W].
    """
    target = logits.gather(1, labels.view(-1, 1)).sum()
    (grad,) = torch.autograd.grad(target, inputs, create_graph=create_graph)
    return grad.flatten(1)


def sobolev_loss(grad_student: torch.Tensor, grad_teacher: torch.Tensor) -> torch.Tensor:
    """mean-MSE between the per-sample L2-normalised gradients (the teacher's detached).

    Args:
        grad_student: [B, n].
        grad_teacher: [B, n].
    """
    g_s = F.normalize(grad_student, p=2, dim=1, eps=1e-12)
    g_t = F.normalize(grad_teacher.detach(), p=2, dim=1, eps=1e-12)
    return F.mse_loss(g_s, g_t)


@register_loss('sobolev')
class Sobolev(DistillationLoss):
    """Jacobian matching of the target-class logit w.r.t. the input (double backward through the student)."""
    paper = 'Sobolev training, Czarnecki et al., NeurIPS 2017, arXiv:1706.04859 (Zoo Jacobian-matching variant)'
    needs_input_grad = True
    disable_fused_attn = True
    #: a logit's input gradient does not depend on that head's bias: z_dist's bias never gets a gradient
    may_leave_parameters_unused = True

    def __init__(self, head: Head = 'auto'):
        """
        Args:
            head: student head whose target logit is differentiated (``auto`` = the averaged heads).
        """
        super().__init__()
        self.head = 'avg' if head == 'auto' else head
        self.uses_dist_head = reads_dist_head(self.head)
        self.student_taps = TapSpec(logits=True)
        self.teacher_taps = TapSpec(logits=True)

    def adapt_models(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        """Switch the student's attention to the explicit (non-fused) path: fused SDPA has no double backward.

        ``set_fused_attn(False)`` only affects models built after it; the student usually exists already.
        """
        for module in student.modules():
            if hasattr(module, 'fused_attn'):
                module.fused_attn = False

    def forward(self, student: Features, teacher: Features, batch: Batch) -> dict[str, torch.Tensor]:
        if not batch.images.requires_grad:
            raise RuntimeError('sobolev needs the input batch with requires_grad (needs_input_grad)')
        labels = _dominant_labels(batch)
        grad_s = target_logit_input_gradient(pick_head(student, self.head), batch.images, labels,
                                             create_graph=True)  # [B, C·H·W]
        x_t = batch.images.detach().requires_grad_(True)
        with torch.enable_grad():
            logits_t = batch.teacher_forward(x_t).logits  # [B, K]
            grad_t = target_logit_input_gradient(logits_t, x_t, labels, create_graph=False)  # [B, C·H·W]
        return {'jacobian': sobolev_loss(grad_s, grad_t)}
