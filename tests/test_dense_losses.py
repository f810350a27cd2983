"""The dense forms of fitnet, vkd, kd and dist (nd: tests/test_dense_nd.py): the vectorised losses against
per-pixel loops written independently (NumPy, float64), the level pairing, and the registry's errors."""
import inspect
import math
import re
from collections import OrderedDict

import numpy as np
import pytest
import torch

import vitkd  # noqa: F401  (registers the losses)
from vitkd.errors import UsageError
from vitkd.losses._dense import DENSE_LOSS_REGISTRY, DenseFeatures, create_dense_loss, list_dense_losses
from vitkd.losses.base import option_domains
from vitkd.losses.dist import dist_dense_loss
from vitkd.losses.fitnet import dense_hint_loss
from vitkd.losses.kd import pixel_kl_div
from vitkd.losses.vkd import build_projector, vkd_dense_level_loss


def _softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max())
    return e / e.sum()


def _pearson(a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (math.sqrt((a * a).sum()) * math.sqrt((b * b).sum()) + eps))


def _huber(d: np.ndarray) -> np.ndarray:
    return np.where(np.abs(d) < 1, 0.5 * d * d, np.abs(d) - 0.5)


@pytest.mark.parametrize('temperature', [1.0, 3.0])
def test_pixel_kl_matches_a_per_pixel_loop(temperature):
    g = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64), torch.randn(2, 5, 3, 4, generator=g,
                                                                                        dtype=torch.float64)
    s, t = z_s.numpy(), z_t.numpy()
    total = 0.0
    for b in range(2):
        for y in range(3):
            for x in range(4):
                p_t, p_s = _softmax(t[b, :, y, x] / temperature), _softmax(s[b, :, y, x] / temperature)
                total += float((p_t * (np.log(p_t) - np.log(p_s))).sum())
    expected = temperature ** 2 * total / (2 * 3 * 4)
    assert pixel_kl_div(z_s, z_t, temperature).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize('beta,gamma,temperature', [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist_dense_matches_a_per_pixel_computation(beta, gamma, temperature):
    g = torch.Generator().manual_seed(1)
    z_s, z_t = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64), torch.randn(2, 4, 3, 3, generator=g,
                                                                                        dtype=torch.float64)
    s, t = z_s.numpy(), z_t.numpy()
    pixels = [(b, y, x) for b in range(2) for y in range(3) for x in range(3)]
    y_s = np.stack([_softmax(s[b, :, y, x] / temperature) for b, y, x in pixels])  # [P, K]
    y_t = np.stack([_softmax(t[b, :, y, x] / temperature) for b, y, x in pixels])
    inter = 1 - np.mean([_pearson(y_s[i], y_t[i]) for i in range(len(pixels))])
    intra = 1 - np.mean([_pearson(y_s[:, k], y_t[:, k]) for k in range(4)])
    got_inter, got_intra = dist_dense_loss(z_s, z_t, beta, gamma, temperature)
    assert got_inter.item() == pytest.approx(temperature ** 2 * beta * inter, rel=1e-10)
    assert got_intra.item() == pytest.approx(temperature ** 2 * gamma * intra, rel=1e-10)


@pytest.mark.parametrize('normalization', ['layernorm', 'batchnorm', 'none'])
def test_vkd_dense_level_matches_a_per_pixel_loop(normalization):
    torch.manual_seed(2)
    f_s, f_t = torch.randn(2, 3, 2, 3, dtype=torch.float64), torch.randn(2, 5, 2, 3, dtype=torch.float64) * 3 + 1
    projector = build_projector('orthogonal_cayley', 3, 5).double()
    w = projector.weight.detach().numpy()  # [5, 3]
    assert np.allclose(w.T @ w, np.eye(3), atol=1e-6)  # orthonormal columns (the map was built in fp32)
    s, t = f_s.numpy(), f_t.numpy()
    pixels = [(b, y, x) for b in range(2) for y in range(2) for x in range(3)]
    teacher_rows = np.stack([t[b, :, y, x] for b, y, x in pixels])  # [P, 5]
    if normalization == 'layernorm':  # each pixel over its channels, biased variance, eps 1e-5
        mean, var = teacher_rows.mean(1, keepdims=True), teacher_rows.var(1, keepdims=True)
        target = (teacher_rows - mean) / np.sqrt(var + 1e-5)
    elif normalization == 'batchnorm':  # each channel over all pixels
        mean, var = teacher_rows.mean(0, keepdims=True), teacher_rows.var(0, keepdims=True)
        target = (teacher_rows - mean) / np.sqrt(var + 1e-5)
    else:
        target = teacher_rows
    errors = [_huber(w @ s[b, :, y, x] - target[i]) for i, (b, y, x) in enumerate(pixels)]
    expected = float(np.mean(errors))
    got = vkd_dense_level_loss(f_s, f_t, projector, normalization)
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_dense_hint_averages_levels_not_pixels():
    torch.manual_seed(3)
    fine_s, fine_t = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    coarse_s, coarse_t = torch.randn(2, 3, 1, 1, dtype=torch.float64), torch.randn(2, 3, 1, 1, dtype=torch.float64)
    per_level = [float(((a.numpy() - b.numpy()) ** 2).mean()) for a, b in ((fine_s, fine_t), (coarse_s, coarse_t))]
    got = dense_hint_loss([fine_s, coarse_s], [fine_t, coarse_t])
    assert got.item() == pytest.approx(sum(per_level) / 2, rel=1e-12)


def _features(channels: int, names=('s4', 's8'), logits: bool = False, seed: int = 0) -> DenseFeatures:
    g = torch.Generator().manual_seed(seed)
    pyramid = OrderedDict((n, torch.randn(2, channels, 16 // int(n[1:]) * 2, 16 // int(n[1:]) * 2, generator=g))
                          for n in names)
    return DenseFeatures(pyramid, torch.randn(2, 4, 8, 8, generator=g) if logits else None)


@pytest.mark.parametrize('name', ['fitnet', 'vkd'])
def test_feature_losses_pair_levels_by_stride_and_train_their_parts(name):
    loss = create_dense_loss(name)
    student, teacher = _features(6, ('s4', 's8', 's16')), _features(10, ('s8', 's16', 's32'), seed=1)
    loss.setup(student, teacher, None)
    parts = loss.regressors if name == 'fitnet' else loss.projectors
    assert list(parts) == ['s8', 's16']  # the strides both pyramids have, nothing else
    for level in student.pyramid.values():
        level.requires_grad_(True)
    value = sum(loss(student, teacher, None).values())
    value.backward()
    assert student.pyramid['s4'].grad is None  # an unmatched level takes no part
    assert student.pyramid['s8'].grad.abs().sum() > 0
    assert all(p.grad is not None for p in loss.parameters())


def test_feature_losses_refuse_pyramids_without_a_common_stride():
    loss = create_dense_loss('vkd')
    with pytest.raises(UsageError, match='share no stride'):
        loss.setup(_features(6, ('s4',)), _features(6, ('s8',)), None)
    with pytest.raises(UsageError, match=r"levels \['s32'\] are not in both"):
        create_dense_loss('fitnet', levels=['s32']).setup(_features(6), _features(6), None)


def test_logit_losses_resize_the_teacher_to_the_student_grid():
    """A teacher whose finest stride differs: its logits are bilinearly resized to the student's grid first."""
    g = torch.Generator().manual_seed(4)
    student_logits = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    teacher_logits = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    resized = torch.nn.functional.interpolate(teacher_logits, size=(4, 4), mode='bilinear', align_corners=False)
    student, teacher = DenseFeatures(OrderedDict(), student_logits), DenseFeatures(OrderedDict(), teacher_logits)
    assert create_dense_loss('kd')(student, teacher, None)['kl'].item() == pytest.approx(
        pixel_kl_div(student_logits, resized).item(), rel=1e-12)
    inter, intra = dist_dense_loss(student_logits, resized)
    terms = create_dense_loss('dist')(student, teacher, None)
    assert (terms['inter'].item(), terms['intra'].item()) == pytest.approx((inter.item(), intra.item()), rel=1e-12)


def test_registry_names_and_errors():
    assert [n for n, _ in list_dense_losses()] == ['dist', 'fitnet', 'kd', 'nd', 'none', 'vkd']
    with pytest.raises(UsageError, match="'crd' has no dense form.*dist, fitnet, kd, nd, none, vkd"):
        create_dense_loss('crd')
    with pytest.raises(UsageError, match="no option head; its options: temperature"):
        create_dense_loss('kd', head='dist')
    for name, option, value in (('kd', 'temperature', 0), ('vkd', 'projector', 'spline'), ('dist', 'beta', -1),
                                 ('fitnet', 'levels', []), ('nd', 'levels', [])):
        # each refused by the domain its constructor declares
        domain = option_domains(DENSE_LOSS_REGISTRY[name])[option]
        with pytest.raises(UsageError, match=re.escape(f"{name}'s {option} must be {domain.describe()}, got")):
            create_dense_loss(name, **{option: value})


def test_every_dense_option_declares_a_domain_its_default_satisfies():
    for name, cls in DENSE_LOSS_REGISTRY.items():
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != 'self'}
        for option, domain in option_domains(cls).items():
            assert domain is not None, f'dense {name}: option {option} declares no domain'
            assert domain.check(defaults[option]) == defaults[option], (name, option)
