"""VkD: orthogonal projection of the student feature + task-specific normalisation of the teacher feature (``vkd``).

"VkD: Improving Knowledge Distillation using Orthogonal Projections", Roy Miles, Ismail Elezi, Jiankang Deng,
CVPR 2024 (arXiv 2403.06213). Official code: roymiles/VkD @ 6f8a5072447a1c5bb6043cdc035cf7b78d3854d8 (classification
code unchanged since 0c9cc5eb7dec9c771350b74b01e9ff6f26bf4c2c): ``train.py`` (student, teacher, projector,
optimiser), ``engine.py`` (``train_one_epoch``: the losses).

Formula (B local batch, D_s student width, D_t teacher width, K classes)::

    s̄ = mean_n P[:, n, :]                      # [B, D_s] final-normed patch tokens of the student, mean over N
    p = W s̄,  W ∈ R^{D_t×D_s}, WᵀW = I        # [B, D_t] orthogonal (isometric) projection, no bias
    t̂ = LN_{D_t}(t̄)                           # [B, D_t] teacher pooled pre-logits, standardised per sample
    L_repr = α · mean-SmoothL1_{β=1}(p, t̂)     # mean over B·D_t
    L_kd   = γ · T² · KL_batchmean(softmax(z_t/T) ‖ softmax(z_dist/T))
    L      = CE(z_cls, targets) + L_kd + L_repr  # the CE is the distiller's (task weight 1)

Defaults are the paper's (α = γ = 1, T = 1, LayerNorm (classification) normalisation, patch-token mean pooling, an
orthogonal projector) except the map that keeps the projector orthogonal: Cayley, not the paper's Householder (same
constraint, same loss for the same W, 2× the training speed on a GPU; see "Projector maps" below). The KL goes on
the distillation head; on a student without one it uses the only head (then the task CE and the KL share that head,
as in plain KD).

Options:

* ``projector``: the orthogonal kinds are ``torch.nn.utils.parametrizations.orthogonal`` on
  ``nn.Linear(D_s, D_t, bias=False)`` with trivialisation on (W = base · Q(X): X the trained ``original`` tensor,
  ``base`` a fixed orthogonal D_t×D_t completion of the initial W₀), differing only in the map X → Q:
  ``'orthogonal_cayley'`` (**default**, Cayley), ``'orthogonal'`` = ``'orthogonal_householder'`` (Householder,
  torch's default map for a non-square matrix: the official module and the paper's map; both names select it),
  ``'orthogonal_matrix_exp'`` (matrix exponential). The others: ``'linear'`` (plain ``nn.Linear(D_s, D_t)``, with
  bias), ``'mlp'`` (Linear(D_s, 2048) → ReLU → Linear(2048, D_t), with biases, the paper-era ``MLPProjector``
  shape).
  **D_s > D_t** (student wider than the teacher): a W with WᵀW = I does not exist; the orthogonal projectors then
  have orthonormal **rows** (W Wᵀ = I_{D_t}, a co-isometry: ‖W s‖ ≤ ‖s‖), which is what the torch parametrisation
  gives for a wide matrix. vitkd accepts this and logs a warning.
* ``normalization`` of the teacher vector (pure functions below): ``'layernorm'`` (default, classification),
  ``'batchnorm'``, ``'whiten'`` (batch ZCA whitening, the paper's choice for other tasks), ``'none'``.
* ``pool``: the student vector — ``'patch'`` (mean of the patch tokens, default), ``'all'`` (mean of all tokens
  including the cls/dist prefix), ``'cls'`` (the class token). On a CNN student ``'patch'`` is the spatial mean of the
  final feature map.
* ``student_block``: ``None`` taps the final-normed tokens; an int ``i`` taps block ``i``'s (un-normed) output from
  ``Features.blocks`` instead, pooled the same way.

Projector maps. The loss depends on W only, so every orthogonal map gives the same loss and the same gradients with
respect to the student for the same W (tested); the maps differ in how the trained tensor X parametrises W, hence in
the optimiser's path, and in cost. On an NVIDIA H200 (DeiT-S⚗ ← RegNetY-160, 224 px, bf16, batch 128, D_s = 384 →
D_t = 3024; ``python benchmarks/bench_gpu_step.py --compiled --out docs/bench/gpu/bench_gpu_step.json``, 2026-12-04)
the map takes 62 % of the training step with Householder (763 img/s), 58 % with the matrix exponential (837 img/s)
and 23 % with Cayley (1523 img/s), against 1997 img/s with a plain linear projector: torch's Householder product
applies the D_s reflectors one after another, forward and backward, and the exponential takes a scaling-and-squaring
series of D_t×D_t products, where torch's Cayley map is one D_t×D_t LU solve. Hence the Cayley default. (Those
figures are torch's Cayley map.) vitkd's projector computes the same W from a D_s×D_s solve instead
(:func:`cayley_frame`, :class:`CayleyOrthogonal`: the same tensors, initialisation and W as torch's map, and no host
read of the solve's error flag): forward + backward of the projector at D_s = 384, D_t = 3024, batch 128 takes 548 ms
against torch's 3385 ms on a 2-core CPU (4.7×; ``python benchmarks/bench_vkd_projector.py --rounds 3 --out
docs/bench/bench_vkd_projector.json``, 2026-12-07).

What torch's Cayley map computes for the tall W here (n = D_t > k = D_s): tril(X) [n, k] is padded with zeros to
X̃ [n, n] and A = X̃ − X̃ᵀ, a skew-symmetric matrix whose free entries are the strictly lower part of its first k
columns (n·k − k(k+1)/2 of them, the dimension of the manifold of n×k orthonormal frames); Q = (I − A/2)⁻¹(I + A/2)
(one ``torch.linalg.solve``) and W = base · Q[:, :k].

* Exact for every X: I − A/2 is invertible for every skew A (A's eigenvalues are imaginary), I − A/2 and I + A/2
  commute and are each other's transpose, so QᵀQ = I and WᵀW = I_k up to the fp32 rounding of the solve (tested:
  ‖WᵀW − I‖_F < 1e-5 after 20 AdamW steps). For a wide W (D_s > D_t) torch transposes, giving W Wᵀ = I.
* Not every orthonormal W is reachable. With U = baseᵀW = [U₁; U₂] (U₁ its top k×k block, = W₀ᵀW), the block rows
  of (I − A/2) Q = I + A/2 give U₁ = (I − M)⁻¹(I + M) with M = B/2 − CᵀC/4 (B the top k×k block of A, C its
  lower-left block), so I + U₁ = 2 (I − M)⁻¹ is always invertible; conversely every U with I + U₁ invertible is
  reached, by C = 2 U₂ (I + U₁)⁻¹ and the skew B = 2 (U₁ − I)(I + U₁)⁻¹ + CᵀC/2. The missed set, W₀ᵀW with an
  eigenvalue −1 (a student direction mapped exactly opposite to where W₀ mapped it), has measure zero and is
  approached only as X grows without bound; a projector trained from W₀ is restricted in no other way. Assigning
  ``projector.weight = W`` (torch's ``right_inverse``) re-anchors ``base`` at W, so any orthonormal W can be set.

Where vitkd differs from the official code:

* **The projector does not collapse.** The official optimiser decays the parametrisation's hidden
  ``original`` tensor; decoupled weight decay moves its −1 diagonal off −1, the Householder map reads it with
  ``.int()`` → 0, and W ≡ 0 after the first step (the representation loss becomes a constant with no gradient).
  With the Cayley or exponential map, decay would instead shrink A and pull W back to W₀. Here the projector's
  parametrisation tensors never receive weight decay (``Distiller.no_weight_decay`` excludes every
  ``.parametrizations.`` parameter; :meth:`VkD.no_weight_decay` lists them too), so W stays orthogonal and trains.
* **Independent terms.** α = 0 computes no representation term (no projector, no teacher pooled tap) and the
  KL still runs; γ = 0 computes no KL and the representation term still runs. The official step crashes when exactly
  one of them is 0. With γ = 0 nothing trains the distillation head, so the task CE then goes on the averaged heads
  (``uses_dist_head`` is ``γ > 0``) and no untrained head is evaluated.
* **The projector is never exported.** It lives in this loss (``distiller.losses.vkd.projector``), not in
  the student: the training checkpoint holds it (with its ``base`` buffer, needed to resume), the exported student
  does not, and it loads strictly without an allow-list.
* The paper's batch whitening for other tasks is not in the official classification code; ``'whiten'`` is vitkd's
  exact definition of it (see :func:`whiten`). ``'batchnorm'``, ``'linear'``, ``'mlp'`` and the Cayley/matrix-exp
  maps are vitkd options, not official; the default Cayley map (above) replaces the official Householder one.
  ``pool``/``student_block`` other than the defaults are vitkd extensions.
* Both terms are computed in fp32 with autocast off (the official code runs the projector matmul in fp16).
"""
from __future__ import annotations

