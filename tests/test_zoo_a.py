"""Knowledge-Distillation-Zoo methods, first half: logits, st, at, fitnet, nst, pkt, fsp, ft, rkd, ab, sp.

Every math check compares against an independent computation written differently (numpy / explicit loops / a
closed form) or checks a property of the method (invariances, limits, which parts train); the generic run trains
each method for two AdamW steps with a tiny ViT student and a CNN student against a random ResNet-18 teacher.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitkd
from vitkd.distiller import Distiller, LossEntry
from vitkd.features import Features
from vitkd.losses import Batch, LossSpecError, RunInfo, create_loss
from vitkd.losses._adapt import (MIDDLE_TAP, THREE_TAPS, align_spatial, default_taps, even_positions, pair_taps)
from vitkd.losses.ab import ab_loss
from vitkd.losses.at import at_loss, attention_map
from vitkd.losses.fsp import fsp_matrix
from vitkd.losses.ft import Paraphraser, ft_loss
from vitkd.losses.logits import logits_mse
from vitkd.losses.nst import nst_loss
from vitkd.losses.pkt import pkt_loss
from vitkd.losses.rkd import angle_cosines, normalized_distance, rkd_angle_loss, rkd_distance_loss, rkd_loss
from vitkd.losses.sp import sp_loss

ZOO_A = ('logits', 'st', 'at', 'fitnet', 'nst', 'pkt', 'fsp', 'ft', 'rkd', 'ab', 'sp')
INFO = RunInfo(num_classes=10, input_size=(3, 32, 32), epochs=10, steps_per_epoch=10)


def _batch(epoch: int = 0, b: int = 4) -> Batch:
    labels = torch.arange(b) % 10
    return Batch(images=torch.zeros(b, 3, 32, 32), targets=F.one_hot(labels, 10).float(), labels=labels,
                 labels_b=labels, progress=epoch)


def _orthogonal(d: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def _tiny_vit(depth: int = 4):
    return vitkd.create_student('deit_ti_distilled', 10, img_size=32, patch_size=4, depth=depth, embed_dim=48,
                                num_heads=2)


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """These tiny models run fastest on one thread (two threads mostly spin on the shared 2-core machines)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def teacher():
    torch.manual_seed(1)
    return vitkd.create_teacher('resnet18', 10, pretrained=False)


# ---------------------------------------------------------------------------------------------------------- taps
def test_default_taps_follow_the_spec_pairings():
    vit12 = vitkd.create_student('deit_tiny_distilled_patch16_224', 10, img_size=32, patch_size=8, depth=12,
                                 embed_dim=16, num_heads=1)
    cnn = vitkd.create_student('resnet18', 10)
    # vitkd adaptation: blocks 4/8/12 (1-indexed) ↔ s2/s3/s4; single-tap: block 8 ↔ s3; two-tap: 8/12 ↔ s3/s4
    assert default_taps(vit12, THREE_TAPS) == (3, 7, 11)
    assert default_taps(vit12, MIDDLE_TAP) == (7,)
    assert default_taps(vit12, (2, 3)) == (7, 11)
    assert default_taps(cnn, THREE_TAPS) == (2, 3, 4)
    assert default_taps(cnn, MIDDLE_TAP) == (3,)
    # one side given with another count: the other side spreads that many taps evenly, ending at the last
    s, t = pair_taps(vit12, cnn, (5, 11), None, THREE_TAPS)
    assert s == (5, 11) and t == default_taps(cnn, even_positions(2)) == (3, 4)
    with pytest.raises(LossSpecError):
        pair_taps(vit12, cnn, (1, 2), (3,), THREE_TAPS)


def test_align_spatial_pools_the_larger_map():
    s, t = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)
    s2, t2 = align_spatial(s, t)
    assert t2 is t and s2.shape == (2, 3, 4, 4)
    manual = s.reshape(2, 3, 4, 2, 4, 2).mean(dim=(3, 5))  # 2×2 block means
    torch.testing.assert_close(s2, manual)
    t3, s3 = align_spatial(t, s)  # student smaller: the teacher is pooled, the student untouched
    assert t3 is t and s3.shape == (2, 3, 4, 4)


