"""DKD: NumPy reference in the official masked form, KD decomposition, masking, mixup policy, warm-up."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vitkd.features import Features
from vitkd.losses import Batch, create_loss
from vitkd.losses.dkd import dkd_loss, dkd_terms, dkd_warmup_factor


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def reference_dkd(z_s, z_t, y, alpha, beta, T):
    """The official construction in NumPy: masked probability sums for TCKD, the −1000 target shift for NCKD."""
    z_s, z_t = np.asarray(z_s, np.float64), np.asarray(z_t, np.float64)
    n, k = z_s.shape
    gt = np.zeros((n, k))
    gt[np.arange(n), y] = 1
    p_s, p_t = _softmax(z_s / T), _softmax(z_t / T)
    b_s = np.stack([(p_s * gt).sum(1), (p_s * (1 - gt)).sum(1)], 1)
    b_t = np.stack([(p_t * gt).sum(1), (p_t * (1 - gt)).sum(1)], 1)
    tckd = (b_t * (np.log(b_t) - np.log(b_s))).sum() * T ** 2 / n
    q_t = _softmax(z_t / T - 1000.0 * gt)
    log_q_s = np.log(_softmax(z_s / T - 1000.0 * gt) + 1e-300)
    log_q_t = np.log(np.where(q_t > 0, q_t, 1.0))
    nckd = (q_t * (log_q_t - log_q_s) * (1 - gt)).sum() * T ** 2 / n
    return alpha * tckd, beta * nckd


def _logits(seed, b=6, k=7, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, k, generator=g) * scale, torch.randn(b, k, generator=g) * scale,
            torch.randint(0, k, (b,), generator=g))


@pytest.mark.parametrize('T', [1.0, 4.0])
def test_matches_official_construction(T):
    z_s, z_t, y = _logits(0)
    t, n = dkd_loss(z_s, z_t, y, alpha=0.8, beta=2.0, temperature=T)
    rt, rn = reference_dkd(z_s.numpy(), z_t.numpy(), y.numpy(), 0.8, 2.0, T)
    assert t.item() == pytest.approx(rt, rel=1e-5)
    assert n.item() == pytest.approx(rn, rel=1e-5)


@pytest.mark.parametrize('T', [1.0, 4.0])
def test_float64_inputs_stay_float64_and_match_the_reference_to_its_precision(T):
    """No cast down: in float64 the agreement is ~1e-15, far below fp32's ~6e-8 rounding."""
    z_s, z_t, y = _logits(3)
    t, n = dkd_loss(z_s.double(), z_t.double(), y, alpha=0.8, beta=2.0, temperature=T)
    assert t.dtype == n.dtype == torch.float64
    rt, rn = reference_dkd(z_s.numpy(), z_t.numpy(), y.numpy(), 0.8, 2.0, T)
    assert t.item() == pytest.approx(rt, rel=1e-12)
    assert n.item() == pytest.approx(rn, rel=1e-12)


@pytest.mark.parametrize('T', [1.0, 3.0])
def test_decomposition_equals_kd(T):
    """α = 1 and β_b = 1 − p^t_y per sample: TCKD + β·NCKD = T²·KL(p_t ‖ p_s) (independent NumPy KL)."""
    z_s, z_t, y = _logits(1)
    tckd, nckd = dkd_terms(z_s, z_t, y, T)
    p_t = _softmax(z_t.double().numpy() / T)
    p_s = _softmax(z_s.double().numpy() / T)
    kl = (p_t * (np.log(p_t) - np.log(p_s))).sum(1) * T ** 2
    coupled = tckd + (1 - torch.from_numpy(p_t[np.arange(len(y)), y.numpy()]).float()) * nckd
    assert np.allclose(coupled.numpy(), kl, rtol=1e-5, atol=1e-6)
    assert (tckd >= -1e-7).all() and (nckd >= -1e-7).all()
    zero_t, zero_n = dkd_terms(z_s, z_s.clone(), y, T)
    assert zero_t.abs().max().item() < 1e-6 and zero_n.abs().max().item() < 1e-6


def test_masking():
    z_s, z_t, y = _logits(2)
    rows = torch.arange(len(y))
    _, nckd = dkd_terms(z_s, z_t, y, 2.0)
    z_s2, z_t2 = z_s.clone(), z_t.clone()
    z_s2[rows, y] += 7.0
    z_t2[rows, y] -= 5.0
    assert torch.allclose(dkd_terms(z_s2, z_t2, y, 2.0)[1], nckd, atol=1e-6)   # NCKD ignores the target logit
    assert not torch.allclose(dkd_terms(z_s2, z_t2, y, 2.0)[0], dkd_terms(z_s, z_t, y, 2.0)[0])
    tckd = dkd_terms(z_s, z_t, y, 2.0)[0]
    z_p = z_s.clone()
    for b in range(len(y)):  # permute the non-target logits of each row
        others = [j for j in range(z_s.shape[1]) if j != y[b]]
        z_p[b, others] = z_s[b, others[::-1]]
    assert torch.allclose(dkd_terms(z_p, z_t, y, 2.0)[0], tckd, atol=1e-6)


