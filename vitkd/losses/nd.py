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
from typing import Annotated, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import roi_align

from ..centers import centers_for_run, check_provenance, load_centers
from ..distributed import all_reduce_sum, get_rank, get_world_size, global_count_mean
from ..domains import Bool, Integer, Interval, ListOf, OneOf, OrNone, Text
from ..dense.models import IGNORE_INDEX
from ..features import Features, TapSpec
from ._dense import DenseDistillationLoss, DenseFeatures, paired_levels, register_dense_loss
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


# ---- dense form (detection / segmentation) ---------------------------------------------------------------------


def box_embeddings(level: torch.Tensor, boxes: Sequence[torch.Tensor], stride: int) -> torch.Tensor:
    """One embedding per ground-truth box: RoIAlign of the box on a pyramid level to a single bin.

    Args:
        level: [B, C, H/s, W/s].
        boxes: per image [n_b, 4] xyxy in input pixels.
        stride: s.

    Returns:
        [Σ n_b, C]: the mean of bilinear samples on a regular grid in the box (``aligned=True``: a box covering
        whole cells samples exactly their centres, so its embedding is the mean of those cells).
    """
    rois = torch.cat([torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)])  # [R, 5]
    return roi_align(level, rois.to(level.dtype), output_size=1, spatial_scale=1 / stride, sampling_ratio=-1,
                     aligned=True).flatten(1)


