"""VkD (``vitkd/losses/vkd.py``): math against independent computations, normalisation properties, orthogonality of
the projector through real optimizer steps (no weight decay on its parametrisation), the default Cayley map against
the paper's Householder map (same loss for the same W), independent terms, export without the projector.

Tiny models only: VkD student 32 px / 2 blocks / width 48, random regnety_002 teacher (pooled width 368).
"""
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.parametrizations import orthogonal

import vitkd  # noqa: F401  (registers students and losses)
from vitkd.build import build_losses, build_optimizer
from vitkd.config import Config
from vitkd.distiller import Distiller, LossEntry
from vitkd.errors import UsageError
from vitkd.features import Features, TapSpec, extract
from vitkd.losses import Batch, RunInfo, create_loss
from vitkd.losses.vkd import (DEFAULT_PROJECTOR, ORTHOGONAL_MAPS, PROJECTORS, CayleyOrthogonal, batch_standardize,
                              build_projector, cayley_frame, layer_standardize, normalize_teacher, pool_student,
                              vkd_representation_loss, whiten)
from vitkd.models import create_student, create_teacher

torch.set_num_threads(2)

TINY = dict(img_size=32, patch_size=4, depth=2, embed_dim=48, num_heads=2)
INFO = RunInfo(num_classes=10, input_size=(3, 32, 32))


# ---- independent reference computations (numpy, explicit loops) ----------------------------------------------

def np_huber_mean(a: np.ndarray, b: np.ndarray, beta: float = 1.0) -> float:
    total, count = 0.0, 0
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            d = abs(float(a[i, j]) - float(b[i, j]))
            total += 0.5 * d * d / beta if d < beta else d - 0.5 * beta
            count += 1
    return total / count


