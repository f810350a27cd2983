"""DIST: NumPy reference with explicit loops, identity/invariances, Pearson eps, decomposition, scope."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from vitkd.features import Features
from vitkd.losses import Batch, create_loss
from vitkd.losses.dist import dist_loss, inter_class_relation, pearson_correlation

EPS = 1e-8


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _rho(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float(np.dot(a, b) / (np.sqrt(np.dot(a, a)) * np.sqrt(np.dot(b, b)) + EPS))


def reference_dist(z_s, z_t, beta, gamma, tau):
    """Independent NumPy DIST: loops over samples (inter) and over classes (intra), float64."""
    y_s, y_t = _softmax(np.asarray(z_s, np.float64) / tau), _softmax(np.asarray(z_t, np.float64) / tau)
    n, k = y_s.shape
    inter = 1 - sum(_rho(y_s[i], y_t[i]) for i in range(n)) / n
    intra = 1 - sum(_rho(y_s[:, j], y_t[:, j]) for j in range(k)) / k
    return tau ** 2 * beta * inter, tau ** 2 * gamma * intra


def _total(*args, **kwargs) -> torch.Tensor:
    inter, intra = dist_loss(*args, **kwargs)
    return inter + intra


@pytest.mark.parametrize('tau', [1.0, 4.0])
def test_matches_numpy_reference(tau):
    g = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(6, 7, generator=g) * 3, torch.randn(6, 7, generator=g) * 3
    inter, intra = dist_loss(z_s, z_t, beta=1.5, gamma=0.7, temperature=tau)
    ref_inter, ref_intra = reference_dist(z_s.numpy(), z_t.numpy(), 1.5, 0.7, tau)
    assert inter.item() == pytest.approx(ref_inter, rel=1e-5, abs=1e-6)
    assert intra.item() == pytest.approx(ref_intra, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize('tau', [1.0, 4.0])
def test_float64_inputs_stay_float64_and_match_the_reference_to_its_precision(tau):
    """No cast down: in float64 the agreement is ~1e-15, far below fp32's ~6e-8 rounding."""
    g = torch.Generator().manual_seed(3)
    z_s, z_t = torch.randn(6, 7, generator=g, dtype=torch.float64) * 3, torch.randn(6, 7, generator=g) * 3
    inter, intra = dist_loss(z_s, z_t.double(), beta=1.5, gamma=0.7, temperature=tau)
    assert inter.dtype == intra.dtype == torch.float64
    ref_inter, ref_intra = reference_dist(z_s.numpy(), z_t.numpy(), 1.5, 0.7, tau)
    assert inter.item() == pytest.approx(ref_inter, rel=1e-12)
    assert intra.item() == pytest.approx(ref_intra, rel=1e-12)


def test_identity_gives_the_eps_expression():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 6, generator=g)
    z[:, 2] = -40.0  # a class with near-constant (≈ 0) probability: its centred column is tiny, the eps shows
    inter, intra = dist_loss(z, z.clone(), beta=1.0, gamma=1.0, temperature=1.0)
    y = _softmax(z.double().numpy())
    def expr(rows):
        vals = []
        for r in rows:
            sq = float(((r - r.mean()) ** 2).sum())
            vals.append(sq / (sq + EPS))  # ‖a′‖² / (‖a′‖² + eps)
        return 1 - np.mean(vals)
    assert inter.item() == pytest.approx(expr(y), abs=1e-6)
    assert intra.item() == pytest.approx(expr(y.T), abs=1e-6)
    assert intra.item() > 1e-3  # the near-constant column contributes visibly: ρ ≈ 0 for it


def test_invariances():
    g = torch.Generator().manual_seed(2)
    z_s, z_t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    base = _total(z_s, z_t, temperature=2.0)
    shift = torch.randn(6, 1, generator=g) * 10
    assert _total(z_s + shift, z_t, temperature=2.0).item() == pytest.approx(base.item(), abs=1e-5)
    assert _total(z_s, z_t - shift, temperature=2.0).item() == pytest.approx(base.item(), abs=1e-5)
    perm_k, perm_b = torch.randperm(5, generator=g), torch.randperm(6, generator=g)
    assert _total(z_s[:, perm_k], z_t[:, perm_k], temperature=2.0).item() == pytest.approx(base.item(), abs=1e-5)
    assert _total(z_s[perm_b], z_t[perm_b], temperature=2.0).item() == pytest.approx(base.item(), abs=1e-5)
    # and it is not invariant to permuting only one side
    assert abs(_total(z_s[perm_b], z_t, temperature=2.0).item() - base.item()) > 1e-3


