"""NORM (``norm``): N-to-one matching, the foldable feature transform, logit standardisation, β1 schedule.

Every expected value is computed independently here (numpy, explicit loops, hand-written BN), never taken from
the implementation.
"""
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import vitkd  # noqa: E402,F401
from vitkd.distiller import Distiller, LossEntry  # noqa: E402
from vitkd.losses import Batch, RunInfo, create_loss  # noqa: E402
from vitkd.losses.functional import kl_div_logits  # noqa: E402
from vitkd.losses.norm import (ResidualFT, StandardizedLogits, align_maps, beta_at, fold_student,  # noqa: E402
                               norm_loss, standardize_logits)
from vitkd.models import create_student, create_teacher  # noqa: E402

TINY_VIT = dict(img_size=32, patch_size=4, depth=2, embed_dim=48, num_heads=2)


def tiny_vit():
    torch.manual_seed(0)
    return create_student('deit_ti_distilled', 10, **TINY_VIT)


def teacher(name='regnety_002'):
    torch.manual_seed(1)
    return create_teacher(name, 10, pretrained=False)


def randomize_bn(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))


# ---------------------------------------------------------------- matching ----------------------------------------

def test_norm_loss_is_sum_over_contiguous_groups():
    g = torch.Generator().manual_seed(0)
    n, ct = 3, 4
    f_s = torch.randn(2, n * ct, 5, 5, generator=g)
    f_t = torch.randn(2, ct, 5, 5, generator=g)
    s, t = f_s.numpy(), f_t.numpy()
    expected = sum(np.mean((s[:, k * ct:(k + 1) * ct] - t) ** 2) for k in range(n))
    assert norm_loss(f_s, f_t, n).item() == pytest.approx(expected, rel=1e-5)
    # zero when every group equals the teacher map
    assert norm_loss(f_t.repeat(1, n, 1, 1), f_t, n).item() == 0.0
    tiled_interleaved = f_t.repeat_interleave(n, dim=1)  # channel j = teacher channel j // N: a different layout
    assert norm_loss(tiled_interleaved, f_t, n).item() > 1e-3


def test_align_maps_max_pools_the_larger_map():
    g = torch.Generator().manual_seed(0)
    big = torch.randn(2, 3, 8, 8, generator=g)
    small = torch.randn(2, 3, 4, 4, generator=g)
    b = big.numpy()
    expected = np.zeros((2, 3, 4, 4), dtype=np.float32)
    for i in range(4):
        for j in range(4):
            expected[:, :, i, j] = b[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].max(axis=(2, 3))
    s, t = align_maps(big, small)  # ImageNet case: pool the student
    np.testing.assert_allclose(s.numpy(), expected)
    assert t is small
    s, t = align_maps(small, big)  # CIFAR case: pool the teacher
    np.testing.assert_allclose(t.numpy(), expected)
    assert s is small


# ---------------------------------------------------------------- logit standardisation ---------------------------

def test_standardize_logits_moments_argmax_and_invariance():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 10, generator=g) * 3 + 1
    c = 2.5
    out = standardize_logits(z, c)
    zn = z.double().numpy()
    var = zn.var(axis=1)  # biased
    np.testing.assert_allclose(out.double().numpy().mean(axis=1), 0, atol=1e-6)
    np.testing.assert_allclose(out.double().numpy().var(axis=1), c ** 2 * var / (var + 1e-7), rtol=1e-5)
    assert torch.equal(out.argmax(1), z.argmax(1))
    # CE and KL on standardised logits ignore a positive scale and a per-row shift of the raw logits
    z_t = torch.randn(5, 10, generator=g)
    moved = 7.0 * z + torch.randn(5, 1, generator=g) * 4
    y = torch.randint(0, 10, (5,), generator=g)
    assert F.cross_entropy(standardize_logits(moved, c), y).item() == pytest.approx(
        F.cross_entropy(out, y).item(), rel=1e-5)
    kl = kl_div_logits(standardize_logits(z, c), standardize_logits(z_t, c), 4.0)
    kl_moved = kl_div_logits(standardize_logits(moved, c), standardize_logits(3 * z_t - 2, c), 4.0)
    assert kl_moved.item() == pytest.approx(kl.item(), rel=1e-5)


