"""NORM: N-to-one representation matching with a linear, foldable feature transform (``norm``).

"NORM: Knowledge Distillation via N-to-One Representation Matching", Xiaolong Liu, Lujun Li, Chao Li, Anbang Yao,
ICLR 2023 (OpenReview CRNwGauQpb6, arXiv 2305.13803). Official code: OSVAI/NORM @ c6dfc39 (code from 8fea781):
``helper/loops.py::train_distill`` (loss, logit standardisation, β1 schedule), ``models/imagenet/resnet_student.py``
(``layer41``/``layer42``: the feature transform), ``models/imagenet/resnet.py`` (teacher taps).

Feature transform (FT), inserted into the student by :meth:`NORM.adapt_models`, on the student feature h with C_s
channels (CNN: the last stage map [B, C_s, H, W], per pixel; ViT: every token after the final LayerNorm
[B, T, C_s] — vitkd adaptation):

    u  = BN_a(W₁ h)            W₁: C_s → N·C_t, no bias      u: [B, N·C_t, H, W] / [B, T, N·C_t]
    h′ = h + BN_b(W₂ u)        W₂: N·C_t → C_s, no bias      (no non-linearity: a linear residual)

and the heads read h′. In eval mode h′ = M h + a with M = I + S_b W₂ S_a W₁ and a = S_b W₂ t_a + t_b (S, t: the
BNs' per-channel scale and shift), so the FT folds into the classifier (global average pooling and token
selection are linear): :func:`fold_student` returns a plain timm student with identical logits.
N = 1 bypasses the FT (the student feature itself is matched; C_s must equal C_t).

Matching (N-to-one), with f_t the teacher's post-ReLU ``forward_features`` map [B, C_t, H_t, W_t] (detached):

    L_NORM = N · mean-MSE(u, tile(f_t, N)) = Σ_{n<N} mean_{B,C_t,H,W} (u[:, n·C_t:(n+1)·C_t] − f_t)²

(contiguous channel groups: target channel j is teacher channel j mod C_t). The larger of the two maps is
max-pooled to the smaller one's size (kernel = stride = the ratio when it divides, as official; adaptive otherwise).
The ViT's matched u is the patch-token part reshaped to its grid. The returned term is β1(e)·L_NORM, with the
hard-coded piecewise schedule β1 of the official code rescaled to the run length (``schedule``); the CLI weight is
the paper's α (official ``-b``).

Optional logit standardisation (in the official code, undocumented in the paper): every classifier of the student and of
the teacher returns c·LN_K(z) (per-row standardisation over the K classes, no affine, eps 1e-7, biased variance), so the
task CE, any KL term (NORM+KD: ``distill: [norm, kd]``) and the evaluation all see standardised logits; the averaged
DeiT logits become (c·LN(z_cls) + c·LN(z_dist))/2 ("NORM-style (logit LN)"). Off by default.

ViT students (``vit_student_weight`` = 0.01): the paper's CNN-tuned weight overwhelms a ViT student's task loss. On the
table's ViT student (``scripts/reproduce.py``, 150 steps, avg-head top-1 gain over the no-teacher student) weight 1
gave −12.5 points (3 seeds), 0.1 gave −1.9 and 0.01 +0.6 (seed 0), so a ViT student gets weight 0.01 unless the
command gives one (``norm:1`` = the paper's).

Where vitkd differs from the official code:

* ViT students (not in the paper): FT per token after the final norm, BN statistics over batch × tokens, the
  patch-token grid of u is matched. The official code is CNN-only.
* The FT is folded into the classifier at export (:meth:`NORM.export_student`); the released code keeps the modules.
* The logit standardisation is an explicit option (``logit_norm``), off by default, with its scale ``logit_scale``
  separate from any CRD weight (the official NORM+CRD uses one variable for both, and crashes at the
  first batch). NORM+KD and NORM+CRD are compositions (``distill: [norm, kd]`` / ``[norm, crd]``).
* Exported students cannot carry the logit standardisation (timm heads are plain linear layers): export drops it
  with a warning (argmax of each head is unchanged; the averaged DeiT head can differ).
* The optional second FT after stage 3 (``--use_layer3``, C hard-coded to 256) is not implemented.
* ``schedule`` rescales the β1 boundaries to the run's epochs by integer arithmetic (b·E // 100 for ImageNet,
  b·E // 240 for CIFAR), which reproduces the official table for the official lengths (100/101 and 240/241 passes).
"""
from __future__ import annotations