def test_pearson_affine_invariance_and_constant_row():
    g = torch.Generator().manual_seed(3)
    y_s, y_t = torch.rand(4, 8, generator=g), torch.rand(4, 8, generator=g)
    a, c = torch.rand(4, 1, generator=g) + 0.5, torch.randn(4, 1, generator=g)
    assert torch.allclose(inter_class_relation(a * y_s + c, y_t), inter_class_relation(y_s, y_t), atol=1e-6)
    const = torch.full((1, 8), 0.125, requires_grad=True)
    rho = pearson_correlation(const, y_t[:1])
    assert rho.item() == 0.0
    rho.sum().backward()
    assert torch.isfinite(const.grad).all()


def test_decomposition_in_beta_gamma():
    g = torch.Generator().manual_seed(4)
    z_s, z_t = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    full = _total(z_s, z_t, beta=2.5, gamma=0.3, temperature=4.0)
    only_inter = _total(z_s, z_t, beta=1.0, gamma=0.0, temperature=4.0)
    only_intra = _total(z_s, z_t, beta=0.0, gamma=1.0, temperature=4.0)
    assert full.item() == pytest.approx(2.5 * only_inter.item() + 0.3 * only_intra.item(), rel=1e-6)


def test_module_head_scope_and_batch_of_one():
    g = torch.Generator().manual_seed(5)
    z_cls, z_dist, z_t = (torch.randn(4, 6, generator=g) for _ in range(3))
    student, teacher = Features(logits=z_cls, logits_dist=z_dist), Features(logits=z_t)
    batch = Batch(images=torch.zeros(4, 3, 8, 8), targets=torch.zeros(4, 6), labels=torch.zeros(4, dtype=torch.long),
                  labels_b=torch.zeros(4, dtype=torch.long))
    glob, local = create_loss('dist'), create_loss('dist', intra_scope='local')
    assert glob.uses_dist_head and not create_loss('dist', head='cls').uses_dist_head
    out_g, out_l = glob(student, teacher, batch), local(student, teacher, batch)
    ref_inter, ref_intra = reference_dist(z_dist.numpy(), z_t.numpy(), 2.0, 2.0, 1.0)  # defaults: β = γ = 2, τ = 1
    assert out_g['inter'].item() == pytest.approx(ref_inter, rel=1e-5)
    assert out_g['intra'].item() == pytest.approx(ref_intra, rel=1e-5)
    assert out_l['intra'].item() == out_g['intra'].item()  # one process: global = local
    with pytest.raises(ValueError):
        create_loss('dist', intra_scope='world')
    # B = 1: every centred column is zero, L_intra is the constant γ·τ² (no NaN)
    inter, intra = dist_loss(z_dist[:1], z_t[:1], beta=1.0, gamma=1.0)
    assert intra.item() == pytest.approx(1.0) and torch.isfinite(inter)


def test_simulated_gather_two_ranks():
    """Two ranks with half batches and an autograd gather: intra = full-batch intra, gradients = W × full gradient."""
    g = torch.Generator().manual_seed(6)
    z_s, z_t = torch.randn(8, 5, generator=g) * 2, torch.randn(8, 5, generator=g) * 2
    tau = 2.0
    halves = [z_s[:4].clone().requires_grad_(True), z_s[4:].clone().requires_grad_(True)]
    probs_s = [torch.softmax(h / tau, dim=1) for h in halves]            # each rank's Y_s (graph kept)
    probs_t = [torch.softmax(z_t[:4] / tau, dim=1), torch.softmax(z_t[4:] / tau, dim=1)]
    total, intras = 0.0, []
    for rank in range(2):
        def gather(y, rank=rank):  # what all_gather returns on `rank`: its own slice in place, the other's graph
            parts = list(probs_s if y.requires_grad else probs_t)
            parts[rank] = y
            return torch.cat(parts, dim=0)
        inter, intra = dist_loss(halves[rank], z_t[4 * rank:4 * rank + 4], temperature=tau, gather=gather)
        intras.append(intra)
        total = total + inter + intra
    total.backward()  # Σ_r L_r: every rank's gradient reaches every slice (all_gather's backward)
    full = z_s.clone().requires_grad_(True)
    ref_inter, ref_intra = dist_loss(full, z_t, temperature=tau)
    (ref_inter + ref_intra).backward()
    for intra in intras:
        assert intra.item() == pytest.approx(ref_intra.item(), rel=1e-6)
    grads = torch.cat([h.grad for h in halves])
    assert torch.allclose(grads, 2 * full.grad, atol=1e-6)  # DDP's average over 2 ranks restores the full gradient
    # local scope differs from the global one on these (different) halves
    local_intra = dist_loss(z_s[:4], z_t[:4], temperature=tau)[1]
    assert abs(local_intra.item() - ref_intra.item()) > 1e-4


