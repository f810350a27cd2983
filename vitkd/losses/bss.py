"""BSS: knowledge distillation with adversarial samples supporting the decision boundary (``bss``).

"Knowledge Distillation with Adversarial Samples Supporting Decision Boundary", Heo, Lee, Yun, Choi, AAAI 2019
(arXiv 1805.05532). Official code (the Zoo variant this follows, itself modified from bhheo/BSS_distillation):
AberHu/Knowledge-Distillation-Zoo @ 65470c846c1300d555815da26999cbe2b51fc815, ``kd_losses/bss.py`` (``BSS``,
``BSSAttacker``) and ``train_bss.py`` (sample selection, attack classes, schedule).

Per training step (z_s, z_t [B, K] logits of the clean batch, y [B] labels):

1. **Base samples**: those that both networks classify correctly (top-1 = y); if more than ``attack_size``, the
   ``attack_size`` with the largest non-target disagreement Σ_{k≠y} (p_t,k − p_s,k)², p = softmax(z) (T = 1).
2. **Attack class** per base sample: drawn among the teacher's classes other than its top-1 with probability
   ∝ p_t (``torch.multinomial`` on the renormalised non-top-1 probabilities).
3. **Attack** on the teacher (frozen, eval mode), ``num_steps`` iterations on x̃ (starting at x):
   o = Σ_b (p_t[b, a_b] − p_t[b, y_b]);  g = ∂o/∂x̃;
   x̃ ← clamp(x̃ + α_b·(p_t,y − p_t,a + ε)·g/‖g‖₂, valid range),  α_b = ``step_alpha`` while the teacher still
   predicts y for sample b, else 0; stop early when no sample is still classified as y.
4. **Loss** on the attacked images only, without the T² factor::

       L = KL_batchmean(softmax(z_t(x̃)/T) ‖ softmax(z_s(x̃)/T))     # mean over the attacked samples

**Schedule** (epochs e counted from 0, E = ``RunInfo.epochs``): factor(e) = 0 for e < ``start_epoch`` (10), else
max(1 − ``decay``·e/E, 0) with ``decay`` = 1.25 — the Zoo's λ_e = λ·max(1 − 1.25·(e₁ − 1)/E, 0) for 1-indexed
e₁ > 10, so CE + BSS in Zoo epochs 11..160 of 200 and CE only afterwards. λ itself is the CLI weight (Zoo: 2.0,
``--distill bss:2``). Steps with factor 0 do no attack and return a zero term (as do steps without a base sample):
the distillation head then gets no gradient, so ``may_leave_parameters_unused`` is set for DDP. ``per_step=True``
evaluates the same schedule at the fractional epoch every step (runs shorter than ``start_epoch`` epochs: the
reproduce.py table's one-epoch cells use ``start_epoch=0.05``, the Zoo's 10/200).

ViT students: the selection and the loss use the averaged heads (``head='auto'``), which the task CE also trains:
BSS, off early in the run and cannot train a classifier head (in the
  reproduce.py table a distillation head reached only by it stayed near chance); ``head='dist'`` gives them the
distillation head (the task CE then goes to the class head). The attack only involves the teacher. Under mixup "correct" and the attack target use the
dominant label (y_a if λ ≥ 0.5 else y_b). Cost per step: up to ``num_steps`` teacher forward/backward passes on up to
``attack_size`` images, plus one student and one teacher forward on them. The extra student forward runs in the
student's current mode (train: BN statistics update, as in the Zoo).

Where vitkd differs from the official code:

* **Clamp range.** Attacked images are clamped per channel to the range of valid normalised pixels,
  [(0 − mean_c)/std_c, (1 − mean_c)/std_c] from the run's mean/std (``RunInfo``), not to the CIFAR-specific
  [−2.5, 2.5]. Attack classes are drawn with ``torch.multinomial`` (the same distribution as the Zoo's roulette
  wheel over the sorted cumulative probabilities, without its per-element Python loop and device syncs).
* The gradient norm in the attack step is clamped at 1e-12 (the Zoo divides by it unguarded: an all-zero gradient,
  e.g. from a saturated softmax, gives NaN there; here it gives a zero step).
* The schedule's start and slope are options (defaults = the Zoo's at any E); the Zoo's ``torch.autograd.gradcheck
  .zero_gradients`` import (removed from PyTorch, so the Zoo's import fails) is not needed: gradients come from
  ``autograd.grad``.
* When every row of non-top-1 teacher probabilities underflows to 0, the attack class is drawn uniformly among the
  non-top-1 classes (the Zoo then keeps the teacher's second class).
"""
from __future__ import annotations

