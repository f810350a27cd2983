"""Knowledge-Distillation-Zoo, second half: sobolev, bss, cc, lwm, irg, vid, ofd, afd, dml, kdsvd.

Each pure function is checked against an independent computation (explicit loops, numpy, closed forms) or a property
of the method; then every method trains two steps inside a Distiller with a tiny ViT and a CNN student.
"""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.multiprocessing as mp

import vitkd
from vitkd.distiller import Distiller, LossEntry
from vitkd.features import Features, TapSpec, extract
from vitkd.losses import Batch, RunInfo, create_loss
from vitkd.losses.afd import ChannelAttention, afd_loss, channel_attention_weights
from vitkd.losses.bss import (boundary_attack, bss_factor, bss_loss, sample_attack_classes, select_base_samples,
                              valid_pixel_range)
from vitkd.losses.cc import cc_loss, correlation_matrix
from vitkd.losses.irg import channel_pool, edge_matrix, irg_terms, transformation_distance
from vitkd.losses.kdsvd import align_singular_vectors, dfv, kdsvd_loss, right_singular_vectors
from vitkd.losses.lwm import grad_cam, lwm_loss, target_gradient
from vitkd.losses.ofd import ofd_margin, ofd_partial_l2, pre_activation_tap
from vitkd.losses.sobolev import sobolev_loss, target_logit_input_gradient
from vitkd.losses.vid import VIDRegressor, vid_nll

TINY_VIT = dict(img_size=32, patch_size=4, depth=4, embed_dim=48, num_heads=2)
METHODS = ['sobolev', 'bss', 'cc', 'lwm', 'irg', 'vid', 'ofd', 'afd', 'dml', 'kdsvd']