# -------------------------------------------------------------------------------------------------------- logits
def test_logits_mse_shift_and_gradient():
    z_s, z_t = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    assert logits_mse(z_t.clone(), z_t) == 0
    expected = np.mean((z_s.numpy() - z_t.numpy()) ** 2)
    assert math.isclose(logits_mse(z_s, z_t).item(), expected, rel_tol=1e-12)
    assert math.isclose(logits_mse(z_s + 3.0, z_t + 3.0).item(), expected, rel_tol=1e-12)  # same shift on both
    shifted = np.mean((z_s.numpy() - z_t.numpy() + 3.0) ** 2)  # shift on one side only (unlike KL)
    assert math.isclose(logits_mse(z_s + 3.0, z_t).item(), shifted, rel_tol=1e-12)
    z_s.requires_grad_(True)
    z_t.requires_grad_(True)
    logits_mse(z_s, z_t).backward()
    torch.testing.assert_close(z_s.grad, 2 * (z_s - z_t).detach() / z_s.numel())
    assert z_t.grad is None


def test_logits_uses_the_dist_head_and_lambda():
    loss = create_loss('logits')
    z_cls, z_dist, z_t = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 5)
    out = loss(Features(logits=z_cls, logits_dist=z_dist), Features(logits=z_t), _batch())
    assert loss.uses_dist_head
    assert math.isclose(out['mse'].item(), 0.1 * ((z_dist - z_t) ** 2).mean().item(), rel_tol=1e-6)


# ------------------------------------------------------------------------------------------------------------ st
def test_st_matches_per_sample_kl_and_closed_form_gradient():
    temperature, lam = 4.0, 0.1
    loss = create_loss('st')
    z_s = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    z_t = torch.randn(6, 5, dtype=torch.float64)
    value = loss(Features(logits=z_s), Features(logits=z_t), _batch())['kl']
    p_t = np.exp(z_t.numpy() / temperature)
    p_t /= p_t.sum(1, keepdims=True)
    p_s = np.exp(z_s.detach().numpy() / temperature)
    p_s /= p_s.sum(1, keepdims=True)
    per_sample = (p_t * (np.log(p_t) - np.log(p_s))).sum(axis=1)  # summed over classes
    assert math.isclose(value.item(), lam * temperature ** 2 * per_sample.mean(), rel_tol=1e-10)  # mean over B only
    value.backward()
    closed = lam * temperature * (p_s - p_t) / z_s.shape[0]
    np.testing.assert_allclose(z_s.grad.numpy(), closed, rtol=1e-9, atol=1e-12)
    # zero at identity, invariant to per-row constants on either side
    rows = torch.randn(6, 1, dtype=torch.float64)
    assert loss(Features(logits=z_t + rows), Features(logits=z_t), _batch())['kl'].abs() < 1e-12
    base = loss(Features(logits=z_s.detach()), Features(logits=z_t), _batch())['kl']
    moved = loss(Features(logits=z_s.detach() + rows), Features(logits=z_t - 2 * rows), _batch())['kl']
    assert math.isclose(base.item(), moved.item(), rel_tol=1e-10)


# ------------------------------------------------------------------------------------------------------------ at
def test_at_invariances_and_different_channel_counts():
    torch.manual_seed(0)
    s, t = torch.randn(3, 6, 5, 5, dtype=torch.float64), torch.randn(3, 9, 5, 5, dtype=torch.float64)
    base = at_loss(s, t)
    assert base > 0
    assert math.isclose(at_loss(7.5 * s, t).item(), base.item(), rel_tol=1e-6)  # positive scaling (eps aside)
    assert math.isclose(at_loss(s[:, torch.randperm(6)], t).item(), base.item(), rel_tol=1e-12)  # channel permutation
    # A_s ∝ A_t with 2 vs 9 channels: one student channel carrying sqrt(Σ_c t_c²), times 2
    student = torch.zeros(3, 2, 5, 5, dtype=torch.float64)
    student[:, 0] = 2 * t.pow(2).sum(1).sqrt()
    assert at_loss(student, t) < 1e-12


