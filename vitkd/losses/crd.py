"""CRD: contrastive representation distillation with momentum memory banks (``crd``).

"Contrastive Representation Distillation", Yonglong Tian, Dilip Krishnan, Phillip Isola, ICLR 2020
(arXiv 1910.10699). Official code: HobbitLong/RepDistiller @ b84f547 (``crd/criterion.py``: ``CRDLoss``, ``Embed``,
``Normalize``, ``ContrastLoss``; ``crd/memory.py``: ``ContrastMemory``); same maths in megvii-research/mdistiller
@ a08d46f ``mdistiller/distillers/CRD.py`` and OSVAI/NORM ``crd/``.

With f_s [B, D_s] (student pooled pre-logits), f_t [B, D_t] (teacher pooled pre-logits), d = ``feat_dim``,
K = ``nce_k`` negatives, τ = ``nce_t``, μ = ``nce_m``, N = training-set size, J [B, K+1] the contrast indices
(column 0 the positive = the sample's own index, then K negatives of other classes):

    v_s = l2n(W_s f_s + b_s),  v_t = l2n(W_t f_t + b_t)                  [B, d]  (l2n without eps; both heads train)
    P_s[b, k] = exp(⟨M_t[J_bk], v_s,b⟩/τ) / Z_s    (student anchor vs the teacher bank M_t [N, d])
    P_t[b, k] = exp(⟨M_s[J_bk], v_t,b⟩/τ) / Z_t    (teacher anchor vs the student bank M_s [N, d]); bank rows detached
    Z = N · mean_{b,k} exp(·/τ) on the first batch, constant afterwards (buffers ``z_s``/``z_t``, in the state dict)
    L(P) = −(1/B) Σ_b [log(P_b0/(P_b0 + c + ε)) + Σ_{k≥1} log(c/(P_bk + c + ε))],  c = K/N, ε = 1e-7
    L_CRD = L(P_s) + L(P_t)
    then, without gradient: M[y] ← l2n(μ·M[y] + (1−μ)·v) for both banks at the batch indices y (pre-update rows
    were used for scoring).

Banks are initialised U(−a, a), a = 1/√(d/3). Everything runs in at least fp32 (exp(·/0.07) overflows fp16).

Distributed design (the official banks are not distribution-safe: under DDP rank 0's banks overwrite the other
ranks' updates at every step). The banks, Z and the label table are buffers of this loss, kept identical on every
rank by the loss itself: rank 0's banks are broadcast once at the first step (ranks are seeded differently),
each rank scores its local batch against the pre-update banks, then (index, v_s, v_t) are all-gathered in rank-major
order, deduplicated (the **last** occurrence of an index in rank-major order wins) and the same
momentum update is applied on every rank; Z is N times the all-reduced mean of the first step's scores. The
distiller is DDP-wrapped with ``broadcast_buffers=True`` (Accelerate's default), which would broadcast rank 0's
buffers — 1.22 GiB on ImageNet — at every forward: harmless for correctness here (the ranks are identical) but
costly, so :meth:`CRD.ddp_ignored_buffers` puts these buffers on DDP's ignore list (the distiller registers it).

ViT students (``vit_student_weight`` = 0.01): the paper's CNN-tuned weight overwhelms a ViT student's task loss. On the
table's ViT student (``scripts/reproduce.py``, 150 steps, avg-head top-1 gain over the no-teacher student) weight 1
gave −16.0 points (3 seeds), 0.1 gave −0.6 and 0.01 −0.3 (seed 0), so a ViT student gets weight 0.01 unless the
command gives one (``crd:1`` = the paper's).

Where vitkd differs from the official code:

* Negatives are rejection-sampled on the device: uniform draws in [0, N), redrawn while the draw has the
  anchor's class or is the positive itself — the distribution of the official ImageNet sampler (uniform over
  other-class samples, with replacement), without its 4.8 GiB per-class index lists; the official draws themselves
  are not reproduced. The class of every sample comes from ``info.train_labels`` when the run provides it (every
  data set with labels): the samples are then grouped by class once, in ``setup`` (non-persistent buffers
  ``class_order``/``class_starts``/``class_sizes``, 8 B per sample), and a step never sorts the N labels; otherwise
  the table (buffer ``sample_labels``) is filled from the batches as they arrive and grouped again at every step, so
  during the first epoch a not-yet-seen sample of the anchor's class can be drawn as a negative (from the second
  epoch on the distribution is exact). A dataset-provided contrast-index mode is available in the pure function
  (:func:`crd_loss` takes any J), not in the loss class (the batch carries no contrast indices).
* Bank updates are deduplicated (``index_copy_`` with duplicates is undefined on CUDA, and repeated augmentation
  guarantees duplicates): every position writes the value of its index's last occurrence (found with a sort of the
  global batch, no ``unique`` or boolean selection, whose sizes the host would wait for on a GPU), so duplicate writes
  agree. Banks in fp32 take 2 × N × d × 4 B per GPU (1.22 GiB on ImageNet with d = 128); the update also keeps a
  bf16 bank (computed in fp32, stored rounded), which the scores read at the anchor's precision.
* Multi-process correctness as above; Z and the banks are checkpointed (the official code saves the
  student only).
* Under mixup/cutmix (DeiT recipe) the positive, the class excluded from the negatives and the bank row updated are
  those of the dominant image: index/labels when λ ≥ 0.5, else their flips. Parity runs disable mixup.
* ``relax`` positives and ``percent`` sub-sampling (CIFAR-only options) are not implemented.
* The loss is a 0-d tensor (the official one has shape (1,)).
"""
from __future__ import annotations

