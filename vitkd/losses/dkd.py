"""DKD: decoupled knowledge distillation (``dkd``).

"Decoupled Knowledge Distillation", Zhao, Cui, Song, Qiu, Liang, CVPR 2022 (arXiv 2203.08679). Official code:
megvii-research/mdistiller @ a08d46f10d6102bd6e3f258ca5ac880b020ea259, ``mdistiller/distillers/DKD.py``
(``dkd_loss``), defaults in ``mdistiller/engine/cfg.py`` (``CFG.DKD``).

Math (z_s, z_t [B, K] logits, y [B] hard labels, T temperature, p = softmax(z/T)):

* binary target / non-target distributions b = [p_y, Σ_{j≠y} p_j]                              # [B, 2]
* TCKD = (T²/B) Σ_b KL(b^t_b ‖ b^s_b)
* p̂ = softmax over the K − 1 non-target logits;  NCKD = (T²/B) Σ_b KL(p̂^t_b ‖ p̂^s_b)
* L_DKD = w(e)·(α·TCKD + β·NCKD), with the epoch warm-up factor w(e) below.

Per sample KL(p^t ‖ p^s) = KL(b^t ‖ b^s) + (1 − p^t_y)·KL(p̂^t ‖ p̂^s): DKD replaces the coupled weight (1 − p^t_y)
by the constant β.

Defaults are the paper's ImageNet values (ResNet-34 → ResNet-18): α = 1, β = 0.5, T = 1, no warm-up. The CIFAR-100
values are T = 4, β = 8 (2 or 6 for some pairs) and a 20-epoch warm-up with ``warmup_indexing='one'``; DKD++ on
ImageNet uses α 0.8, β 0.5, T 1, ``warmup=5`` with ``warmup_indexing='zero'``.

Warm-up: w(e) = min(1, (e + 1)/E_w) for ``warmup_indexing='one'`` (mdistiller counts epochs from 1: the first epoch
already trains at 1/E_w) and w(e) = min(1, e/E_w) for ``'zero'`` (DKD++: the first epoch is CE only), e the
integer epoch counted from 0, constant within an epoch as in both official trainers. This is deliberately not the
distiller's generic ``warmup_epochs`` (a per-step linear ramp over the fractional epoch); do not set both.

Labels under mixup/cutmix (the official target mask is built from hard labels and is undefined under mixing) —
option ``label_policy``:

* ``pair`` (default): λ·DKD(y_a) + (1 − λ)·DKD(y_b), with the batch-mode mixup metadata of :class:`Batch`
  (y_b = flip(y_a), one λ per batch). Without mixup λ = 1 and y_b = y_a, which is the plain hard-label DKD.
* ``argmax``: y = argmax of the (mixed, smoothed) soft target of the task loss.

Label smoothing does not touch DKD. Which student head: the distillation head when present (``head='auto'``), the
task CE then goes to the class head.

Where vitkd differs from the official code:

* NCKD excludes the target class by selecting the K − 1 non-target logits instead of subtracting 1000 from the
  target logit (identical whenever |z/T| ≪ 1000; exact always). K = 2 gives NCKD = 0 (mdistiller issue #60).
* log b^s is computed with log-sum-exp of log-probabilities (log p_y and log Σ_{j≠y} p_j) instead of the log of
  probability sums: mathematically identical, but never −∞ when the non-target probabilities underflow.
* At least fp32 (float64 stays float64); an explicit label policy under mixup (the official code has hard labels
  only).
"""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F

from ..domains import Integer, NonNegative, OneOf, Positive
from ..features import Features, TapSpec
from .base import Batch, DistillationLoss, Head, pick_head, reads_dist_head, register_loss
from .functional import at_least_fp32

__all__ = ['dkd_terms', 'dkd_loss', 'dkd_warmup_factor', 'DKD', 'LABEL_POLICIES', 'WARMUP_INDEXING']

LABEL_POLICIES = ('pair', 'argmax')
WARMUP_INDEXING = ('zero', 'one')


