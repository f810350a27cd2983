"""ND: norm-and-direction loss towards the teacher's class centres (``nd``); the "++" methods are base loss + ND.

"Improving Knowledge Distillation via Regularizing Feature Norm and Direction", Wang, Cheng, Duan, Wang, Feng,
Kong, arXiv 2305.17007 (ECCV 2024). Official code: WangYZ1608/Knowledge-Distillation-via-ND @
fc6f3f9058ed35189a1d3c0a79a7594025e4d88f — ``ImageNet/DeiT/utils.py::DirectNormLoss.project_center_v2`` (loss),
``ImageNet/DeiT/Dataset/data.py::mixup_center`` (centres under mixup), ``ImageNet/DeiT/Models/embtrans.py``
(adapter), ``ImageNet/emb_fea_distribution.py`` (class centres; vitkd: :mod:`vitkd.centers`).

Math (s_b student embedding after the adapter, t_b teacher pooled pre-logits, c_b the sample's class centre, all
[B, D_t]):

  L_ND = (1/B) Σ_b [ 1 − ⟨s_b, c_b/‖c_b‖⟩ / max(‖s_b‖, ‖t_b‖) ]

One term, no eps, no temperature: while ‖s‖ < ‖t‖ it pulls the projection of s on the centre direction up (the
norm grows); once ‖s‖ ≥ ‖t‖ it is 1 − cos(s, c). ‖t‖ never carries gradient. The CLI weight is λ_nd
(``nd_loss_factor``); the loss returns the unweighted mean, times the optional per-epoch warm-up
w(e) = min(1, e/E_w) (``warmup``; integer epochs from 0, DKD++ on ImageNet warms ND up with E_w = 5).

* **Student embedding**: the student's pre-logits ``forward_head(pre_logits=True)``: (h_cls + h_dist)/2 for a
  distilled ViT (official DeiT++; the same definition for the VkD student, whose dist token is the patch mean — a
  vitkd adaptation), the pooled features for a CNN.
* **Adapter** (``EmbTrans``) when D_s ≠ D_t: BatchNorm1d(D_s) → Dropout(0.5) → Linear(D_s, D_t), trained with the
  student and used only for ND; BN weight 1 / bias 0, Linear weight and bias ~ N(0, 0.01²) (``adapter_init='normal'``,
  DeiT++ and ImageNet KD++/DKD++) or PyTorch's default Linear weight init with bias 0 (``'pytorch'``, ReviewKD++ and
  the CIFAR scripts).
* **Centres** C [K, D_t] (a buffer, saved in checkpoints): from ``centers=<file>`` at setup (a vitkd centre file,
  see :mod:`vitkd.centers`, or the official ``{class: [floats]}`` JSON), or set by the run before training with
  :meth:`ND.set_centers` (:meth:`ND.prepare_for_run` computes them, split across the processes, or loads them from
  the cache: :func:`vitkd.centers.centers_for_run`). They are
  identical on every rank, so DDP does not re-broadcast them at every step (``ddp_ignored_buffers``).
* **Mixup**: c_b = C[y_a] mixed with the same λ and pairing as the images,
  c″ = λ·S(C[y_a]) + (1 − λ)·S(C[y_b]), where S(c)_b = (1 − ε)·c_b + (ε/K)·Σ_j c_j (sum over the local batch) is the
  official batch "label smoothing" of the centres with ε = ``center_smoothing`` (DeiT++: 0.1 = its mixup smoothing;
  the CNN scripts have no mixup: 0). Without mixup (λ = 1, ε = 0) c = C[y].

Where vitkd differs from the official code:

* Vectorised loss with an element-wise maximum instead of a Python loop with ``max`` (identical values; at exact
  ties the gradient is split between the two branches).
* The official ``EmbTrans`` re-initialises every ``nn.Linear`` of the wrapped student (qkv, MLP, heads) to
  N(0, 0.01²), a bug (its init loop runs after the student is stored inside it); vitkd initialises only the adapter
  (``parity_reinit_student=True`` reproduces the re-init).
* Centres come from stock timm (``forward_head(pre_logits=True)``; the official script needs a patched timm model
  returning (embedding, logits)), computed and cached by :mod:`vitkd.centers` with their provenance; a file whose shape
  does not match the run is a one-line error, and :meth:`ND.prepare_for_run` refuses a file made with another teacher.
* Under mixup the centre mixing uses the (y_a, y_b, λ) metadata of the data step (the official Mixup returns the
  mixed centres itself); both follow timm's batch mode (pairing b ↔ B−1−b, one λ per batch).
* At least fp32 (float64 inputs stay float64).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import torch
import torch.nn as nn

from ..centers import centers_for_run, check_provenance, load_centers
from ..domains import Bool, Integer, Interval, OneOf, OrNone, Text
from ..features import Features, TapSpec
from .base import Batch, DistillationLoss, LossSpecError, RunContext, RunInfo, register_loss
from .functional import at_least_fp32

__all__ = ['nd_per_sample', 'nd_loss', 'smooth_batch_centers', 'mix_centers', 'make_adapter', 'ND', 'ADAPTER_INITS']

_logger = logging.getLogger(__name__)

ADAPTER_INITS = ('normal', 'pytorch')


def nd_per_sample(student_emb: torch.Tensor, teacher_emb: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """1 − ⟨s, c/‖c‖⟩ / max(‖s‖, ‖t‖) per sample.

    Args:
        student_emb: s [B, D].
        teacher_emb: t [B, D] (detached here: ‖t‖ never carries gradient).
        centers: c [B, D], one (possibly mixed) centre per sample; only its direction matters.

    Returns:
        [B].
    """
    unit_centers = centers / centers.norm(dim=1, keepdim=True)               # [B, D]
    denom = torch.maximum(student_emb.norm(dim=1), teacher_emb.detach().norm(dim=1))  # [B]
    return 1 - (student_emb * unit_centers).sum(dim=1) / denom


def nd_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """L_ND: :func:`nd_per_sample` averaged over the (local) batch."""
    return nd_per_sample(student_emb, teacher_emb, centers).mean()


def smooth_batch_centers(centers: torch.Tensor, smoothing: float, num_classes: int) -> torch.Tensor:
    """S·c with S_bb = 1 − ε + ε/K and S_bj = ε/K: (1 − ε)·c_b + (ε/K)·Σ_j c_j over the batch. [B, D] → [B, D]."""
    if smoothing == 0:
        return centers
    return (1 - smoothing) * centers + (smoothing / num_classes) * centers.sum(dim=0, keepdim=True)


def mix_centers(class_centers: torch.Tensor, labels: torch.Tensor, labels_b: torch.Tensor, lam: float,
                smoothing: float = 0.0) -> torch.Tensor:
    """The centre of each (mixed) sample: λ·S(C[y_a]) + (1 − λ)·S(C[y_b]).

    Args:
        class_centers: C [K, D].
        labels: y_a [B].
        labels_b: y_b [B] (timm batch mode: ``labels.flip(0)``).
        lam: λ, the weight of y_a.
        smoothing: ε of the batch smoothing S (0 = none).

    Returns:
        [B, D].
    """
    num_classes = class_centers.shape[0]
    mixed = smooth_batch_centers(class_centers[labels], smoothing, num_classes)  # [B, D]
    if lam != 1.0:
        other = smooth_batch_centers(class_centers[labels_b], smoothing, num_classes)
        mixed = lam * mixed + (1 - lam) * other
    return mixed


def make_adapter(student_dim: int, teacher_dim: int, init: str = 'normal') -> nn.Sequential:
    """EmbTrans: BatchNorm1d(D_s) → Dropout(0.5) → Linear(D_s, D_t), initialised alone (not the student)."""
    if init not in ADAPTER_INITS:
        raise ValueError(f'adapter_init must be one of {ADAPTER_INITS}, got {init!r}')
    adapter = nn.Sequential(nn.BatchNorm1d(student_dim), nn.Dropout(0.5), nn.Linear(student_dim, teacher_dim))
    nn.init.ones_(adapter[0].weight)
    nn.init.zeros_(adapter[0].bias)
    if init == 'normal':
        nn.init.normal_(adapter[2].weight, std=0.01)
        nn.init.normal_(adapter[2].bias, std=0.01)
    else:  # keep PyTorch's default Linear weight init
        nn.init.zeros_(adapter[2].bias)
    return adapter


def read_centers_file(path: str) -> tuple[torch.Tensor, dict]:
    """(C [K, D] float32, provenance) from a vitkd ``.safetensors`` centre file or the official ``.json``."""
    file = Path(path)
    if not file.is_file():
        raise LossSpecError(f'nd.centers={path!r}: no such file (make one with scripts/compute_centers.py)')
    if file.suffix == '.json':  # official: {"0": [D floats], "1": [...], ...}
        data = json.loads(file.read_text())
        try:
            rows = [data[str(k)] for k in range(len(data))]
        except KeyError:
            raise LossSpecError(f'nd.centers={path!r}: the JSON keys must be the class indices 0..K-1') from None
        return torch.tensor(rows, dtype=torch.float32), {'source': 'official json', 'path': str(file.resolve())}
    return load_centers(file)


@register_loss('nd')
class ND(DistillationLoss):
    """Norm-and-direction loss of the student embedding against the teacher's class centres."""
    paper = 'ND (KD++), Wang et al. arXiv:2305.17007 (ECCV 2024)'
    def __init__(self, centers: Annotated[Optional[str], OrNone(Text())] = None,
                 center_smoothing: Annotated[float, Interval(0, 1, hi_open=True)] = 0.0,
                 adapter_init: Annotated[str, OneOf(*ADAPTER_INITS)] = 'normal',
                 warmup: Annotated[int, Integer(lo=0)] = 0, parity_reinit_student: Annotated[bool, Bool()] = False):
        """
        Args:
            centers: a centre file (vitkd ``.safetensors`` or official ``.json``); None = set by the run.
            center_smoothing: ε of the batch smoothing of the centres (DeiT++: 0.1).
            adapter_init: ``normal`` (N(0, 0.01²) weight and bias) or ``pytorch`` (default weight, zero bias).
            warmup: E_w of the per-epoch warm-up min(1, e/E_w), e counted from 0 (0 = none).
            parity_reinit_student: reproduce the official bug — re-initialise every ``nn.Linear`` of the student to
                N(0, 0.01²) weights and biases and every ``BatchNorm1d`` to 1/0, as the official ``EmbTrans`` does
                (official parity only; off by default).
        """
        super().__init__()
        self.centers_path = centers
        self.center_smoothing, self.adapter_init, self.warmup = center_smoothing, adapter_init, warmup
        self.parity_reinit_student = parity_reinit_student
        self.centers_provenance: dict = {}
        self.adapter: Optional[nn.Module] = None
        self.register_buffer('centers', torch.zeros(0, 0))
        self._centers_ok = False
        self.student_taps = TapSpec(pooled=True)
        self.teacher_taps = TapSpec(pooled=True)

    def options(self) -> dict:
        return {'centers': self.centers_path, 'center_smoothing': self.center_smoothing,
                'adapter_init': self.adapter_init, 'warmup': self.warmup,
                'parity_reinit_student': self.parity_reinit_student}

    def adapt_models(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        if not self.parity_reinit_student:
            return
        _logger.warning('nd.parity_reinit_student: re-initialising every Linear of the student to N(0, 0.01²) '
                        '(the official EmbTrans bug, parity only)')
        for m in student.modules():
            if isinstance(m, nn.BatchNorm1d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.normal_(m.bias, std=0.01)

    def prepare_for_run(self, run: RunContext) -> None:
        """The teacher's class centres: a centre file given as ``nd.centers`` is checked against the run's teacher
        (source and weights); otherwise they are computed by one teacher pass over the training set (split across
        the processes) or loaded from the centre cache."""
        if run.teacher is None:
            return
        if self.has_centers:
            check_provenance(self.centers_provenance, run.teacher)
            return
        centers, _, provenance = centers_for_run(run.cfg, run.teacher, run.spec, run.accelerator, run.cache_dir)
        self.set_centers(centers, provenance)

    def ddp_ignored_buffers(self) -> set[str]:
        return {'centers'}  # identical on every rank (same file / cache / checkpoint): no broadcast at every step

    @property
    def has_centers(self) -> bool:
        return self.centers.numel() > 0 and bool((self.centers.norm(dim=1) > 0).all())

    def setup(self, student: Features, teacher: Features, info: RunInfo) -> None:
        student_dim, teacher_dim = student.pooled.shape[1], teacher.pooled.shape[1]
        if student_dim != teacher_dim:
            self.adapter = make_adapter(student_dim, teacher_dim, self.adapter_init).to(student.pooled.device)
        if self.centers_path is not None:
            centers, provenance = read_centers_file(self.centers_path)
            self._check_shape(centers, info.num_classes, teacher_dim, f'nd.centers={self.centers_path!r}')
            self.set_centers(centers, provenance)
        elif self.centers.numel():  # set before setup
            self._check_shape(self.centers, info.num_classes, teacher_dim, 'the class centres')
        else:
            self.centers = torch.zeros(info.num_classes, teacher_dim, device=teacher.pooled.device)

    @staticmethod
    def _check_shape(centers: torch.Tensor, num_classes: int, teacher_dim: int, what: str) -> None:
        if tuple(centers.shape) != (num_classes, teacher_dim):
            raise LossSpecError(f'{what} has shape {tuple(centers.shape)}, but the run needs (classes, teacher width) '
                                f'= ({num_classes}, {teacher_dim})')

    def set_centers(self, centers: torch.Tensor, provenance: Optional[dict] = None) -> None:
        """Install the teacher's class centres C [K, D_t] (every row non-zero and finite)."""
        centers = at_least_fp32(centers.detach())
        if centers.ndim != 2:
            raise LossSpecError(f'class centres must be [K, D], got shape {tuple(centers.shape)}')
        if self.centers.numel() and centers.shape != self.centers.shape:
            raise LossSpecError(f'class centres of shape {tuple(centers.shape)} do not match the run\'s '
                                f'{tuple(self.centers.shape)} (classes, teacher width)')
        if not torch.isfinite(centers).all():
            raise LossSpecError('class centres contain NaN/inf')
        zero = (centers.norm(dim=1) == 0).nonzero().flatten().tolist()
        if zero:
            raise LossSpecError(f'class centres of classes {zero[:10]} are zero vectors (no direction)')
        device = self.centers.device if self.centers.numel() else centers.device
        self.centers = centers.to(device).clone()
        self.centers_provenance = dict(provenance or {})
        self._centers_ok = True

    def forward(self, student: Features, teacher: Features, batch: Batch) -> dict[str, torch.Tensor]:
        if not self._centers_ok:
            if not self.has_centers:
                raise LossSpecError('nd needs the teacher\'s class centres: pass nd.centers=<file> (see '
                                    'scripts/compute_centers.py) or call prepare_for_run before training')
            self._centers_ok = True  # restored from a checkpoint
        factor = min(1.0, batch.epoch / self.warmup) if self.warmup else 1.0
        student_emb = student.pooled                                       # [B, D_s]
        if factor == 0:
            return {'nd': student_emb.new_zeros(())}
        if self.adapter is not None:
            student_emb = self.adapter(student_emb)                        # [B, D_t]
        centers = mix_centers(self.centers, batch.labels, batch.labels_b, batch.lam, self.center_smoothing)
        return {'nd': factor * nd_loss(student_emb, teacher.pooled, centers)}