def region_embeddings(level: torch.Tensor, masks: torch.Tensor, num_classes: int,
                      ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One embedding per (image, class): the level's features averaged over the class's pixels.

    Every image gets all K classes, a class absent from it with a zero embedding and ``present`` False: the number of
    regions is fixed (B·K), so no step waits for the device to count them.

    Args:
        level: [B, C, h, w] at stride s = H / h.
        masks: [B, H, W] int64 labels, ``ignore_index`` unlabelled.
        num_classes: K.
        ignore_index: the unlabelled value.

    Returns:
        (embeddings [B·K, C], labels [B·K], present [B·K] bool), regions in (image, class) order: each cell of the
        level weighted by the fraction of its s×s pixels that carry the class.
    """
    classes = torch.arange(num_classes, device=masks.device)
    labelled = (masks != ignore_index).unsqueeze(1)
    onehot = ((masks.unsqueeze(1) == classes.view(1, -1, 1, 1)) & labelled).to(level.dtype)          # [B, K, H, W]
    weights = F.adaptive_avg_pool2d(onehot, level.shape[-2:])                                           # [B, K, h, w]
    sums = torch.einsum('bkhw,bchw->bkc', weights, level)                                               # [B, K, C]
    mass = weights.sum(dim=(2, 3))                                                                      # [B, K]
    embeddings = sums / mass.clamp(min=torch.finfo(mass.dtype).tiny).unsqueeze(2)     # absent: 0 / tiny = 0
    return embeddings.flatten(0, 1), classes.repeat(len(masks)), (mass > 0).flatten()


@register_dense_loss('nd')
class DenseND(DenseDistillationLoss):
    """ND's direction term on pooled pyramid features: per object (detection) or per class region (segmentation).

    The paper's detection form (official ``Detection/model/rcnn.py``, ``utils.py::DirectNormLoss``) applies
    L_ND = 1 − ⟨s, c_y/‖c_y‖⟩ / max(‖s‖, ‖t‖) to the RoI embeddings of Faster R-CNN's box head, the teacher's class
    centres c averaged from its own RoI embeddings, summed over the RoIs and divided by their number. vitkd's FCOS has
    no RoI head, so the embedding of an object is its pyramid features pooled over its box (RoIAlign to one bin, as
    the box pooler; :func:`box_embeddings`), and in segmentation that of each class present in an image its features
    averaged over the class's pixels (:func:`region_embeddings`); the label y is the object's or region's class. On
    every shared level l (pairing by stride): s = A_l(pooled student), t = pooled teacher, c = C_l[y]; the loss is
    the mean over the regions of the whole global batch (each process's sum divided by the global count:
    :func:`vitkd.distributed.global_count_mean`), averaged over the levels.

    * Centres C_l [K, C_t]: the mean of the teacher's pooled embeddings of each class over the training set, without
      augmentation, computed before training by one teacher pass split across the processes (sums in float64);
      a buffer, saved with the checkpoints. A class that never occurs keeps a zero centre (no region carries it).
    * A_l: a learned Linear(C_s, C_t) when the widths differ (the classification adapter's BatchNorm would use
      per-process region statistics), else the identity as in the paper's detectors (same widths).
    * Regions are the ground-truth objects only: the paper's RoIs also include sampled background proposals (its 81st
      class), which FCOS does not have.
    * Weight: 1 unless given; the paper's detection configs (``configs/KD++/*.yaml``) use ND_WEIGHT 1.5
      (``--distill nd:1.5``).
    * No ND "++" base loss is added here: combine with ``fitnet``, ``vkd``, ``kd`` in ``--distill``.

    Args:
        levels: pyramid levels to use (``['s8', 's16']``); None = every level both models have.
    """
    paper = ND.paper

    def __init__(self, levels: Annotated[Optional[Sequence[str]], OrNone(ListOf(Text()))] = None):
        super().__init__()
        self.levels = None if levels is None else [str(k) for k in levels]
        self.adapters = nn.ModuleDict()
        self.matched: list[str] = []
        self.strides: dict[str, int] = {}
        self.num_classes = 0

    def setup(self, student: DenseFeatures, teacher: DenseFeatures, info) -> None:
        self.matched = paired_levels(student, teacher, self.levels, 'nd')
        self.adapters = nn.ModuleDict({k: nn.Linear(student.pyramid[k].shape[1], teacher.pyramid[k].shape[1])
                                       for k in self.matched
                                       if student.pyramid[k].shape[1] != teacher.pyramid[k].shape[1]})
        self.strides = {k: int(k[1:]) for k in self.matched}
        for k in self.matched:
            self.register_buffer(f'centers_{k}', torch.zeros(0, teacher.pyramid[k].shape[1],
                                                             device=teacher.pyramid[k].device))

    def ddp_ignored_buffers(self) -> set[str]:
        return {f'centers_{k}' for k in self.matched}  # identical on every rank (all-reduced sums)

    def centers(self, level: str) -> torch.Tensor:
        return getattr(self, f'centers_{level}')

    def _embeddings(self, level: str, features: torch.Tensor,
                    targets) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(pooled [R, C], labels [R], present [R] or None = all) of a level: boxes for a detector's targets, every
        (image, class) region for masks."""
        if isinstance(targets, torch.Tensor):
            return region_embeddings(features, targets, self.num_classes, IGNORE_INDEX)
        return (box_embeddings(features, [t['boxes'] for t in targets], self.strides[level]),
                torch.cat([t['labels'] for t in targets]), None)

    @torch.no_grad()
    def prepare_for_run(self, run: RunContext) -> None:
        """The teacher's class centres of every level: process p pools samples p, p + N, … of the training set."""
        if run.teacher is None or run.train_data is None:
            return
        self.num_classes = run.spec.num_classes
        device = next(run.teacher.model.parameters()).device
        world, rank = get_world_size(), get_rank()
        sums = {k: torch.zeros(self.num_classes, self.centers(k).shape[1], dtype=torch.float64, device=device)
                for k in self.matched}
        counts = torch.zeros(self.num_classes, dtype=torch.float64, device=device)
        mine = list(range(rank, len(run.train_data), world))
        step = max(1, run.cfg.batch_size)
        for start in range(0, len(mine), step):
            samples = [run.train_data[i] for i in mine[start:start + step]]
            images = torch.stack([s[0] for s in samples]).to(device)
            targets = (torch.stack([s[1] for s in samples]).to(device) if isinstance(samples[0][1], torch.Tensor)
                       else [{k: v.to(device) for k, v in s[1].items()} for s in samples])
            pyramid = run.teacher.model.forward_pyramid(run.teacher.prepare_input(images))
            for k in self.matched:  # the same regions, in the same order, at every level (absent ones add zeros)
                emb, labels, present = self._embeddings(k, pyramid[k].double(), targets)
                sums[k].index_add_(0, labels, emb)
            counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64) if present is None
                              else present.double())
        counts = all_reduce_sum(counts).clamp(min=1).unsqueeze(1)
        for k in self.matched:
            setattr(self, f'centers_{k}', (all_reduce_sum(sums[k]) / counts).to(self.centers(k).dtype))

    def forward(self, student: DenseFeatures, teacher: DenseFeatures, batch) -> dict[str, torch.Tensor]:
        if not self.num_classes:
            raise LossSpecError('nd needs the teacher\'s class centres, computed by the run before training')
        losses = []
        for k in self.matched:
            s, labels, present = self._embeddings(k, student.pyramid[k], batch.targets)  # [R, C_s], [R], [R]
            t, _, _ = self._embeddings(k, teacher.pyramid[k], batch.targets)               # [R, C_t]
            if k in self.adapters:
                s = self.adapters[k](s)                                                    # [R, C_t]
            c = self.centers(k).to(s.dtype)[labels]                                        # [R, C_t]
            if present is None:
                per_region, count = nd_per_sample(s, t, c), labels.new_full((), len(labels))
            else:  # an absent region computes on ones (finite, no gradient to the features) and counts zero
                keep, one = present.unsqueeze(1), s.new_ones(())
                s, t, c = (torch.where(keep, x, one) for x in (s, t, c))
                per_region, count = nd_per_sample(s, t, c) * present, present.sum()
            losses.append(global_count_mean(per_region.sum(), count))
        return {'nd': torch.stack(losses).mean()}


__all__ += ['box_embeddings', 'region_embeddings', 'DenseND']
