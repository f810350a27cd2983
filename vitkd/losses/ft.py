"""FT: factor transfer (``ft``), as in the Knowledge-Distillation-Zoo.

Paper: "Paraphrasing Complex Network: Network Compression via Factor Transfer", Kim, Park, Kwak, NeurIPS 2018
(arXiv 1802.04977).
Official code (the Zoo): AberHu/Knowledge-Distillation-Zoo @ 65470c846c1300d555815da26999cbe2b51fc815,
``kd_losses/ft.py`` (``FT``), trainer ``train_ft.py``, modules ``paraphraser`` / ``translator`` in ``network.py``.

Modules (factor channels C_f = int(k·C_t)); every conv is followed by BN (``use_bn``; without BN the convs have a
bias) and LeakyReLU(0.1):
* paraphraser (teacher side): encoder = 3×3 convs C_t→C_t→C_f→C_f; decoder = 3×3 ConvTranspose C_f→C_f→C_t→C_t
  (stride 1, padding 1); the factor φ_t is the encoder output;
* translator (student side): 3×3 convs C_s→C_s→C_f→C_f; φ_s is its output.
Init: Conv2d and ConvTranspose2d Kaiming-normal (fan_out, relu), bias 0; BN 1/0.

Formula: φ̂ = φ flattened per sample to [B, C_f·H·W] and L2-normalised (``F.normalize``, eps 1e-12);
  L = λ · mean-L1(φ̂_s, sg(φ̂_t)) over B·C_f·H·W (p = 1 as in the paper).
Defaults: k = 0.5, λ = 200 (``lambda_kd``; CIFAR-tuned starting point to re-tune), BN on (the Zoo uses BN on
CIFAR-10 only).

Procedure, in one vitkd run (the Zoo runs the paraphraser pre-training as a separate 30-epoch job):
1. epochs [0, ``paraphraser_epochs``) (default 30): **paraphraser pre-training** — the returned term is the
   reconstruction mean-MSE(decoder(encoder(F_t)), F_t) on the (detached) teacher map, the paraphraser in train mode;
   the task CE is off (:meth:`task_weight` = 0) and the translator unused, so the student gets no gradient and
   does not move (AdamW skips parameters without gradient): the student's training starts after the pre-training,
   as in the Zoo. With AdamW the term's scale (it is multiplied by the method weight) hardly matters.
2. from ``paraphraser_epochs`` on: the paraphraser is frozen (eval mode for good — :meth:`train` keeps it there — and
   ``requires_grad=False``, so its BN statistics stay fixed) and the student + translator train on
   CE + λ·FT; the translator follows the student's train/eval mode.

Taps (vitkd adaptation; :mod:`vitkd.losses._adapt`): one pair, by default the student block at
2/3 of its depth (G_8) ↔ the teacher's stage s3 (1232 channels, C_f = 616 at k = 0.5); other sizes are aligned by
adaptive average pooling of the larger map before the translator / paraphraser. At s4 (3024 channels) one 3×3 conv
C→C has ≈ 82 M parameters: stay at s3, lower k, or set ``outer_kernel_size=1`` (the C_t→C_t / C_s→C_s outer convs of
the encoder, decoder and translator become 1×1; vitkd option).

Where vitkd differs from the official code:
* ConvTranspose2d layers get the same Kaiming init as Conv2d (the Zoo leaves PyTorch's default);
  ``zoo_deconv_init=True`` reproduces the Zoo;
* the paraphraser pre-training shares the run's optimizer and lr schedule (the Zoo: separate SGD, lr 0.01, momentum
  0.9, wd 1e-4, no schedule, no nesterov) and occupies the first ``paraphraser_epochs`` epochs of the run;
* under DDP the translator gets no gradient in stage 1 and the paraphraser none in stage 2: prepare with
  ``find_unused_parameters=True``;
* taps, pooling and the ``outer_kernel_size`` option; λ lives in the loss (``lambda_kd``).
"""
from __future__ import annotations

from typing import Annotated, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..domains import Bool, NonNegative, OneOf, Positive
from ..features import Features
from ._adapt import MIDDLE_TAP, tap_indices, PairedTaps, align_spatial, as_taps, init_convs_
from .base import Batch, DistillationLoss, RunInfo, register_loss

__all__ = ['ft_loss', 'Paraphraser', 'Translator', 'FactorTransfer']

OneTap = tap_indices(max_len=1)  # FT compares one tap pair


def ft_loss(student_factor: torch.Tensor, teacher_factor: torch.Tensor) -> torch.Tensor:
    """mean-L1 between per-sample L2-normalised factors [B, C_f, H, W] (teacher detached)."""
    s = F.normalize(student_factor.flatten(1), dim=1)           # [B, C_f·H·W]
    t = F.normalize(teacher_factor.detach().flatten(1), dim=1)  # [B, C_f·H·W]
    return F.l1_loss(s, t)


def _conv_block(conv: nn.Module, channels: int, use_bn: bool) -> list[nn.Module]:
    return [conv, nn.BatchNorm2d(channels) if use_bn else nn.Identity(), nn.LeakyReLU(0.1)]


