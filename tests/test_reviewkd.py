"""ReviewKD (``reviewkd``): HCL against an independent numpy implementation, the ABF chain, taps, parameter counts.

Parameter counts and MACs are numbers obtained by running the official ReviewKD model builders, not values produced
by this implementation.
"""
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import vitkd  # noqa: E402,F401
from vitkd.distiller import Distiller, LossEntry  # noqa: E402
from vitkd.losses import Batch, RunInfo, create_loss  # noqa: E402
from vitkd.losses.reviewkd import ABF, ReviewChain, even_blocks, hcl_level, hcl_loss, preact_module  # noqa: E402
from vitkd.models import create_student, create_teacher  # noqa: E402


def np_adaptive_avg_pool(x, size):
    """Adaptive average pooling by its definition: bin i covers [floor(i·h/l), ceil((i+1)·h/l))."""
    b, c, h, w = x.shape
    out = np.zeros((b, c, size, size))
    for i in range(size):
        for j in range(size):
            r0, r1 = (i * h) // size, math.ceil((i + 1) * h / size)
            c0, c1 = (j * w) // size, math.ceil((j + 1) * w / size)
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    return out


# HCL pyramid levels and their normalised weights, by map size (official hcl: weights 1, 1/2, 1/4, ...; full map first)
SPEC_WEIGHTS = {
    'large': [(None, 8 / 15), (4, 4 / 15), (2, 2 / 15), (1, 1 / 15)],
    4: [(None, 4 / 7), (2, 2 / 7), (1, 1 / 7)],
    2: [(None, 2 / 3), (1, 1 / 3)],
    1: [(None, 1.0)],
}


def np_hcl_level(s, t):
    h = s.shape[2]
    table = SPEC_WEIGHTS['large'] if h >= 5 else SPEC_WEIGHTS[h]
    total = 0.0
    for size, weight in table:
        a, b = (s, t) if size is None else (np_adaptive_avg_pool(s, size), np_adaptive_avg_pool(t, size))
        total += weight * np.mean((a - b) ** 2)
    return total


@pytest.mark.parametrize('h', [1, 2, 4, 7, 14, 56])
def test_hcl_level_matches_spec_weights(h):
    g = torch.Generator().manual_seed(h)
    s, t = torch.randn(2, 3, h, h, generator=g), torch.randn(2, 3, h, h, generator=g)
    expected = np_hcl_level(s.double().numpy(), t.double().numpy())
    assert hcl_level(s.double(), t.double()).item() == pytest.approx(expected, rel=1e-10)
    assert hcl_level(t, t).item() == 0.0
    shift = torch.randn(2, 3, h, h, generator=g) * 5
    assert hcl_level(s.double() + shift.double(), t.double() + shift.double()).item() == pytest.approx(expected,
                                                                                                      rel=1e-9)


def test_hcl_loss_sums_levels():
    g = torch.Generator().manual_seed(0)
    ss = [torch.randn(2, 4, h, h, generator=g).double() for h in (8, 4, 1)]
    ts = [torch.randn(2, 4, h, h, generator=g).double() for h in (8, 4, 1)]
    expected = sum(np_hcl_level(s.numpy(), t.numpy()) for s, t in zip(ss, ts))
    assert hcl_loss(ss, ts).item() == pytest.approx(expected, rel=1e-10)


# ---------------------------------------------------------------- parameter counts and cost (official builders) -

def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_official_builders_parameter_counts():
    shapes = [(56, 56), (28, 28), (14, 14), (7, 7), (1, 1)]
    r18 = ReviewChain([64, 128, 256, 512, 512], [64, 128, 256, 512, 512], 512, shapes)
    assert n_params(r18) == 7_552_904
    mv1 = [128, 256, 512, 1024, 1024]
    r50 = [256, 512, 1024, 2048, 2048]
    assert n_params(ReviewChain(mv1, r50, 256, shapes)) == 14_338_056
    assert n_params(ReviewChain(mv1, r50, 512, shapes)) == 28_664_328  # mdistiller's hard-coded mid min(512, C)


