"""ReviewKD: knowledge review with attention-based fusion (ABF) and the hierarchical context loss (``reviewkd``).

"Distilling Knowledge via Knowledge Review", Pengguang Chen, Shu Liu, Hengshuang Zhao, Jiaya Jia, CVPR 2021
(arXiv 2104.09044). Official code: dvlab-research/ReviewKD @ cede6ea (``ImageNet/models/reviewkd.py``: ABF, chain,
``hcl``; ``CIFAR-100/model/reviewkd.py``: ABF with ``out_shape``); re-implementation megvii-research/mdistiller
@ a08d46f ``mdistiller/distillers/ReviewKD.py``.

Levels (shallow → deep) i = 1..L+1: L feature maps plus the pooled vector as a 1×1 map. Student level x_i
[B, C_s,i, h_i, w_i], teacher target F_t,i [B, C_t,i, H_i, W_i]. The review chain runs deepest first:

    (out_{L+1}, r_{L+1}) = ABF_{L+1}(x_{L+1})                        (no fusion)
    (out_i, r_i)         = ABF_i(x_i, r_{i+1}),  i = L … 1

    ABF_i(x, r):  y = BN(Conv1×1(C_s,i → mid, no bias)(x))                               y: [B, mid, h_i, w_i]
                  r = nearest-resize(r, (h_i, w_i));  a = σ(Conv1×1(2·mid → 2, bias)([y, r]))   a: [B, 2, h_i, w_i]
                  y = y·a₀ + r·a₁                                   (two independent gates, not a softmax)
                  y = nearest-resize(y, (H_i, W_i)) if the sizes differ       (official CIFAR ``out_shape``)
                  out = BN(Conv3×3(mid → C_t,i, pad 1, no bias)(y));  returns (out, y)

HCL (hierarchical context loss), per level with maps of height h:

    L_i = [mean-MSE(F_s, F_t) + Σ_{l ∈ (4, 2, 1), l < h} w_l·mean-MSE(AAP_l F_s, AAP_l F_t)] / (1 + Σ w_l),
    w = 1/2, 1/4, 1/8 in the order the pooled levels are used;      L_HCL = Σ_i L_i (summed over levels).

Taps. Teacher (CNN): the outputs of stages ``teacher_stages`` (timm feature indices: 0 = stem, 1..4 = stages)
**before the last ReLU** of each stage (``teacher_preact``: the input of the last block's final activation, e.g.
``s4.b1.act3:input`` on RegNetY, ``layer4.1.act2:input`` on ResNet-18 — the official ``is_last`` features), plus the
pooled pre-logits. Student: a CNN the same way (``student_preact``, official ImageNet; the official CIFAR code used
post-ReLU students), a ViT the un-normed outputs of blocks ``student_blocks`` as grids (default: evenly spaced, the
last block included) plus ``forward_head(pre_logits=True)`` ((h_cls + h_dist)/2 for a distilled DeiT).

ViT adaptation (vitkd adaptation): ABF fusion assumes deeper = coarser, a ViT is flat (14×14 at
every block). vitkd follows the official CIFAR ``out_shape`` path unchanged: every level works at the student grid
and its fused map is nearest-resized to the teacher's size just before conv2 (14 → 56, 28 up; 14 → 7 down); the
returned residual has the teacher's size and is re-interpolated by the next ABF. Cost: the conv2 at 56×56 dominates;
for DeiT-Ti/S/B with a RegNetY-160 teacher (mid = min(512, D_s)) the official builders give 13.95 / 28.25 / 38.64 M ABF
parameters and 2.53 / 5.12 / 6.98 GMACs per image (students: 1.3 / 4.6 / 17.6 GMACs) — :class:`ReviewChain`
reproduces these counts exactly; with the default mid 256 they are 18.59 / 18.84 / 19.33 M and 3.37 / 3.41 / 3.49
GMACs (:meth:`ReviewChain.macs`; both are logged at setup). ``teacher_grid='pooled'`` instead average-pools teacher
maps larger than the student grid down to it (56, 28 → 14 at 224 px): the same parameters, 0.94 / 1.93 / 2.73 GMACs
at mid = min(512, D_s), the teacher's fine detail lost (label such runs).

Where vitkd differs from the official code:

* ``mid_channels`` is an explicit option (mdistiller hard-codes min(512, C_last)); default 256 (official
  ImageNet MobileNetV1 value; official ImageNet ResNet-18: 512; min(512, D_s) is a reasonable choice for DeiTs).
* The teacher is always in eval mode (the official CIFAR code trains with the teacher in train mode).
* Student and teacher levels may have different resolutions at every level (the CIFAR ``out_shape`` path is used
  whenever sizes differ; the official ImageNet ABF has no resize).
* The HCL weight and warm-up are the generic CLI weight and ``warmup_epochs`` (official ImageNet: 1.0 / 8.0, no
  warm-up; official CIFAR: min(1, e/20)).
"""
from __future__ import annotations

