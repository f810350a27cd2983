"""OFD: overhaul of feature distillation — pre-ReLU teacher features, margin, partial L2 (``ofd``).

"A Comprehensive Overhaul of Feature Distillation", Heo, Kim, Yun, Park, Kwak, Choi, ICCV 2019 (arXiv 1904.01866;
original code clovaai/overhaul-distillation). Official code this follows (the Zoo's modification):
AberHu/Knowledge-Distillation-Zoo @ 65470c846c1300d555815da26999cbe2b51fc815, ``kd_losses/ofd.py::OFD``,
``train_kd.py --kd_mode ofd``.

Per stage (teacher pre-ReLU map t [B, C_t, H, W]; student map s [B, C_s, H, W] after spatial alignment)::

    m_c = Σ_{b,h,w} t·[t < 0] / (Σ_{b,h,w} [t < 0] + 1e-6)       # [C_t] mean negative response (0 without any)
    t′ = max(t, m_c)                                              # teacher values below the margin raised to it
    s′ = BN(Conv1×1(s))                                           # connector C_s → C_t, no conv bias
    L_stage = mean over all elements of (s′ − t′)²·(1 − [s′ ≤ t′ ∧ t′ ≤ 0])   # partial L2
    L = mean over the stages

The connector's conv is Kaiming-normal (fan_out, relu), its BN starts at weight 1 / bias 0 and follows the student's
train/eval mode; both live in this loss (trained, checkpointed, not exported). The Zoo's λ is 0.5
(``--distill ofd:0.5``; a CIFAR value, re-tune).

Taps. **Teacher**: the pre-ReLU output of each chosen stage, i.e. the *input* of the last activation of the stage's
last block, read by a forward pre-hook (``'<module>:input'`` module taps). Found automatically on timm CNNs: timm
RegNet → ``s{i}.b{last}.act3`` (after the residual add), timm ResNet → ``layer{i}.{last}.act2`` (BasicBlock) /
``act3`` (Bottleneck); a stem tap whose feature module is itself the activation (ResNet ``act1``) uses that
module's input. Other architectures: pass ``teacher_modules`` (e.g. ``('s2.b4.act3:input', ...)``). Stages are chosen
like every three-tap Zoo method (positions 1/2/3 of the depth = s2/s3/s4, ``_adapt``; ``teacher_blocks`` overrides).
**Student**: a ViT's block grids (blocks 4/8/12 by default; a ViT residual stream has no ReLU, so there is no pre-ReLU
version); a CNN student's pre-ReLU stage outputs, found the same way as the teacher's (or ``student_modules``).
A ViT teacher (no ReLU) uses its block grids.

Margin modes: ``margin='batch'`` (default, the Zoo's empirical margin on the current batch), ``'ema'`` (a running
exponential average of it, momentum ``margin_momentum``, initialised by the first batch; kept in buffers, so it is
checkpointed). Either way the margin is detached.

Where vitkd differs from the official code:

* The original OFD (clovaai, mdistiller) derives an analytical margin from the teacher's pre-ReLU BatchNorm
  (E[x | x < 0] of N(β, γ²)); for RegNet/ResNet the pre-ReLU value is BN(conv3) + shortcut, so that margin is inexact
  and it is not offered: vitkd uses the Zoo's empirical margin. The original also sums over C, H, W
  per sample, weights stages by 1/2^{n−i−1}, and keeps the teacher in train mode; none of that is reproduced — the
  teacher is always in eval mode here (no train-mode-teacher parity option).
* Spatial alignment by pooling the larger map (the Zoo assumes equal shapes); fp32 with autocast off.
"""
from __future__ import annotations

from typing import Annotated, Optional, Sequence

import torch
import torch.nn as nn

from ..domains import Interval, ListOf, OneOf, OrNone, Text
from ..features import INPUT_SUFFIX, Features, TapSpec, _is_vit
from ._adapt import THREE_TAPS, Blocks, PairedTaps, align_spatial, as_taps, conv1x1_connector
from .base import Batch, DistillationLoss, LossSpecError, RunInfo, register_loss

__all__ = ['OFD', 'ofd_margin', 'ofd_partial_l2', 'pre_activation_tap', 'MARGINS']

MARGINS = ('batch', 'ema')
# module names, ``name:input`` for a module's input
ModuleTaps = Annotated[Optional[Sequence[str]], OrNone(ListOf(Text()))]
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU)