def test_shift_invariance_k2_and_extreme_logits():
    z_s, z_t, y = _logits(3)
    shift = torch.randn(6, 1) * 5
    a = sum(dkd_loss(z_s, z_t, y, 1.0, 2.0, 2.0))
    b = sum(dkd_loss(z_s + shift, z_t - shift, y, 1.0, 2.0, 2.0))
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    z2_s, z2_t, y2 = _logits(4, k=2)
    assert dkd_terms(z2_s, z2_t, y2, 1.0)[1].abs().max().item() == 0.0
    g = torch.Generator().manual_seed(5)
    z_s = ((torch.rand(4, 1000, generator=g) * 2 - 1) * 30).requires_grad_(True)
    z_t = (torch.rand(4, 1000, generator=g) * 2 - 1) * 30
    z_t[:, 0] = 30.0  # the teacher is sure of class 0; the student is sure of class 1
    with torch.no_grad():
        z_s[:, 1] = 30.0
    y = torch.zeros(4, dtype=torch.long)
    loss = sum(dkd_loss(z_s, z_t, y, 1.0, 8.0, 1.0))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z_s.grad).all()


def _run(loss, z_s, z_t, labels, labels_b, lam, targets=None, epoch=0):
    k = z_s.shape[1]
    batch = Batch(images=torch.zeros(len(labels), 3, 4, 4), targets=targets if targets is not None else
                  torch.zeros(len(labels), k), labels=labels, labels_b=labels_b, lam=lam, progress=epoch)
    out = loss(Features(logits=z_s), Features(logits=z_t), batch)
    return out['tckd'] + out['nckd']


def test_mixup_label_policy():
    z_s, z_t, y = _logits(6)
    y_b = y.flip(0)
    loss = create_loss('dkd', alpha=1.0, beta=2.0, temperature=2.0)
    dkd_a = sum(dkd_loss(z_s, z_t, y, 1.0, 2.0, 2.0))
    assert _run(loss, z_s, z_t, y, y_b, 1.0).item() == pytest.approx(dkd_a.item(), rel=1e-6)
    for lam in (0.0, 0.3, 0.9):
        assert _run(loss, z_s, z_t, y, y.clone(), lam).item() == pytest.approx(dkd_a.item(), rel=1e-5)
    lam = 0.3
    ra = sum(reference_dkd(z_s.numpy(), z_t.numpy(), y.numpy(), 1.0, 2.0, 2.0))
    rb = sum(reference_dkd(z_s.numpy(), z_t.numpy(), y_b.numpy(), 1.0, 2.0, 2.0))
    assert _run(loss, z_s, z_t, y, y_b, lam).item() == pytest.approx(lam * ra + (1 - lam) * rb, rel=1e-5)
    # argmax policy: labels from the mixed soft target
    targets = torch.softmax(torch.randn(6, 7), dim=1)
    arg = create_loss('dkd', alpha=1.0, beta=2.0, temperature=2.0, label_policy='argmax')
    ref = sum(reference_dkd(z_s.numpy(), z_t.numpy(), targets.argmax(1).numpy(), 1.0, 2.0, 2.0))
    assert _run(arg, z_s, z_t, y, y_b, lam, targets).item() == pytest.approx(ref, rel=1e-5)


def test_warmup_factor_and_module():
    assert dkd_warmup_factor(0, 5, 'zero') == 0.0
    assert dkd_warmup_factor(0, 20, 'one') == pytest.approx(1 / 20)
    assert dkd_warmup_factor(19, 20, 'one') == 1.0 and dkd_warmup_factor(4, 20, 'one') == pytest.approx(5 / 20)
    assert dkd_warmup_factor(2, 5, 'zero') == pytest.approx(0.4) and dkd_warmup_factor(9, 5, 'zero') == 1.0
    assert dkd_warmup_factor(0, 0, 'zero') == 1.0
    z_s, z_t, y = _logits(7)
    loss = create_loss('dkd', warmup=5)
    full = sum(dkd_loss(z_s, z_t, y, 1.0, 0.5, 1.0))
    assert _run(loss, z_s, z_t, y, y, 1.0, epoch=0).item() == 0.0
    assert _run(loss, z_s, z_t, y, y, 1.0, epoch=2).item() == pytest.approx(0.4 * full.item(), rel=1e-6)
    assert _run(loss, z_s, z_t, y, y, 1.0, epoch=7).item() == pytest.approx(full.item(), rel=1e-6)


def test_head_selection():
    z_cls, z_t, y = _logits(8)
    z_dist = torch.randn_like(z_cls)
    batch = Batch(images=torch.zeros(6, 3, 4, 4), targets=torch.zeros(6, 7), labels=y, labels_b=y)
    feats = Features(logits=z_cls, logits_dist=z_dist)
    out = create_loss('dkd')(feats, Features(logits=z_t), batch)
    ref = sum(reference_dkd(z_dist.numpy(), z_t.numpy(), y.numpy(), 1.0, 0.5, 1.0))
    assert (out['tckd'] + out['nckd']).item() == pytest.approx(ref, rel=1e-5)
    assert create_loss('dkd').uses_dist_head and not create_loss('dkd', head='cls').uses_dist_head