import logging
import math

from typing import Annotated

import torch
import torch.nn as nn

from .. import distributed as vdist
from ..domains import Integer, Interval, OneOf, Positive
from ..features import Features, TapSpec
from .base import Batch, DistillationLoss, LossSpecError, RunInfo, register_loss

__all__ = ['l2_normalize', 'contrast_scores', 'nce_loss', 'crd_loss', 'last_occurrence', 'momentum_update',
           'group_by_class', 'sample_negatives', 'CRD']

_logger = logging.getLogger(__name__)

NCE_EPS = 1e-7
STUDENT_FEATURES = ('pooled', 'cls', 'dist')
BANK_DTYPES = ('float32', 'bfloat16')


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x/‖x‖₂ over the last dimension, no eps (official ``Normalize``)."""
    return x / x.pow(2).sum(dim=-1, keepdim=True).sqrt()


def contrast_scores(anchor: torch.Tensor, memory: torch.Tensor, contrast_idx: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """Unnormalised scores exp(⟨memory[J_bk], anchor_b⟩/τ).

    Args:
        anchor: [B, d].
        memory: the other network's bank [N, d] (read without gradient).
        contrast_idx: J [B, K+1], column 0 the positive.
        temperature: τ.

    Returns:
        [B, K+1].
    """
    rows = memory.detach()[contrast_idx].to(anchor.dtype)  # [B, K+1, d] (a low-precision bank is read at the anchor's)
    return torch.exp(torch.einsum('bkd,bd->bk', rows, anchor) / temperature)


def nce_loss(probs: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Eq. 18 of the paper: −(1/B) Σ_b [log(P_b0/(P_b0 + c + ε)) + Σ_{k≥1} log(c/(P_bk + c + ε))], c = K/N.

    Args:
        probs: P [B, K+1] (scores divided by Z), column 0 the positive.
        num_samples: N.
    """
    c = (probs.shape[1] - 1) / num_samples
    log_pos = torch.log(probs[:, 0] / (probs[:, 0] + c + NCE_EPS))  # [B]
    log_neg = torch.log(c / (probs[:, 1:] + c + NCE_EPS))  # [B, K]
    return -(log_pos.sum() + log_neg.sum()) / probs.shape[0]


def crd_loss(v_s: torch.Tensor, v_t: torch.Tensor, memory_s: torch.Tensor, memory_t: torch.Tensor,
             contrast_idx: torch.Tensor, z_s: float | torch.Tensor, z_t: float | torch.Tensor, temperature: float,
             num_samples: int) -> torch.Tensor:
    """L_CRD = L(P_s) + L(P_t) with P_s = scores(v_s vs M_t)/Z_s and P_t = scores(v_t vs M_s)/Z_t.

    Args:
        v_s, v_t: normalised embeddings [B, d].
        memory_s, memory_t: student / teacher banks [N, d].
        contrast_idx: J [B, K+1] (any indices: also the dataset-provided parity mode).
        z_s, z_t: the normalisation constants.
        temperature: τ.
        num_samples: N.
    """
    p_s = contrast_scores(v_s, memory_t, contrast_idx, temperature) / z_s
    p_t = contrast_scores(v_t, memory_s, contrast_idx, temperature) / z_t
    return nce_loss(p_s, num_samples) + nce_loss(p_t, num_samples)


