"""DML: deep mutual learning of the student with a trainable peer network (``dml``, no teacher).

"Deep Mutual Learning", Zhang, Xiang, Hospedales, Lu, CVPR 2018 (arXiv 1706.00384). Official code (the Zoo variant
this follows): AberHu/Knowledge-Distillation-Zoo @ 65470c846c1300d555815da26999cbe2b51fc815, ``kd_losses/dml.py::DML``,
``train_dml.py``.

Formula (z_1 student logits, z_2 peer logits [B, K], one forward of both nets per batch, T = 1, no T²)::

    L_1 = CE(z_1, y) + λ·KL_batchmean(softmax(sg(z_2)) ‖ softmax(z_1))     # trains the student
    L_2 = CE(z_2, y) + λ·KL_batchmean(softmax(sg(z_1)) ‖ softmax(z_2))     # trains the peer

The student's CE is the distiller's task loss; this loss returns ``kl`` = λ·KL for the student and ``peer_ce`` +
``peer_kl`` for the peer (CE on the same soft targets — label smoothing and mixup folded in — as the student's). Each
network's terms see the other's logits detached, so one backward of the sum gives every parameter exactly the
gradient of its own network's L_k: the Zoo's synchronous update (backward L_1, step optimiser 1, backward L_2,
step optimiser 2, from one forward) with one optimiser over both parameter sets (same optimiser settings, as the
Zoo's two identical SGDs). Default λ = ``kl_weight`` = 1.0; keep the CLI weight at 1 (``--distill dml``): a CLI
weight w ≠ 1 scales the student's KL and the peer's whole objective L_2 by w.

The peer is a submodule of this loss, so the optimiser, DDP, train/eval switching and training checkpoints see it;
it is built in :meth:`DML.setup` with ``vitkd.models.create_student`` — by default the student's own architecture and
kwargs (``RunInfo.student_name`` / ``student_kwargs``), or ``peer`` / ``peer_kwargs``. Its ``no_weight_decay()``
(``pos_embed``, ``cls_token``, …) is forwarded with the ``peer.`` prefix. It starts from its own random init (the Zoo
starts each net from its baseline init file).

Which logits: on a student with a distillation head the KL uses that head (``head='auto'``, as ``kd``; the task CE
then goes to the class head); the peer is represented by its inference output (the mean of its heads for a
distilled ViT, its only head otherwise) in both its CE and its KL.

Where vitkd differs from the official code:

* One optimiser over both networks instead of two (identical update, see above); the peer's learning rate and weight
  decay follow the run's. The Zoo picks the best checkpoint by max(acc_1, acc_2); vitkd evaluates and exports the
  student only — the peer lives in the training checkpoint (``losses.dml.peer.*``) and is not evaluated.
* DML with a frozen teacher would degenerate to ST at T = 1, so this loss never uses one.
"""
from __future__ import annotations

from typing import Annotated, Any, Optional

import torch
import torch.nn as nn

from ..domains import Kwargs, NonNegative, OrNone, Text
from ..features import Features, TapSpec, extract
from ..models import create_student
from .base import Batch, DistillationLoss, Head, LossSpecError, RunInfo, pick_head, reads_dist_head, register_loss
from .functional import at_least_fp32, kl_div_logits, soft_target_cross_entropy

__all__ = ['DML', 'mutual_kl']


def mutual_kl(logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """KL_batchmean(softmax(sg(z_other)) ‖ softmax(z)) at T = 1: the gradient reaches ``logits`` only."""
    return kl_div_logits(logits, other_logits.detach(), temperature=1.0)


@register_loss('dml')
class DML(DistillationLoss):
    """Mutual learning with a peer network trained alongside the student (teacher-free)."""
    paper = 'DML, Zhang et al., CVPR 2018, arXiv:1706.00384'
    needs_teacher = False

    def __init__(self, kl_weight: Annotated[float, NonNegative()] = 1.0,
                 peer: Annotated[Optional[str], OrNone(Text())] = None,
                 peer_kwargs: Annotated[Optional[dict], OrNone(Kwargs())] = None, head: Head = 'auto'):
        """
        Args:
            kl_weight: λ on both KL terms.
            peer: timm / vitkd model name of the peer (None: the student's architecture and kwargs).
            peer_kwargs: timm kwargs for ``peer`` (only with ``peer``).
            head: student head in the KLs (``auto`` = distillation head if any).
        """
        super().__init__()
        if peer_kwargs is not None and peer is None:
            raise LossSpecError('peer_kwargs needs peer (the default peer copies the student\'s kwargs)')
        self.kl_weight, self.peer_name, self.peer_kwargs, self.head = kl_weight, peer, peer_kwargs, head
        self.uses_dist_head = reads_dist_head(self.head)
        self.student_taps = TapSpec(logits=True)
        self.peer: Optional[nn.Module] = None

    def options(self) -> dict[str, Any]:
        return {'kl_weight': self.kl_weight, 'peer': self.peer_name, 'peer_kwargs': self.peer_kwargs,
                'head': self.head}

    def setup(self, student: Features, teacher: Features, info: RunInfo) -> None:
        name = self.peer_name or info.student_name
        if not name:
            raise ValueError('dml needs RunInfo.student_name (or the peer option) to build the peer network')
        kwargs = dict(self.peer_kwargs or {}) if self.peer_name else dict(info.student_kwargs)
        self.peer = create_student(name, info.num_classes, **kwargs).to(student.logits.device)

    def no_weight_decay(self) -> set[str]:
        nwd = getattr(self.peer, 'no_weight_decay', None)
        return {f'peer.{n}' for n in nwd()} if nwd is not None else set()

    def forward(self, student: Features, teacher: Features, batch: Batch) -> dict[str, torch.Tensor]:
        if self.peer is None:
            raise RuntimeError('dml.setup() has not built the peer network')
        logits_s = pick_head(student, self.head)  # [B, K]
        peer = extract(self.peer, batch.images.detach(), TapSpec(logits=True), 'peer')
        logits_p = at_least_fp32(peer.head_logits)  # [B, K]
        return {'kl': self.kl_weight * mutual_kl(logits_s, logits_p),
                'peer_ce': soft_target_cross_entropy(logits_p, at_least_fp32(batch.targets)),
                'peer_kl': self.kl_weight * mutual_kl(logits_p, logits_s)}
