"""LwM: Grad-CAM attention distillation from "Learning without Memorizing" (``lwm``).

"Learning without Memorizing", Dhar, Singh, Peng, Wu, Chellappa, CVPR 2019 (arXiv 1811.08051) — only its Grad-CAM
attention-distillation term, as in the Zoo. Official code this follows: AberHu/Knowledge-Distillation-Zoo @
65470c846c1300d555815da26999cbe2b51fc815, ``kd_losses/lwm.py::LwM``, ``train_kd.py --kd_mode lwm``.

Formula (F [B, C, H, W] a tapped map of each network, z [B, K] logits, y [B] labels)::

    w_c = mean_{H,W} ∂z_y/∂F_c                        # [B, C] Grad-CAM channel weights
    cam = ReLU(Σ_c w_c · F_c)                          # [B, H, W] (Selvaraju et al.'s Grad-CAM)
    ĉam = cam.flatten / max(‖cam‖₂, 1e-12)             # [B, H·W]
    L = mean-L1(ĉam_s, sg(ĉam_t))

The student's ∂z_y/∂F is built with ``create_graph`` (the loss trains the student through its own gradient: double
backward); the teacher's is first order, on its own leaf copy of the input (``batch.teacher_forward``). The Zoo's λ is
0.4 (``--distill lwm:0.4``, a CIFAR value); its README warns LwM alone is unstable.

Taps: one map per network at 2/3 of the depth by default (ViT block 8 ↔ RegNet s3, both 14×14 at 224 px; CNN s3 ↔
s3), chosen like every single-tap Zoo method (``_adapt``; ``student_block`` / ``teacher_block`` override). The map is
read with a forward hook on the tap's module (``feature_info[i]['module']``: ``blocks.7``, ``s3``, ``layer3``), i.e.
the very tensor the rest of the network consumes, so ∂z/∂F exists. A ViT block output [B, P + h·w, D] drops its P
prefix tokens and becomes a [B, D, h, w] grid (h, w from the model's reduction); the gradient w.r.t. the prefix tokens
is not part of the CAM. If the two CAMs differ in size, the larger is average-pooled to the smaller before
normalisation.

ViT students: the target logit is the averaged heads' logit (``head='auto'``, trained by the task CE too:
the term alone cannot train a classifier head (in the
  reproduce.py table a distillation head reached only by it stayed near chance); ``head='dist'``: the distillation head's) of the dominant label (y_a if λ ≥ 0.5 else y_b);
the teacher uses the same class. The explained head's bias gets no gradient (∂z/∂F does not depend on it;
``may_leave_parameters_unused`` tells DDP). Double backward through attention needs the non-fused path:
:meth:`LwM.adapt_models` sets ``fused_attn = False`` on the student's timm attention modules.

Where vitkd differs from the official code:

* **Grad-CAM (Zoo issue #16).** The Zoo computes ReLU(Σ_c w_c·∂z_y/∂F_c) — gradients instead of activations — which
  after GAP + FC is spatially constant at the last stage (hence the README's choice of the middle stage). vitkd
  computes the real Grad-CAM; ``cam='zoo'`` reproduces the Zoo's formula (parity only).
* **Teacher gradient.** The teacher's gradient has no ``create_graph``; the Zoo also sets ``img.requires_grad`` in
  train and test, which is unnecessary here (the student's map depends on its parameters) — ``needs_input_grad`` is
  False.
* The maps a loss receives are fp32 contiguous copies (bf16 autocast, ``channels_last`` teachers), which are not on
  the path to the logits; the gradient is then taken w.r.t. the original tensor through its autograd edge and cast
  to fp32 (:func:`target_gradient`).

ViT students (``vit_student_weight`` = 0.01): the Zoo's CIFAR-tuned λ is too strong for a ViT student. On the table's
ViT student (``scripts/reproduce.py``, 150 steps, avg-head top-1 gain over the no-teacher student) weight 1 gave
−2.15 points, 0.1 gave −0.72 and 0.01 −0.14 (seed 0), so a ViT student gets weight 0.01 unless the command gives one
(``lwm:1`` = the Zoo's).
"""
from __future__ import annotations