def test_at_eps_is_added_to_the_norm():
    torch.manual_seed(0)
    fmap = 1e-4 * torch.randn(2, 3, 4, 4, dtype=torch.float64)  # ‖A‖ ≈ 1e-7, comparable to the eps
    a = (fmap.numpy() ** 2).sum(axis=1).reshape(2, -1)
    on_norm = a / (np.sqrt((a ** 2).sum(1, keepdims=True)) + 1e-6)
    on_square = a / np.sqrt((a ** 2).sum(1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(attention_map(fmap).numpy(), on_norm, rtol=1e-10)
    assert not np.allclose(on_norm, on_square, rtol=1e-3)  # the two placements are distinguishable here


# -------------------------------------------------------------------------------------------------------- fitnet
def test_fitnet_regressor_matches_a_hand_computation_and_zero_at_target():
    loss = create_loss('fitnet', student_blocks=[0], teacher_blocks=[0])
    s = torch.randn(4, 3, 4, 4)
    t = torch.relu(torch.randn(4, 5, 2, 2))
    loss.configure_taps(torch.nn.Identity(), torch.nn.Identity())
    loss.setup(Features(blocks={0: s}, num_blocks=1), Features(blocks={0: t}, num_blocks=1), INFO)
    loss.eval()  # BN with running statistics (mean 0, var 1)
    conv, bn = loss.regressors[0][0], loss.regressors[0][1]
    pooled = s.reshape(4, 3, 2, 2, 2, 2).mean(dim=(3, 5))  # student 4×4 pooled to the teacher's 2×2
    w = conv.weight.detach()[:, :, 0, 0].numpy()  # [5, 3]
    lin = np.einsum('oc,bchw->bohw', w, pooled.numpy())
    bn_out = lin / np.sqrt(1 + bn.eps) * bn.weight.detach().numpy()[None, :, None, None]
    expected = 0.1 * np.mean((np.maximum(bn_out, 0) - t.numpy()) ** 2)
    out = loss(Features(blocks={0: s}, num_blocks=1), Features(blocks={0: t}, num_blocks=1), _batch())['hint']
    assert math.isclose(out.item(), expected, rel_tol=1e-5)
    target = loss.regressors[0](pooled).detach()
    assert loss(Features(blocks={0: s}, num_blocks=1), Features(blocks={0: target}, num_blocks=1),
                _batch())['hint'] < 1e-12


def test_fitnet_without_regressor_needs_identical_maps(teacher):
    student = vitkd.create_student('resnet18', 10)
    Distiller(student, teacher, [LossEntry(create_loss('fitnet', regressor=False))], INFO)  # same architecture: ok
    with pytest.raises(LossSpecError):
        Distiller(_tiny_vit(), teacher, [LossEntry(create_loss('fitnet', regressor=False))], INFO)


# ----------------------------------------------------------------------------------------------------------- nst
def _nst_loops(s: np.ndarray, t: np.ndarray) -> float:
    """Squared MMD with k(a, b) = (a·b)², written with explicit loops."""
    def unit(x):
        x = x.reshape(x.shape[0], x.shape[1], -1)
        return x / np.maximum(np.linalg.norm(x, axis=2, keepdims=True), 1e-12)
    s, t = unit(s), unit(t)
    def kmean(a, b):
        total = 0.0
        for n in range(a.shape[0]):
            for i in range(a.shape[1]):
                for j in range(b.shape[1]):
                    total += float(a[n, i] @ b[n, j]) ** 2
        return total / (a.shape[0] * a.shape[1] * b.shape[1])
    return kmean(t, t) + kmean(s, s) - 2 * kmean(s, t)


def test_nst_matches_loops_and_invariances():
    torch.manual_seed(0)
    s, t = torch.rand(2, 3, 3, 3, dtype=torch.float64), torch.rand(2, 4, 3, 3, dtype=torch.float64)
    value = nst_loss(s, t)
    assert math.isclose(value.item(), _nst_loops(s.numpy(), t.numpy()), rel_tol=1e-10)
    assert value >= 0
    scale = torch.tensor([0.5, 2.0, 7.0], dtype=torch.float64).view(1, 3, 1, 1)
    assert math.isclose(nst_loss(s[:, [2, 0, 1]] * scale, t[:, [3, 1, 0, 2]]).item(), value.item(), rel_tol=1e-10)
    # the student's set of normalised channels equals the teacher's (permuted, positively scaled): zero
    assert abs(nst_loss(t[:, [1, 3, 0, 2]] * 3.0, t).item()) < 1e-12


# ----------------------------------------------------------------------------------------------------------- pkt
def _pkt_numpy(f_s: np.ndarray, f_t: np.ndarray, eps: float = 1e-6) -> float:
    def probs(f):
        b = f.shape[0]
        p = np.zeros((b, b))
        for i in range(b):
            for j in range(b):
                ui = f[i] / (np.linalg.norm(f[i]) + eps)
                uj = f[j] / (np.linalg.norm(f[j]) + eps)
                p[i, j] = (ui @ uj + 1) / 2
        return p / p.sum(axis=1, keepdims=True)
    p_s, p_t = probs(f_s), probs(f_t)
    return float(np.mean(p_t * np.log((p_t + eps) / (p_s + eps))))


def test_pkt_matches_numpy_and_invariances():
    torch.manual_seed(0)
    f_s, f_t = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    value = pkt_loss(f_s, f_t)
    assert math.isclose(value.item(), _pkt_numpy(f_s.numpy(), f_t.numpy()), rel_tol=1e-9)
    scales = torch.tensor([[0.5], [2.0], [3.0], [1.5], [9.0]], dtype=torch.float64)
    moved = pkt_loss(f_s @ _orthogonal(6) * scales, f_t @ _orthogonal(8, 1))
    assert math.isclose(moved.item(), value.item(), rel_tol=1e-6)  # the 1e-6 eps breaks exact scale invariance
    perm = torch.randperm(5)
    assert math.isclose(pkt_loss(f_s[perm], f_t[perm]).item(), value.item(), rel_tol=1e-10)
    assert pkt_loss(f_t.clone(), f_t) == 0  # the eps-perturbed KL of identical rows


def test_pkt_zero_row_has_finite_gradient():
    f_s = torch.randn(4, 6)
    f_s[2] = 0
    f_s.requires_grad_(True)
    value = pkt_loss(f_s, torch.randn(4, 3))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(f_s.grad).all()


def test_relational_losses_use_the_gathered_batch():
    """scope='global' wiring: a gather appending another process's rows gives the loss of the concatenated batch."""
    torch.manual_seed(0)
    s_local, t_local, s_other, t_other = (torch.randn(3, 5, dtype=torch.float64) for _ in range(4))

    def fake_gather():  # the losses gather the student features first, then the teacher's
        queue = [s_other, t_other]
        return lambda x: torch.cat([x, queue.pop(0)])

    s_all, t_all = torch.cat([s_local, s_other]), torch.cat([t_local, t_other])
    assert math.isclose(pkt_loss(s_local, t_local, gather=fake_gather()).item(), pkt_loss(s_all, t_all).item(),
                        rel_tol=1e-12)
    gathered, full = rkd_loss(s_local, t_local, gather=fake_gather()), rkd_loss(s_all, t_all)
    assert all(math.isclose(gathered[k].item(), full[k].item(), rel_tol=1e-12) for k in ('dist', 'angle'))
    assert math.isclose(sp_loss(s_local, t_local, gather=fake_gather()).item(), sp_loss(s_all, t_all).item(),
                        rel_tol=1e-12)
    assert not math.isclose(pkt_loss(s_local, t_local).item(), pkt_loss(s_all, t_all).item(), rel_tol=1e-3)


# ----------------------------------------------------------------------------------------------------------- fsp
def test_fsp_matrix_matches_loops_after_pooling():
    torch.manual_seed(0)
    first, second = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 5, 2, 2, dtype=torch.float64)
    g = fsp_matrix(first, second)
    pooled = first.numpy().reshape(2, 3, 2, 2, 2, 2).mean(axis=(3, 5))
    expected = np.zeros((2, 3, 5))
    for b in range(2):
        for i in range(3):
            for j in range(5):
                expected[b, i, j] = np.sum(pooled[b, i] * second.numpy()[b, j]) / 4
    np.testing.assert_allclose(g.numpy(), expected, rtol=1e-12)
    perm = torch.randperm(16)  # the same spatial permutation of both maps (equal sizes): G unchanged
    a, c = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 5, 4, 4, dtype=torch.float64)
    permuted = fsp_matrix(a.flatten(2)[..., perm].view_as(a), c.flatten(2)[..., perm].view_as(c))
    torch.testing.assert_close(permuted, fsp_matrix(a, c))