@pytest.mark.parametrize('dim,params_m,gmacs', [(192, 13.95, 2.53), (384, 28.25, 5.12), (768, 38.64, 6.98)])
def test_deit_adaptation_cost_matches_spec(dim, params_m, gmacs):
    teacher_c = [224, 448, 1232, 3024, 3024]
    teacher_hw = [(56, 56), (28, 28), (14, 14), (7, 7), (1, 1)]
    chain = ReviewChain([dim] * 5, teacher_c, min(512, dim), teacher_hw)
    assert n_params(chain) / 1e6 == pytest.approx(params_m, abs=0.005)
    assert chain.macs([(14, 14)] * 4 + [(1, 1)]) / 1e9 == pytest.approx(gmacs, abs=0.005)


# ---------------------------------------------------------------- ABF ---------------------------------------------

def test_abf_gates_one_zero_ignore_the_deeper_residual():
    torch.manual_seed(0)
    abf = ABF(6, 4, 5, fuse=True).eval()
    with torch.no_grad():
        abf.att_conv[0].weight.zero_()
        abf.att_conv[0].bias.copy_(torch.tensor([50.0, -50.0]))  # sigmoid → (1, 0)
    x = torch.randn(2, 6, 4, 4)
    out1, _ = abf(x, torch.randn(2, 4, 2, 2), (8, 8))
    out2, _ = abf(x, torch.randn(2, 4, 2, 2) * 10, (8, 8))
    assert out1.shape == (2, 5, 8, 8)
    torch.testing.assert_close(out1, out2)
    with torch.no_grad():
        abf.att_conv[0].bias.copy_(torch.tensor([0.0, 0.0]))
    out3, _ = abf(x, torch.randn(2, 4, 2, 2), (8, 8))
    assert not torch.allclose(out1, out3)


def test_abf_fusion_formula():
    """y = BN(conv1 x)·a₀ + nearest(r)·a₁, then nearest-resize and BN(conv3×3): recomputed by hand (eval BN)."""
    torch.manual_seed(1)
    abf = ABF(3, 4, 2, fuse=True).eval()
    x, r = torch.randn(1, 3, 2, 2), torch.randn(1, 4, 1, 1)
    out, fused = abf(x, r, (4, 4))
    bn1, bn2 = abf.conv1[1], abf.conv2[1]
    with torch.no_grad():
        y = torch.einsum('oc,bchw->bohw', abf.conv1[0].weight[:, :, 0, 0], x)
        y = (y - bn1.running_mean[:, None, None]) / torch.sqrt(bn1.running_var[:, None, None] + bn1.eps)
        r_up = r.expand(1, 4, 2, 2)  # nearest 1×1 → 2×2
        logits = torch.einsum('oc,bchw->bohw', abf.att_conv[0].weight[:, :, 0, 0], torch.cat([y, r_up], 1))
        gates = torch.sigmoid(logits + abf.att_conv[0].bias[:, None, None])
        y = y * gates[:, :1] + r_up * gates[:, 1:]
        y = y.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest 2×2 → 4×4
        z = F.conv2d(y, abf.conv2[0].weight, padding=1)
        z = (z - bn2.running_mean[:, None, None]) / torch.sqrt(bn2.running_var[:, None, None] + bn2.eps)
    torch.testing.assert_close(fused, y)
    torch.testing.assert_close(out, z)


def test_chain_shapes_order_and_deepest_has_no_fusion():
    chain = ReviewChain([5, 5, 5], [3, 7, 9], 4, [(8, 8), (2, 2), (1, 1)])
    assert chain.abfs[-1].att_conv is None and all(a.att_conv is not None for a in chain.abfs[:-1])
    outs = chain([torch.randn(2, 5, 4, 4), torch.randn(2, 5, 4, 4), torch.randn(2, 5, 1, 1)])
    assert [tuple(o.shape) for o in outs] == [(2, 3, 8, 8), (2, 7, 2, 2), (2, 9, 1, 1)]
    # review order: the shallow output depends on the deeper student level, not the other way round
    chain.eval()
    xs = [torch.randn(2, 5, 4, 4), torch.randn(2, 5, 4, 4), torch.randn(2, 5, 1, 1)]
    a = chain(xs)
    b = chain([xs[0] + 1, xs[1], xs[2]])
    c = chain([xs[0], xs[1], xs[2] + 1])
    torch.testing.assert_close(a[1], b[1])
    torch.testing.assert_close(a[2], b[2])
    assert not torch.allclose(a[0], c[0])