import copy
import logging
from typing import Annotated, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..domains import Bool, Integer, OneOf, Positive
from ..features import Features, TapSpec, _is_vit
from .base import Batch, DistillationLoss, LossSpecError, RunInfo, register_loss

__all__ = ['norm_loss', 'align_maps', 'standardize_logits', 'beta_at', 'ResidualFT', 'StandardizedLogits',
           'TokenBatchNorm', 'fold_student', 'strip_logit_norm', 'NORM', 'SCHEDULES']

_logger = logging.getLogger(__name__)

#: β1 schedules: (nominal length L, ((boundary b, value while e < b·E // L), …), value after the last boundary)
SCHEDULES = {
    'imagenet': (100, ((5, 0.1), (15, 0.5), (60, 0.9), (80, 0.5)), 0.1),
    'cifar': (240, ((10, 0.1), (20, 0.5), (180, 1.0), (210, 0.5)), 0.1),
    'none': (1, (), 1.0),
}
LOGIT_EPS = 1e-7  # official helper/loops.py


def norm_loss(student_map: torch.Tensor, teacher_map: torch.Tensor, num_copies: int) -> torch.Tensor:
    """N-to-one matching: N · mean-MSE(f_s, tile(f_t, N)).

    Args:
        student_map: f_s [B, N·C_t, H, W].
        teacher_map: f_t [B, C_t, H, W] (no gradient expected).
        num_copies: N.

    Returns:
        Scalar = Σ_n mean-MSE(f_s[:, n·C_t:(n+1)·C_t], f_t).
    """
    if student_map.shape[1] != num_copies * teacher_map.shape[1] or student_map.shape[2:] != teacher_map.shape[2:]:
        raise ValueError(f'NORM: student map {tuple(student_map.shape)} does not match {num_copies} × teacher map '
                         f'{tuple(teacher_map.shape)}')
    target = teacher_map.repeat(1, num_copies, 1, 1)  # [B, N·C_t, H, W]: channel j = teacher channel j mod C_t
    return num_copies * F.mse_loss(student_map, target)