import logging
from typing import Annotated, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal

from ..domains import Integer, ListOf, NonNegative, OneOf, OrNone, Positive, Text
from ..features import Features, TapError, TapSpec
from ._dense import DenseDistillationLoss, DenseFeatures, paired_levels, register_dense_loss
from .base import Batch, DistillationLoss, LossSpecError, RunInfo, pick_head, register_loss
from .functional import kl_div_logits

__all__ = ['VkD', 'layer_standardize', 'batch_standardize', 'whiten', 'normalize_teacher', 'vkd_representation_loss',
           'build_projector', 'cayley_frame', 'CayleyOrthogonal', 'pool_student', 'NORMALIZATIONS', 'PROJECTORS',
           'ORTHOGONAL_MAPS', 'DEFAULT_PROJECTOR', 'POOLS']

_logger = logging.getLogger(__name__)

NORMALIZATIONS = ('layernorm', 'batchnorm', 'whiten', 'none')
# the orthogonal kinds and torch's name of their map; 'orthogonal' (the official module's name) = Householder
ORTHOGONAL_MAPS = {'orthogonal_cayley': 'cayley', 'orthogonal': 'householder', 'orthogonal_householder': 'householder',
                   'orthogonal_matrix_exp': 'matrix_exp'}
PROJECTORS = (*ORTHOGONAL_MAPS, 'linear', 'mlp')
DEFAULT_PROJECTOR = 'orthogonal_cayley'  # exact like the paper's Householder map, 2× the step rate on a GPU
POOLS = ('patch', 'all', 'cls')
MLP_HIDDEN = 2048  # the paper-era MLPProjector's hidden width
EPS = 1e-5         # F.layer_norm's default, as the official code uses