def ofd_margin(teacher_map: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """m [C]: the mean of the negative values of each channel over (B, H, W); 0 for a channel without any.

    Args:
        teacher_map: t [B, C, H, W].
    """
    negative = (teacher_map < 0).to(teacher_map.dtype)
    return (teacher_map * negative).sum(dim=(0, 2, 3)) / (negative.sum(dim=(0, 2, 3)) + eps)


def ofd_partial_l2(student_map: torch.Tensor, teacher_map: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """mean((s′ − t′)²·(1 − [s′ ≤ t′ ∧ t′ ≤ 0])) with t′ = max(t, m).

    Args:
        student_map: s′ [B, C, H, W] (connector output).
        teacher_map: t [B, C, H, W] (pre-ReLU).
        margin: m [C].
    """
    target = torch.maximum(teacher_map.detach(), margin.detach().view(1, -1, 1, 1))
    skip = (student_map <= target) & (target <= 0)
    return ((student_map - target) ** 2 * (~skip).to(student_map.dtype)).mean()


def pre_activation_tap(model: nn.Module, tap: int) -> Optional[str]:
    """Module tap (``'name:input'``) of the pre-activation output of feature ``tap`` of a timm CNN, else None.

    The feature module (``feature_info[tap]['module']``) is either an activation itself (its input is the pre-ReLU map)
    or a stage whose last block ends with an activation after the residual add (the block's last activation child).
    """
    info = getattr(model, 'feature_info', None)
    if info is None or _is_vit(model):
        return None
    name = info[tap]['module']
    module = dict(model.named_modules())[name]
    if isinstance(module, _ACTIVATIONS):
        return name + INPUT_SUFFIX
    blocks = list(module.named_children())
    if not blocks:
        return None
    block_name, block = blocks[-1]
    acts = [n for n, m in block.named_children() if isinstance(m, _ACTIVATIONS)]
    return f'{name}.{block_name}.{acts[-1]}{INPUT_SUFFIX}' if acts else None


def _resolve_modules(model: nn.Module, taps: Sequence[int], what: str, explicit: Optional[tuple[str, ...]],
                     required: bool) -> Optional[tuple[str, ...]]:
    if explicit is not None:
        if len(explicit) != len(taps):
            raise LossSpecError(f'ofd: {what}_modules {explicit} must name one module per tap ({len(taps)})')
        return explicit
    if _is_vit(model):
        return None  # block grids: a ViT has no pre-ReLU map
    names = tuple(pre_activation_tap(model, t) for t in taps)
    if any(n is None for n in names):
        if required:
            raise LossSpecError(f'ofd: cannot find the pre-ReLU modules of {type(model).__name__} taps {tuple(taps)}; '
                                f'pass ofd.{what}_modules=[...] (e.g. "s3.b11.act3:input")')
        return None
    return names


@register_loss('ofd')
class OFD(PairedTaps, DistillationLoss):
    """Partial L2 between connector(student) and margin-clipped pre-ReLU teacher maps, stage by stage."""
    paper = 'OFD, Heo et al., ICCV 2019, arXiv:1904.01866 (Zoo variant, empirical margin)'
    default_positions = THREE_TAPS

    def __init__(self, margin: Annotated[str, OneOf(*MARGINS)] = 'batch',
                 margin_momentum: Annotated[float, Interval(0, 1, lo_open=True)] = 0.1,
                 student_blocks: Blocks = None, teacher_blocks: Blocks = None,
                 student_modules: ModuleTaps = None, teacher_modules: ModuleTaps = None):
        """
        Args:
            margin: ``batch`` (empirical margin of the current batch) or ``ema`` (running average of it).
            margin_momentum: weight of the new batch in the ``ema`` margin.
            student_blocks, teacher_blocks: stage taps (indices); None = 1/3, 2/3, 3/3 of the depth.
            student_modules, teacher_modules: explicit module taps (e.g. ``'layer3.1.act2:input'``) overriding the
                automatic pre-ReLU choice, one per stage.
        """
        super().__init__()
        self.margin, self.margin_momentum = margin, margin_momentum
        self.student_blocks, self.teacher_blocks = as_taps(student_blocks), as_taps(teacher_blocks)
        self.student_modules = tuple(student_modules) if student_modules is not None else None
        self.teacher_modules = tuple(teacher_modules) if teacher_modules is not None else None
        self.connectors = nn.ModuleList()
        self._student_names: Optional[tuple[str, ...]] = None
        self._teacher_names: Optional[tuple[str, ...]] = None

    def configure_taps(self, student, teacher) -> None:
        super().configure_taps(student, teacher)
        self._student_names = _resolve_modules(student, self.student_indices, 'student', self.student_modules,
                                               required=False)
        self._teacher_names = (None if teacher is None else
                               _resolve_modules(teacher, self.teacher_indices, 'teacher', self.teacher_modules,
                                                required=not _is_vit(teacher)))
        if self._student_names is not None:
            self.student_taps = TapSpec(modules=self._student_names)
        if self._teacher_names is not None:
            self.teacher_taps = TapSpec(modules=self._teacher_names)

    def _maps(self, student: Features, teacher: Features) -> list[tuple[torch.Tensor, torch.Tensor]]:
        s = ([student.modules[n] for n in self._student_names] if self._student_names is not None else
             [student.block(i) for i in self.student_indices])
        t = ([teacher.modules[n] for n in self._teacher_names] if self._teacher_names is not None else
             [teacher.block(i) for i in self.teacher_indices])
        return list(zip(s, t))

    def setup(self, student: Features, teacher: Features, info: RunInfo) -> None:
        device = student.logits.device
        for i, (s, t) in enumerate(self._maps(student, teacher)):
            self.connectors.append(conv1x1_connector(s.shape[1], t.shape[1], bn=True).to(device))
            if self.margin == 'ema':
                self.register_buffer(f'margin_{i}', torch.zeros(t.shape[1], device=device))
                self.register_buffer(f'margin_seen_{i}', torch.zeros((), dtype=torch.bool, device=device))

    def _stage_margin(self, i: int, teacher_map: torch.Tensor) -> torch.Tensor:
        current = ofd_margin(teacher_map.detach())  # [C_t]
        if self.margin == 'batch':
            return current
        if self.training:
            running, seen = getattr(self, f'margin_{i}'), getattr(self, f'margin_seen_{i}')
            running.copy_(torch.where(seen, (1 - self.margin_momentum) * running + self.margin_momentum * current,
                                      current))
            seen.fill_(True)
        return getattr(self, f'margin_{i}')

    def forward(self, student: Features, teacher: Features, batch: Batch) -> dict[str, torch.Tensor]:
        losses = []
        for i, (connector, (s, t)) in enumerate(zip(self.connectors, self._maps(student, teacher))):
            s, t = align_spatial(s, t)
            losses.append(ofd_partial_l2(connector(s), t, self._stage_margin(i, t)))
        return {'partial_l2': torch.stack(losses).mean()}