def test_even_blocks():
    assert even_blocks(12, 4) == (2, 5, 8, 11)
    assert even_blocks(4, 4) == (0, 1, 2, 3)
    assert even_blocks(6, 3) == (1, 3, 5)


# ---------------------------------------------------------------- taps -------------------------------------------

def test_preact_module_names():
    regnet = timm.create_model('regnety_002')
    assert [preact_module(regnet, i) for i in (1, 2, 3, 4)] == ['s1.b1.act3', 's2.b1.act3', 's3.b4.act3',
                                                               's4.b7.act3']
    r18 = timm.create_model('resnet18')
    assert preact_module(r18, 4) == 'layer4.1.act2' and preact_module(r18, 0) == 'act1'
    assert preact_module(timm.create_model('resnet50'), 2) == 'layer2.3.act3'


def _vit_run(img=64, patch=8, depth=4, **opts):
    torch.manual_seed(0)
    student = create_student('deit_ti_distilled', 10, img_size=img, patch_size=patch, depth=depth, embed_dim=32,
                             num_heads=2)
    torch.manual_seed(1)
    teacher = create_teacher('regnety_002', 10, pretrained=False)
    with torch.no_grad():  # timm zero-inits each block's last BN: pre-ReLU maps would equal the (≥ 0) shortcut
        for m in teacher.model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.normal_()
    loss = create_loss('reviewkd', mid_channels=8, **opts)
    d = Distiller(student, teacher, [LossEntry(loss, 1.0)], RunInfo(num_classes=10, input_size=(3, img, img)))
    return d, student, teacher, loss


def test_vit_adaptation_term_equals_independent_computation():
    """Student blocks 0..3 (un-normed grids) + pooled vs the teacher's pre-ReLU stage maps + pooled, via the chain."""
    d, student, teacher, loss = _vit_run()
    d.train()
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))
    term = d(Batch(x, F.one_hot(y, 10).float(), y))['terms']['reviewkd.hcl'].item()
    # independent taps
    stored = {}
    names = ['s1.b1.act3', 's2.b1.act3', 's3.b4.act3', 's4.b7.act3']
    mods = dict(teacher.model.named_modules())
    handles = [mods[n].register_forward_pre_hook(lambda m, i, n=n: stored.__setitem__(n, i[0].clone()))
               for n in names]
    with torch.no_grad():
        t_final = teacher.model.forward_features(x)
        t_pooled = t_final.mean(dim=(2, 3))
        post = {i: f for i, f in zip((1, 2, 3, 4), teacher.model.forward_intermediates(x, indices=[1, 2, 3, 4],
                                                                                       intermediates_only=True))}
    for h in handles:
        h.remove()
    t_levels = [stored[n] for n in names] + [t_pooled[:, :, None, None]]
    assert (stored['s4.b7.act3'] < 0).any()  # pre-ReLU
    torch.testing.assert_close(F.relu(stored['s2.b1.act3']), post[2])
    tokens = []
    block_handles = [student.blocks[i].register_forward_hook(lambda m, i, o: tokens.append(o)) for i in range(4)]
    d.train()
    with torch.no_grad():
        final = student.forward_features(x)
    for h in block_handles:
        h.remove()
    grids = [t[:, 2:].transpose(1, 2).reshape(2, 32, 8, 8) for t in tokens]
    s_levels = grids + [((final[:, 0] + final[:, 1]) / 2)[:, :, None, None]]
    with torch.no_grad():
        outs = loss.chain(s_levels)
    assert [tuple(o.shape[1:]) for o in outs] == [tuple(t.shape[1:]) for t in t_levels]
    assert [tuple(o.shape[2:]) for o in outs] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    expected = sum(np_hcl_level(o.double().numpy(), t.double().numpy()) for o, t in zip(outs, t_levels))
    assert term == pytest.approx(expected, rel=1e-4)