def _convs(widths: Sequence[int], kernels: Sequence[int], use_bn: bool, transposed: bool = False) -> nn.Sequential:
    """Stride-1 'same' convs widths[i] → widths[i+1] with kernel kernels[i], each + BN + LeakyReLU(0.1)."""
    conv_type = nn.ConvTranspose2d if transposed else nn.Conv2d
    layers: list[nn.Module] = []
    for c_in, c_out, k in zip(widths[:-1], widths[1:], kernels):
        layers += _conv_block(conv_type(c_in, c_out, k, 1, k // 2, bias=not use_bn), c_out, use_bn)
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """Teacher-side auto-encoder: [B, C_t, H, W] → (factor [B, C_f, H, W], reconstruction [B, C_t, H, W])."""

    def __init__(self, channels: int, factor_channels: int, use_bn: bool = True, outer_kernel_size: int = 3,
                 zoo_deconv_init: bool = False):
        super().__init__()
        c, f, k = channels, factor_channels, outer_kernel_size
        self.encoder = _convs((c, c, f, f), (k, 3, 3), use_bn)
        self.decoder = _convs((f, f, c, c), (3, 3, k), use_bn, transposed=True)
        init_convs_(self, transposed=not zoo_deconv_init)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        factor = self.encoder(x)
        return factor, self.decoder(factor)


class Translator(nn.Module):
    """Student-side encoder: [B, C_s, H, W] → factor [B, C_f, H, W]."""

    def __init__(self, channels: int, factor_channels: int, use_bn: bool = True, outer_kernel_size: int = 3):
        super().__init__()
        c, f = channels, factor_channels
        self.encoder = init_convs_(_convs((c, c, f, f), (outer_kernel_size, 3, 3), use_bn))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


@register_loss('ft')
class FactorTransfer(PairedTaps, DistillationLoss):
    """Factor transfer: paraphraser pre-training phase, then λ·mean-L1 of normalised factors."""
    paper = 'FT, Kim, Park & Kwak, NeurIPS 2018, arXiv:1802.04977 (Knowledge-Distillation-Zoo)'
    # translator and student idle during the paraphraser pre-training: DDP needs find_unused_parameters
    may_leave_parameters_unused = True
    default_positions = MIDDLE_TAP

    def __init__(self, lambda_kd: Annotated[float, NonNegative()] = 200.0, k: Annotated[float, Positive()] = 0.5,
                 paraphraser_epochs: Annotated[float, Positive()] = 30, use_bn: Annotated[bool, Bool()] = True,
                 outer_kernel_size: Annotated[int, OneOf(1, 3)] = 3, zoo_deconv_init: Annotated[bool, Bool()] = False,
                 student_blocks: OneTap = None, teacher_blocks: OneTap = None):
        """
        Args:
            lambda_kd: λ (Zoo value; CIFAR-tuned starting point).
            k: factor rate, C_f = int(k·C_t).
            paraphraser_epochs: epochs of paraphraser pre-training at the start of the run (> 0; fractional
                epochs allowed).
            use_bn: BN after every conv of both modules (Zoo: CIFAR-10 only).
            outer_kernel_size: kernel of the C→C outer convs (3 = Zoo; 1 keeps wide teacher stages affordable).
            zoo_deconv_init: leave ConvTranspose2d at PyTorch's default init (the Zoo's behaviour; parity only).
            student_blocks, teacher_blocks: one tap index each (None: block at 2/3 of the depth ↔ stage s3).
        """
        super().__init__()
        self.lambda_kd, self.k, self.paraphraser_epochs, self.use_bn = lambda_kd, k, paraphraser_epochs, use_bn
        self.outer_kernel_size, self.zoo_deconv_init = outer_kernel_size, zoo_deconv_init
        self.student_blocks, self.teacher_blocks = as_taps(student_blocks), as_taps(teacher_blocks)
        self.paraphraser: Optional[Paraphraser] = None
        self.translator: Optional[Translator] = None
        self.paraphraser_frozen = False

    def setup(self, student: Features, teacher: Features, info: RunInfo) -> None:
        (s, t), = self.map_pairs(student, teacher)
        factor_channels = int(self.k * t.shape[1])
        if factor_channels < 1:
            raise ValueError(f'k={self.k} gives no factor channel for a {t.shape[1]}-channel teacher map')
        self.paraphraser = Paraphraser(t.shape[1], factor_channels, self.use_bn, self.outer_kernel_size,
                                       self.zoo_deconv_init)
        self.translator = Translator(s.shape[1], factor_channels, self.use_bn, self.outer_kernel_size)

    def in_pretraining(self, epoch: float) -> bool:
        return epoch < self.paraphraser_epochs

    def task_weight(self, epoch: float) -> float:
        return 0.0 if self.in_pretraining(epoch) else 1.0

    def freeze_paraphraser(self) -> None:
        """Stage 2: the paraphraser stays in eval mode with no trainable parameter (idempotent)."""
        self.paraphraser_frozen = True
        self.paraphraser.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> 'FactorTransfer':
        super().train(mode)
        if self.paraphraser_frozen and self.paraphraser is not None:
            self.paraphraser.eval()
        return self

    def forward(self, student: Features, teacher: Features, batch: Batch) -> dict[str, torch.Tensor]:
        (s, t), = self.map_pairs(student, teacher)
        s, t = align_spatial(s, t.detach())
        if self.in_pretraining(batch.progress):
            _, reconstruction = self.paraphraser(t)
            return {'reconstruction': F.mse_loss(reconstruction, t)}
        if not self.paraphraser_frozen:
            self.freeze_paraphraser()
        with torch.no_grad():
            teacher_factor = self.paraphraser.encoder(t)  # [B, C_f, H, W]
        return {'ft': self.lambda_kd * ft_loss(self.translator(s), teacher_factor)}