@pytest.mark.parametrize('name', ['fsp', 'ab'])
def test_init_stage_then_ce_only(name, teacher):
    torch.manual_seed(0)
    student = _tiny_vit()
    distiller = Distiller(student, teacher, [LossEntry(create_loss(name, init_epochs=2))], INFO)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    targets = F.one_hot(y, 10).float()
    out = distiller(Batch(x, targets, y, progress=1))  # init stage: method only, CE off
    out['loss'].backward()
    assert f'{name}.{name}' in out['terms']
    assert student.head.weight.grad is None or student.head.weight.grad.abs().max() == 0
    own = [p for p in distiller.losses[name].parameters()]
    assert own and all(p.grad is not None and p.grad.abs().sum() > 0 for p in own if p.ndim > 1)
    distiller.zero_grad(set_to_none=True)
    out = distiller(Batch(x, targets, y, progress=2))  # stage 2: the method's λ is 0, the loss is the task CE
    assert set(out['terms']) == {'task'}
    assert torch.equal(out['loss'].detach(), out['terms']['task'])
    out['loss'].backward()
    assert all(p.grad is None for p in own)
    # init_epochs=0: no phases, the method runs next to CE at any epoch
    plain = Distiller(_tiny_vit(), teacher, [LossEntry(create_loss(name, init_epochs=0))], INFO)
    out = plain(Batch(x, targets, y, progress=100))
    assert f'{name}.{name}' in out['terms'] and plain.task_weight_at(0) == 1.0
    assert math.isclose(out['loss'].item(), out['terms']['task'].item() + out['terms'][f'{name}.{name}'].item(),
                        rel_tol=1e-5)
    # a stage may end inside an epoch: 0.25 of a 1-epoch run
    short = Distiller(_tiny_vit(), teacher, [LossEntry(create_loss(name, init_epochs=0.25))], INFO)
    assert f'{name}.{name}' in short(Batch(x, targets, y, progress=0.2))['terms'] and short.task_weight_at(0.2) == 0.0
    assert set(short(Batch(x, targets, y, progress=0.3))['terms']) == {'task'} and short.task_weight_at(0.3) == 1.0