from typing import Annotated, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.graph import GradientEdge

from ..domains import Integer, OneOf, OrNone
from ..features import Features, TapSpec, _is_vit
from ._adapt import MIDDLE_TAP, align_spatial, as_taps, pair_taps
from .base import Batch, DistillationLoss, Head, LossSpecError, pick_head, reads_dist_head, register_loss

__all__ = ['LwM', 'grad_cam', 'lwm_loss', 'target_gradient', 'CAM_MODES']

CAM_MODES = ('gradcam', 'zoo')


_COPY_NODES = ('ToCopyBackward', 'CloneBackward')


def target_gradient(logits: torch.Tensor, labels: torch.Tensor, feature: torch.Tensor,
                    create_graph: bool) -> torch.Tensor:
    """∂ Σ_b z[b, y_b] / ∂F (samples independent, so row b is ∂z[b, y_b]/∂F[b]).

    Args:
        logits: z [B, K], computed from ``feature``.
        labels: y [B].
        feature: F, any shape. If it is a copy of the tensor the network used — the distiller hands losses fp32
            (``.float()`` under bf16 autocast) contiguous (``.contiguous()`` of a ``channels_last`` teacher's map)
            copies — the gradient is taken w.r.t. the original, reached through the copies' autograd edges.
        create_graph: keep the graph (double backward).

    Returns:
        A tensor shaped like ``feature``, with its dtype.
    """
    target = logits.gather(1, labels.view(-1, 1)).sum()
    inputs, node = feature, feature.grad_fn
    while True:
        (grad,) = torch.autograd.grad(target, inputs, create_graph=create_graph, retain_graph=True, allow_unused=True)
        if grad is not None:
            return grad.to(feature.dtype)
        if node is None or not type(node).__name__.startswith(_COPY_NODES):
            raise RuntimeError('lwm: the tapped map is not on the path to the logits (a copy the gradient cannot '
                               'be traced through)')
        source, index = node.next_functions[0]
        inputs, node = GradientEdge(source, index), source


def grad_cam(feature: torch.Tensor, grad: torch.Tensor, mode: str = 'gradcam') -> torch.Tensor:
    """Grad-CAM [B, H, W] of a map and its gradient [B, C, H, W].

    ``gradcam``: ReLU(Σ_c w_c·F_c); ``zoo``: ReLU(Σ_c w_c·∂z/∂F_c) (the Zoo's bug, parity), w_c = mean_{H,W} ∂z/∂F_c.
    """
    if mode not in CAM_MODES:
        raise ValueError(f'cam must be one of {CAM_MODES}, got {mode!r}')
    weights = grad.mean(dim=(2, 3), keepdim=True)  # [B, C, 1, 1]
    return F.relu((weights * (feature if mode == 'gradcam' else grad)).sum(dim=1))


def lwm_loss(cam_student: torch.Tensor, cam_teacher: torch.Tensor) -> torch.Tensor:
    """mean-L1 between the per-sample L2-normalised CAMs [B, H, W] (the larger pooled to the smaller first)."""
    cam_s, cam_t = align_spatial(cam_student.unsqueeze(1), cam_teacher.detach().unsqueeze(1))
    return F.l1_loss(F.normalize(cam_s.flatten(1), p=2, dim=1, eps=1e-12),
                     F.normalize(cam_t.flatten(1), p=2, dim=1, eps=1e-12))