# ---- task-specific normalisations of the teacher vector (pure functions) ---------------------------------------

def layer_standardize(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Per-sample standardisation over the features, no affine: (x − mean_d) / √(var_d + eps), biased variance.

    Args:
        x: [B, D].
        eps: added to the variance.

    Returns:
        [B, D] (= ``F.layer_norm(x, (D,), eps=eps)``).
    """
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def batch_standardize(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Per-feature standardisation over the batch, no affine: (x − mean_b) / √(var_b + eps), biased variance.

    Args:
        x: [B, D].
        eps: added to the variance.

    Returns:
        [B, D].
    """
    mean = x.mean(dim=0, keepdim=True)                         # [1, D]
    var = (x - mean).pow(2).mean(dim=0, keepdim=True)          # [1, D] biased
    return (x - mean) / torch.sqrt(var + eps)


def whiten(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Batch ZCA whitening.

    With X_c = x − mean_b(x) and the biased covariance Σ = X_cᵀX_c / B = U diag(λ) Uᵀ, the output is
    X_c U diag((λ + eps)^(−1/2)) Uᵀ: zero mean per feature and covariance U diag(λ / (λ + eps)) Uᵀ ≈ I when B > D.
    When B ≤ D, Σ has rank ≤ B − 1 and the output covariance is ≈ the orthogonal projector onto the batch's span.
    Computed through the thin SVD X_c = A diag(s) Vᵀ (exactly the same map, since X_c has no component outside
    span(V)): output = A diag(s / √(s²/B + eps)) Vᵀ, in float64, cost O(B·D·min(B, D)).

    Args:
        x: [B, D].
        eps: added to the covariance eigenvalues.

    Returns:
        [B, D], same dtype as ``x``.
    """
    b = x.shape[0]
    xc = (x - x.mean(dim=0, keepdim=True)).double()            # [B, D]
    a, s, vh = torch.linalg.svd(xc, full_matrices=False)       # [B, r], [r], [r, D]
    scale = s / torch.sqrt(s * s / b + eps)                    # [r]
    return ((a * scale) @ vh).to(x.dtype)


def normalize_teacher(x: torch.Tensor, normalization: str, eps: float = EPS) -> torch.Tensor:
    """Apply the task-specific normalisation ``normalization`` (one of :data:`NORMALIZATIONS`) to [B, D]."""
    if normalization == 'layernorm':
        return layer_standardize(x, eps)
    if normalization == 'batchnorm':
        return batch_standardize(x, eps)
    if normalization == 'whiten':
        return whiten(x, eps)
    if normalization == 'none':
        return x
    raise ValueError(f'normalization must be one of {NORMALIZATIONS}, got {normalization!r}')


def vkd_representation_loss(projected: torch.Tensor, teacher_pooled: torch.Tensor,
                            normalization: str = 'layernorm') -> torch.Tensor:
    """mean-SmoothL1_{β=1}(p, norm(t̄)) over all B·D_t elements.

    Args:
        projected: p = W s̄ [B, D_t].
        teacher_pooled: t̄ [B, D_t] (no gradient expected).
        normalization: the task-specific normalisation of t̄.

    Returns:
        Scalar.
    """
    target = normalize_teacher(teacher_pooled, normalization)  # [B, D_t]
    return F.smooth_l1_loss(projected, target, beta=1.0, reduction='mean')


# ---- projector and student pooling -----------------------------------------------------------------------------

def cayley_frame(original: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """W = base · Q[:, :k] with Q = (I − A/2)⁻¹(I + A/2), the Cayley map of torch's orthogonal parametrisation, from
    one k×k solve instead of an n×n one.

    torch pads tril(X) [n, k] (n ≥ k) with zeros to X̃ [n, n] and takes the skew A = X̃ − X̃ᵀ. Its blocks are
    A = [[B, −Cᵀ], [C, 0]] with B = L₁ − L₁ᵀ (k×k; L₁ the strictly lower part of X's top k rows: the diagonal cancels)
    and C = X[k:] ((n − k)×k). Solving (I − A/2) [P; R] = [I_k; 0] gives R = C P/2 and (I − B/2 + CᵀC/4) P = I_k, so

        Q[:, :k] = 2 (I − A/2)⁻¹ [I_k; 0] − [I_k; 0] = [2P − I; C P],   T = I − B/2 + CᵀC/4,   P = T⁻¹
        W = base[:, :k] (2P − I) + base[:, k:] C P = (2 base[:, :k] + base[:, k:] C) T⁻¹ − base[:, :k]

    T is invertible for every X (its symmetric part I + CᵀC/4 is ≥ I, so every singular value of T is ≥ 1): the solve
    skips LAPACK's error check, whose host read would stall a GPU step. Cost O(n²k) (the product with ``base``)
    against torch's O(n³) solve with n right-hand sides. A wide X (n < k) is transposed in and out, as torch does.

    Args:
        original: X [n, k] (or [k, n]), the trained tensor (torch's ``original``).
        base: [max, max] the fixed orthogonal completion of the initial W.

    Returns:
        W with X's shape, orthonormal columns (rows when wide).
    """
    transposed = original.shape[-2] < original.shape[-1]
    x = original.mT if transposed else original                       # [n, k], n ≥ k
    k = x.shape[-1]
    top, rest = x[:k].tril(-1), x[k:]                                 # L₁ [k, k], C [n − k, k]
    eye = torch.eye(k, dtype=x.dtype, device=x.device)
    t = eye - (top - top.mT) / 2 + rest.mT @ rest / 4                 # T [k, k]
    first, others = base[:, :k], base[:, k:]                          # [n, k], [n, n − k]
    w, _ = torch.linalg.solve_ex(t, 2 * first + others @ rest, left=False, check_errors=False)  # [n, k]
    w = w - first
    return w.mT if transposed else w


class CayleyOrthogonal(nn.Module):
    """vitkd's Cayley parametrisation W = :func:`cayley_frame` (original, base): torch's
    ``orthogonal(..., orthogonal_map='cayley', use_trivialization=True)`` with the same tensors (``original``,
    ``base``), the same initialisation (including its random completion of W₀) and the same W, computed from a k×k
    solve without a host read (see :func:`cayley_frame`)."""

    def __init__(self):
        super().__init__()
        self.register_buffer('base', None)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return cayley_frame(original, self.base)

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """Anchor ``base`` at ``weight`` (completed to an orthogonal matrix as torch does) and return torch's
        ``original`` for it, −I on the diagonal: the Cayley map ignores X's diagonal, so it gives W = ``weight``."""
        frame = weight.mT if weight.shape[-2] < weight.shape[-1] else weight   # [n, k], n ≥ k
        n, k = frame.shape
        if n == k:
            eye = torch.eye(k, dtype=frame.dtype, device=frame.device)
            is_orthogonal = torch.allclose(frame.mT @ frame, eye, atol=10.0 * n * torch.finfo(frame.dtype).eps)
            self.base = frame.clone() if is_orthogonal else _orthonormalize(frame)
        else:
            completion = torch.randn(n, n - k, dtype=frame.dtype, device=frame.device)
            self.base = _orthonormalize(torch.cat([frame, completion], dim=-1))
        original = torch.zeros_like(weight)
        original.diagonal().fill_(-1.0)
        return original


def _orthonormalize(matrix: torch.Tensor) -> torch.Tensor:
    """The Q factor of ``matrix`` = QR with diag(R) ≥ 0 (the columns' Gram–Schmidt orthonormalisation)."""
    reflectors, tau = torch.geqrf(matrix)
    return torch.linalg.householder_product(reflectors, tau) * reflectors.diagonal().sgn()[None, :]


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """Student → teacher projector [B, in_dim] → [B, out_dim] (see the module docstring for the kinds)."""
    if kind in ORTHOGONAL_MAPS:
        if in_dim > out_dim:
            _logger.warning('vkd: student width %d > teacher width %d: no W with WᵀW = I exists; the orthogonal '
                            'projector has orthonormal rows instead (W Wᵀ = I, it does not preserve norms)',
                            in_dim, out_dim)
        linear = nn.Linear(in_dim, out_dim, bias=False)
        if ORTHOGONAL_MAPS[kind] == 'cayley':
            return parametrize.register_parametrization(linear, 'weight', CayleyOrthogonal(), unsafe=True)
        return orthogonal(linear, orthogonal_map=ORTHOGONAL_MAPS[kind], use_trivialization=True)
    if kind == 'linear':
        return nn.Linear(in_dim, out_dim)
    if kind == 'mlp':
        return nn.Sequential(nn.Linear(in_dim, MLP_HIDDEN), nn.ReLU(inplace=True), nn.Linear(MLP_HIDDEN, out_dim))
    raise ValueError(f'projector must be one of {PROJECTORS}, got {kind!r}')


def pool_student(student: Features, pool: str = 'patch', block: Optional[int] = None) -> torch.Tensor:
    """The student vector s̄ [B, D_s].

    Args:
        student: student features with ``tokens`` (``block is None``) or ``blocks=(block,)`` tapped.
        pool: ``'patch'`` mean of the patch tokens (spatial mean of a CNN map), ``'all'`` mean of prefix + patch
            tokens, ``'cls'`` the class token.
        block: None = the final-normed tokens; i = block i's output grid (+ its prefix tokens).
    """
    if block is None:
        patches = student.patch_tokens                         # [B, N, D] or None (CNN)
        prefix = None
        if patches is None:
            if student.final_map is None:
                raise TapError('vkd: the student has neither patch tokens nor a final feature map')
            patches = student.final_map.flatten(2).transpose(1, 2)  # [B, H·W, C]
        else:
            tokens = [t for t in (student.cls_token, student.dist_token) if t is not None]
            prefix = torch.stack(tokens, dim=1) if tokens else None  # [B, P, D]
    else:
        patches = student.block(block).flatten(2).transpose(1, 2)     # [B, N, D]
        prefix = student.block_prefix.get(block % student.num_blocks if student.num_blocks else block)
    if pool == 'patch':
        return patches.mean(dim=1)
    if prefix is None:
        raise TapError(f'vkd: pool={pool!r} needs prefix (class) tokens, which this student tap has none of; '
                       "use pool='patch'")
    if pool == 'cls':
        return prefix[:, 0]
    return torch.cat([prefix, patches], dim=1).mean(dim=1)     # 'all'


# ---- the registered loss ---------------------------------------------------------------------------------------

@register_loss('vkd')
class VkD(DistillationLoss):
    """VkD: α·SmoothL1(W s̄, norm(t̄)) with an orthogonal W, plus γ·T²·KL on the distillation head.

    Args:
        alpha: weight of the representation term (0 = not computed, no projector).
        gamma: weight of the logit term (0 = not computed).
        temperature: T of the KL term.
        projector: one of :data:`PROJECTORS` (default :data:`DEFAULT_PROJECTOR`, the Cayley map).
        normalization: one of :data:`NORMALIZATIONS` (teacher side only; the student side is never normalised).
        pool: one of :data:`POOLS`.
        student_block: None (final-normed tokens) or the student block whose output is pooled.
    """
    paper = 'VkD, Miles, Elezi, Deng, CVPR 2024, arXiv:2403.06213'

    def __init__(self, alpha: Annotated[float, NonNegative()] = 1.0, gamma: Annotated[float, NonNegative()] = 1.0,
                 temperature: Annotated[float, Positive()] = 1.0,
                 projector: Annotated[str, OneOf(*PROJECTORS)] = DEFAULT_PROJECTOR,
                 normalization: Annotated[str, OneOf(*NORMALIZATIONS)] = 'layernorm',
                 pool: Annotated[str, OneOf(*POOLS)] = 'patch',
                 student_block: Annotated[Optional[int], OrNone(Integer())] = None):
        super().__init__()
        if alpha == 0 and gamma == 0:
            raise LossSpecError('vkd with alpha = gamma = 0 computes nothing; use --distill none')
        self.alpha, self.gamma, self.temperature = float(alpha), float(gamma), float(temperature)
        self.projector_kind = projector
        self.normalization, self.pool, self.student_block = normalization, pool, student_block
        self.uses_dist_head = self.gamma > 0
        self.projector: Optional[nn.Module] = None
        repr_on = self.alpha > 0
        self.student_taps = TapSpec(logits=True, tokens=repr_on and student_block is None,
                                    blocks=(student_block,) if repr_on and student_block is not None else ())
        self.teacher_taps = TapSpec(logits=self.gamma > 0, pooled=repr_on)

    def options(self) -> dict:
        opts = super().options()
        opts['projector'] = self.projector_kind
        return opts

    def setup(self, student: Features, teacher: Features, info: RunInfo) -> None:
        """Build the projector D_s → D_t from the example features' widths."""
        if self.alpha == 0:
            return
        if teacher.pooled is None:
            raise LossSpecError('vkd: the teacher gave no pooled feature')
        s = pool_student(student, self.pool, self.student_block)   # [2, D_s]
        in_dim, out_dim = s.shape[-1], teacher.pooled.shape[-1]
        device = s.device
        self.projector = build_projector(self.projector_kind, in_dim, out_dim).to(device)
        _logger.info('vkd: %s projector %d -> %d (%d parameters)', self.projector_kind, in_dim, out_dim,
                     sum(p.numel() for p in self.projector.parameters()))

    def no_weight_decay(self) -> set[str]:
        """The projector's parametrisation tensors (decaying the Householder ``original`` zeroes W)."""
        return {n for n, _ in self.named_parameters() if '.parametrizations.' in n}

    def forward(self, student: Features, teacher: Features, batch: Batch) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        if self.alpha > 0:
            if self.projector is None:
                raise RuntimeError('vkd: setup() was not called (the projector is built from example features)')
            s = pool_student(student, self.pool, self.student_block)   # [B, D_s]
            p = self.projector(s)                                      # [B, D_t]
            terms['repr'] = self.alpha * vkd_representation_loss(p, teacher.pooled, self.normalization)
        if self.gamma > 0:
            z_s = pick_head(student, 'dist')                           # [B, K] z_dist (the only head otherwise)
            terms['kl'] = self.gamma * kl_div_logits(z_s, teacher.logits, self.temperature, 'batchmean')
        return terms


# ---- dense form (detection / segmentation) ---------------------------------------------------------------------


def vkd_dense_level_loss(student_map: torch.Tensor, teacher_map: torch.Tensor, projector: nn.Module,
                         normalization: str = 'layernorm') -> torch.Tensor:
    """VkD's representation loss on one pyramid level, every pixel a sample.

    The C_s-vector of each student pixel is projected by W (WᵀW = I) and compared with the task-normalised C_t-vector
    of the teacher's pixel at the same place: :func:`vkd_representation_loss` on the B·H·W rows. With ``layernorm``
    each teacher pixel is standardised over its channels (the per-sample standardisation of classification, per
    pixel); ``batchnorm`` standardises each channel over the B·H·W pixels.

    Args:
        student_map: F_s [B, C_s, H, W].
        teacher_map: F_t [B, C_t, H, W] (no gradient expected).
        projector: [N, C_s] → [N, C_t].
        normalization: one of :data:`NORMALIZATIONS`.

    Returns:
        mean-SmoothL1_{β=1} over the B·H·W·C_t elements.
    """
    student_rows = student_map.permute(0, 2, 3, 1).reshape(-1, student_map.shape[1])  # [B·H·W, C_s]
    teacher_rows = teacher_map.permute(0, 2, 3, 1).reshape(-1, teacher_map.shape[1])  # [B·H·W, C_t]
    return vkd_representation_loss(projector(student_rows), teacher_rows.detach(), normalization)


@register_dense_loss('vkd')
class DenseVkD(DenseDistillationLoss):
    """VkD's orthogonal projection + teacher normalisation on every shared pyramid level (mean over the levels).

    Dense form (vitkd adaptation): one projector per level (each level is a different feature space), pixels as the
    samples of the classification formula, the level losses averaged so each level counts once. The logit term of
    classification VkD has no dense counterpart here: combine with ``kd`` for segmentation.

    Args:
        alpha: weight of the representation term.
        projector: one of :data:`PROJECTORS`.
        normalization: one of :data:`NORMALIZATIONS` (teacher side, per pixel for ``layernorm``).
        levels: pyramid levels to match; None = every level both models have.
    """
    paper = VkD.paper

    def __init__(self, alpha: Annotated[float, Positive()] = 1.0,
                 projector: Annotated[str, OneOf(*PROJECTORS)] = DEFAULT_PROJECTOR,
                 normalization: Annotated[str, OneOf(*NORMALIZATIONS)] = 'layernorm',
                 levels: Annotated[Optional[Sequence[str]], OrNone(ListOf(Text()))] = None):
        super().__init__()
        self.alpha, self.projector_kind, self.normalization = float(alpha), projector, normalization
        self.levels = None if levels is None else [str(k) for k in levels]
        self.projectors = nn.ModuleDict()

    def options(self) -> dict:
        opts = super().options()
        opts['projector'] = self.projector_kind
        return opts

    def setup(self, student: DenseFeatures, teacher: DenseFeatures, info) -> None:
        """One projector C_s → C_t per matched level."""
        matched = paired_levels(student, teacher, self.levels, 'vkd')
        self.projectors = nn.ModuleDict({k: build_projector(self.projector_kind, student.pyramid[k].shape[1],
                                                            teacher.pyramid[k].shape[1]) for k in matched})

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if '.parametrizations.' in n}

    def forward(self, student: DenseFeatures, teacher: DenseFeatures, batch) -> dict[str, torch.Tensor]:
        losses = [vkd_dense_level_loss(student.pyramid[k], teacher.pyramid[k], projector, self.normalization)
                  for k, projector in self.projectors.items()]
        return {'repr': self.alpha * torch.stack(losses).mean()}


__all__ += ['vkd_dense_level_loss', 'DenseVkD']