def np_layer_std(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    out = np.empty_like(x, dtype=np.float64)
    for i in range(x.shape[0]):
        row = x[i].astype(np.float64)
        mu = sum(row) / len(row)
        var = sum((v - mu) ** 2 for v in row) / len(row)
        out[i] = (row - mu) / math.sqrt(var + eps)
    return out


def np_batch_std(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    x = x.astype(np.float64)
    return (x - x.mean(0)) / np.sqrt(x.var(0) + eps)   # numpy var is biased (ddof=0)


def np_zca(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """ZCA by the eigendecomposition of the biased covariance (a different route from the SVD in the code)."""
    x = x.astype(np.float64)
    xc = x - x.mean(0)
    cov = xc.T @ xc / x.shape[0]
    lam, u = np.linalg.eigh(cov)
    lam = np.clip(lam, 0, None)
    return xc @ u @ np.diag(1 / np.sqrt(lam + eps)) @ u.T


def np_kl_batchmean(z_s: np.ndarray, z_t: np.ndarray, t: float) -> float:
    def log_softmax(z):
        z = z / t
        m = z.max(1, keepdims=True)
        return z - m - np.log(np.exp(z - m).sum(1, keepdims=True))
    ls, lt = log_softmax(z_s.astype(np.float64)), log_softmax(z_t.astype(np.float64))
    return float((np.exp(lt) * (lt - ls)).sum() / z_s.shape[0] * t * t)


# ---- helpers --------------------------------------------------------------------------------------------------

def make_distiller(student_name='deit_ti_distilled', seed=0, **vkd_opts):
    torch.manual_seed(seed)
    if student_name == 'deit_ti_distilled':
        student = create_student('deit_ti_distilled', 10, **TINY)
    else:
        student = create_student(student_name, 10, img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2)
    teacher = create_teacher('regnety_002', 10, pretrained=False)
    return Distiller(student, teacher, [LossEntry(create_loss('vkd', **vkd_opts))], INFO)


def batch(seed, b=8):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, 32, 32, generator=g)
    labels = torch.randint(0, 10, (b,), generator=g)
    targets = F.one_hot(labels, 10).float() * 0.9 + 0.01
    return images, targets, labels


def proj_weight(d: Distiller) -> torch.Tensor:
    return d.losses['vkd'].projector.weight.detach()


def fake_features(b=6, n=5, d_s=16, d_t=24, k=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = Features(logits=torch.randn(b, k, generator=g), logits_dist=torch.randn(b, k, generator=g),
                       cls_token=torch.randn(b, d_s, generator=g), dist_token=torch.randn(b, d_s, generator=g),
                       patch_tokens=torch.randn(b, n, d_s, generator=g))
    teacher = Features(logits=torch.randn(b, k, generator=g), pooled=3 * torch.randn(b, d_t, generator=g) + 1)
    return student, teacher


def run_batch():
    return vitkd.losses.Batch(images=torch.zeros(1), targets=torch.zeros(1), labels=torch.zeros(1),
                              labels_b=torch.zeros(1))


# ---- (a) the representation term against an independent computation -----------------------------------------

@pytest.mark.parametrize('normalization,ref', [('layernorm', np_layer_std), ('batchnorm', np_batch_std),
                                               ('none', lambda x: x.astype(np.float64))])
def test_representation_term_equals_numpy(normalization, ref):
    g = torch.Generator().manual_seed(3)
    p = 2 * torch.randn(5, 9, generator=g, dtype=torch.float64)           # |p − t̂| spans both Huber branches
    t = 4 * torch.randn(5, 9, generator=g, dtype=torch.float64) - 2
    got = vkd_representation_loss(p, t, normalization).item()
    want = np_huber_mean(p.numpy(), ref(t.numpy()))
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_loss_forward_matches_handwritten_pipeline():
    """Pool patch tokens, project with W, standardise t̄, Huber mean, ×α; KL on z_dist ×γ — all by hand."""
    student, teacher = fake_features()
    loss = create_loss('vkd', alpha=0.7, gamma=1.3, temperature=2.0)
    torch.manual_seed(0)
    loss.setup(student, teacher, INFO)
    out = loss(student, teacher, run_batch())
    assert set(out) == {'repr', 'kl'}
    w = loss.projector.weight.detach().double().numpy()                   # [D_t, D_s]
    tokens = student.patch_tokens.double().numpy()                        # [B, N, D_s]
    s_bar = np.stack([sum(tokens[b, n] for n in range(tokens.shape[1])) / tokens.shape[1]
                      for b in range(tokens.shape[0])])
    want_repr = 0.7 * np_huber_mean(s_bar @ w.T, np_layer_std(teacher.pooled.numpy()))
    want_kl = 1.3 * np_kl_batchmean(student.logits_dist.numpy(), teacher.logits.numpy(), 2.0)
    assert out['repr'].item() == pytest.approx(want_repr, rel=1e-5)
    assert out['kl'].item() == pytest.approx(want_kl, rel=1e-5)


# ---- (b) normalisations against their definitions ------------------------------------------------------------

def test_layernorm_per_sample_standardised_and_invariances():
    g = torch.Generator().manual_seed(4)
    t = 5 * torch.randn(6, 40, generator=g, dtype=torch.float64) + 3
    z = layer_standardize(t)
    assert torch.allclose(z.mean(1), torch.zeros(6, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(z.var(1, unbiased=False), torch.ones(6, dtype=torch.float64), atol=1e-5)
    assert np.allclose(z.numpy(), np_layer_std(t.numpy()), atol=1e-12)
    p = torch.randn(6, 40, generator=g, dtype=torch.float64)
    base = vkd_representation_loss(p, t, 'layernorm')
    shift = 100 * torch.randn(6, 1, generator=g, dtype=torch.float64)     # per-sample constant
    scale = torch.rand(6, 1, generator=g, dtype=torch.float64) * 10 + 0.5  # positive per-sample scale
    assert vkd_representation_loss(p, t + shift, 'layernorm').item() == pytest.approx(base.item(), rel=1e-9)
    assert vkd_representation_loss(p, t * scale, 'layernorm').item() == pytest.approx(base.item(), rel=1e-6)
    # without the normalisation the same changes do move the loss (the invariance is the normalisation's doing)
    assert abs(vkd_representation_loss(p, t + shift, 'none') - vkd_representation_loss(p, t, 'none')) > 1e-2


def test_batchnorm_per_feature_standardised():
    g = torch.Generator().manual_seed(5)
    t = torch.randn(32, 7, generator=g, dtype=torch.float64) * torch.arange(1, 8) + torch.arange(7)
    z = batch_standardize(t)
    assert torch.allclose(z.mean(0), torch.zeros(7, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(z.var(0, unbiased=False), torch.ones(7, dtype=torch.float64), atol=1e-5)
    assert np.allclose(z.numpy(), np_batch_std(t.numpy()), atol=1e-12)
    # per-sample (layernorm) standardisation is a different thing: its per-feature stats are not 0/1 here
    assert not torch.allclose(layer_standardize(t).mean(0), torch.zeros(7, dtype=torch.float64), atol=1e-2)


@pytest.mark.parametrize('b,d', [(200, 8), (6, 20)])
def test_whiten_matches_eigh_zca_and_gives_identity_covariance(b, d):
    g = torch.Generator().manual_seed(6)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    t = torch.randn(b, d, generator=g, dtype=torch.float64) @ mix + 2      # correlated features
    z = whiten(t)
    assert np.allclose(z.numpy(), np_zca(t.numpy()), atol=1e-7)
    assert torch.allclose(z.mean(0), torch.zeros(d, dtype=torch.float64), atol=1e-10)
    if b > d:
        cov = z.T @ z / b
        assert torch.allclose(cov, torch.eye(d, dtype=torch.float64), atol=1e-3)
        raw_cov = (t - t.mean(0)).T @ (t - t.mean(0)) / b
        assert not torch.allclose(raw_cov, torch.eye(d, dtype=torch.float64), atol=1e-1)
    assert whiten(t.float()).dtype == torch.float32


def test_none_is_identity_and_unknown_is_error():
    x = torch.randn(3, 4)
    assert torch.equal(normalize_teacher(x, 'none'), x)
    with pytest.raises(ValueError, match='normalization'):
        normalize_teacher(x, 'group')
    with pytest.raises(ValueError, match='normalization'):
        create_loss('vkd', normalization='group')


@pytest.mark.parametrize('normalization,ref', [('batchnorm', np_batch_std), ('whiten', np_zca)])
def test_normalization_option_reaches_the_loss(normalization, ref):
    student, teacher = fake_features(b=30, d_t=12)
    loss = create_loss('vkd', gamma=0.0, normalization=normalization, projector='linear')
    loss.setup(student, teacher, INFO)
    p = loss.projector(student.patch_tokens.mean(1)).detach().double().numpy()
    want = np_huber_mean(p, ref(teacher.pooled.numpy()))
    assert loss(student, teacher, run_batch())['repr'].item() == pytest.approx(want, rel=1e-5)


# ---- student pooling options ---------------------------------------------------------------------------------

def test_pool_options_match_their_definitions():
    student, _ = fake_features()
    tokens = student.patch_tokens
    assert torch.allclose(pool_student(student, 'patch'), tokens.mean(1))
    assert torch.equal(pool_student(student, 'cls'), student.cls_token)
    n = tokens.shape[1]
    want_all = (student.cls_token + student.dist_token + tokens.sum(1)) / (n + 2)
    assert torch.allclose(pool_student(student, 'all'), want_all, atol=1e-6)
    cnn = Features(final_map=torch.randn(2, 5, 3, 4))
    assert torch.allclose(pool_student(cnn, 'patch'), cnn.final_map.mean((2, 3)), atol=1e-6)
    with pytest.raises(ValueError, match='prefix'):
        pool_student(cnn, 'cls')


def test_student_block_tap_is_pooled_block_output():
    d = make_distiller(student_block=0, pool='all')
    assert d.student_spec.blocks == (0,) and not d.losses['vkd'].student_taps.tokens
    images, _, _ = batch(1, b=4)
    d.student.eval()
    with torch.no_grad():
        feats = extract(d.student, images, TapSpec(blocks=(0,)))
        grid, prefix = feats.blocks[0], feats.block_prefix[0]          # [B, D, h, w], [B, 2, D]
        tokens = torch.cat([prefix, grid.flatten(2).transpose(1, 2)], 1)
        manual = d.student.blocks[0](d.student._pos_embed(d.student.patch_embed(images)))  # block 0 by hand
    assert torch.allclose(tokens, manual, atol=1e-5)
    assert torch.allclose(pool_student(feats, 'all', block=0), manual.mean(1), atol=1e-5)
    d.student.train()
    images, targets, labels = batch(2)
    out = d(Batch(images, targets, labels))
    assert {'vkd.repr', 'vkd.kl'} <= set(out['terms'])


# ---- projectors ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kind', PROJECTORS)
def test_every_projector_builds_and_maps_widths(kind):
    student, teacher = fake_features(d_s=16, d_t=24)
    loss = create_loss('vkd', projector=kind)
    loss.setup(student, teacher, INFO)
    out = loss(student, teacher, run_batch())
    assert torch.isfinite(out['repr']) and out['repr'] > 0
    assert loss.projector(torch.randn(3, 16)).shape == (3, 24)
    if kind.startswith('orthogonal'):
        w = loss.projector.weight.detach()
        assert torch.allclose(w.T @ w, torch.eye(16), atol=1e-5)
        assert loss.no_weight_decay() == {n for n, _ in loss.named_parameters()} != set()
    else:
        assert loss.no_weight_decay() == set()
    if kind == 'mlp':
        assert loss.projector[0].out_features == 2048


def _map_of(projector) -> str:
    """The map inside an orthogonal projector's parametrisation: vitkd's Cayley map, or torch's map's name."""
    parametrisation = projector.parametrizations.weight[0]
    return 'cayley' if isinstance(parametrisation, CayleyOrthogonal) else parametrisation.orthogonal_map.name


def _torch_cayley(in_dim: int, out_dim: int) -> torch.nn.Module:
    return orthogonal(torch.nn.Linear(in_dim, out_dim, bias=False), orthogonal_map='cayley', use_trivialization=True)


def _set_original(projector, value: torch.Tensor) -> None:
    with torch.no_grad():
        projector.parametrizations.weight.original.copy_(value)


@pytest.mark.parametrize('in_dim,out_dim', [(6, 20), (12, 12), (20, 6), (1, 9)])
@pytest.mark.parametrize('scale', [0.1, 3.0])
def test_vitkd_cayley_map_is_torchs_in_float64_with_the_same_tensors_and_gradients(in_dim, out_dim, scale):
    """Same seed → the same ``base`` and ``original`` (so torch-map checkpoints load unchanged); the same trained
    tensor → the same W (to 1e-12 in fp64, where both are exact up to rounding) and the same gradient of a loss on W
    with respect to the trained tensor (torch's computes them from an n×n solve, vitkd's from a k×k one)."""
    torch.manual_seed(3)
    ours = build_projector('orthogonal_cayley', in_dim, out_dim).double()
    torch.manual_seed(3)
    reference = _torch_cayley(in_dim, out_dim).double()
    assert ours.state_dict().keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    trained = scale * torch.randn(out_dim, in_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    probe = torch.randn(out_dim, in_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    grads = []
    for projector in (ours, reference):
        _set_original(projector, trained)
        (projector.weight * probe).sum().pow(2).backward()
        grads.append(projector.parametrizations.weight.original.grad)
    torch.testing.assert_close(ours.weight, reference.weight, atol=1e-12, rtol=0)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-10 * grads[1].abs().max().item(), rtol=0)
    assert grads[1].abs().max() > 0


def test_vitkd_cayley_map_equals_the_dense_formula_and_stays_orthonormal():
    """Against Q = (I − A/2)⁻¹(I + A/2) written out densely (A from the padded lower triangle), and WᵀW = I for
    large trained tensors (fp64: the map is exact for every X); a torch-map checkpoint loads and gives its W."""
    n, k = 30, 8
    x = 5.0 * torch.randn(n, k, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    padded = torch.cat([x.tril(), torch.zeros(n, n - k, dtype=torch.float64)], dim=1)
    a = padded - padded.T
    eye = torch.eye(n, dtype=torch.float64)
    q = torch.linalg.inv(eye - a / 2) @ (eye + a / 2)
    base = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(7)))[0]
    w = cayley_frame(x, base)
    torch.testing.assert_close(w, base @ q[:, :k], atol=1e-12, rtol=0)
    torch.testing.assert_close(w.T @ w, torch.eye(k, dtype=torch.float64), atol=1e-12, rtol=0)
    reference = _torch_cayley(k, n)
    _set_original(reference, x.float())
    ours = build_projector('orthogonal_cayley', k, n)
    ours.load_state_dict(reference.state_dict())
    torch.testing.assert_close(ours.weight, reference.weight, atol=1e-5, rtol=0)  # fp32, ‖X‖ ~ 5: solve rounding


def test_default_is_the_cayley_map_and_the_householder_map_stays_selectable():
    student, teacher = fake_features(d_s=16, d_t=24)
    default = create_loss('vkd')
    default.setup(student, teacher, INFO)
    assert default.options()['projector'] == 'orthogonal_cayley' == DEFAULT_PROJECTOR
    assert _map_of(default.projector) == 'cayley'
    for name, want in [('orthogonal', 'householder'), ('orthogonal_householder', 'householder'),
                       ('orthogonal_matrix_exp', 'matrix_exp')]:
        cfg = Config(distill=['vkd'], loss_opts=[f'vkd.projector={name}'])   # the command-line route
        (entry,) = build_losses(cfg)
        entry.loss.setup(student, teacher, INFO)
        assert entry.loss.options()['projector'] == name and _map_of(entry.loss.projector) == want
    with pytest.raises(UsageError, match='orthogonal_householder'):               # a user error naming the choices
        create_loss('vkd', projector='householder')


@pytest.mark.parametrize('kind', [k for k in ORTHOGONAL_MAPS if k != 'orthogonal_cayley'])
def test_every_orthogonal_map_gives_the_cayley_loss_and_student_gradients_for_the_same_w(kind):
    """The loss sees W only: with the same orthonormal W set in both (torch's ``right_inverse``), the Householder /
    exponential projector and the Cayley one give the same loss and the same gradients w.r.t. the student tokens,
    and both equal the handwritten computation with W as a plain matrix."""
    student, teacher = fake_features(b=6, d_s=16, d_t=24)
    g = torch.Generator().manual_seed(11)
    w = torch.linalg.qr(torch.randn(24, 16, generator=g))[0]                 # an orthonormal W unrelated to the init
    results = {}
    for name in ('orthogonal_cayley', kind):
        loss = create_loss('vkd', gamma=0.0, projector=name)
        torch.manual_seed(0)
        loss.setup(student, teacher, INFO)
        loss.projector.weight = w                                            # right_inverse: re-anchors base at W
        assert torch.allclose(loss.projector.weight, w, atol=1e-6)
        tokens = student.patch_tokens.clone().requires_grad_(True)
        feats = Features(patch_tokens=tokens, logits=student.logits, logits_dist=student.logits_dist)
        value = loss(feats, teacher, run_batch())['repr']
        value.backward()
        results[name] = (value.item(), tokens.grad)
    (v_cayley, g_cayley), (v_other, g_other) = results['orthogonal_cayley'], results[kind]
    assert abs(v_cayley - v_other) < 1e-6
    assert torch.allclose(g_cayley, g_other, atol=1e-6) and g_cayley.abs().max() > 1e-4
    tokens = student.patch_tokens.double().requires_grad_(True)              # W as a plain matrix, float64
    p = tokens.mean(1) @ w.double().T
    target = torch.from_numpy(np_layer_std(teacher.pooled.numpy()))
    F.smooth_l1_loss(p, target, beta=1.0).backward()
    assert v_cayley == pytest.approx(np_huber_mean(p.detach().numpy(), target.numpy()), rel=1e-5)
    assert torch.allclose(g_cayley.double(), tokens.grad, atol=1e-6)


def test_student_wider_than_teacher_gives_orthonormal_rows(caplog):
    with caplog.at_level(logging.WARNING, logger='vitkd.losses.vkd'):
        proj = build_projector('orthogonal', 24, 10)
    w = proj.weight.detach()                                              # [10, 24]
    assert torch.allclose(w @ w.T, torch.eye(10), atol=1e-5)
    assert not torch.allclose(w.T @ w, torch.eye(24), atol=1e-2)         # WᵀW = I is impossible here
    assert 'orthonormal rows' in caplog.text


# ---- (c) orthogonality survives real optimizer steps ---------------------------------------------------------

def _param_group_of(optimizer, param):
    groups = [g for g in optimizer.param_groups if any(p is param for p in g['params'])]
    assert len(groups) == 1
    return groups[0]


def test_default_cayley_projector_stays_exactly_orthogonal_and_trains_under_the_default_optimizer():
    """The default projector (Cayley) and the default optimizer (AdamW, weight decay 0.05, lr 5e-4), 20 steps."""
    d = make_distiller()
    assert _map_of(d.losses['vkd'].projector) == 'cayley'
    cfg = Config()
    assert cfg.opt == 'adamw' and cfg.weight_decay > 0
    optimizer = build_optimizer(cfg, d, lr=cfg.lr)
    w0 = proj_weight(d).clone()
    for step in range(20):
        images, targets, labels = batch(step, b=4)
        d(Batch(images, targets, labels, step=step))['loss'].backward()
        optimizer.step()
        optimizer.zero_grad()
    w = proj_weight(d)
    assert torch.linalg.matrix_norm(w.T @ w - torch.eye(w.shape[1])).item() < 1e-5
    assert torch.linalg.matrix_norm(w - w0).item() > 0.1                 # it trained (‖W₀‖_F is √48 ≈ 6.9)


@pytest.mark.parametrize('opt,projector,steps', [('adamw', 'orthogonal', 20), ('sgd', 'orthogonal', 20),
                                                 ('adamw', 'orthogonal_cayley', 5)])
def test_projector_stays_orthogonal_through_real_training_steps(opt, projector, steps):
    d = make_distiller(projector=projector)
    cfg = Config(**{'opt': opt, 'weight_decay': 0.05, 'momentum': 0.9, 'lr': 5e-3})
    optimizer = build_optimizer(cfg, d, lr=5e-3 if opt == 'adamw' else 5e-2)
    loss = d.losses['vkd']
    original = loss.projector.parametrizations.weight.original
    assert _param_group_of(optimizer, original)['weight_decay'] == 0
    # and the factory does decay ordinary matrices, so the check above can tell the groups apart
    assert _param_group_of(optimizer, d.student.blocks[0].attn.qkv.weight)['weight_decay'] == 0.05
    d_s = d.student.embed_dim
    w0 = proj_weight(d).clone()
    assert w0.shape == (368, d_s)
    for step in range(steps):
        images, targets, labels = batch(step, b=4)
        out = d(Batch(images, targets, labels, step=step))
        out['loss'].backward()
        optimizer.step()
        optimizer.zero_grad()
    w = proj_weight(d)
    assert (w.T @ w - torch.eye(d_s)).abs().max() < 1e-4
    assert torch.linalg.matrix_norm(w).item() == pytest.approx(math.sqrt(d_s), rel=1e-5)
    assert (w - w0).abs().max() > 1e-3                                   # it trained
    d.student.eval()
    images, _, _ = batch(99)
    with torch.no_grad():
        s_bar = extract(d.student, images, TapSpec(tokens=True)).patch_tokens.mean(1)   # [B, D_s]
        p = loss.projector(s_bar)                                                       # [B, D_t]
    assert torch.allclose(p.norm(dim=1), s_bar.norm(dim=1), rtol=1e-4)
    assert (p.norm(dim=1) > 0.1).all()


def test_decayed_householder_parameter_collapses_projector_to_zero():
    """The official bug, reproduced on purpose: ``original`` in an AdamW group with wd 0.05 zeroes W in one step."""
    d = make_distiller(projector='orthogonal')
    original = d.losses['vkd'].projector.parametrizations.weight.original
    others = [p for p in d.parameters() if p is not original]
    optimizer = torch.optim.AdamW([{'params': [original], 'weight_decay': 0.05},
                                   {'params': others, 'weight_decay': 0.0}], lr=5e-4)
    assert torch.linalg.matrix_norm(proj_weight(d)).item() == pytest.approx(math.sqrt(48), rel=1e-5)
    images, targets, labels = batch(0)
    d(Batch(images, targets, labels))['loss'].backward()
    optimizer.step()
    assert torch.count_nonzero(proj_weight(d)) == 0
    optimizer.zero_grad()
    out = d(Batch(images, targets, labels))
    out['loss'].backward()
    assert original.grad is None or torch.count_nonzero(original.grad) == 0   # no gradient any more


# ---- (d) independent terms -----------------------------------------------------------------------------------

def test_alpha_zero_computes_kl_only_and_has_no_projector():
    d = make_distiller(alpha=0.0)
    loss = d.losses['vkd']
    assert loss.projector is None and list(loss.parameters()) == []
    assert not loss.teacher_taps.pooled and loss.teacher_taps.logits and not loss.student_taps.tokens
    images, targets, labels = batch(0)
    out = d(Batch(images, targets, labels))
    assert set(out['terms']) == {'task', 'vkd.kl'} and out['terms']['vkd.kl'] > 0
    out['loss'].backward()
    assert d.student.head_dist.weight.grad.abs().sum() > 0                 # the KL trains the dist head


def test_alpha_zero_projector_gets_no_gradient_in_function_form():
    """Same loss built with α > 0, evaluated with α = 0: the term is skipped, so the projector receives no grad."""
    student, teacher = fake_features()
    loss = create_loss('vkd', alpha=1.0)
    loss.setup(student, teacher, INFO)
    loss.alpha = 0.0
    student.logits_dist.requires_grad_(True)
    out = loss(student, teacher, run_batch())
    assert set(out) == {'kl'}
    out['kl'].backward()
    assert all(p.grad is None for p in loss.projector.parameters())
    assert student.logits_dist.grad is not None


def test_gamma_zero_runs_repr_only_and_task_uses_both_heads():
    d = make_distiller(gamma=0.0)
    assert not d.losses['vkd'].uses_dist_head and not d.task_on_cls_head
    images, targets, labels = batch(0)
    out = d(Batch(images, targets, labels))
    assert set(out['terms']) == {'task', 'vkd.repr'}
    out['loss'].backward()
    assert d.losses['vkd'].projector.parametrizations.weight.original.grad.abs().sum() > 0


def test_kl_term_zero_when_dist_logits_equal_teacher_logits():
    student, teacher = fake_features()
    loss = create_loss('vkd', alpha=0.0)
    student.logits_dist = teacher.logits.clone()
    assert loss(student, teacher, run_batch())['kl'].abs().item() < 1e-6
    student.logits_dist = teacher.logits + torch.randn_like(teacher.logits)
    assert loss(student, teacher, run_batch())['kl'].item() > 1e-3


def test_kl_uses_only_head_without_dist_head():
    student, teacher = fake_features()
    student.logits_dist = None
    loss = create_loss('vkd', alpha=0.0)
    want = np_kl_batchmean(student.logits.numpy(), teacher.logits.numpy(), 1.0)
    assert loss(student, teacher, run_batch())['kl'].item() == pytest.approx(want, rel=1e-5)


def test_both_weights_zero_is_an_error():
    with pytest.raises(ValueError, match='alpha = gamma = 0'):
        create_loss('vkd', alpha=0.0, gamma=0.0)


# ---- (e) timm's distilled DeiT as the student ----------------------------------------------------------------

def test_timm_deit_distilled_student():
    d = make_distiller('deit_tiny_distilled_patch16_224')
    assert d.task_on_cls_head
    optimizer = build_optimizer(Config(**{'opt': 'adamw', 'weight_decay': 0.05}), d, lr=5e-3)
    for step in range(3):
        images, targets, labels = batch(step, b=4)
        out = d(Batch(images, targets, labels))
        assert torch.isfinite(out['loss'])
        out['loss'].backward()
        optimizer.step()
        optimizer.zero_grad()
    w = proj_weight(d)
    assert w.shape == (368, 48)
    assert (w.T @ w - torch.eye(48)).abs().max() < 1e-4


# ---- (f) the exported student has no projector ---------------------------------------------------------------

def test_exported_student_has_no_projector_and_loads_strictly():
    d = make_distiller()
    student_keys = set(d.student.state_dict())
    assert not any('projector' in k or 'parametrizations' in k for k in student_keys)
    full = set(d.state_dict())
    assert 'losses.vkd.projector.parametrizations.weight.original' in full
    assert 'losses.vkd.projector.parametrizations.weight.0.base' in full   # kept for resume (training checkpoint)
    fresh = create_student('deit_ti_distilled', 10, **TINY)
    result = fresh.load_state_dict(d.student.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_training_checkpoint_restores_the_projector():
    """The projector (hidden tensor and its random ``base`` completion) round-trips through the distiller state."""
    d = make_distiller(seed=0)
    with torch.no_grad():
        d.losses['vkd'].projector.parametrizations.weight.original.add_(0.01)   # move W off its init
    other = make_distiller(seed=1)
    assert not torch.allclose(proj_weight(other), proj_weight(d))
    other.load_state_dict(d.state_dict(), strict=True)
    assert torch.equal(proj_weight(other), proj_weight(d))