# ------------------------------------------------------------------------------------------------------------ ft
def test_ft_loss_scale_invariance_and_zero_when_proportional():
    torch.manual_seed(0)
    s, t = torch.randn(3, 4, 2, 2, dtype=torch.float64), torch.randn(3, 4, 2, 2, dtype=torch.float64)
    base = ft_loss(s, t)
    scales = torch.tensor([0.1, 3.0, 50.0], dtype=torch.float64).view(3, 1, 1, 1)  # per-sample positive scaling
    assert math.isclose(ft_loss(s * scales, t * 2.0).item(), base.item(), rel_tol=1e-12)
    assert ft_loss(t * scales, t) < 1e-15
    expected = np.mean(np.abs(s.numpy().reshape(3, -1) / np.linalg.norm(s.numpy().reshape(3, -1), axis=1)[:, None]
                              - t.numpy().reshape(3, -1) / np.linalg.norm(t.numpy().reshape(3, -1), axis=1)[:, None]))
    assert math.isclose(base.item(), expected, rel_tol=1e-12)


def test_ft_phases_freeze_the_paraphraser(teacher):
    torch.manual_seed(0)
    student = _tiny_vit()
    distiller = Distiller(student, teacher, [LossEntry(create_loss('ft', paraphraser_epochs=1))], INFO)
    loss = distiller.losses['ft']
    optimizer = torch.optim.AdamW(distiller.parameters(), lr=1e-3)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    targets = F.one_hot(y, 10).float()
    distiller.train()
    out = distiller(Batch(x, targets, y, progress=0))  # paraphraser pre-training: reconstruction only, CE off
    assert set(out['terms']) == {'task', 'ft.reconstruction'} and distiller.task_weight_at(0) == 0
    out['loss'].backward()
    assert all(p.grad is not None for p in loss.paraphraser.parameters())
    assert all(p.grad is None for p in student.parameters())
    assert all(p.grad is None for p in loss.translator.parameters())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    bn = [m for m in loss.paraphraser.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    stats = [m.running_mean.clone() for m in bn]
    distiller.train()
    out = distiller(Batch(x, targets, y, progress=1))  # stage 2: paraphraser frozen, student + translator on CE + λ·FT
    out['loss'].backward()
    optimizer.step()
    distiller.train()  # a generic .train() must not wake the paraphraser up
    assert not loss.paraphraser.training and all(not p.requires_grad for p in loss.paraphraser.parameters())
    assert loss.translator.training
    distiller(Batch(x, targets, y, progress=2))
    assert all(torch.equal(a, m.running_mean) for a, m in zip(stats, bn))  # BN statistics stay fixed
    assert all(p.grad is not None for p in loss.translator.parameters())
    translator_ids = {id(p) for p in loss.translator.parameters()}
    assert translator_ids <= {id(p) for g in optimizer.param_groups for p in g['params']}
    s_map = student.forward_intermediates(x, indices=list(loss.student_indices), output_fmt='NCHW',
                                          intermediates_only=True)[0]
    t_map = teacher.model.forward_intermediates(x, indices=list(loss.teacher_indices), intermediates_only=True)[0]
    s_map, t_map = align_spatial(s_map, t_map)
    assert loss.translator(s_map).shape == loss.paraphraser.encoder(t_map).shape


def test_ft_init_options():
    torch.manual_seed(0)
    kaiming = Paraphraser(64, 32).decoder[0].weight        # ConvTranspose2d(32, 32, 3): weight [32, 32, 3, 3]
    default = Paraphraser(64, 32, zoo_deconv_init=True).decoder[0].weight
    fan_out, fan_in = 32 * 9, 32 * 9  # torch's fans of a [32, 32, 3, 3] weight (dims 0 / 1 × receptive field)
    kaiming_std, default_std = math.sqrt(2 / fan_out), 1 / math.sqrt(3 * fan_in)  # kaiming_uniform_(a=√5): gain²=1/3
    assert abs(kaiming.std().item() - kaiming_std) < 0.1 * kaiming_std
    assert abs(default.std().item() - default_std) < 0.1 * default_std
    assert Paraphraser(8, 4, outer_kernel_size=1).encoder[0].kernel_size == (1, 1)
    assert Paraphraser(8, 4, use_bn=False).encoder[0].bias is not None


# ----------------------------------------------------------------------------------------------------------- rkd
def _angles_loops(f: np.ndarray) -> np.ndarray:
    b = f.shape[0]
    out = np.zeros((b, b, b))
    for i in range(b):
        for j in range(b):
            for k in range(b):
                u, v = f[j] - f[i], f[k] - f[i]
                nu, nv = np.linalg.norm(u), np.linalg.norm(v)
                if nu > 0 and nv > 0:
                    out[i, j, k] = (u @ v) / (nu * nv)
    return out


def test_rkd_relations_match_loops():
    torch.manual_seed(0)
    f = torch.randn(5, 4, dtype=torch.float64)
    np.testing.assert_allclose(angle_cosines(f).numpy(), _angles_loops(f.numpy()), atol=1e-12)
    d = np.array([[np.linalg.norm(a - b) for b in f.numpy()] for a in f.numpy()])
    # normaliser: mean of the B² − B off-diagonal (positive) entries, not of all B² entries
    np.testing.assert_allclose(normalized_distance(f).numpy(), d / (d.sum() / (5 * 4)), rtol=1e-9)
    assert not np.allclose(normalized_distance(f).numpy(), d / d.mean(), rtol=1e-3)


def test_rkd_invariances_and_teacher_gradient():
    torch.manual_seed(0)
    f_t = torch.randn(6, 5, dtype=torch.float64)
    f_s = (2.5 * f_t @ _orthogonal(5) + torch.randn(1, 5, dtype=torch.float64)).requires_grad_(True)
    f_t.requires_grad_(True)
    terms = rkd_loss(f_s, f_t)
    assert terms['dist'] < 1e-10 and terms['angle'] < 1e-10
    other = torch.randn(6, 7, dtype=torch.float64)  # d_s ≠ d_t: any rotation/translation/scale of f_s keeps L
    base = rkd_loss(other, f_t.detach())
    moved = rkd_loss(0.3 * other @ _orthogonal(7, 2) - 4.0, f_t.detach())
    assert all(math.isclose(base[k].item(), moved[k].item(), rel_tol=1e-8) for k in base)
    sum(rkd_loss(other.requires_grad_(True), f_t).values()).backward()
    assert f_t.grad is None and other.grad is not None
    assert angle_cosines(other).shape == (6, 6, 6)


def test_rkd_chunked_angle_equals_unchunked():
    torch.manual_seed(0)
    f_t = torch.randn(7, 5, dtype=torch.float64)
    f_a = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    f_b = f_a.detach().clone().requires_grad_(True)
    full, chunked = rkd_angle_loss(f_a, f_t), rkd_angle_loss(f_b, f_t, chunk_size=3)
    assert math.isclose(full.item(), chunked.item(), rel_tol=1e-12)
    full.backward()
    chunked.backward()
    torch.testing.assert_close(f_a.grad, f_b.grad)
    assert rkd_distance_loss(f_a, f_t) > 0


# ------------------------------------------------------------------------------------------------------------ ab
def test_ab_two_branch_formula_on_hand_picked_values():
    m = 2.0
    s = torch.tensor([-3.0, -2.0, -1.9, 0.0, 1.9, 2.0, 3.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 2.5], dtype=torch.float64)
    t = torch.tensor([0.0, -1.0, 0.0, -5.0, -0.1, 0.0, 0.0, 1.0, 0.5, 2.0, 0.1, 3.0, 1.0, 0.2], dtype=torch.float64)
    expected = []
    for sv, tv in zip(s.tolist(), t.tolist()):
        if tv > 0:  # the teacher neuron is active (t = 0 counts as inactive)
            expected.append((sv - m) ** 2 if sv <= m else 0.0)
        else:
            expected.append((sv + m) ** 2 if sv > -m else 0.0)
    assert math.isclose(ab_loss(s, t, m).item(), float(np.mean(expected)), rel_tol=1e-12)


def test_ab_zero_and_no_gradient_beyond_the_margin():
    s = torch.tensor([2.0, 3.5, -2.0, -4.0, 0.5, -0.5], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1.0, 0.3, 0.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    ab_loss(s, t, 2.0).backward()
    assert torch.all(s.grad[:4] == 0) and torch.all(s.grad[4:] != 0)
    assert ab_loss(s[:4], t[:4], 2.0) == 0
    # post-ReLU teacher maps give the same loss as pre-ReLU ones (only [t > 0] is read)
    pre = torch.randn(50, dtype=torch.float64)
    student = torch.randn(50, dtype=torch.float64)
    assert ab_loss(student, torch.relu(pre)) == ab_loss(student, pre)


# ------------------------------------------------------------------------------------------------------------ sp
def test_sp_matches_numpy_and_invariances():
    torch.manual_seed(0)
    s, t = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.randn(4, 5, 3, 3, dtype=torch.float64)
    def gram(x):
        q = x.reshape(x.shape[0], -1)
        g = q @ q.T
        return g / np.linalg.norm(g, axis=1, keepdims=True)
    expected = np.sum((gram(s.numpy()) - gram(t.numpy())) ** 2) / 16
    value = sp_loss(s, t)
    assert math.isclose(value.item(), expected, rel_tol=1e-12)
    flat = s.flatten(1)
    rotated = (flat @ _orthogonal(12)).view_as(s)
    assert math.isclose(sp_loss(5.0 * rotated, 0.2 * t).item(), value.item(), rel_tol=1e-10)
    assert math.isclose(sp_loss(s[:, [2, 0, 1]], t).item(), value.item(), rel_tol=1e-12)
    perm = torch.randperm(4)
    assert math.isclose(sp_loss(s[perm], t[perm]).item(), value.item(), rel_tol=1e-12)
    assert sp_loss(3.0 * (t.flatten(1) @ _orthogonal(45)), t) < 1e-20  # G_s ∝ G_t


# ------------------------------------------------------------------------------------------------- generic runs
# epochs of the two steps, and which of the loss's own parameters must have a gradient at each step
PHASES = {'ft': ((0, 'paraphraser'), (1, 'translator'))}
OPTIONS = {'ft': dict(paraphraser_epochs=1)}


@pytest.mark.parametrize('student_kind', ['vit', 'cnn'])
@pytest.mark.parametrize('name', ZOO_A)
def test_two_adamw_steps(name, student_kind, teacher):
    torch.manual_seed(0)
    student = _tiny_vit() if student_kind == 'vit' else vitkd.create_student('resnet18', 10)
    distiller = Distiller(student, teacher, [LossEntry(create_loss(name, **OPTIONS.get(name, {})))], INFO)
    loss = distiller.losses[name]
    optimizer = torch.optim.AdamW([p for p in distiller.parameters() if p.requires_grad], lr=1e-3)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    targets = F.one_hot(y, 10).float()
    before = {n: p.detach().clone() for n, p in distiller.named_parameters()}
    for epoch, own in PHASES.get(name, ((0, ''), (0, ''))):
        distiller.train()
        optimizer.zero_grad(set_to_none=True)
        out = distiller(Batch(x, targets, y, progress=epoch))
        assert torch.isfinite(out['loss']) and any(k.startswith(f'{name}.') for k in out['terms'])
        out['loss'].backward()
        student_grads = [p.grad for p in student.parameters() if p.grad is not None]
        if name == 'ft' and epoch == 0:
            assert not student_grads  # paraphraser pre-training: the student waits
        else:
            assert student_grads and all(torch.isfinite(g).all() for g in student_grads)
            assert any(g.abs().sum() > 0 for g in student_grads)
        trainable = [(n, p) for n, p in loss.named_parameters() if p.requires_grad and n.startswith(own)]
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trainable), name
        assert all(p.grad is None for p in teacher.model.parameters())
        optimizer.step()
    changed = [n for n, p in distiller.named_parameters() if not torch.equal(before[n], p)]
    assert any(n.startswith('student.') for n in changed)
    if any(True for _ in loss.parameters()):
        assert any(n.startswith(f'losses.{name}.') for n in changed)


def test_unknown_option_is_rejected():
    for name in ZOO_A:
        with pytest.raises(LossSpecError):
            create_loss(name, no_such_option=1)