def last_occurrence(index: torch.Tensor) -> torch.Tensor:
    """For each position m of ``index`` [M], the position of the last occurrence of ``index[m]``: a stable sort and a
    segment maximum over the runs of equal values (no ``unique``, whose output size the host would wait for on a GPU).

    Returns:
        [M] positions.
    """
    m = index.numel()
    sorted_values, order = torch.sort(index, stable=True)                 # [M]
    run = torch.ones(m, dtype=torch.long, device=index.device)
    run[1:] = (sorted_values[1:] != sorted_values[:-1]).long()
    run = run.cumsum(0) - 1                                               # [M] run number of each sorted position
    last = torch.zeros(m, dtype=torch.long, device=index.device).scatter_reduce(0, run, order, reduce='amax')
    return torch.empty_like(order).scatter_(0, order, last[run])          # back to the input positions


@torch.no_grad()
def momentum_update(memory: torch.Tensor, index: torch.Tensor, v: torch.Tensor, momentum: float) -> None:
    """M[y] ← l2n(μ·M[y] + (1−μ)·v) in place; for an index present several times the last occurrence wins. A
    non-finite embedding never enters the bank (its row keeps its value), so a step that ``--nan-policy skip`` drops
    cannot poison later steps through the banks, which are too large to roll back.

    Every position writes its row: duplicates write the same value (their last occurrence's), a row whose last
    occurrence is non-finite writes its old value back, so the result does not depend on the order of the writes and
    no data-dependent selection (a host wait on a GPU) is needed. The arithmetic is done in at least fp32 and stored in
    the bank's dtype.
    """
    last = last_occurrence(index)                                         # [M]
    update = v[last]                                                      # [M, d]
    old = memory[index]                                                   # [M, d]
    compute = torch.promote_types(memory.dtype, torch.float32)
    new = l2_normalize(momentum * old.to(compute) + (1 - momentum) * update.to(compute)).to(memory.dtype)
    memory.index_copy_(0, index, torch.where(torch.isfinite(update).all(dim=-1, keepdim=True), new, old))