# ---------------------------------------------------------------- β1 schedule --------------------------------------

@pytest.mark.parametrize('total', [100, 101])
def test_beta_schedule_imagenet_boundaries(total):
    table = {0: 0.1, 4: 0.1, 5: 0.5, 14: 0.5, 15: 0.9, 59: 0.9, 60: 0.5, 79: 0.5, 80: 0.1, 99: 0.1, 100: 0.1}
    for e, value in table.items():
        assert beta_at(e, total, 'imagenet') == value, e


def test_beta_schedule_cifar_rescaled_and_none():
    table = {9: 0.1, 10: 0.5, 19: 0.5, 20: 1.0, 179: 1.0, 180: 0.5, 209: 0.5, 210: 0.1, 239: 0.1, 240: 0.1}
    for e, value in table.items():
        assert beta_at(e, 240, 'cifar') == value, e
    # a 300-epoch run keeps the ImageNet fractions: 5 % = 15 epochs, 15 % = 45, 60 % = 180, 80 % = 240
    assert [beta_at(e, 300, 'imagenet') for e in (14, 15, 44, 45, 179, 180, 239, 240)] == [
        0.1, 0.5, 0.5, 0.9, 0.9, 0.5, 0.5, 0.1]
    assert beta_at(3, 100, 'none') == 1.0


# ---------------------------------------------------------------- feature transform ------------------------------

@pytest.mark.parametrize('tokens', [True, False])
def test_ft_is_affine_in_eval_and_fold_matches(tokens):
    torch.manual_seed(0)
    ft = ResidualFT(torch.nn.Identity(), 6, 12, tokens=tokens)
    shape = (3, 5, 6) if tokens else (3, 6, 4, 4)
    ft.train()
    for _ in range(3):  # real running statistics
        ft(torch.randn(*shape) * 2 + 1)
    ft.eval()
    x, y = torch.randn(*shape), torch.randn(*shape)
    a, b = 0.3, 0.7
    with torch.no_grad():
        np.testing.assert_allclose(ft(a * x + b * y).numpy(), (a * ft(x) + b * ft(y)).numpy(), atol=1e-5)
        folded = ft.fold()
        assert isinstance(folded, torch.nn.Linear if tokens else torch.nn.Conv2d)
        np.testing.assert_allclose(folded(x).numpy(), ft(x).numpy(), atol=1e-5)
    # train mode is not affine in general (batch statistics) but the residual adds to the input
    ft.train()
    assert not torch.allclose(ft(x), x)


def _vit_with_norm(num_copies=2, logit_norm=False, tch=None):
    student, tch = tiny_vit(), tch or teacher()
    loss = create_loss('norm', num_copies=num_copies, logit_norm=logit_norm)
    d = Distiller(student, tch, [LossEntry(loss, 1.0)], RunInfo(num_classes=10, input_size=(3, 32, 32), epochs=100))
    return d, student, tch, loss


def test_vit_fold_student_gives_plain_timm_model_with_same_logits():
    d, student, _, _ = _vit_with_norm(num_copies=3)
    assert isinstance(student.norm, ResidualFT)
    randomize_bn(student.norm)
    student.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = student(x)
        folded = d.export_student().eval()
        out = folded(x)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, ResidualFT) for m in folded.modules())
    plain = create_student('deit_ti_distilled', 10, **TINY_VIT)
    plain.load_state_dict(folded.state_dict(), strict=True)  # the exported student is an ordinary timm student