def align_maps(student_map: torch.Tensor, teacher_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max-pool the spatially larger map to the other's size (official: the student on ImageNet, the teacher on CIFAR).

    With an integer ratio this is ``max_pool2d(kernel = stride = ratio)``; other ratios use adaptive max pooling.
    """
    hs, ws = student_map.shape[-2:]
    ht, wt = teacher_map.shape[-2:]
    if (hs, ws) != (ht, wt):
        if hs * ws >= ht * wt:
            student_map = F.adaptive_max_pool2d(student_map, (ht, wt))
        else:
            teacher_map = F.adaptive_max_pool2d(teacher_map, (hs, ws))
    return student_map, teacher_map


def standardize_logits(logits: torch.Tensor, scale: float, eps: float = LOGIT_EPS) -> torch.Tensor:
    """c·(z − mean_K z)/√(var_K z + eps) per row, biased variance, no affine (the official NORM code's logit LN)."""
    mean = logits.mean(dim=-1, keepdim=True)
    var = logits.var(dim=-1, keepdim=True, unbiased=False)
    return scale * (logits - mean) / torch.sqrt(var + eps)


def beta_at(epoch: int, total_epochs: int, schedule: str = 'imagenet') -> float:
    """β1(e) of the official hard-coded schedule, boundaries rescaled to ``total_epochs`` (e counted from 0)."""
    length, steps, last = SCHEDULES[schedule]
    for boundary, value in steps:
        if epoch < boundary * total_epochs // length:
            return value
    return last


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the channels of tokens [B, T, C] (statistics over batch × tokens); [B, C] also accepted.

    The tokens are normalised as the rows of a [B·T, C] view (2× faster on CPU than BatchNorm1d on [B, C, T])."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def _bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as y = s·x + t (float64)."""
    s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return s, bn.bias.double() - bn.running_mean.double() * s


class ResidualFT(nn.Module):
    """``inner`` followed by NORM's linear residual feature transform: h′ = h + BN_b(W₂ BN_a(W₁ h)).

    ``expand`` (W₁ + BN_a) outputs the matched representation u; tap it as ``'<name>.expand'``.

    Args:
        inner: the wrapped student module (its output is h).
        channels: C_s.
        expanded: N·C_t.
        tokens: True for token inputs [B, T, C] (Linear + token BN), False for maps [B, C, H, W] (1×1 conv + BN2d).
    """

    def __init__(self, inner: nn.Module, channels: int, expanded: int, tokens: bool):
        super().__init__()
        self.inner, self.tokens = inner, tokens
        if tokens:
            self.expand = nn.Sequential(nn.Linear(channels, expanded, bias=False), TokenBatchNorm(expanded))
            self.reduce = nn.Sequential(nn.Linear(expanded, channels, bias=False), TokenBatchNorm(channels))
        else:
            self.expand = nn.Sequential(nn.Conv2d(channels, expanded, 1, bias=False), nn.BatchNorm2d(expanded))
            self.reduce = nn.Sequential(nn.Conv2d(expanded, channels, 1, bias=False), nn.BatchNorm2d(channels))
        for seq in (self.expand, self.reduce):  # official init: Kaiming-normal (fan_out, relu); BN 1 / 0
            nn.init.kaiming_normal_(seq[0].weight, mode='fan_out', nonlinearity='relu')

    def forward(self, *args, **kwargs) -> torch.Tensor:
        h = self.inner(*args, **kwargs)
        return h + self.reduce(self.expand(h))

    @torch.no_grad()
    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(M [C_s, C_s], a [C_s]) in float64 with h + FT(h) = M h + a per token / pixel (eval-mode BN)."""
        w1 = self.expand[0].weight.double().reshape(self.expand[0].weight.shape[0], -1)  # [N·C_t, C_s]
        w2 = self.reduce[0].weight.double().reshape(self.reduce[0].weight.shape[0], -1)  # [C_s, N·C_t]
        s_a, t_a = _bn_affine(self.expand[1])
        s_b, t_b = _bn_affine(self.reduce[1])
        eye = torch.eye(w2.shape[0], dtype=torch.float64, device=w2.device)
        return eye + (s_b[:, None] * w2) @ (s_a[:, None] * w1), s_b * (w2 @ t_a) + t_b

    def fold(self) -> nn.Module:
        """One affine layer equal to h ↦ h + FT(h) in eval mode: ``nn.Linear`` (tokens) or a 1×1 ``nn.Conv2d``."""
        m, a = self.affine()
        w = self.expand[0].weight
        c = m.shape[0]
        layer = nn.Linear(c, c) if self.tokens else nn.Conv2d(c, c, 1)
        layer = layer.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer.weight.copy_(m.reshape(layer.weight.shape))
            layer.bias.copy_(a)
        return layer


class StandardizedLogits(nn.Module):
    """A classifier whose logits are standardised: c·LN_K(inner(x)) (official NORM's logit layer norm)."""

    def __init__(self, inner: nn.Module, scale: float, eps: float = LOGIT_EPS):
        super().__init__()
        self.inner, self.scale, self.eps = inner, scale, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return standardize_logits(self.inner(x), self.scale, self.eps)

    def extra_repr(self) -> str:
        return f'scale={self.scale}, eps={self.eps}'


def _classifier_names(model: nn.Module) -> list[str]:
    names = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier')
    if not names:
        raise LossSpecError(f'{type(model).__name__} does not name its classifier (pretrained_cfg["classifier"])')
    names = [names] if isinstance(names, str) else list(names)
    modules = dict(model.named_modules())
    return [n for n in names if isinstance(modules.get(n), nn.Module)]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition('.')
    setattr(model.get_submodule(parent) if parent else model, child, module)


def fold_student(student: nn.Module) -> nn.Module:
    """A copy of ``student`` without NORM's insertions: the FT folded into every classifier, logit LN removed.

    Requires the path from the FT to the classifier to be linear (timm ViTs with token/avg pooling and no
    ``fc_norm``; CNNs whose head is global average pooling + linear), which :meth:`NORM.export_student` checks
    numerically.
    """
    model = copy.deepcopy(student)
    fts = [(n, m) for n, m in model.named_modules() if isinstance(m, ResidualFT)]
    if len(fts) > 1:
        raise LossSpecError(f'fold_student: {len(fts)} NORM feature transforms in one student')
    affine = None
    for name, ft in fts:
        affine = ft.affine()
        _set(model, name, ft.inner)
    for name in _classifier_names(model):
        head = model.get_submodule(name)
        if isinstance(head, StandardizedLogits):
            _logger.warning('NORM: the exported student drops the logit standardisation of %r (timm heads are '
                            'linear); each head\'s argmax is unchanged', name)
            head = head.inner
            _set(model, name, head)
        if affine is None:
            continue
        if not isinstance(head, nn.Linear):
            raise LossSpecError(f'NORM: cannot fold the feature transform into classifier {name!r} '
                                f'({type(head).__name__}, not nn.Linear)')
        m, a = affine
        with torch.no_grad():
            w = head.weight.double()  # [K, C_s]
            bias = head.bias.double() if head.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64,
                                                                                device=w.device)
            new = nn.Linear(head.in_features, head.out_features, bias=True).to(head.weight.device,
                                                                                head.weight.dtype)
            new.weight.copy_(w @ m)
            new.bias.copy_(bias + w @ a)
        _set(model, name, new)
    return model


@register_loss('norm')
class NORM(DistillationLoss):
    """N-to-one representation matching through a linear, foldable feature transform."""
    paper = ('NORM: Knowledge Distillation via N-to-One Representation Matching, Liu, Li, Li, Yao, ICLR 2023, '
             'arXiv:2305.13803')
    vit_student_weight = 0.01

    def __init__(self, num_copies: Annotated[int, Integer(lo=1)] = 8,
                 schedule: Annotated[str, OneOf(*SCHEDULES)] = 'imagenet', logit_norm: Annotated[bool, Bool()] = False,
                 logit_scale: Annotated[float, Positive()] = 2.5):
        """
        Args:
            num_copies: N (official ``-s``; ImageNet and CIFAR scripts: 8). 1 bypasses the feature transform.
            schedule: β1 schedule ``imagenet`` (0.1/0.5/0.9/0.5/0.1 at 5/15/60/80 % of the run), ``cifar``
                (0.1/0.5/1.0/0.5/0.1 at 10/20/180/210 of 240) or ``none`` (β1 = 1).
            logit_norm: standardise every classifier's logits of the student and the teacher (c·LN_K, eps 1e-7).
            logit_scale: c (official ``--ceta`` 2.5); used only with ``logit_norm``.
        """
        super().__init__()
        self.num_copies, self.schedule = num_copies, schedule
        self.logit_norm, self.logit_scale = logit_norm, logit_scale
        self.ft_name: Optional[str] = None   # where the FT sits in the student ('norm', 'layer4', 's4')
        self.vit = False
        self.num_prefix_tokens = 0
        self.total_epochs = 1
        self.input_size: tuple[int, int, int] = (3, 224, 224)
        self.teacher_taps = TapSpec(tokens=True)  # final_map: the teacher's post-ReLU forward_features

    def adapt_models(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        """Insert the FT after the student's final norm (ViT) / last stage (CNN); optionally standardise logits."""
        if teacher is None:
            raise LossSpecError('loss \'norm\' needs a teacher (--teacher)')
        if any(isinstance(m, (ResidualFT, StandardizedLogits)) for m in student.modules()):
            raise LossSpecError('loss \'norm\': this student already carries NORM modules (build a fresh student)')
        self.vit = _is_vit(student)
        teacher_channels = int(teacher.num_features)
        if self.vit:
            name, channels = 'norm', int(student.embed_dim)
            self.num_prefix_tokens = int(student.num_prefix_tokens)
        else:
            info = getattr(student, 'feature_info', None)
            if not info:
                raise LossSpecError(f'loss \'norm\': CNN student {type(student).__name__} has no feature_info')
            name, channels = info[-1]['module'], int(info[-1]['num_chs'])
        if self.num_copies > 1:
            ft = ResidualFT(student.get_submodule(name), channels, self.num_copies * teacher_channels, tokens=self.vit)
            _set(student, name, ft.to(next(student.parameters()).device))
            self.ft_name = name
            self.student_taps = TapSpec(modules=(f'{name}.expand',))
        else:
            if channels != teacher_channels:
                raise LossSpecError(f'loss \'norm\' with num_copies=1 matches the student feature directly: it needs '
                                    f'C_s = C_t, got {channels} and {teacher_channels}')
            self.student_taps = TapSpec(tokens=True)
        if self.logit_norm:
            for model in (student, teacher):
                for head in _classifier_names(model):
                    _set(model, head, StandardizedLogits(model.get_submodule(head), self.logit_scale))
            _logger.info('NORM: logits of the student and the teacher are standardised (c = %g, eps %g) for every '
                         'loss and for evaluation ("NORM-style (logit LN)")', self.logit_scale, LOGIT_EPS)

    def setup(self, student: Features, teacher: Features, info: RunInfo) -> None:
        self.total_epochs, self.input_size = info.epochs, tuple(info.input_size)
        f_s = self._student_map(student)
        if f_s.shape[1] != self.num_copies * teacher.final_map.shape[1]:
            raise LossSpecError(f'loss \'norm\': student map has {f_s.shape[1]} channels, expected '
                                f'{self.num_copies} × {teacher.final_map.shape[1]}')

    def _student_map(self, student: Features) -> torch.Tensor:
        """The matched student representation as a map [B, N·C_t, H, W]."""
        if self.ft_name is None:
            return student.final_map
        u = student.modules[f'{self.ft_name}.expand']
        if not self.vit:
            return u  # [B, N·C_t, H, W]
        patches = u[:, self.num_prefix_tokens:]  # [B, h·w, N·C_t]
        b, n, c = patches.shape
        side = int(round(n ** 0.5))
        if side * side != n:
            raise LossSpecError(f'loss \'norm\': {n} patch tokens do not form a square grid')
        return patches.transpose(1, 2).reshape(b, c, side, side)

    def beta(self, epoch: int) -> float:
        return beta_at(epoch, self.total_epochs, self.schedule)

    def forward(self, student: Features, teacher: Features, batch: Batch) -> dict[str, torch.Tensor]:
        f_s, f_t = align_maps(self._student_map(student), teacher.final_map.detach())
        return {'norm': self.beta(batch.epoch) * norm_loss(f_s, f_t, self.num_copies)}

    @torch.no_grad()
    def export_student(self, student: nn.Module) -> nn.Module:
        """:func:`fold_student`, verified: the folded student's logits equal the unfolded ones in eval mode."""
        if self.ft_name is None and not self.logit_norm:
            return student
        folded = fold_student(student).eval()
        if self.ft_name is not None:
            reference = strip_logit_norm(student).eval()  # the FT kept, only the (unexportable) logit LN removed
            x = torch.randn(2, *self.input_size, device=next(student.parameters()).device)
            ref, out = reference(x).float(), folded(x).float()
            if not torch.allclose(out, ref, rtol=1e-3, atol=1e-4 * max(1.0, ref.abs().max().item())):
                raise LossSpecError(f'NORM: folding the feature transform into the classifier of '
                                    f'{type(student).__name__} changes its logits (the path from {self.ft_name!r} to '
                                    'the classifier is not linear); export the unfolded student instead')
        return folded.train(student.training)


def strip_logit_norm(student: nn.Module) -> nn.Module:
    """A copy of ``student`` with any logit standardisation removed (the FT kept)."""
    model = copy.deepcopy(student)
    for name, m in list(model.named_modules()):
        if isinstance(m, StandardizedLogits):
            _set(model, name, m.inner)
    return model