def _binary_and_nontarget_log_probs(logits: torch.Tensor, labels: torch.Tensor, temperature: float
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """log b [B, 2] (target, rest) and log p̂ [B, K − 1] over the non-target classes (in class order), at temperature T.

    Gathers by index (the target, and the K − 1 others from :func:`_nontarget_classes`) rather than by a boolean
    target mask: a boolean selection's output size is a device value the host would wait for on a GPU.
    """
    log_p = F.log_softmax(logits / temperature, dim=1)                    # [B, K]
    log_p_target = log_p.gather(1, labels[:, None])                       # [B, 1]
    log_p_other = log_p.gather(1, _nontarget_classes(labels, logits.shape[1]))  # [B, K − 1]
    log_binary = torch.cat([log_p_target, torch.logsumexp(log_p_other, dim=1, keepdim=True)], dim=1)  # [B, 2]
    log_nontarget = F.log_softmax(log_p_other, dim=1)                     # [B, K − 1] (shift-invariant)
    return log_binary, log_nontarget


def _nontarget_classes(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[B, K − 1] the classes other than ``labels`` [B], ascending: j, or j + 1 from the label on."""
    others = torch.arange(num_classes - 1, device=labels.device)[None, :]  # [1, K − 1]
    return others + (others >= labels[:, None]).long()


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample TCKD and NCKD, each multiplied by T².

    Args:
        student_logits: z_s [B, K].
        teacher_logits: z_t [B, K].
        labels: y [B] class indices.
        temperature: T.

    Returns:
        (T²·KL(b^t ‖ b^s) [B], T²·KL(p̂^t ‖ p̂^s) [B]).
    """
    if student_logits.shape[1] < 2:
        raise ValueError('DKD needs at least 2 classes')
    labels = labels.long()
    log_b_s, log_nt_s = _binary_and_nontarget_log_probs(at_least_fp32(student_logits), labels, temperature)
    log_b_t, log_nt_t = _binary_and_nontarget_log_probs(at_least_fp32(teacher_logits), labels, temperature)
    tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(dim=1)              # [B]
    nckd = (log_nt_t.exp() * (log_nt_t - log_nt_s)).sum(dim=1)           # [B]
    scale = temperature ** 2
    return scale * tckd, scale * nckd


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float = 1.0,
             beta: float = 0.5, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(α·TCKD, β·NCKD), each T²-scaled and averaged over the batch (sum over classes / B)."""
    tckd, nckd = dkd_terms(student_logits, teacher_logits, labels, temperature)
    return alpha * tckd.mean(), beta * nckd.mean()


def dkd_warmup_factor(epoch: int, warmup: int, indexing: str = 'zero') -> float:
    """w(e) = min(1, e/E_w) (``zero``) or min(1, (e + 1)/E_w) (``one``, mdistiller); 1 when ``warmup`` is 0."""
    if indexing not in WARMUP_INDEXING:
        raise ValueError(f'warmup_indexing must be one of {WARMUP_INDEXING}, got {indexing!r}')
    if warmup <= 0:
        return 1.0
    return min(1.0, (epoch + (indexing == 'one')) / warmup)


@register_loss('dkd')
class DKD(DistillationLoss):
    """DKD: w(e)·(α·TCKD + β·NCKD) with an explicit label policy under mixup."""
    paper = 'DKD, Zhao et al. CVPR 2022, arXiv:2203.08679'

    def __init__(self, alpha: Annotated[float, NonNegative()] = 1.0, beta: Annotated[float, NonNegative()] = 0.5,
                 temperature: Annotated[float, Positive()] = 1.0, warmup: Annotated[int, Integer(lo=0)] = 0,
                 warmup_indexing: Annotated[str, OneOf(*WARMUP_INDEXING)] = 'zero',
                 label_policy: Annotated[str, OneOf(*LABEL_POLICIES)] = 'pair', head: Head = 'auto'):
        """
        Args:
            alpha: α, weight of TCKD.
            beta: β, weight of NCKD.
            temperature: T.
            warmup: E_w, warm-up length in epochs (0 = none); see ``warmup_indexing``.
            warmup_indexing: ``zero`` → min(1, e/E_w) (DKD++), ``one`` → min(1, (e + 1)/E_w) (mdistiller).
            label_policy: ``pair`` (λ·DKD(y_a) + (1 − λ)·DKD(y_b)) or ``argmax`` (argmax of the mixed target).
            head: student head: ``auto`` (distillation head when present), ``dist``, ``cls`` or ``avg``.
        """
        super().__init__()
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.warmup, self.warmup_indexing = warmup, warmup_indexing
        self.label_policy, self.head = label_policy, head
        self.uses_dist_head = reads_dist_head(self.head)
        self.student_taps = TapSpec(logits=True)
        self.teacher_taps = TapSpec(logits=True)

    def forward(self, student: Features, teacher: Features, batch: Batch) -> dict[str, torch.Tensor]:
        z_s, z_t = pick_head(student, self.head), teacher.logits
        factor = dkd_warmup_factor(batch.epoch, self.warmup, self.warmup_indexing)
        if factor == 0:  # inside the warm-up's zero phase the term is not computed (a zero-weight term costs nothing)
            zero = z_s.new_zeros(())
            return {'tckd': zero, 'nckd': zero}
        if self.label_policy == 'argmax':
            pairs = [(batch.targets.argmax(dim=1), 1.0)]
        else:
            pairs = [(batch.labels, float(batch.lam))]
            if batch.lam != 1.0:
                pairs.append((batch.labels_b, 1.0 - float(batch.lam)))
        tckd = nckd = z_s.new_zeros(())
        for labels, weight in pairs:
            t, n = dkd_loss(z_s, z_t, labels, self.alpha, self.beta, self.temperature)
            tckd, nckd = tckd + weight * t, nckd + weight * n
        return {'tckd': factor * tckd, 'nckd': factor * nckd}