def test_cnn_fold_student_matches():
    torch.manual_seed(0)
    student = timm.create_model('resnet18', num_classes=10)
    loss = create_loss('norm', num_copies=2)
    d = Distiller(student, teacher(), [LossEntry(loss, 1.0)], RunInfo(num_classes=10, input_size=(3, 32, 32)))
    assert isinstance(student.layer4, ResidualFT)
    randomize_bn(student.layer4.expand, 1)
    randomize_bn(student.layer4.reduce, 2)
    student.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = student(x)
        folded = d.export_student().eval()
        out = folded(x)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-4, atol=1e-4)
    timm.create_model('resnet18', num_classes=10).load_state_dict(folded.state_dict(), strict=True)
    with pytest.raises(Exception):
        timm.create_model('resnet18', num_classes=10).load_state_dict(student.state_dict(), strict=True)


def test_vit_norm_term_equals_independent_computation():
    """β1(e)·N·MSE between the max-pooled patch grid of BN(W₁ h) (hand-written BN) and the tiled teacher map."""
    d, student, tch, loss = _vit_with_norm(num_copies=2)
    d.train()
    captured = {}
    student.norm.inner.register_forward_hook(lambda m, i, o: captured.__setitem__('h', o.detach()))
    torch.manual_seed(3)
    x = torch.randn(4, 3, 32, 32)
    y = torch.randint(0, 10, (4,))
    targets = F.one_hot(y, 10).float()
    term5 = d(Batch(x, targets, y, progress=5))['terms']['norm.norm'].item()
    term0 = d(Batch(x, targets, y, progress=0))['terms']['norm.norm'].item()
    h = captured['h'].double().numpy()  # [B, T, D] after the final LayerNorm
    w1 = student.norm.expand[0].weight.detach().double().numpy()  # [N·C_t, D]
    z = h @ w1.T  # [B, T, N·C_t]
    mean, var = z.mean(axis=(0, 1)), z.var(axis=(0, 1))  # BN over batch × tokens, biased variance
    u = (z - mean) / np.sqrt(var + 1e-5)  # weight 1, bias 0 at init
    patches = u[:, 2:]  # drop cls + dist tokens: 8×8 grid
    grid = patches.reshape(4, 8, 8, -1).transpose(0, 3, 1, 2)  # [B, N·C_t, 8, 8]
    with torch.no_grad():
        f_t = tch.model.forward_features(x).double().numpy()  # [B, 368, 1, 1] at 32 px
    pooled = grid.max(axis=(2, 3), keepdims=True)  # 8×8 → 1×1
    c_t = f_t.shape[1]
    expected = sum(np.mean((pooled[:, k * c_t:(k + 1) * c_t] - f_t) ** 2) for k in range(2))
    assert term0 == pytest.approx(0.1 * expected, rel=1e-4)
    assert term5 == pytest.approx(0.5 * expected, rel=1e-4)


def test_ft_trains_and_heads_read_the_transformed_tokens():
    d, student, _, _ = _vit_with_norm(num_copies=2)
    d.train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    out = d(Batch(x, F.one_hot(y, 10).float(), y, progress=20))
    out['loss'].backward()
    for name, p in student.norm.named_parameters():
        if not name.startswith('inner.'):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # changing the FT's output BN shift changes the logits: the heads read h + FT(h)
    student.eval()
    with torch.no_grad():
        before = student(x)
        student.norm.reduce[1].bias.add_(1.0)
        after = student(x)
    assert not torch.allclose(before, after)


def test_num_copies_one_bypasses_the_ft():
    torch.manual_seed(0)
    student = timm.create_model('resnet18', num_classes=10)
    names_before = [n for n, _ in student.named_modules()]
    tch = teacher('resnet18')
    loss = create_loss('norm', num_copies=1, schedule='none')
    d = Distiller(student, tch, [LossEntry(loss, 1.0)], RunInfo(num_classes=10, input_size=(3, 32, 32)))
    assert [n for n, _ in student.named_modules()] == names_before
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    term = d(Batch(x, F.one_hot(y, 10).float(), y))['terms']['norm.norm'].item()
    with torch.no_grad():
        expected = ((student.forward_features(x) - tch.model.forward_features(x)) ** 2).mean().item()
    assert term == pytest.approx(expected, rel=1e-4)
    assert d.export_student() is student
    with pytest.raises(ValueError, match='C_s = C_t'):
        Distiller(timm.create_model('resnet18', num_classes=10), teacher(),
                  [LossEntry(create_loss('norm', num_copies=1))], RunInfo(num_classes=10, input_size=(3, 32, 32)))