class _MapTap:
    """Where one network's map comes from: a module name, and how to turn tokens into a grid."""

    def __init__(self, model: nn.Module, tap: int, what: str):
        info = getattr(model, 'feature_info', None)
        if info is None:
            raise LossSpecError(f'lwm: {what} {type(model).__name__} has no feature_info to locate tap {tap}')
        tap = tap % len(info)
        self.module = info[tap]['module']
        self.reduction = int(info[tap]['reduction'])
        self.prefix = int(getattr(model, 'num_prefix_tokens', 0)) if _is_vit(model) else 0

    def grid(self, x: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """[B, C, H, W] as is; ViT tokens [B, P + h·w, D] → [B, D, h, w]."""
        if x.ndim == 4:
            return x
        h, w = image_size[0] // self.reduction, image_size[1] // self.reduction
        tokens = x[:, self.prefix:]  # [B, h·w, D]
        if tokens.shape[1] != h * w:
            raise ValueError(f'lwm: {tokens.shape[1]} patch tokens do not form a {h}×{w} grid')
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)


@register_loss('lwm')
class LwM(DistillationLoss):
    """Grad-CAM attention distillation (double backward through the student)."""
    paper = 'LwM, Dhar et al., CVPR 2019, arXiv:1811.08051 (Grad-CAM attention term)'
    vit_student_weight = 0.01
    disable_fused_attn = True
    #: ∂z_y/∂F does not depend on the explained head's bias: z_dist's bias never gets a gradient
    may_leave_parameters_unused = True

    def __init__(self, cam: Annotated[str, OneOf(*CAM_MODES)] = 'gradcam',
                 student_block: Annotated[Optional[int], OrNone(Integer())] = None,
                 teacher_block: Annotated[Optional[int], OrNone(Integer())] = None, head: Head = 'auto'):
        """
        Args:
            cam: ``gradcam`` (correct) or ``zoo`` (the Zoo's gradient-times-gradient formula, parity only).
            student_block, teacher_block: tap index of the map; None = 2/3 of the depth (ViT G_8, CNN s3).
            head: student head whose target logit is explained (``auto`` = the averaged heads).
        """
        super().__init__()
        self.cam, self.head = cam, 'avg' if head == 'auto' else head
        self.student_block = None if student_block is None else int(student_block)
        self.teacher_block = None if teacher_block is None else int(teacher_block)
        self.uses_dist_head = reads_dist_head(self.head)
        self._student_map: Optional[_MapTap] = None
        self._teacher_map: Optional[_MapTap] = None

    def adapt_models(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        """Switch the student's attention to the explicit (non-fused) path: fused SDPA has no double backward.

        ``set_fused_attn(False)`` only affects models built after it; the student usually exists already.
        """
        for module in student.modules():
            if hasattr(module, 'fused_attn'):
                module.fused_attn = False

    def configure_taps(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        s, t = pair_taps(student, teacher, as_taps(self.student_block), as_taps(self.teacher_block), MIDDLE_TAP)
        self._student_map = _MapTap(student, s[0], 'student')
        self.student_taps = TapSpec(logits=True, modules=(self._student_map.module,))
        if teacher is not None:
            self._teacher_map = _MapTap(teacher, t[0], 'teacher')
            self.teacher_taps = TapSpec(logits=True, modules=(self._teacher_map.module,))

    def forward(self, student: Features, teacher: Features, batch: Batch) -> dict[str, torch.Tensor]:
        if self._student_map is None or self._teacher_map is None:
            raise RuntimeError('lwm.configure_taps() has not run (build the loss through the Distiller)')
        size = tuple(batch.images.shape[-2:])
        labels = batch.labels if batch.lam >= 0.5 else batch.labels_b  # dominant label under mixup
        feature_s = student.modules[self._student_map.module]
        grad_s = target_gradient(pick_head(student, self.head), labels, feature_s, create_graph=True)
        cam_s = grad_cam(self._student_map.grid(feature_s, size), self._student_map.grid(grad_s, size), self.cam)
        x_t = batch.images.detach().requires_grad_(True)
        with torch.enable_grad():
            feats_t = batch.teacher_forward(x_t)
            feature_t = feats_t.modules[self._teacher_map.module]
            grad_t = target_gradient(feats_t.logits, labels, feature_t, create_graph=False)
        cam_t = grad_cam(self._teacher_map.grid(feature_t.detach(), size), self._teacher_map.grid(grad_t, size),
                         self.cam)
        return {'cam_l1': lwm_loss(cam_s, cam_t)}
