"""DIST: inter-class and intra-class relation distillation (``dist``).

"Knowledge Distillation from A Stronger Teacher", Huang, You, Wang, Qian, Xu, NeurIPS 2022 (arXiv 2205.10536).
Official code: hunto/DIST_KD @ 2418f18b1fedd7c2646a7b1b9a27d5c674c2170b, classification submodule
hunto/image_classification_sota @ d9662f7df68fe46b973c4580b7c9b896cedcd301, ``lib/models/losses/dist_kd.py``
(``pearson_correlation``, ``inter_class_relation``, ``intra_class_relation``, ``DIST``).

Math (z_s, z_t [B, K] logits; τ temperature):

* Y_s = softmax(z_s/τ), Y_t = softmax(z_t/τ)                                        # [B, K]
* ρ(a, b) = ⟨a − mean a, b − mean b⟩ / (‖a − mean a‖·‖b − mean b‖ + 1e-8)          (eps once, on the norm product)
* L_inter = 1 − (1/B) Σ_b ρ(Y_s[b, :], Y_t[b, :])      (per sample, across classes)
* L_intra = 1 − (1/K) Σ_k ρ(Y_s[:, k], Y_t[:, k])      (per class, across the batch)
* L_DIST = τ²·(β·L_inter + γ·L_intra)

Defaults: β = γ = 2, τ = 1 — the paper's ImageNet values, equal to the official module (β = γ = 1) times its
``kd_loss_weight`` 2. The CIFAR recipe (DIST++ too) uses β = γ = 1, τ = 4 and an outer weight (see the presets).

Warm-up: ``warmup`` = E_w gives the factor min(1, e/E_w) with e the integer epoch from 0, constant within an epoch
(DIST++ on CIFAR warms DIST up over 20 epochs); the distiller's generic ``warmup_epochs`` is a per-step ramp instead.

Which student head: the distillation head when the student has one (``head='auto'``, as ``kd``), the task CE then
goes to the class head (a vitkd adaptation); ``cls``/``avg`` choose the class head / the mean.

Where vitkd differs from the official code:

* **Scope of the intra-class term.** The official code computes L_intra over the per-GPU batch, so the
  loss changes with the number of GPUs at a fixed global batch. vitkd's default ``intra_scope='global'`` gathers
  Y_s (autograd-aware :func:`vitkd.distributed.all_gather_with_grad`: its backward sums every rank's gradient of
  its copy — like ``torch.distributed.nn.functional.all_gather`` — which DDP's gradient averaging turns back into
  the gradient of the one global loss) and Y_t over the processes and computes L_intra over all B_g samples;
  ``'local'`` reproduces the official per-rank behaviour. Both are identical on one process.
* Logits come from the model outputs, not from forward hooks (the official hook mangles a batch of 1).
* Computed in at least fp32 (the official loss runs under the trainer's autocast); the 1e-8 eps is meaningless in
  bf16 for K = 1000, where probabilities are ~1e-3.
"""
from __future__ import annotations

from functools import partial

from typing import Annotated, Callable, Optional

import torch

from ..distributed import all_gather_with_grad
from ..domains import Integer, NonNegative, OneOf, Positive
from ..features import Features, TapSpec
from ._dense import DenseDistillationLoss, DenseFeatures, align_logits, register_dense_loss
from .base import Batch, DistillationLoss, Head, pick_head, reads_dist_head, register_loss
from .functional import at_least_fp32

__all__ = ['pearson_correlation', 'inter_class_relation', 'intra_class_relation', 'dist_loss', 'DIST', 'INTRA_SCOPES']

INTRA_SCOPES = ('global', 'local')
PEARSON_EPS = 1e-8