def group_by_class(block: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The samples ordered by block (class + 1; 0 = unknown), with each block's first position and size.

    Args:
        block: [N] block of every sample, in [0, num_blocks).
        num_blocks: an upper bound on the number of blocks.

    Returns:
        (order [N] sample indices grouped by block, starts [num_blocks], sizes [num_blocks]).
    """
    sizes = torch.zeros(num_blocks, dtype=torch.long, device=block.device).scatter_add_(0, block,
                                                                                         torch.ones_like(block))
    return torch.argsort(block, stable=True), sizes.cumsum(0) - sizes, sizes


def sample_negatives(positive: torch.Tensor, labels: torch.Tensor, sample_labels: torch.Tensor, k: int,
                     generator: torch.Generator | None = None,
                     grouping: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """K negatives per anchor, uniform over the samples of other classes, with replacement, on the device.

    Drawn directly from the other classes (no rejection loop, so no host read of how many draws to redo): the samples
    are ordered by class (:func:`group_by_class`), anchor b with class y picks r uniform in [0, N − n_y) and takes the
    r-th sample of the order with class y's block cut out. The positives are counted in their anchors' classes, so they
    are excluded with them.

    Args:
        positive: the anchors' dataset indices [B].
        labels: the anchors' classes [B] (≥ 0).
        sample_labels: the class of every training sample [N] (−1 = unknown: a class of its own, always accepted).
        k: K.
        generator: optional RNG (on the device of ``positive``).
        grouping: :func:`group_by_class` of ``sample_labels + 1`` when every class is known (the positives are then in
            their anchors' classes already): an ImageNet-size table is sorted once, not at every step. None: grouped
            here, with the positives moved to their anchors' classes.

    Returns:
        [B, K] indices, never of the anchor's class and never the positive itself.
    """
    device = positive.device
    own = labels.long()[:, None] + 1                                      # [B, 1]
    if grouping is None:
        block = (sample_labels.long() + 1).index_put((positive.long(),), own[:, 0])  # [N] 0 unknown, c + 1 class c
        # ≥ the number of classes + 1 without reading the largest label
        grouping = group_by_class(block, block.numel() + 1)
    order, starts, sizes = grouping
    own_start, own_size = starts[own], sizes[own]
    others = order.numel() - own_size                                     # [B, 1] samples of other classes
    u = torch.rand(positive.numel(), k, dtype=torch.float64, device=device, generator=generator)  # 53-bit uniform
    r = torch.minimum((u * others).long(), others - 1)                    # [B, K] uniform in [0, others)
    return order[torch.where(r < own_start, r, r + own_size)]


@register_loss('crd')
class CRD(DistillationLoss):
    """Contrastive representation distillation (NCE against momentum memory banks of both networks)."""
    paper = 'CRD: Contrastive Representation Distillation, Tian, Krishnan, Isola, ICLR 2020, arXiv:1910.10699'
    vit_student_weight = 0.01
    labels_given = False  # setup got info.train_labels: the class grouping is fixed (built there)

    def __init__(self, feat_dim: Annotated[int, Integer(lo=1)] = 128, nce_k: Annotated[int, Integer(lo=1)] = 16384,
                 nce_t: Annotated[float, Positive()] = 0.07,
                 nce_m: Annotated[float, Interval(0, 1, hi_open=True)] = 0.5,
                 student_feature: Annotated[str, OneOf(*STUDENT_FEATURES)] = 'pooled',
                 bank_dtype: Annotated[str, OneOf(*BANK_DTYPES)] = 'float32'):
        """
        Args:
            feat_dim: d, the embedding width.
            nce_k: K, negatives per anchor.
            nce_t: τ.
            nce_m: μ, momentum of the bank update.
            student_feature: ``pooled`` (``forward_head(pre_logits=True)``: (h_cls + h_dist)/2 on a distilled DeiT,
                the global pool on a CNN), ``cls`` or ``dist`` (that token after the final norm, ViTs).
            bank_dtype: storage of the two banks: ``float32`` (the official precision, 2·N·d·4 B per GPU) or
                ``bfloat16`` (half of it: updated in fp32 and rounded once, read at the anchor's precision).
        """
        super().__init__()
        self.feat_dim, self.nce_k, self.nce_t, self.nce_m = feat_dim, nce_k, nce_t, nce_m
        self.student_feature, self.bank_dtype = student_feature, bank_dtype
        self.num_samples = 0
        self.embed_s: nn.Module | None = None
        self.embed_t: nn.Module | None = None
        self._synced = False  # banks broadcast from rank 0 once (ranks are seeded differently)
        self._z_set = False   # Z known to be set (a checkpoint restores it; the first step sets it otherwise)
        self.student_taps = TapSpec(pooled=True) if student_feature == 'pooled' else TapSpec(tokens=True)
        self.teacher_taps = TapSpec(pooled=True)

    def ddp_ignored_buffers(self) -> set[str]:
        return {'memory_s', 'memory_t', 'z_s', 'z_t', 'sample_labels'}

    def _student_vector(self, student: Features) -> torch.Tensor:
        vec = {'pooled': student.pooled, 'cls': student.cls_token, 'dist': student.dist_token}[self.student_feature]
        if vec is None:
            raise LossSpecError(f'loss \'crd\': the student has no {self.student_feature!r} feature')
        return vec.flatten(1)

    def setup(self, student: Features, teacher: Features, info: RunInfo) -> None:
        if info.num_samples < 2:
            raise LossSpecError('loss \'crd\' needs the training-set size (info.num_samples) for its memory banks')
        f_s, f_t = self._student_vector(student), teacher.pooled.flatten(1)
        device = f_s.device
        self.num_samples = n = info.num_samples
        self.embed_s = nn.Linear(f_s.shape[1], self.feat_dim).to(device)
        self.embed_t = nn.Linear(f_t.shape[1], self.feat_dim).to(device)
        bound = 1.0 / math.sqrt(self.feat_dim / 3)  # E‖m‖² = 1
        dtype = getattr(torch, self.bank_dtype)
        for name in ('memory_s', 'memory_t'):  # drawn in fp32 (the same numbers for either dtype), stored as asked
            self.register_buffer(name, (torch.rand(n, self.feat_dim, device=device) * 2 * bound - bound).to(dtype))
        self.register_buffer('z_s', torch.tensor(-1.0, device=device))  # < 0: not set yet
        self.register_buffer('z_t', torch.tensor(-1.0, device=device))
        labels = getattr(info, 'train_labels', None)
        table = torch.full((n,), -1, dtype=torch.long) if labels is None else torch.as_tensor(labels).long().clone()
        if table.shape != (n,):
            raise LossSpecError(f'loss \'crd\': info.train_labels has shape {tuple(table.shape)}, expected ({n},)')
        self.register_buffer('sample_labels', table.to(device))
        # every class known: the samples are grouped by class once (an ImageNet table is not sorted at every step)
        self.labels_given = labels is not None
        if self.labels_given:
            order, starts, sizes = group_by_class(table.to(device) + 1, int(table.max()) + 2)
            for name, value in (('class_order', order), ('class_starts', starts), ('class_sizes', sizes)):
                self.register_buffer(name, value, persistent=False)
        _logger.info('CRD: banks 2 × %d × %d %s (%.2f GiB), %d negatives, τ %g, μ %g%s', n, self.feat_dim,
                     self.bank_dtype, 2 * n * self.feat_dim * dtype.itemsize / 2 ** 30, self.nce_k, self.nce_t, self.nce_m,
                     '' if labels is not None else '; sample classes learnt from the batches (first epoch: '
                     'unseen same-class samples can be drawn as negatives)')

    def _anchor(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, label) of each sample's dominant image under batch mixup (λ ≥ 0.5: itself, else its partner)."""
        if batch.index is None:
            raise LossSpecError('loss \'crd\' needs the dataset indices of the batch (batch.index)')
        if batch.lam >= 0.5:
            return batch.index, batch.labels
        return batch.index.flip(0), batch.labels_b

    @torch.no_grad()
    def _sync_state(self, batch: Batch) -> None:
        if not self._synced:
            vdist.broadcast_(self.memory_s)
            vdist.broadcast_(self.memory_t)
            self._synced = True
        if self.labels_given:
            return
        index = vdist.all_gather_no_grad(batch.index.to(self.sample_labels.device).long(), equal_sizes=True)
        labels = vdist.all_gather_no_grad(batch.labels.to(self.sample_labels.device).long(), equal_sizes=True)
        self.sample_labels[index] = labels  # the true (unmixed) class of every image of the global batch

    @torch.no_grad()
    def _set_z(self, v_s: torch.Tensor, v_t: torch.Tensor, contrast: torch.Tensor) -> None:
        """Z = N · mean of the first step's scores over every rank's batch (then constant)."""
        for z, anchor, memory in ((self.z_s, v_s, self.memory_t), (self.z_t, v_t, self.memory_s)):
            scores = contrast_scores(anchor, memory, contrast, self.nce_t)
            total = vdist.all_reduce_sum(torch.stack([scores.sum(), scores.new_full((), scores.numel())]))
            z.fill_(float(total[0] / total[1]) * self.num_samples)

    @torch.no_grad()
    def update_banks(self, index: torch.Tensor, v_s: torch.Tensor, v_t: torch.Tensor) -> None:
        """All-gather (index, v_s, v_t) and apply the same deduplicated momentum update on every rank."""
        index = vdist.all_gather_no_grad(index.long(), equal_sizes=True)  # training batches: as large on every rank
        momentum_update(self.memory_s, index, vdist.all_gather_no_grad(v_s, equal_sizes=True), self.nce_m)
        momentum_update(self.memory_t, index, vdist.all_gather_no_grad(v_t, equal_sizes=True), self.nce_m)

    def sample_contrast(self, index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """J [B, K+1]: the positive (own index) then K negatives of other classes."""
        grouping = (self.class_order, self.class_starts, self.class_sizes) if self.labels_given else None
        negatives = sample_negatives(index, labels, self.sample_labels, self.nce_k, grouping=grouping)
        return torch.cat([index[:, None], negatives], dim=1)

    def forward(self, student: Features, teacher: Features, batch: Batch) -> dict[str, torch.Tensor]:
        v_s = l2_normalize(self.embed_s(self._student_vector(student)))  # [B, d]
        v_t = l2_normalize(self.embed_t(teacher.pooled.flatten(1).detach()))  # [B, d]
        index, labels = self._anchor(batch)
        index, labels = index.to(v_s.device).long(), labels.to(v_s.device).long()
        if self.training:
            self._sync_state(batch)
        contrast = self.sample_contrast(index, labels)  # [B, K+1]
        if not self._z_set:  # read once per process (Z is constant after the first step): no host read per step
            if bool((self.z_s < 0) | (self.z_t < 0)):
                self._set_z(v_s, v_t, contrast)
            self._z_set = True
        loss = crd_loss(v_s, v_t, self.memory_s, self.memory_t, contrast, self.z_s, self.z_t, self.nce_t,
                        self.num_samples)
        if self.training:
            self.update_banks(index, v_s.detach(), v_t.detach())
        return {'crd': loss}