import logging
from typing import Annotated, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..domains import Bool, Integer, ListOf, OneOf, OrNone
from ..features import Features, TapSpec, _is_vit
from .base import Batch, DistillationLoss, LossSpecError, RunInfo, register_loss

__all__ = ['hcl_level', 'hcl_loss', 'ABF', 'ReviewChain', 'ReviewKD', 'preact_module', 'even_blocks']

_logger = logging.getLogger(__name__)

HCL_POOL_SIZES = (4, 2, 1)
TEACHER_GRIDS = ('native', 'pooled')


def hcl_level(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """HCL of one level: full-resolution MSE plus pooled MSEs at 4×4, 2×2, 1×1 (those smaller than h), normalised.

    Args:
        student_map: F_s [B, C, h, w].
        teacher_map: F_t [B, C, h, w].
    """
    h = student_map.shape[2]
    loss = F.mse_loss(student_map, teacher_map)
    weight, total = 1.0, 1.0
    for size in HCL_POOL_SIZES:
        if size >= h:
            continue
        weight /= 2.0
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(student_map, size),
                                          F.adaptive_avg_pool2d(teacher_map, size))
        total += weight
    return loss / total


def hcl_loss(student_maps: Sequence[torch.Tensor], teacher_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """L_HCL = Σ_levels :func:`hcl_level` (summed, not averaged)."""
    if len(student_maps) != len(teacher_maps):
        raise ValueError(f'HCL: {len(student_maps)} student levels vs {len(teacher_maps)} teacher levels')
    return sum(hcl_level(s, t) for s, t in zip(student_maps, teacher_maps))


class ABF(nn.Module):
    """Attention-based fusion of one level (see the module docstring).

    Args:
        in_channels: C_s,i of the student level.
        mid_channels: mid.
        out_channels: C_t,i of the teacher level.
        fuse: False for the deepest level (no residual, no attention conv).
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)  # official init; att_conv and BNs keep the defaults
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                out_shape: Optional[tuple[int, int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(out [B, C_t, *out_shape], fused map [B, mid, *out_shape] = the next level's residual)."""
        y = self.conv1(x)  # [B, mid, h, w]
        if self.att_conv is not None:
            if residual is None:
                raise ValueError('a fusing ABF needs the deeper residual')
            residual = F.interpolate(residual, size=y.shape[-2:], mode='nearest')
            gates = self.att_conv(torch.cat([y, residual], dim=1))  # [B, 2, h, w]
            y = y * gates[:, 0:1] + residual * gates[:, 1:2]
        if out_shape is not None and tuple(y.shape[-2:]) != tuple(out_shape):
            y = F.interpolate(y, size=tuple(out_shape), mode='nearest')
        return self.conv2(y), y


class ReviewChain(nn.Module):
    """The ABF stack: levels given shallow-first (pooled level last), run deepest-first.

    Args:
        in_channels: student channels per level, shallow-first.
        out_channels: teacher channels per level, shallow-first.
        mid_channels: mid of every ABF.
        out_shapes: teacher (H, W) per level, shallow-first.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int], mid_channels: int,
                 out_shapes: Sequence[tuple[int, int]]):
        super().__init__()
        n = len(in_channels)
        if not n == len(out_channels) == len(out_shapes):
            raise ValueError('ReviewChain: in_channels, out_channels and out_shapes need one entry per level')
        self.abfs = nn.ModuleList(ABF(c_in, mid_channels, c_out, fuse=i < n - 1)
                                  for i, (c_in, c_out) in enumerate(zip(in_channels, out_channels)))
        self.out_shapes = [tuple(s) for s in out_shapes]

    def forward(self, levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Student levels shallow-first → ABF outputs shallow-first (each with its teacher level's shape)."""
        outs: list[Optional[torch.Tensor]] = [None] * len(levels)
        residual = None
        for i in reversed(range(len(levels))):
            outs[i], residual = self.abfs[i](levels[i], residual, self.out_shapes[i])
        return outs

    def macs(self, in_shapes: Sequence[tuple[int, int]]) -> int:
        """Convolution multiply-accumulates per image, given the student levels' (h, w) shallow-first."""
        total = 0
        for abf, (h, w), (ho, wo) in zip(self.abfs, in_shapes, self.out_shapes):
            c1, c2 = abf.conv1[0], abf.conv2[0]
            total += c1.in_channels * c1.out_channels * h * w
            if abf.att_conv is not None:
                total += abf.att_conv[0].in_channels * 2 * h * w
            total += c2.in_channels * c2.out_channels * 9 * ho * wo
        return total


def preact_module(model: nn.Module, index: int) -> str:
    """Name of the module whose *input* is feature ``index`` before its last activation (``'…act3'``).

    The stage named by timm's ``feature_info[index]`` ends with a block whose last child called ``act*`` is the
    ReLU after the residual add (RegNet ``act3``, ResNet ``act2``/``act3``); a stage that is itself an activation
    (ResNet's stem ``act1``) is returned as is.
    """
    info = getattr(model, 'feature_info', None)
    if not info or not -len(info) <= index < len(info):
        raise LossSpecError(f'{type(model).__name__} has no feature {index} (feature_info has {len(info or [])})')
    stage_name = info[index]['module']
    stage = model.get_submodule(stage_name)
    children = list(stage.named_children())
    if not children:
        if stage_name.rsplit('.', 1)[-1].startswith('act'):
            return stage_name
        raise LossSpecError(f'cannot find the pre-activation of {stage_name!r} in {type(model).__name__}')
    block_name, block = children[-1]
    acts = [n for n, _ in block.named_children() if n.startswith('act')]
    if not acts:
        raise LossSpecError(f'cannot find the last activation of {stage_name}.{block_name} in '
                            f'{type(model).__name__}; use post-activation features (*_preact=False)')
    return f'{stage_name}.{block_name}.{acts[-1]}'


def even_blocks(depth: int, levels: int) -> tuple[int, ...]:
    """``levels`` block indices spread evenly over ``depth`` blocks, ending with the last (12, 4 → 2, 5, 8, 11)."""
    return tuple(max(0, round((k + 1) * depth / levels) - 1) for k in range(levels))


def _cnn_keys(model: nn.Module, indices: Sequence[int], preact: bool) -> tuple[list, TapSpec]:
    if preact:
        names = [preact_module(model, i) + ':input' for i in indices]
        return [('module', n) for n in names], TapSpec(pooled=True, modules=tuple(names))
    return [('block', i) for i in indices], TapSpec(pooled=True, blocks=tuple(indices))


def _read(feats: Features, key: tuple) -> torch.Tensor:
    kind, name = key
    return feats.block(name) if kind == 'block' else feats.modules[name]


@register_loss('reviewkd')
class ReviewKD(DistillationLoss):
    """Review chain of ABFs from student levels to teacher stages, trained with the hierarchical context loss."""
    paper = 'ReviewKD: Distilling Knowledge via Knowledge Review, Chen, Liu, Zhao, Jia, CVPR 2021, arXiv:2104.09044'

    def __init__(self, teacher_stages: Annotated[Sequence[int], ListOf(Integer())] = (1, 2, 3, 4),
                 student_blocks: Annotated[Optional[Sequence[int]], OrNone(ListOf(Integer()))] = None,
                 mid_channels: Annotated[int, Integer(lo=1)] = 256, teacher_preact: Annotated[bool, Bool()] = True,
                 student_preact: Annotated[bool, Bool()] = True,
                 teacher_grid: Annotated[str, OneOf(*TEACHER_GRIDS)] = 'native'):
        """
        Args:
            teacher_stages: teacher feature indices (timm ``feature_info``: 0 = stem, 1..4 = stages), shallow-first.
            student_blocks: student levels, one per teacher stage: ViT block indices (default: evenly spaced, ending
                with the last block), CNN feature indices (default: ``teacher_stages``).
            mid_channels: ABF mid channel (official ImageNet: 512 for ResNet-18, 256 for MobileNetV1).
            teacher_preact: tap teacher stages before their last ReLU (official); False = stage outputs.
            student_preact: the same for CNN students (official ImageNet; CIFAR used post-ReLU); no effect on ViTs.
            teacher_grid: ``native`` (ABF outputs at the teacher's resolutions) or ``pooled`` (teacher maps larger
                than the student's grid are average-pooled down to it).
        """
        super().__init__()
        self.teacher_stages = tuple(int(i) for i in teacher_stages)
        self.student_blocks = None if student_blocks is None else tuple(int(i) for i in student_blocks)
        if self.student_blocks is not None and len(self.student_blocks) != len(self.teacher_stages):
            raise ValueError(f'student_blocks {self.student_blocks} and teacher_stages {self.teacher_stages} need the '
                             'same length (one student level per teacher stage)')
        self.mid_channels, self.teacher_grid = mid_channels, teacher_grid
        self.teacher_preact, self.student_preact = teacher_preact, student_preact
        self.chain: Optional[ReviewChain] = None
        self._student_keys: list = []
        self._teacher_keys: list = []
        self._teacher_pool: list[Optional[tuple[int, int]]] = []

    def configure_taps(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        if teacher is None or _is_vit(teacher):
            raise LossSpecError('loss \'reviewkd\' needs a CNN teacher (its stage maps are the review targets)')
        self._teacher_keys, self.teacher_taps = _cnn_keys(teacher, self.teacher_stages, self.teacher_preact)
        if _is_vit(student):
            blocks = self.student_blocks or even_blocks(len(student.blocks), len(self.teacher_stages))
            self._student_keys = [('block', i) for i in blocks]
            self.student_taps = TapSpec(pooled=True, blocks=tuple(blocks))
        else:
            stages = self.student_blocks or self.teacher_stages
            self._student_keys, self.student_taps = _cnn_keys(student, stages, self.student_preact)

    def _levels(self, student: Features, teacher: Features) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Student levels and teacher targets, shallow-first, the pooled vectors last as 1×1 maps."""
        xs = [_read(student, k) for k in self._student_keys] + [student.pooled[:, :, None, None]]
        ts = [_read(teacher, k) for k in self._teacher_keys]
        if self._teacher_pool:
            ts = [t if size is None else F.adaptive_avg_pool2d(t, size) for t, size in zip(ts, self._teacher_pool)]
        return xs, ts + [teacher.pooled[:, :, None, None]]

    def setup(self, student: Features, teacher: Features, info: RunInfo) -> None:
        xs, ts = self._levels(student, teacher)
        if self.teacher_grid == 'pooled':
            self._teacher_pool = [tuple(x.shape[-2:]) if t.shape[-2] * t.shape[-1] > x.shape[-2] * x.shape[-1]
                                  else None for x, t in zip(xs[:-1], ts[:-1])]
            xs, ts = self._levels(student, teacher)
        self.chain = ReviewChain([x.shape[1] for x in xs], [t.shape[1] for t in ts], self.mid_channels,
                                 [tuple(t.shape[-2:]) for t in ts]).to(xs[0].device)
        params = sum(p.numel() for p in self.chain.parameters())
        macs = self.chain.macs([tuple(x.shape[-2:]) for x in xs])
        _logger.info('ReviewKD: %d levels, student %s → teacher %s, mid %d: %.2f M ABF parameters, %.2f GMACs per '
                     'image', len(xs), [tuple(x.shape[1:]) for x in xs], [tuple(t.shape[1:]) for t in ts],
                     self.mid_channels, params / 1e6, macs / 1e9)

    def forward(self, student: Features, teacher: Features, batch: Batch) -> dict[str, torch.Tensor]:
        xs, ts = self._levels(student, teacher)
        return {'hcl': hcl_loss(self.chain(xs), [t.detach() for t in ts])}