def pearson_correlation(a: torch.Tensor, b: torch.Tensor, eps: float = PEARSON_EPS) -> torch.Tensor:
    """Row-wise Pearson correlation with the eps added once to the product of the centred norms.

    Args:
        a: [R, n].
        b: [R, n].
        eps: added to ‖a′‖·‖b′‖ (a zero-variance row gives ρ = 0 and a finite gradient).

    Returns:
        ρ [R].
    """
    a_c = a - a.mean(dim=1, keepdim=True)  # [R, n]
    b_c = b - b.mean(dim=1, keepdim=True)  # [R, n]
    return (a_c * b_c).sum(dim=1) / (a_c.norm(dim=1) * b_c.norm(dim=1) + eps)


def inter_class_relation(y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
    """1 − mean over samples of ρ(Y_s[b, :], Y_t[b, :]) for probabilities [B, K]."""
    return 1 - pearson_correlation(y_s, y_t).mean()


def intra_class_relation(y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
    """1 − mean over classes of ρ(Y_s[:, k], Y_t[:, k]) for probabilities [B, K] (correlation across the batch)."""
    return 1 - pearson_correlation(y_s.t(), y_t.t()).mean()


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 2.0, gamma: float = 2.0,
              temperature: float = 1.0, gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The two DIST terms, each already multiplied by τ² and its weight.

    Args:
        student_logits: z_s [B, K].
        teacher_logits: z_t [B, K].
        beta: β, weight of the inter-class term.
        gamma: γ, weight of the intra-class term.
        temperature: τ (softmax temperature; the terms are multiplied by τ² after the reduction).
        gather: maps local probabilities [B, K] to the batch the intra-class term is computed over (e.g. the
            all-gathered [B·W, K]); None = the local batch.

    Returns:
        (τ²·β·L_inter, τ²·γ·L_intra), scalars.
    """
    y_s = torch.softmax(at_least_fp32(student_logits) / temperature, dim=1)  # [B, K]
    y_t = torch.softmax(at_least_fp32(teacher_logits) / temperature, dim=1)  # [B, K]
    scale = temperature ** 2
    inter = scale * beta * inter_class_relation(y_s, y_t)
    if gather is not None:
        y_s, y_t = gather(y_s), gather(y_t)  # [B_g, K]
    intra = scale * gamma * intra_class_relation(y_s, y_t)
    return inter, intra


@register_loss('dist')
class DIST(DistillationLoss):
    """DIST: τ²·(β·(1 − inter-class Pearson) + γ·(1 − intra-class Pearson)) on softened probabilities."""
    paper = 'DIST, Huang et al. NeurIPS 2022, arXiv:2205.10536'

    def __init__(self, beta: Annotated[float, NonNegative()] = 2.0, gamma: Annotated[float, NonNegative()] = 2.0,
                 temperature: Annotated[float, Positive()] = 1.0,
                 intra_scope: Annotated[str, OneOf(*INTRA_SCOPES)] = 'global', head: Head = 'auto',
                 warmup: Annotated[int, Integer(lo=0)] = 0):
        """
        Args:
            beta: β, weight of the inter-class relation term.
            gamma: γ, weight of the intra-class relation term.
            temperature: τ.
            intra_scope: ``global`` (intra-class term over the all-gathered batch) or ``local`` (per process,
                official parity).
            head: student head: ``auto`` (distillation head when present), ``dist``, ``cls`` or ``avg``.
            warmup: E_w of the per-epoch warm-up min(1, e/E_w), e the integer epoch from 0 (DIST++ on CIFAR: 20);
                0 = none.
        """
        super().__init__()
        self.beta, self.gamma, self.temperature, self.warmup = beta, gamma, temperature, warmup
        self.intra_scope, self.head = intra_scope, head
        self.uses_dist_head = reads_dist_head(self.head)
        self.student_taps = TapSpec(logits=True)
        self.teacher_taps = TapSpec(logits=True)

    def forward(self, student: Features, teacher: Features, batch: Batch) -> dict[str, torch.Tensor]:
        factor = min(1.0, batch.epoch / self.warmup) if self.warmup else 1.0
        if factor == 0:  # not computed in the warm-up's zero phase (every rank agrees: same epoch, no gather)
            zero = student.logits.new_zeros(())
            return {'inter': zero, 'intra': zero}
        # training batches are equally large on every process: the gather then reads no size on the host
        gather = partial(all_gather_with_grad, equal_sizes=self.training) if self.intra_scope == 'global' else None
        inter, intra = dist_loss(pick_head(student, self.head), teacher.logits, self.beta, self.gamma,
                                 self.temperature, gather)
        return {'inter': factor * inter, 'intra': factor * intra}


# ---- dense form (semantic segmentation) ------------------------------------------------------------------------


def dist_dense_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 1.0,
                    gamma: float = 1.0, temperature: float = 1.0,
                    gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DIST on segmentation logits, the official segmentation form: (B, K, H, W) flattened to (B·H·W, K) rows.

    L_inter correlates the class distributions of each pixel; L_intra correlates, for each class, its probability
    across all B·H·W pixels of the batch (the process's, or every process's through ``gather``).

    Args:
        student_logits: z_s [B, K, H, W].
        teacher_logits: z_t [B, K, H, W].
        beta, gamma, temperature: β, γ, τ of :func:`dist_loss`.
        gather: as in :func:`dist_loss` (None: the process's pixels).

    Returns:
        (τ²·β·L_inter, τ²·γ·L_intra).
    """
    k = student_logits.shape[1]
    student_rows = student_logits.permute(0, 2, 3, 1).reshape(-1, k)  # [B·H·W, K]
    teacher_rows = teacher_logits.permute(0, 2, 3, 1).reshape(-1, k)  # [B·H·W, K]
    return dist_loss(student_rows, teacher_rows.detach(), beta, gamma, temperature, gather)


@register_dense_loss('dist')
class DenseDIST(DenseDistillationLoss):
    """DIST's dense form: inter- and intra-class Pearson relations over the B·H·W pixels of the batch.

    As in the official segmentation code the intra-class term is computed over each process's pixels by default
    (``intra_scope='local'``: a gather of 2 × B·H·W·K probabilities per step costs far more than in classification);
    with one process that is the whole batch, and on N processes a different loss. ``intra_scope='global'`` gathers
    every process's pixels (:func:`vitkd.distributed.all_gather_with_grad`, as classification's default) so that N
    processes at batch B compute the loss of one process at N·B. The teacher's logits are resized (bilinear) to the
    student's grid when their finest strides differ.

    Args:
        beta, gamma: weights of the inter- and intra-class terms (the official module's 1, 1; the run's weight is
            the ``--distill dist:W`` factor).
        temperature: τ (the official segmentation form has none: 1).
        intra_scope: ``local`` (each process's pixels, official) or ``global`` (all-gathered pixels).
    """
    paper = DIST.paper
    needs_logits = True

    def __init__(self, beta: Annotated[float, NonNegative()] = 1.0, gamma: Annotated[float, NonNegative()] = 1.0,
                 temperature: Annotated[float, Positive()] = 1.0,
                 intra_scope: Annotated[str, OneOf(*INTRA_SCOPES)] = 'local'):
        super().__init__()
        self.beta, self.gamma, self.temperature = float(beta), float(gamma), float(temperature)
        self.intra_scope = intra_scope

    def forward(self, student: DenseFeatures, teacher: DenseFeatures, batch) -> dict[str, torch.Tensor]:
        z_s = at_least_fp32(student.logits)
        gather = partial(all_gather_with_grad, equal_sizes=self.training) if self.intra_scope == 'global' else None
        inter, intra = dist_dense_loss(z_s, align_logits(z_s, teacher.logits), self.beta, self.gamma,
                                       self.temperature, gather)
        return {'inter': inter, 'intra': intra}


__all__ += ['dist_dense_loss', 'DenseDIST']