def test_logit_norm_option_standardises_student_and_teacher_and_export_drops_it():
    d, student, tch, _ = _vit_with_norm(num_copies=2, logit_norm=True)
    assert isinstance(student.head, StandardizedLogits) and isinstance(student.head_dist, StandardizedLogits)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    d.train()
    out = d(Batch(x, F.one_hot(y, 10).float(), y))
    with torch.no_grad():
        z_t = tch.model(x)
        raw_t = tch.model.head.fc.inner(tch.model.forward_head(tch.model.forward_features(x), pre_logits=True))
        tokens = student.forward_features(x)
        z_s = student.forward_head(tokens)[0]
        raw_s = student.head.inner(tokens[:, 0])
    for z, raw in ((z_t, raw_t), (z_s, raw_s)):
        v = raw.double().numpy().var(axis=1)
        np.testing.assert_allclose(z.mean(1).numpy(), 0, atol=1e-5)
        np.testing.assert_allclose(z.double().numpy().var(axis=1), 2.5 ** 2 * v / (v + 1e-7), rtol=1e-4)
    assert out['logits'].shape == (4, 10)
    exported = d.export_student()
    assert not any(isinstance(m, StandardizedLogits) for m in exported.modules())
    create_student('deit_ti_distilled', 10, **TINY_VIT).load_state_dict(exported.state_dict(), strict=True)


def test_logit_norm_off_by_default_leaves_heads_alone():
    _, student, tch, loss = _vit_with_norm(num_copies=2)
    assert loss.logit_norm is False
    assert isinstance(student.head, torch.nn.Linear) and isinstance(tch.model.head.fc, torch.nn.Linear)


def test_fold_student_rejects_non_linear_classifier():
    student = tiny_vit()
    student.norm = ResidualFT(student.norm, 48, 8, tokens=True)
    student.head = torch.nn.Sequential(torch.nn.Linear(48, 10))
    with pytest.raises(ValueError, match='cannot fold'):
        fold_student(student)


# ---------------------------------------------------------------- presets ------------------------------------------

def _preset_losses(name):
    from vitkd.build import build_losses
    from vitkd.config import REPO, load_yaml
    from vitkd.arguments import resolve
    cfg = resolve({}, load_yaml(str(REPO / 'scripts' / 'configs' / f'{name}.yaml')))
    return cfg, {e.loss.name: e for e in build_losses(cfg)}


def test_norm_presets_carry_the_official_values():
    for name in ('norm', 'norm+kd', 'norm+crd'):
        cfg, entries = _preset_losses(name)
        norm = entries['norm']
        assert (norm.weight, norm.loss.num_copies, norm.loss.schedule) == (1.0, 8, 'imagenet'), name
        assert norm.loss.logit_norm and norm.loss.logit_scale == 2.5, name  # CNN parity preset (official logit LN)
        assert (cfg.student, cfg.teacher, cfg.task_weight) == ('resnet18', 'resnet34.tv_in1k', 1.0), name
    _, entries = _preset_losses('norm+kd')
    assert entries['kd'].loss.temperature == 4
    _, entries = _preset_losses('norm+crd')
    crd = entries['crd']  # the CRD weight is its own option (official: shared with c), equal to c = 2.5 in this preset
    assert crd.weight == 2.5 and (crd.loss.feat_dim, crd.loss.nce_k, crd.loss.nce_t, crd.loss.nce_m) == (
        128, 16384, 0.07, 0.5)
