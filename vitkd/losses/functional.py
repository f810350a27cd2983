"""Math shared by several methods (pure functions on tensors)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ['at_least_fp32', 'kl_div_logits', 'soft_target_cross_entropy', 'KL_REDUCTIONS']

KL_REDUCTIONS = ('batchmean', 'numel')


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` promoted to fp32 when it is a narrower float (bf16/fp16 under autocast), otherwise ``t`` itself.

    Losses compute in at least fp32 (softmax of small temperatures and log-ratios lose digits in bf16) but never
    cast down: a float64 input stays float64, so a float64 run matches a float64 reference to its own precision.
    """
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def kl_div_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                  reduction: str = 'batchmean') -> torch.Tensor:
    """T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)).

    Args:
        student_logits: z_s [B, K].
        teacher_logits: z_t [B, K] (no gradient is expected to flow into it).
        temperature: T.
        reduction: ``batchmean`` (sum over classes, mean over the batch) or ``numel`` (divide the sum by B·K, as
            DeiT's soft distillation does; = batchmean / K).

    Returns:
        Scalar, multiplied by T² after the reduction.
    """
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f'KL reduction {reduction!r} is not one of {KL_REDUCTIONS}')
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl_sum = F.kl_div(log_p_s, log_p_t, reduction='sum', log_target=True)
    denom = student_logits.shape[0] if reduction == 'batchmean' else student_logits.numel()
    return kl_sum / denom * temperature ** 2


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(1/B) Σ_b Σ_k −q[b, k]·log softmax(z)[b, k] for soft targets q [B, K]."""
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