def _orthogonal(d: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


# ---------------------------------------------------------------------------------------------------------- Sobolev
def test_sobolev_input_gradient_matches_hand_derivative():
    torch.manual_seed(0)
    a, b = torch.randn(4, 6), torch.randn(4)
    x = torch.randn(3, 6, requires_grad=True)
    logits = (x ** 2) @ a.t() + x.sum(1, keepdim=True) * b  # z_k = Σ_i a_ki x_i² + b_k Σ_i x_i
    labels = torch.tensor([2, 0, 3])
    grad = target_logit_input_gradient(logits, x, labels, create_graph=False)
    expected = 2 * a[labels] * x.detach() + b[labels].unsqueeze(1)  # ∂z_y/∂x_i = 2 a_yi x_i + b_y
    torch.testing.assert_close(grad, expected)


def test_sobolev_loss_normalises_per_sample():
    torch.manual_seed(0)
    g_s, g_t = torch.randn(3, 10), torch.randn(3, 10)
    ns, nt = g_s.numpy(), g_t.numpy()
    expected = np.mean((ns / np.linalg.norm(ns, axis=1, keepdims=True) - nt / np.linalg.norm(nt, axis=1, keepdims=True))
                       ** 2)
    assert sobolev_loss(g_s, g_t).item() == pytest.approx(float(expected), rel=1e-5)
    scale = torch.tensor([[2.0], [0.5], [7.0]])  # positive per-sample scale = scaling that sample's logit
    assert sobolev_loss(g_s * scale, g_t / scale).item() == pytest.approx(float(expected), rel=1e-5)
    assert sobolev_loss(g_t, g_t).item() == pytest.approx(0.0, abs=1e-12)


def test_sobolev_zero_for_student_copy_of_teacher_and_logit_scale_invariant():
    torch.manual_seed(0)
    teacher = vitkd.create_teacher('resnet18', 10, pretrained=False)
    student = vitkd.create_student('resnet18', 10)
    student.load_state_dict(teacher.model.state_dict())
    info = RunInfo(num_classes=10, input_size=(3, 32, 32), student_name='resnet18')
    d = Distiller(student, teacher, [LossEntry(create_loss('sobolev'))], info).eval()  # BN as in the teacher
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    assert d(Batch(x, F.one_hot(y, 10).float(), y))['terms']['sobolev.jacobian'].item() < 1e-10
    with torch.no_grad():  # scaling the teacher's logits by 3 scales its input gradient: no change after normalising
        teacher.model.fc.weight.mul_(3)
        teacher.model.fc.bias.mul_(3)
    assert d(Batch(x, F.one_hot(y, 10).float(), y))['terms']['sobolev.jacobian'].item() < 1e-10
    student.fc.weight.data.add_(0.3 * torch.randn_like(student.fc.weight))
    assert d(Batch(x, F.one_hot(y, 10).float(), y))['terms']['sobolev.jacobian'].item() > 1e-6


def test_sobolev_double_backward_matches_finite_differences():
    torch.manual_seed(0)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    w2 = torch.randn(4, 3, dtype=torch.float64)
    grad_t = torch.randn(2, 50, dtype=torch.float64)
    labels = torch.tensor([1, 3])

    def loss_of(w1):
        inp = x.clone().requires_grad_(True)
        feat = torch.tanh(F.conv2d(inp, w1, padding=1)).mean(dim=(2, 3))  # [2, 3]
        g_s = target_logit_input_gradient(feat @ w2.t(), inp, labels, create_graph=True)
        return sobolev_loss(g_s, grad_t)

    w1 = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(loss_of, (w1,), eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------- BSS
def test_bss_schedule_reproduces_zoo_epochs():
    def zoo(e1, epochs=200, lam=2.0):  # train_bss.py with 1-indexed epochs
        return 0 if e1 <= 10 else max(lam * (1 - 5 / 4 * (e1 - 1) / epochs), 0)
    for e1 in (1, 10, 11, 100, 160, 161, 200):
        assert 2.0 * bss_factor(e1 - 1, 200) == pytest.approx(zoo(e1)), e1
    assert bss_factor(9, 200) == 0 and bss_factor(10, 200) > 0 and bss_factor(159, 200) > 0
    assert bss_factor(160, 200) == 0


def test_bss_loss_has_no_t_squared():
    torch.manual_seed(0)
    z_s, z_t, t = torch.randn(5, 7), torch.randn(5, 7), 3.0
    p_t = np.exp(z_t.numpy() / t) / np.exp(z_t.numpy() / t).sum(1, keepdims=True)
    p_s = np.exp(z_s.numpy() / t) / np.exp(z_s.numpy() / t).sum(1, keepdims=True)
    expected = float((p_t * (np.log(p_t) - np.log(p_s))).sum() / 5)
    assert bss_loss(z_s, z_t, t).item() == pytest.approx(expected, rel=1e-5)


def test_bss_base_sample_selection():
    torch.manual_seed(0)
    z_t = torch.randn(40, 5)
    z_s = z_t + 0.8 * torch.randn(40, 5)  # a student that mostly agrees
    labels = z_t.argmax(1).clone()
    labels[::3] = (labels[::3] + 1) % 5  # some samples wrong for the teacher
    chosen = select_base_samples(z_s, z_t, labels, attack_size=4)
    p_s, p_t = F.softmax(z_s, 1).numpy(), F.softmax(z_t, 1).numpy()
    candidates = []
    for i in range(40):
        if z_s[i].argmax() == labels[i] and z_t[i].argmax() == labels[i]:
            score = sum((p_t[i, k] - p_s[i, k]) ** 2 for k in range(5) if k != labels[i])
            candidates.append((score, i))
    assert len(candidates) > 4
    expected = [i for _, i in sorted(candidates, reverse=True)[:4]]
    assert chosen.tolist() == expected
    few = select_base_samples(z_s, z_t, labels, attack_size=100)
    assert sorted(few.tolist()) == sorted(i for _, i in candidates)


def test_bss_attack_class_distribution():
    logits = torch.tensor([[3.0, 1.0, 0.5, 0.0, -1.0, 2.0]])
    draws = sample_attack_classes(logits.expand(30000, -1), generator=torch.Generator().manual_seed(0))
    counts = np.bincount(draws.numpy(), minlength=6)
    assert counts[0] == 0  # never the teacher's top-1
    p = np.exp(logits[0].numpy())
    p[0] = 0
    expected = p / p.sum() * 30000
    chi2 = float(((counts[1:] - expected[1:]) ** 2 / expected[1:]).sum())
    assert chi2 < 30, (counts, expected)  # 4 degrees of freedom: P(χ² > 30) ≈ 5e-6


def test_bss_attack_one_step_and_bounds():
    torch.manual_seed(0)
    weight = torch.randn(4, 12)
    forward = lambda x: x.flatten(1) @ weight.t()  # noqa: E731  a linear "teacher"
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    lower, upper = valid_pixel_range(mean, std)
    x = ((torch.rand(3, 3, 2, 2) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    labels = forward(x).argmax(1)
    attack = (labels + 1) % 4
    out = boundary_attack(forward, x, labels, attack, lower, upper, step_alpha=0.3, num_steps=1, eps=1e-4)
    # one step by hand: o = p_a − p_y, ∂o/∂x = Wᵀ(p_a(e_a − p) − p_y(e_y − p)) for z = Wx
    p = F.softmax(forward(x), 1)
    eye = torch.eye(4)
    dz = p.gather(1, attack[:, None]) * (eye[attack] - p) - p.gather(1, labels[:, None]) * (eye[labels] - p)
    g = (dz @ weight).view_as(x)
    step = 0.3 * (p.gather(1, labels[:, None]) - p.gather(1, attack[:, None]) + 1e-4).view(-1, 1, 1, 1) * g / \
        g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    expected = torch.minimum(torch.maximum(x + step, lower), upper)
    torch.testing.assert_close(out, expected)
    far = boundary_attack(forward, x, labels, attack, lower, upper, step_alpha=50.0, num_steps=10)
    assert bool((far >= lower - 1e-6).all()) and bool((far <= upper + 1e-6).all())
    assert far.grad_fn is None and not far.requires_grad
    pixels = far * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def _biased_pair(bias_class: int = 3):
    """A random teacher and a tiny ViT student that both predict ``bias_class`` on any input (BSS needs samples
    both classify correctly)."""
    teacher = vitkd.create_teacher('resnet18', 10, pretrained=False)
    student = vitkd.create_student('deit_ti_distilled', 10, **TINY_VIT)
    with torch.no_grad():
        teacher.model.fc.bias[bias_class] += 6.0
        student.head.bias[bias_class] += 6.0
        student.head_dist.bias[bias_class] += 6.0
    return student, teacher


def test_bss_attack_leaves_networks_alone_and_trains_student():
    torch.manual_seed(0)
    student, teacher = _biased_pair()
    info = RunInfo(num_classes=10, input_size=(3, 32, 32), epochs=10, student_name='deit_ti_distilled',
                   student_kwargs=TINY_VIT)
    loss = create_loss('bss', start_epoch=0, attack_size=3, num_steps=2)
    d = Distiller(student, teacher, [LossEntry(loss)], info, task_weight=0.0)  # the loss is the BSS term alone
    t_before = [p.clone() for p in teacher.model.parameters()]
    s_before = [p.clone() for p in student.parameters()]
    x, y = torch.randn(6, 3, 32, 32), torch.full((6,), 3)
    out = d(Batch(x, F.one_hot(y, 10).float(), y, progress=1.0))
    assert all(torch.equal(a, b) for a, b in zip(t_before, teacher.model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(s_before, student.parameters()))
    kl = out['terms']['bss.kl']
    assert kl.item() > 0 and torch.isfinite(kl)
    assert out['loss'].item() == pytest.approx(kl.item())
    (g,) = torch.autograd.grad(out['loss'], student.head_dist.weight)
    assert g.abs().sum() > 0
    # no BSS term before the schedule starts
    d.losses['bss'].start_epoch = 5
    assert d(Batch(x, F.one_hot(y, 10).float(), y, progress=1.0))['terms']['bss.kl'].item() == 0
    # per_step: the schedule at the fractional epoch; a one-epoch run with the Zoo's 10/200 start and 1.25 decay
    d.losses['bss'].start_epoch, d.losses['bss'].per_step, d.losses['bss'].epochs = 0.05, True, 1
    assert d(Batch(x, F.one_hot(y, 10).float(), y, progress=0.04))['terms']['bss.kl'].item() == 0
    assert d(Batch(x, F.one_hot(y, 10).float(), y, progress=0.81))['terms']['bss.kl'].item() == 0  # 1 - 1.25 * 0.81 < 0
    torch.manual_seed(5)  # the attack classes are sampled: the same draws for both passes
    on = d(Batch(x, F.one_hot(y, 10).float(), y, progress=0.4))['terms']['bss.kl'].item()
    d.losses['bss'].start_epoch, d.losses['bss'].per_step = 0, False  # whole epoch 0 of 1: factor 1
    torch.manual_seed(5)
    full = d(Batch(x, F.one_hot(y, 10).float(), y, progress=0.4))['terms']['bss.kl'].item()
    assert full > 0 and on == pytest.approx((1 - 1.25 * 0.4) * full, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------- CC
def test_cc_correlation_matches_loops_and_rbf_limit():
    torch.manual_seed(0)
    f = torch.randn(5, 7, dtype=torch.float64)
    gamma = 0.4
    c = correlation_matrix(f, gamma, order=2).numpy()
    fn = f.numpy() / np.linalg.norm(f.numpy(), axis=1, keepdims=True)
    for i in range(5):
        for j in range(5):
            s = float(fn[i] @ fn[j])
            expected = sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * s ** p for p in range(3))
            assert c[i, j] == pytest.approx(expected, rel=1e-12)
    exact = np.exp(-gamma * ((fn[:, None] - fn[None]) ** 2).sum(-1))
    np.testing.assert_allclose(correlation_matrix(f, gamma, order=25).numpy(), exact, rtol=1e-12)
    assert np.abs(c - exact).max() > 1e-4  # order 2 is only an approximation


def test_cc_invariances():
    torch.manual_seed(0)
    f_s, f_t = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    base = cc_loss(f_s, f_t).item()
    assert base > 0
    scale = torch.rand(6, 1, dtype=torch.float64) + 0.1
    assert cc_loss(f_s * scale, f_t @ _orthogonal(5)).item() == pytest.approx(base, rel=1e-10)
    embed = _orthogonal(8)[:, :5].t()  # [5, 8] orthonormal rows: S is preserved
    assert cc_loss(f_t @ embed * 3, f_t).item() == pytest.approx(0.0, abs=1e-20)


IRG_OPTS = dict(student_blocks=[0, 1], teacher_blocks=[1, 2], w_vertex=1.0, w_edge=2.0, w_transformation=3.0)
SCOPE_LOSSES = (('cc', dict(gamma=0.2, order=3)), ('irg', IRG_OPTS))


def _scope_inputs(n: int = 8) -> tuple[Features, Features]:
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    student = Features(logits=r(n, 5), pooled=r(n, 6), blocks={0: r(n, 3, 2, 2), 1: r(n, 3, 2, 2)}, num_blocks=2)
    teacher = Features(logits=r(n, 5), pooled=r(n, 7), blocks={1: r(n, 4, 4, 4), 2: r(n, 8, 2, 2)}, num_blocks=3)
    return student, teacher


def _scope_terms(name: str, scope: str, student: Features, teacher: Features, rows=slice(None)):
    """The loss's terms on ``rows`` of the batch, and the gradient w.r.t. the student's pooled vector there."""
    pooled = student.pooled[rows].clone().requires_grad_(True)
    part = Features(logits=student.logits[rows], pooled=pooled, blocks={k: v[rows] for k, v in student.blocks.items()},
                    num_blocks=student.num_blocks)
    other = Features(logits=teacher.logits[rows], pooled=teacher.pooled[rows],
                     blocks={k: v[rows] for k, v in teacher.blocks.items()}, num_blocks=teacher.num_blocks)
    n = pooled.shape[0]
    batch = Batch(images=torch.zeros(n, 3, 8, 8), targets=torch.zeros(n, 5), labels=torch.zeros(n, dtype=torch.long),
                  labels_b=torch.zeros(n, dtype=torch.long))
    loss = create_loss(name, scope=scope, **dict(SCOPE_LOSSES)[name])
    loss.configure_taps(nn.Identity(), nn.Identity())  # explicit taps: the models are not inspected
    out = loss(part, other, batch)
    sum(out.values()).backward()
    return {k: v.detach() for k, v in out.items()}, pooled.grad


def _scope_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        student, teacher = _scope_inputs()
        results = {}
        for split in (4,):  # equal per-process batches (training drops the last partial batch)
            rows = slice(0, split) if rank == 0 else slice(split, 8)
            for name, _ in SCOPE_LOSSES:
                for scope in ('global', 'local'):
                    results[split, name, scope] = _scope_terms(name, scope, student, teacher, rows)
        torch.save(results, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


def test_cc_and_irg_global_scope_on_two_processes_equals_one_process_on_the_whole_batch(tmp_path):
    """Two gloo processes, each holding part of an 8-sample batch: ``scope='global'`` gives every rank the loss of
    the whole batch on one process (recomputed from the pure functions), and the gradients the ranks get for their
    slices, averaged as DDP does, are the one-process gradient; ``local`` is the loss of each rank's own slice."""
    mp.spawn(_scope_worker, args=(str(tmp_path / 'init'), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2)]
    student, teacher = _scope_inputs()
    whole = {name: _scope_terms(name, 'local', student, teacher) for name, _ in SCOPE_LOSSES}
    # the one-process values from the pure functions, independent of the loss classes
    assert whole['cc'][0]['correlation'].item() == pytest.approx(cc_loss(student.pooled, teacher.pooled, 0.2, 3).item(),
                                                                 rel=1e-6)
    ref = irg_terms(student.logits, teacher.logits, student.pooled, teacher.pooled,
                    (student.blocks[0], student.blocks[1]), (teacher.blocks[1], teacher.blocks[2]))
    for term, w in (('vertex', 1.0), ('edge', 2.0), ('transformation', 3.0)):
        assert whole['irg'][0][term].item() == pytest.approx(w * ref[term].item(), rel=1e-6)
    for split in (4,):
        rows = [slice(0, split), slice(split, 8)]
        for name, _ in SCOPE_LOSSES:
            full_terms, full_grad = whole[name]
            for rank in range(2):
                terms, grad = results[rank][split, name, 'global']
                assert terms.keys() == full_terms.keys()
                for term in terms:
                    assert terms[term].item() == pytest.approx(full_terms[term].item(), rel=1e-5), (name, term)
                # each rank backpropagates the same global loss: the gather sums 2 copies, DDP divides by 2
                torch.testing.assert_close(grad / 2, full_grad[rows[rank]], rtol=1e-4, atol=1e-6)
                local_terms, _ = results[rank][split, name, 'local']
                own, _ = _scope_terms(name, 'local', student, teacher, rows[rank])
                assert all(local_terms[t].item() == pytest.approx(own[t].item(), rel=1e-6) for t in own)
                assert any(abs(local_terms[t].item() - full_terms[t].item()) > 1e-4 for t in own), (name, split)
    with pytest.raises(ValueError):
        create_loss('cc', scope='world')


# ---------------------------------------------------------------------------------------------------------- LwM
class _GapLinear(nn.Module):
    """conv → ReLU → F → GAP → linear: Grad-CAM at F is ReLU(Σ_c W_yc F_c)/HW."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        feat = torch.relu(self.conv(x))
        return self.fc(feat.mean(dim=(2, 3))), feat


def test_lwm_gradcam_is_the_class_activation_map():
    torch.manual_seed(0)
    net = _GapLinear()
    x, labels = torch.randn(2, 2, 5, 5), torch.tensor([1, 2])
    logits, feat = net(x)
    grad = target_gradient(logits, labels, feat, create_graph=False)
    cam = grad_cam(feat, grad)
    w = net.fc.weight.detach()
    expected = torch.relu(torch.einsum('bc,bchw->bhw', w[labels], feat.detach())) / 25
    torch.testing.assert_close(cam, expected)
    assert cam.flatten(1).std(1).min() > 0  # not spatially constant
    zoo = grad_cam(feat, grad, mode='zoo')
    torch.testing.assert_close(zoo, zoo[:, :1, :1].expand_as(zoo))  # the Zoo's gradient-based CAM is constant here
    with torch.no_grad():  # a positive scaling of the logits scales the CAM: same normalised CAM, zero loss
        net.fc.weight.mul_(4)
        net.fc.bias.mul_(4)
    logits2, feat2 = net(x)
    cam2 = grad_cam(feat2, target_gradient(logits2, labels, feat2, create_graph=False))
    assert lwm_loss(cam2, cam).item() == pytest.approx(0.0, abs=1e-7)
    assert lwm_loss(cam, torch.rand_like(cam)).item() > 1e-3


def test_lwm_gradient_through_copies_of_the_map():
    torch.manual_seed(0)
    net = _GapLinear()
    x, labels = torch.randn(2, 2, 5, 5), torch.tensor([0, 3])
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits, feat = net(x)  # bf16
    assert feat.dtype == torch.bfloat16
    (direct,) = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), feat, retain_graph=True)
    via_copy = target_gradient(logits.float(), labels, feat.float(), create_graph=False)  # what a loss receives
    assert via_copy.dtype == torch.float32
    torch.testing.assert_close(via_copy, direct.float())
    net = net.to(memory_format=torch.channels_last)  # the distiller's .contiguous() copy of a channels_last map
    logits, feat = net(x.to(memory_format=torch.channels_last))
    assert not feat.is_contiguous()
    (direct,) = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), feat, retain_graph=True)
    torch.testing.assert_close(target_gradient(logits, labels, feat.float().contiguous(), create_graph=False), direct)


def test_lwm_double_backward_matches_finite_differences():
    torch.manual_seed(0)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    fc = torch.randn(3, 3, dtype=torch.float64)
    cam_t = torch.rand(2, 4, 4, dtype=torch.float64)
    labels = torch.tensor([0, 2])

    def loss_of(w1):
        feat = torch.tanh(F.conv2d(x, w1, padding=1))  # [2, 3, 4, 4]
        logits = torch.tanh(feat).pow(2).mean(dim=(2, 3)) @ fc.t()  # gradient depends on F spatially
        grad = target_gradient(logits, labels, feat, create_graph=True)
        return lwm_loss(grad_cam(feat, grad), cam_t)

    w1 = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(loss_of, (w1,), eps=1e-6, atol=1e-6)


def test_lwm_vit_tokens_become_the_block_grid():
    torch.manual_seed(0)
    student = vitkd.create_student('deit_ti_distilled', 10, **TINY_VIT)
    teacher = vitkd.create_teacher('resnet18', 10, pretrained=False)
    loss = create_loss('lwm')
    loss.adapt_models(student, teacher.model)
    loss.configure_taps(student, teacher.model)
    assert loss._student_map.module == 'blocks.2' and loss._teacher_map.module == 'layer3'  # 2/3 of the depth
    assert all(not m.fused_attn for m in student.modules() if hasattr(m, 'fused_attn'))
    x = torch.randn(2, 3, 32, 32)
    feats = extract(student, x, TapSpec(blocks=(2,), modules=('blocks.2',)))
    torch.testing.assert_close(loss._student_map.grid(feats.modules['blocks.2'], (32, 32)), feats.blocks[2])
    other = create_loss('lwm', cam='zoo', student_block=-3, teacher_block=2)
    other.configure_taps(student, teacher.model)
    assert (other._student_map.module, other._teacher_map.module, other.cam) == ('blocks.1', 'layer2', 'zoo')


# ---------------------------------------------------------------------------------------------------------- IRG
def test_irg_edge_matrix_and_invariances():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    e = edge_matrix(x).numpy()
    flat = x.flatten(1).numpy()
    d = np.array([[((flat[i] - flat[j]) ** 2).sum() for j in range(5)] for i in range(5)])
    np.testing.assert_allclose(e, d / d.max(), rtol=1e-10, atol=1e-12)
    assert np.allclose(np.diag(e), 0) and e.max() == pytest.approx(1.0)
    rotated = (x.flatten(1) @ _orthogonal(12)) * 4.0
    np.testing.assert_allclose(edge_matrix(rotated).numpy(), e, atol=1e-12)


def test_irg_channel_pool_reproduces_pair_average_and_bins():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(channel_pool(x, 4), (x[:, 0::2] + x[:, 1::2]) / 2)  # the Zoo's ratio-2 rule
    y = torch.randn(2, 5, 2, 2)
    pooled = channel_pool(y, 3)
    for i in range(3):  # adaptive bins [⌊5i/3⌋, ⌈5(i+1)/3⌉)
        lo, hi = (5 * i) // 3, -(-5 * (i + 1) // 3)
        torch.testing.assert_close(pooled[:, i], y[:, lo:hi].mean(1))


def test_irg_terms_vertex_and_transformation():
    torch.manual_seed(0)
    z_s, z_t = torch.randn(4, 6), torch.randn(4, 6)
    f_s, f_t = torch.randn(4, 5), torch.randn(4, 9)
    a = torch.randn(4, 3, 4, 4)
    t1, t2 = torch.randn(4, 6, 4, 4), torch.randn(4, 12, 2, 2)
    terms = irg_terms(z_s, z_t, f_s, f_t, (a, a), (t1, t1))
    assert terms['vertex'].item() == pytest.approx(float(((z_s - z_t) ** 2).mean()), rel=1e-6)
    assert terms['transformation'].item() == 0  # identical taps in both networks: τ ≡ 1 on both sides
    tau = transformation_distance(t1, t2)  # t1 pooled to 2×2, t2's 12 channels pooled to 6
    ref = ((F.avg_pool2d(t1, 2) - (t2[:, 0::2] + t2[:, 1::2]) / 2) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(tau, ref / ref.max())
    assert irg_terms(z_s, z_t, f_s, f_t, (a, a), (t1, t2))['transformation'].item() > 0


# ---------------------------------------------------------------------------------------------------------- VID
def test_vid_variance_init_and_mle_stationary_point():
    reg = VIDRegressor(3, 4, 4, init_var=5.0)
    torch.testing.assert_close(reg.variance(), torch.full((4,), 5.0), rtol=1e-6, atol=0)
    torch.manual_seed(0)
    mean, target = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2) * torch.tensor([0.5, 1, 2, 3]).view(1, 4, 1, 1)
    mle = ((target - mean) ** 2).mean(dim=(0, 2, 3))
    var = mle.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(vid_nll(mean, target, var), var)
    assert g.abs().max() < 1e-6
    var2 = (mle * 2).requires_grad_(True)
    (g2,) = torch.autograd.grad(vid_nll(mean, target, var2), var2)
    assert g2.abs().min() > 1e-3
    expected = np.mean(0.5 * (np.log(mle.numpy()[None, :, None, None])
                              + (target - mean).numpy() ** 2 / mle.numpy()[None, :, None, None]))
    assert vid_nll(mean, target, mle).item() == pytest.approx(float(expected), rel=1e-5)


def test_vid_module_options_and_stage_mean():
    torch.manual_seed(0)
    loss = create_loss('vid', sf=0.5, init_var=2.0, student_blocks=[0, 1], teacher_blocks=[1, 2])
    loss.configure_taps(nn.Identity(), nn.Identity())
    student = Features(logits=torch.randn(2, 5), blocks={0: torch.randn(2, 6, 4, 4), 1: torch.randn(2, 6, 4, 4)},
                       num_blocks=2)
    teacher = Features(blocks={1: torch.randn(2, 8, 8, 8), 2: torch.randn(2, 12, 2, 2)}, num_blocks=3)
    loss.setup(student, teacher, RunInfo(num_classes=5))
    assert [r.mean[0].out_channels for r in loss.regressors] == [4, 6]  # M = ⌊0.5·C_t⌋
    for r in loss.regressors:
        torch.testing.assert_close(r.variance(), torch.full_like(r.variance(), 2.0))
    batch = Batch(images=torch.zeros(2, 3, 8, 8), targets=torch.zeros(2, 5), labels=torch.zeros(2, dtype=torch.long),
                  labels_b=torch.zeros(2, dtype=torch.long))
    nll = loss(student, teacher, batch)['nll']
    stage1 = vid_nll(loss.regressors[0](student.blocks[0]), F.avg_pool2d(teacher.blocks[1], 2), torch.full((8,), 2.0))
    stage2 = vid_nll(loss.regressors[1](F.avg_pool2d(student.blocks[1], 2)), teacher.blocks[2], torch.full((12,), 2.0))
    assert nll.item() == pytest.approx((stage1.item() + stage2.item()) / 2, rel=1e-5)
    alphas = {n for n, _ in loss.named_parameters() if n.endswith('alpha')}
    assert alphas == {'regressors.0.alpha', 'regressors.1.alpha'}


# ---------------------------------------------------------------------------------------------------------- OFD
def test_ofd_margin_and_partial_l2():
    torch.manual_seed(0)
    t = torch.randn(3, 4, 2, 2)
    t[:, 2] = t[:, 2].abs()  # channel without negatives
    m = ofd_margin(t)
    for c in range(4):
        neg = t[:, c][t[:, c] < 0]
        assert m[c].item() == pytest.approx(neg.mean().item() if neg.numel() else 0.0, abs=1e-5)
    s = torch.randn(3, 4, 2, 2, requires_grad=True)
    loss = ofd_partial_l2(s, t, m)
    sn, tn, mn = s.detach().numpy(), t.numpy(), m.numpy()
    total = 0.0
    for idx in np.ndindex(sn.shape):
        target = max(tn[idx], mn[idx[1]])
        if not (sn[idx] <= target and target <= 0):
            total += (sn[idx] - target) ** 2
    assert loss.item() == pytest.approx(total / sn.size, rel=1e-5)
    (g,) = torch.autograd.grad(loss, s)
    target = torch.maximum(t, m.view(1, -1, 1, 1))
    skipped = (s.detach() <= target) & (target <= 0)
    assert skipped.any() and bool((g[skipped] == 0).all()) and bool((g[~skipped] != 0).all())


@pytest.mark.parametrize('arch,stage,expected', [('regnety_002', 3, 's3.b4.act3:input'),
                                                 ('resnet18', 2, 'layer2.1.act2:input'),
                                                 ('resnet18', 0, 'act1:input')])
def test_ofd_pre_activation_taps(arch, stage, expected):
    torch.manual_seed(0)
    # zero_init_last=False: timm zero-initialises each block's last BN, which would leave only the (post-ReLU) shortcut
    model = vitkd.create_teacher(arch, 10, pretrained=False, zero_init_last=False).model
    name = pre_activation_tap(model, stage)
    assert name == expected
    feats = extract(model, torch.randn(2, 3, 32, 32), TapSpec(blocks=(stage,), modules=(name,)))
    pre = feats.modules[name]
    assert (pre < 0).any()  # really before the ReLU (ResNet's in-place ReLU needs the clone)
    torch.testing.assert_close(torch.relu(pre), feats.blocks[stage])


def test_ofd_ema_margin_and_connector_mode():
    torch.manual_seed(0)
    student = vitkd.create_student('deit_ti_distilled', 10, **TINY_VIT)
    teacher = vitkd.create_teacher('resnet18', 10, pretrained=False)
    info = RunInfo(num_classes=10, input_size=(3, 32, 32))
    loss = create_loss('ofd', margin='ema', margin_momentum=0.25)
    d = Distiller(student, teacher, [LossEntry(loss)], info).train()
    assert loss._teacher_names == ('layer2.1.act2:input', 'layer3.1.act2:input', 'layer4.1.act2:input')
    assert all(c[1].training for c in loss.connectors)  # BN follows the student's mode
    t1, t2 = torch.randn(2, 128, 4, 4), torch.randn(2, 128, 4, 4)
    m1 = loss._stage_margin(0, t1)
    torch.testing.assert_close(m1, ofd_margin(t1))
    m2 = loss._stage_margin(0, t2)
    torch.testing.assert_close(m2, 0.75 * ofd_margin(t1) + 0.25 * ofd_margin(t2))
    assert 'losses.ofd.margin_0' in d.state_dict()
    d.eval()
    assert not loss.connectors[0][1].training
    torch.testing.assert_close(loss._stage_margin(0, torch.randn(2, 128, 4, 4)), m2)  # frozen in eval


def test_ofd_explicit_module_taps_and_cnn_student_pre_relu():
    student = vitkd.create_student('resnet18', 10)
    teacher = vitkd.create_teacher('regnety_002', 10, pretrained=False)
    auto = create_loss('ofd')
    auto.configure_taps(student, teacher.model)
    assert auto._student_names == ('layer2.1.act2:input', 'layer3.1.act2:input', 'layer4.1.act2:input')
    assert auto._teacher_names == ('s2.b1.act3:input', 's3.b4.act3:input', 's4.b7.act3:input')
    explicit = create_loss('ofd', student_modules=['layer3.1.act2:input'], teacher_modules=['s3.b3.act3:input'],
                           student_blocks=[3], teacher_blocks=[3])
    explicit.configure_taps(student, teacher.model)
    assert explicit.student_taps.modules == ('layer3.1.act2:input',)
    assert explicit.teacher_taps.modules == ('s3.b3.act3:input',)
    with pytest.raises(ValueError):
        create_loss('ofd', margin='bn')


# ---------------------------------------------------------------------------------------------------------- AFD
def test_afd_attention_and_loss():
    torch.manual_seed(0)
    rho = channel_attention_weights(torch.randn(3, 5) * 4)
    assert bool((rho > 0).all())
    torch.testing.assert_close(rho.sum(1), torch.ones(3))
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    r = channel_attention_weights(torch.randn(2, 3))
    expected = 0.0
    for b in range(2):
        for c in range(3):
            sn = s[b, c] / (s[b, c].norm() + 1e-6)
            tn = t[b, c] / (t[b, c].norm() + 1e-6)
            expected += r[b, c].item() * ((sn - tn) ** 2).mean().item()
    assert afd_loss(s, t, r).item() == pytest.approx(expected / 2, rel=1e-5)
    scale = torch.tensor([0.5, 3.0, 20.0]).view(1, 3, 1, 1)
    assert afd_loss(s * scale, t, r).item() == pytest.approx(expected / 2, rel=1e-4)
    assert afd_loss(t * scale, t, r).item() == pytest.approx(0.0, abs=1e-10)
    one = ChannelAttention(3, att_f=0.5)(t[:1])  # B = 1 (the Zoo's squeeze() breaks there)
    assert one.shape == (1, 3)


# ---------------------------------------------------------------------------------------------------------- DML
def test_dml_gradients_stay_in_their_network_and_identical_peers_agree():
    torch.manual_seed(0)
    student = vitkd.create_student('resnet18', 10)
    info = RunInfo(num_classes=10, input_size=(3, 32, 32), student_name='resnet18')
    loss = create_loss('dml')
    d = Distiller(student, None, [LossEntry(loss)], info).train()
    assert set(d.losses['dml'].peer.state_dict()) == set(student.state_dict())
    calls = []
    loss.peer.conv1.register_forward_hook(lambda *_: calls.append(1))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    terms = loss(extract(student, x, TapSpec(logits=True)), None,
                 Batch(images=x, targets=F.one_hot(y, 10).float(), labels=y, labels_b=y))
    assert len(calls) == 1  # one peer forward per step, shared by its CE and both KLs
    s_params, p_params = list(student.parameters()), list(loss.peer.parameters())
    g_s = torch.autograd.grad(terms['kl'], s_params + p_params, allow_unused=True, retain_graph=True)
    assert all(g is None for g in g_s[len(s_params):]) and any(g is not None and g.abs().sum() > 0
                                                              for g in g_s[:len(s_params)])
    g_p = torch.autograd.grad(terms['peer_kl'] + terms['peer_ce'], s_params + p_params, allow_unused=True)
    assert all(g is None for g in g_p[:len(s_params)]) and any(g is not None for g in g_p[len(s_params):])
    loss.kl_weight = 2.0
    doubled = loss(extract(student, x, TapSpec(logits=True)), None,
                   Batch(images=x, targets=F.one_hot(y, 10).float(), labels=y, labels_b=y))
    assert doubled['kl'].item() == pytest.approx(2 * terms['kl'].item(), rel=1e-5)
    loss.peer.load_state_dict(student.state_dict())
    d.eval()
    terms = loss(extract(student, x, TapSpec(logits=True)), None,
                 Batch(images=x, targets=F.one_hot(y, 10).float(), labels=y, labels_b=y))
    assert terms['kl'].item() == pytest.approx(0.0, abs=1e-7) and terms['peer_kl'].item() == pytest.approx(0, abs=1e-7)


def test_dml_peer_option_and_weight_decay_names():
    torch.manual_seed(0)
    student = vitkd.create_student('resnet18', 10)
    info = RunInfo(num_classes=10, input_size=(3, 32, 32), student_name='resnet18')
    loss = create_loss('dml', peer='deit_ti_distilled', peer_kwargs=dict(TINY_VIT, depth=2))
    d = Distiller(student, None, [LossEntry(loss)], info)
    assert len(loss.peer.blocks) == 2 and loss.peer.head_dist is not None
    assert {'losses.dml.peer.pos_embed', 'losses.dml.peer.cls_token'} <= d.no_weight_decay()
    with pytest.raises(ValueError):
        create_loss('dml', peer_kwargs={'depth': 2})


# ---------------------------------------------------------------------------------------------------------- KD-SVD
def test_kdsvd_singular_vectors_alignment_and_dfv():
    torch.manual_seed(0)
    f = torch.randn(2, 5, 3, 2, dtype=torch.float64)
    v, s = right_singular_vectors(f, 2)
    for b in range(2):
        _, s_np, vh_np = np.linalg.svd(f[b].flatten(1).t().numpy(), full_matrices=False)
        np.testing.assert_allclose(s[b].numpy(), s_np[:2], rtol=1e-10)
        np.testing.assert_allclose(np.abs((v[b].numpy() * vh_np[:2].T).sum(0)), 1.0, rtol=1e-10)
    # the student candidate most aligned with each teacher vector is chosen, its sign flipped to match
    v_t = v[:, :, :1]
    cands = torch.stack([v[:, :, 1], -v[:, :, 0], v[:, :, 1] * 0.3], dim=2)
    chosen, weighted_t = align_singular_vectors(cands, v_t, s[:, :1])
    torch.testing.assert_close(chosen, v_t)  # normalised single singular value = 1
    torch.testing.assert_close(weighted_t, v_t)
    a, b = torch.randn(2, 3, 1), torch.randn(2, 4, 1)
    g = dfv(a, b, sigma=8.0)
    for i in range(3):
        for j in range(4):
            torch.testing.assert_close(g[:, i, j, 0], torch.exp(-(a[:, i, 0] - b[:, j, 0]) ** 2 / 8))


def test_kdsvd_loss_zero_for_same_maps_and_scale_invariant():
    torch.manual_seed(0)
    maps_t = [torch.randn(2, 6, 4, 4, dtype=torch.float64), torch.randn(2, 8, 2, 2, dtype=torch.float64)]
    assert kdsvd_loss(maps_t, maps_t).item() == pytest.approx(0.0, abs=1e-12)
    flipped = [-maps_t[0], maps_t[1] * 3]  # sign and positive scale do not change the singular vectors' content
    assert kdsvd_loss(flipped, maps_t).item() == pytest.approx(0.0, abs=1e-12)
    maps_s = [torch.randn(2, 6, 3, 3, dtype=torch.float64, requires_grad=True),
              torch.randn(2, 8, 3, 3, dtype=torch.float64, requires_grad=True)]
    loss = kdsvd_loss(maps_s, maps_t, k=2, extra_candidates=1)
    assert loss.item() > 0
    assert kdsvd_loss([m * 5 for m in maps_s], maps_t, k=2).item() == pytest.approx(loss.item(), rel=1e-9)
    grads = torch.autograd.grad(loss, maps_s)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


# ---------------------------------------------------------------------------------------------------------- generic
def _student(kind: str):
    if kind == 'vit':
        return 'deit_ti_distilled', TINY_VIT
    return 'resnet18', {}


EXTRA_OPTIONS = {'bss': dict(start_epoch=0, attack_size=4, num_steps=2)}


@pytest.mark.parametrize('kind', ['vit', 'cnn'])
@pytest.mark.parametrize('name', METHODS)
def test_two_training_steps(name, kind):
    torch.manual_seed(0)
    student_name, kwargs = _student(kind)
    if name == 'bss' and kind == 'vit':
        student, teacher = _biased_pair()
    else:
        student = vitkd.create_student(student_name, 10, **kwargs)
        teacher = vitkd.create_teacher('resnet18', 10, pretrained=False)
        if name == 'bss':
            with torch.no_grad():
                teacher.model.fc.bias[3] += 6.0
                student.fc.bias[3] += 6.0
    if name == 'dml':
        teacher = None
    info = RunInfo(num_classes=10, input_size=(3, 32, 32), epochs=10, steps_per_epoch=10, student_name=student_name,
                   student_kwargs=kwargs)
    loss = create_loss(name, **EXTRA_OPTIONS.get(name, {}))
    d = Distiller(student, teacher, [LossEntry(loss)], info)
    opt = torch.optim.AdamW(d.parameters(), lr=1e-3)
    teacher_before = [p.clone() for p in teacher.model.parameters()] if teacher is not None else []
    loss_params_before = [p.detach().clone() for p in loss.parameters()]
    for step in range(2):
        x = torch.randn(2, 3, 32, 32)
        y = torch.full((2,), 3) if name == 'bss' else torch.randint(0, 10, (2,))
        out = d(Batch(x, F.one_hot(y, 10).float(), y, progress=0.0, step=step))
        opt.zero_grad()
        out['loss'].backward()
        assert torch.isfinite(out['loss'])
        method_terms = {k: v for k, v in out['terms'].items() if k.startswith(name + '.')}
        assert method_terms and all(torch.isfinite(v) for v in method_terms.values())
        assert sum(v.item() for v in method_terms.values()) > 0
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
        unused = [n for n, p in d.named_parameters() if p.requires_grad and p.grad is None]
        assert not unused or loss.may_leave_parameters_unused, unused  # else DDP would fail on them
        if loss_params_before:
            assert all(p.grad is not None for p in loss.parameters()), [n for n, p in loss.named_parameters()
                                                                        if p.grad is None]
        opt.step()
    if teacher is not None:
        assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
        assert all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.model.parameters()))
    if loss_params_before:  # VID variances, connectors, attention MLPs, DML peer: registered and trained
        assert any(not torch.equal(a, b) for a, b in zip(loss_params_before, loss.parameters()))
    if name == 'vid':
        assert all(not torch.equal(a, b) for a, (n, b) in zip(loss_params_before, loss.named_parameters())
                   if n.endswith('alpha'))