def _gloo_worker(rank: int, world: int, init_file: str, out_dir: str, z_s, z_t) -> None:
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        results = {}
        for split in (4, 5):  # equal (4 + 4) and unequal (5 + 3) per-process batches
            rows = slice(0, split) if rank == 0 else slice(split, 8)
            for scope in ('global', 'local'):
                loss = create_loss('dist', intra_scope=scope, temperature=2.0, head='cls')
                # a training batch is equally large on every process (the gather then exchanges no sizes); unequal
                # ones are gathered with their sizes exchanged, as outside training
                loss.train(split == 4)
                z = z_s[rows].clone().requires_grad_(True)
                n = z.shape[0]
                student, teacher = Features(logits=z), Features(logits=z_t[rows])
                batch = Batch(images=torch.zeros(n, 1, 2, 2), targets=torch.zeros(n, 5),
                              labels=torch.zeros(n, dtype=torch.long), labels_b=torch.zeros(n, dtype=torch.long))
                out = loss(student, teacher, batch)
                (out['inter'] + out['intra']).backward()
                results[split, scope] = (out['inter'].detach(), out['intra'].detach(), z.grad)
        torch.save(results, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_global_scope(tmp_path):
    """Real all-gather over 2 CPU processes: global intra = single-process intra on the concatenated batch, and the
    per-rank gradients (summed over ranks by the gather's backward) average to the single-process gradient."""
    g = torch.Generator().manual_seed(7)
    z_s, z_t = torch.randn(8, 5, generator=g) * 2, torch.randn(8, 5, generator=g) * 2
    mp.spawn(_gloo_worker, args=(2, str(tmp_path / 'init'), str(tmp_path), z_s, z_t), nprocs=2, join=True)
    ref_intra = dist_loss(z_s, z_t, temperature=2.0)[1]
    results = [torch.load(tmp_path / f'rank{rank}.pt', weights_only=True) for rank in range(2)]
    for split in (4, 5):
        rows = [slice(0, split), slice(split, 8)]
        # what DDP optimises: the mean over ranks of each rank's (local inter + global intra)
        full = z_s.clone().requires_grad_(True)
        inters = [dist_loss(full[r], z_t[r], temperature=2.0)[0] for r in rows]
        (sum(inters) / 2 + dist_loss(full, z_t, temperature=2.0)[1]).backward()
        for rank in range(2):
            inter, intra, grad = results[rank][split, 'global']
            assert intra.item() == pytest.approx(ref_intra.item(), rel=1e-6)
            assert inter.item() == pytest.approx(inters[rank].item(), rel=1e-6)
            assert torch.allclose(grad / 2, full.grad[rows[rank]], atol=1e-6)  # DDP divides the summed grads by 2
            _, local_intra, _ = results[rank][split, 'local']
            own = dist_loss(z_s[rows[rank]], z_t[rows[rank]], temperature=2.0)[1]
            assert local_intra.item() == pytest.approx(own.item(), rel=1e-6)
            assert abs(local_intra.item() - ref_intra.item()) > 1e-4


def test_per_epoch_warmup():
    g = torch.Generator().manual_seed(8)
    z_s, z_t = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    loss = create_loss('dist', warmup=20, head='cls')
    def at(epoch):
        batch = Batch(images=torch.zeros(4, 3, 2, 2), targets=torch.zeros(4, 6),
                      labels=torch.zeros(4, dtype=torch.long), labels_b=torch.zeros(4, dtype=torch.long),
                      progress=epoch)
        out = loss(Features(logits=z_s), Features(logits=z_t), batch)
        return (out['inter'] + out['intra']).item()
    ref = sum(reference_dist(z_s.numpy(), z_t.numpy(), 2.0, 2.0, 1.0))
    assert at(0) == 0.0
    assert at(5) == pytest.approx(0.25 * ref, rel=1e-5)
    assert at(25) == pytest.approx(ref, rel=1e-5)