def test_teacher_grid_pooled_averages_large_teacher_maps_to_the_student_grid():
    _, _, _, loss = _vit_run(teacher_grid='pooled')
    # student grid 8×8: teacher s1 16×16 is pooled to 8×8, the others are kept
    assert loss.chain.out_shapes == [(8, 8), (8, 8), (4, 4), (2, 2), (1, 1)]
    _, _, _, native = _vit_run()
    assert native.chain.out_shapes[0] == (16, 16)


def test_teacher_eval_and_every_abf_parameter_gets_a_gradient():
    d, student, teacher, loss = _vit_run(img=32, patch=4, depth=2)
    stats = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    opt = torch.optim.SGD(d.parameters(), lr=0.1)
    d.train()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    d(Batch(x, F.one_hot(y, 10).float(), y))['loss'].backward()
    for name, p in loss.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    opt.step()
    assert not teacher.model.training
    for k, v in teacher.model.state_dict().items():
        assert torch.equal(v, stats[k]), k
    # the pooled (1×1) level's 3×3 conv only ever sees its centre tap
    g = loss.chain.abfs[-1].conv2[0].weight.grad  # [C_t, mid, 3, 3]
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[1, 1] = False
    assert g[:, :, mask].abs().max() == 0 and g[:, :, 1, 1].abs().sum() > 0


def test_cnn_student_preact_taps():
    torch.manual_seed(0)
    student = timm.create_model('resnet18', num_classes=10)
    torch.manual_seed(1)
    teacher = create_teacher('resnet18', 10, pretrained=False)
    pre = create_loss('reviewkd', mid_channels=8)
    Distiller(student, teacher, [LossEntry(pre, 1.0)], RunInfo(num_classes=10, input_size=(3, 32, 32)))
    assert pre.student_taps.modules == ('layer1.1.act2:input', 'layer2.1.act2:input', 'layer3.1.act2:input',
                                        'layer4.1.act2:input')
    post = create_loss('reviewkd', mid_channels=8, student_preact=False, teacher_preact=False)
    d = Distiller(timm.create_model('resnet18', num_classes=10), teacher, [LossEntry(post, 1.0)],
                  RunInfo(num_classes=10, input_size=(3, 32, 32)))
    assert post.student_taps.blocks == (1, 2, 3, 4) and post.teacher_taps.blocks == (1, 2, 3, 4)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    assert torch.isfinite(d(Batch(x, F.one_hot(y, 10).float(), y))['loss'])


def test_vit_teacher_rejected():
    student = create_student('deit_ti_distilled', 10, img_size=32, patch_size=4, depth=2, embed_dim=32, num_heads=2)
    teacher = create_teacher('deit_tiny_patch16_224', 10, pretrained=False, img_size=32, patch_size=8, depth=1)
    with pytest.raises(ValueError, match='CNN teacher'):
        Distiller(student, teacher, [LossEntry(create_loss('reviewkd'), 1.0)], RunInfo(num_classes=10,
                                                                                       input_size=(3, 32, 32)))


# ---------------------------------------------------------------- presets ------------------------------------------

def _preset_losses(name):
    from vitkd.build import build_losses
    from vitkd.config import REPO, load_yaml
    from vitkd.arguments import resolve
    cfg = resolve({}, load_yaml(str(REPO / 'scripts' / 'configs' / f'{name}.yaml')))
    return cfg, {e.loss.name: e for e in build_losses(cfg)}


def test_reviewkd_presets_carry_the_official_values():
    cfg, entries = _preset_losses('reviewkd')
    rkd = entries['reviewkd']
    assert (rkd.weight, rkd.warmup_epochs, rkd.loss.mid_channels) == (1.0, 0.0, 512)  # official R34 -> R18
    assert rkd.loss.teacher_preact and rkd.loss.student_preact and rkd.loss.teacher_stages == (1, 2, 3, 4)
    assert (cfg.student, cfg.teacher) == ('resnet18', 'resnet34.tv_in1k')
    _, entries = _preset_losses('reviewkd++')  # official ReviewKD++: HCL 1.0 warmed up over 5 epochs, ND 3.0 not
    assert (entries['reviewkd'].weight, entries['reviewkd'].warmup_epochs) == (1.0, 5.0)
    assert (entries['nd'].weight, entries['nd'].warmup_epochs) == (3.0, 0.0)
    assert entries['reviewkd'].loss.mid_channels == 512