from typing import Annotated, Callable, Optional

import torch
import torch.nn.functional as F

from ..domains import Bool, Integer, NonNegative, Positive
from ..features import Features, TapSpec
from .base import Batch, DistillationLoss, Head, RunInfo, pick_head, reads_dist_head, register_loss
from .functional import at_least_fp32, kl_div_logits

__all__ = ['BSS', 'bss_factor', 'select_base_samples', 'sample_attack_classes', 'boundary_attack', 'bss_loss',
           'valid_pixel_range']


def bss_factor(epoch: float, epochs: int, start_epoch: float = 10, decay: float = 1.25) -> float:
    """Multiplier of the BSS term at 0-indexed ``epoch`` of ``epochs`` (0 before ``start_epoch``); ``epoch`` is the
    whole epoch (the Zoo) or, with ``per_step``, the fractional one."""
    if epoch < start_epoch:
        return 0.0
    return max(1.0 - decay * epoch / epochs, 0.0)


def valid_pixel_range(mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel bounds [1, C, 1, 1] of normalised images whose pixels lie in [0, 1]."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (0 - mean_t) / std_t, (1 - mean_t) / std_t


def select_base_samples(logits_s: torch.Tensor, logits_t: torch.Tensor, labels: torch.Tensor,
                        attack_size: int) -> torch.Tensor:
    """Indices [n ≤ attack_size] of the samples both networks classify correctly, most disagreeing first.

    Args:
        logits_s: z_s [B, K] (clean batch).
        logits_t: z_t [B, K].
        labels: y [B].
        attack_size: maximum number of samples kept.
    """
    correct = (logits_s.argmax(1) == labels) & (logits_t.argmax(1) == labels)
    index = correct.nonzero().flatten()
    if index.numel() > attack_size:
        diff = (F.softmax(logits_t[index], dim=1) - F.softmax(logits_s[index], dim=1)) ** 2  # [n, K]
        score = diff.sum(1) - diff.gather(1, labels[index].view(-1, 1)).squeeze(1)            # Σ_{k≠y}
        index = index[score.topk(attack_size).indices]
    return index


def sample_attack_classes(logits_t: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[n] one class per row drawn from softmax(z_t) restricted to the non-top-1 classes (renormalised).

    Args:
        logits_t: z_t [n, K], K ≥ 2.
        generator: optional RNG for ``torch.multinomial``.
    """
    probs = F.softmax(logits_t, dim=1)  # [n, K]
    top1 = probs.argmax(1, keepdim=True)
    probs = probs.scatter(1, top1, 0.0)
    dead = probs.sum(1, keepdim=True) <= 0  # every non-top-1 probability underflowed
    probs = torch.where(dead, torch.ones_like(probs).scatter(1, top1, 0.0), probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def boundary_attack(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
                    attack_classes: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, step_alpha: float = 0.3,
                    num_steps: int = 10, eps: float = 1e-4) -> torch.Tensor:
    """Move each image towards the teacher's boundary between its label and its attack class.

    Args:
        forward: x → teacher logits [n, K] with a graph to x (samples independent).
        images: x [n, C, H, W].
        labels: y [n].
        attack_classes: a [n].
        lower, upper: per-channel clamp bounds broadcastable to x.
        step_alpha, num_steps, eps: the attacker's step size, iterations and additive constant.

    Returns:
        x̃ [n, C, H, W], detached.
    """
    x = images.detach().clone()
    for _ in range(num_steps):
        x.requires_grad_(True)
        with torch.enable_grad():
            logits = forward(x)  # [n, K]
            probs = F.softmax(logits, dim=1)
            p_y = probs.gather(1, labels.view(-1, 1))          # [n, 1]
            p_a = probs.gather(1, attack_classes.view(-1, 1))  # [n, 1]
            (grad,) = torch.autograd.grad((p_a - p_y).sum(), x)
        active = logits.argmax(1) == labels  # still on the label's side
        if not bool(active.any()):
            break
        alpha = step_alpha * active.to(x.dtype).view(-1, 1, 1, 1)
        pert = (p_y - p_a).detach().view(-1, 1, 1, 1)
        norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        x = torch.maximum(torch.minimum(x.detach() + alpha * (pert + eps) * grad / norm, upper), lower)
    return x.detach()


def bss_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL_batchmean(softmax(z_t/T) ‖ softmax(z_s/T)) on the attacked samples, without T²."""
    return kl_div_logits(logits_s, logits_t.detach(), temperature) / temperature ** 2


@register_loss('bss')
class BSS(DistillationLoss):
    """KD on adversarial boundary-supporting samples made by attacking the teacher."""
    paper = 'BSS, Heo et al., AAAI 2019, arXiv:1805.05532'
    #: steps without a term (before ``start_epoch``, after the decay, no base sample) leave z_dist's head idle
    may_leave_parameters_unused = True

    def __init__(self, temperature: Annotated[float, Positive()] = 3.0, attack_size: Annotated[int, Integer(lo=1)] = 32,
                 step_alpha: Annotated[float, Positive()] = 0.3, num_steps: Annotated[int, Integer(lo=1)] = 10,
                 attack_eps: Annotated[float, NonNegative()] = 1e-4, start_epoch: Annotated[float, NonNegative()] = 10,
                 decay: Annotated[float, NonNegative()] = 1.25, head: Head = 'auto',
                 per_step: Annotated[bool, Bool()] = False):
        """
        Args:
            temperature: T of the KL on attacked samples (no T² factor).
            attack_size: maximum number of attacked samples per step.
            step_alpha, num_steps, attack_eps: the attacker (Zoo: 0.3, 10, 1e-4).
            start_epoch: first 0-indexed epoch with a non-zero term (Zoo: 10, i.e. from 1-indexed epoch 11).
            decay: slope of the linear decay, factor = max(1 − decay·epoch/epochs, 0).
            per_step: evaluate the schedule every step at the fractional epoch instead of once per whole epoch (the
                Zoo), so that a run shorter than ``start_epoch`` epochs keeps its shape: with ``start_epoch=0.05``
                a one-epoch run starts the term after 5 % of it and ends it at 80 %, as epochs 10 and 160 of 200.
            head: student head (``auto`` = the averaged heads).
        """
        super().__init__()
        self.temperature, self.attack_size, self.step_alpha = temperature, attack_size, step_alpha
        self.num_steps, self.attack_eps, self.start_epoch, self.decay = num_steps, attack_eps, start_epoch, decay
        self.per_step = per_step
        self.head = 'avg' if head == 'auto' else head
        self.uses_dist_head = reads_dist_head(self.head)
        self.student_taps = TapSpec(logits=True)
        self.teacher_taps = TapSpec(logits=True)
        self.epochs = 1
        lower, upper = valid_pixel_range(RunInfo.mean, RunInfo.std)
        self.register_buffer('lower', lower, persistent=False)
        self.register_buffer('upper', upper, persistent=False)

    def setup(self, student: Features, teacher: Features, info: RunInfo) -> None:
        self.epochs = info.epochs
        lower, upper = valid_pixel_range(info.mean, info.std)
        device = student.logits.device
        self.lower, self.upper = lower.to(device), upper.to(device)

    def forward(self, student: Features, teacher: Features, batch: Batch) -> dict[str, torch.Tensor]:
        logits_s = pick_head(student, self.head)  # [B, K]
        factor = bss_factor(batch.progress if self.per_step else batch.epoch, self.epochs, self.start_epoch,
                            self.decay)
        zero = logits_s.new_zeros(())
        if factor == 0:
            return {'kl': zero}
        labels = batch.labels if batch.lam >= 0.5 else batch.labels_b  # dominant label under mixup
        index = select_base_samples(logits_s.detach(), teacher.logits, labels, self.attack_size)
        if index.numel() == 0:
            return {'kl': zero}
        attack_classes = sample_attack_classes(teacher.logits[index])
        attacked = boundary_attack(lambda x: batch.teacher_forward(x).logits, batch.images[index], labels[index],
                                   attack_classes, self.lower, self.upper, self.step_alpha, self.num_steps,
                                   self.attack_eps)  # [n, C, H, W]
        attacked_s = at_least_fp32(pick_head(batch.student_forward(attacked), self.head))  # [n, K]
        with torch.no_grad():
            attacked_t = batch.teacher_forward(attacked).logits  # [n, K]
        return {'kl': factor * bss_loss(attacked_s, attacked_t, self.temperature)}
