"""ND and the "++" presets: limits, gradient routing, mixed centres, adapter, centre cache, presets."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vitkd.build import build_losses
from vitkd.centers import (CentersError, centers_for_run, compute_class_centers, compute_or_load_centers, load_centers,
                           save_centers)
from vitkd.config import load_yaml
from vitkd.arguments import resolve
from vitkd.losses import RunContext
from vitkd.distiller import Distiller, LossEntry
from vitkd.features import Features
from vitkd.losses import Batch, DistillationLoss, LossSpecError, RunInfo, create_loss
from vitkd.losses.functional import kl_div_logits, soft_target_cross_entropy
from vitkd.losses.nd import make_adapter, mix_centers, nd_loss, nd_per_sample, smooth_batch_centers
from vitkd.models import create_student, create_teacher

REPO = Path(__file__).resolve().parents[1]
K = 10


# ---- the loss -----------------------------------------------------------------------------------------------------

def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def test_limits_and_center_scale_invariance():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(3, 16, generator=g)
    t = torch.randn(3, 16, generator=g)
    t_norm = t.norm(dim=1)
    big = _unit(c) * (t_norm[:, None] * torch.tensor([[1.0], [1.5], [3.0]]))  # a ≥ ‖t‖
    assert torch.allclose(nd_per_sample(big, t, c), torch.zeros(3), atol=1e-6)
    small = _unit(c) * (0.4 * t_norm[:, None])                                # a < ‖t‖
    assert torch.allclose(nd_per_sample(small, t, c), torch.full((3,), 0.6), atol=1e-6)
    ortho = torch.randn(3, 16, generator=g)
    ortho = ortho - (ortho * _unit(c)).sum(1, keepdim=True) * _unit(c)        # s ⟂ c
    assert torch.allclose(nd_per_sample(ortho, t, c), torch.ones(3), atol=1e-6)
    s = torch.randn(3, 16, generator=g)
    assert torch.allclose(nd_per_sample(s, t, c * torch.tensor([[0.1], [7.0], [123.0]])), nd_per_sample(s, t, c))


def test_matches_official_style_loop():
    g = torch.Generator().manual_seed(1)
    s, t, c = (torch.randn(5, 8, generator=g) * 3 for _ in range(3))
    total = 0.0
    for s_b, t_b, c_b in zip(s.double(), t.double(), c.double()):  # the official per-sample loop with Python max
        total += 1 - float(torch.dot(s_b, c_b / c_b.norm())) / max(float(s_b.norm()), float(t_b.norm()))
    assert nd_loss(s, t, c).item() == pytest.approx(total / 5, rel=1e-5)


def test_gradient_routing():
    g = torch.Generator().manual_seed(2)
    c = torch.randn(4, 6, generator=g)
    t = torch.randn(4, 6, generator=g).requires_grad_(True)
    s = torch.randn(4, 6, generator=g)
    s = (_unit(s) * 0.5 * t.detach().norm(dim=1, keepdim=True)).requires_grad_(True)   # ‖s‖ < ‖t‖
    nd_loss(s, t, c).backward()
    expected = -_unit(c) / (4 * t.detach().norm(dim=1, keepdim=True))
    assert torch.allclose(s.grad, expected, atol=1e-6)
    assert t.grad is None or t.grad.abs().max().item() == 0.0                         # no gradient to the teacher
    s2 = (_unit(torch.randn(4, 6, generator=g)) * 2 * t.detach().norm(dim=1, keepdim=True)).requires_grad_(True)
    nd_loss(s2, t.detach(), c).backward()                                            # ‖s‖ > ‖t‖: direction only
    assert (s2.grad * s2.detach()).sum(dim=1).abs().max().item() < 1e-6
    assert s2.grad.abs().max().item() > 1e-4


def test_mixed_centers():
    g = torch.Generator().manual_seed(3)
    centers = torch.randn(K, 5, generator=g)
    y = torch.randint(0, K, (6,), generator=g)
    y_b = y.flip(0)
    assert torch.equal(mix_centers(centers, y, y_b, 1.0, 0.0), centers[y])
    assert torch.allclose(mix_centers(centers, y, y_b, 0.0, 0.0), centers[y_b])
    eps, lam, b = 0.1, 0.37, 6
    s_matrix = smooth_batch_centers(torch.eye(b), eps, K)  # S applied to the identity is S itself
    assert torch.allclose(s_matrix.sum(dim=1), torch.full((b,), 1 - eps + eps * b / K))
    assert s_matrix[0, 0].item() == pytest.approx(1 - eps + eps / K) and s_matrix[0, 1].item() == pytest.approx(eps / K)
    # explicit per-sample loop in the official form: c1 = S·C[y], c'' = λ·c1 + (1 − λ)·flip(c1)
    c = centers[y].double().numpy()
    sm = np.full((b, b), eps / K)
    np.fill_diagonal(sm, 1 - eps + eps / K)
    c1 = np.stack([sum(sm[i, j] * c[j] for j in range(b)) for i in range(b)])
    ref = np.stack([lam * c1[i] + (1 - lam) * c1[b - 1 - i] for i in range(b)])
    assert np.allclose(mix_centers(centers, y, y_b, lam, eps).double().numpy(), ref, atol=1e-6)


# ---- module, adapter, centres -------------------------------------------------------------------------------------

def _tiny_student():
    torch.manual_seed(0)
    return create_student('deit_ti_distilled', K, img_size=32, patch_size=4, depth=2, embed_dim=48, num_heads=2,
                           in_chans=3)


@pytest.fixture(scope='module')
def teacher():
    torch.manual_seed(1)
    return create_teacher('regnety_002', K, pretrained=False)


def _info():
    return RunInfo(num_classes=K, input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _random_centers(dim: int, seed: int = 4) -> torch.Tensor:
    return torch.randn(K, dim, generator=torch.Generator().manual_seed(seed))


def test_adapter_leaves_student_untouched_and_inits(teacher):
    student = _tiny_student()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    distiller = Distiller(student, teacher, [LossEntry(create_loss('nd'), 1.0)], _info())
    after = student.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    adapter = distiller.losses['nd'].adapter
    bn, linear = adapter[0], adapter[2]
    assert (bn.num_features, linear.in_features, linear.out_features) == (48, 48, teacher.model.num_features)
    assert torch.equal(bn.weight, torch.ones(48)) and torch.equal(bn.bias, torch.zeros(48))
    assert 0.009 < linear.weight.std().item() < 0.011 and abs(linear.weight.mean().item()) < 1e-3
    assert 0.006 < linear.bias.std().item() < 0.014
    pt = make_adapter(48, 64, 'pytorch')[2]
    assert torch.equal(pt.bias, torch.zeros(64)) and pt.weight.abs().max().item() <= 1 / 48 ** 0.5
    assert pt.weight.std().item() > 0.05  # PyTorch's kaiming-uniform scale, not N(0, 0.01²)
    # parity option (the official EmbTrans bug): every Linear of the student re-initialised to N(0, 0.01²), biases too
    parity_student = _tiny_student()
    Distiller(parity_student, teacher, [LossEntry(create_loss('nd', parity_reinit_student=True), 1.0)], _info())
    qkv = parity_student.blocks[0].attn.qkv
    assert 0.008 < qkv.weight.std().item() < 0.012 and qkv.bias.abs().max().item() > 0
    assert not torch.equal(parity_student.head.weight, before['head.weight'])
    assert distiller.losses['nd'].ddp_ignored_buffers() == {'centers'}
    # same widths: no adapter
    nd = create_loss('nd')
    feats = Features(pooled=torch.zeros(2, 32))
    nd.setup(feats, feats, _info())
    assert nd.adapter is None


def _batch(images, labels, labels_b=None, lam=1.0, epoch=0):
    return Batch(images=images, targets=torch.zeros(len(labels), K), labels=labels,
                 labels_b=labels if labels_b is None else labels_b, lam=lam, progress=epoch)


def test_set_centers_forward_and_errors(teacher):
    student = _tiny_student()
    distiller = Distiller(student, teacher, [LossEntry(create_loss('nd'), 1.0)], _info())
    nd = distiller.losses['nd']
    assert not nd.has_centers and type(nd).prepare_for_run is not DistillationLoss.prepare_for_run
    images, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 3, 7])
    with pytest.raises(LossSpecError, match='class centres'):
        distiller(Batch(images, torch.zeros(4, K), y))
    d_t = teacher.model.num_features
    with pytest.raises(LossSpecError, match='shape'):
        nd.set_centers(torch.randn(K, d_t + 1))
    bad = _random_centers(d_t)
    bad[2] = 0
    with pytest.raises(LossSpecError, match='zero'):
        nd.set_centers(bad)
    centers = _random_centers(d_t)
    nd.set_centers(centers, {'teacher': 'x'})
    assert torch.equal(nd.state_dict()['centers'], centers)  # saved with the checkpoints
    distiller.eval()  # adapter dropout/BN deterministic for the comparison below
    out = distiller(Batch(images, torch.zeros(4, K), y))
    s_feats = distiller.student.forward_head(distiller.student.forward_features(images), pre_logits=True)
    t_feats = teacher.model.forward_head(teacher.model.forward_features(teacher.prepare_input(images)),
                                         pre_logits=True)
    ref = nd_loss(nd.adapter(s_feats), t_feats, centers[y])
    assert out['terms']['nd.nd'].item() == pytest.approx(ref.item(), rel=1e-5)
    # mixup: centres mixed with the batch's λ and pairing
    lam = 0.3
    out = distiller(Batch(images, torch.zeros(4, K), y, labels_b=y.flip(0), lam=lam))
    ref = nd_loss(nd.adapter(s_feats), t_feats, lam * centers[y] + (1 - lam) * centers[y.flip(0)])
    assert out['terms']['nd.nd'].item() == pytest.approx(ref.item(), rel=1e-5)


def test_centers_option_file_and_official_json(teacher, tmp_path):
    d_t = teacher.model.num_features
    centers = _random_centers(d_t)
    save_centers(tmp_path / 'c.safetensors', centers, {'teacher': teacher.source})
    d = Distiller(_tiny_student(), teacher, [LossEntry(create_loss('nd', centers=str(tmp_path / 'c.safetensors')))],
                  _info())
    assert torch.equal(d.losses['nd'].centers, centers)
    (tmp_path / 'c.json').write_text(json.dumps({str(k): centers[k].tolist() for k in range(K)}))
    d = Distiller(_tiny_student(), teacher, [LossEntry(create_loss('nd', centers=str(tmp_path / 'c.json')))], _info())
    assert torch.allclose(d.losses['nd'].centers, centers)
    save_centers(tmp_path / 'wrong.safetensors', centers[:, :5], {})
    with pytest.raises(LossSpecError, match='shape'):
        Distiller(_tiny_student(), teacher, [LossEntry(create_loss('nd', centers=str(tmp_path / 'wrong.safetensors')))],
                  _info())
    with pytest.raises(LossSpecError, match='no such file'):
        Distiller(_tiny_student(), teacher, [LossEntry(create_loss('nd', centers=str(tmp_path / 'nope.json')))],
                  _info())


class _CountingLoader:
    """Batches of a tiny fixed data set; every class appears."""

    def __init__(self, n=20, seed=5):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, 16, 16, generator=g)
        self.labels = torch.arange(n) % K

    def __iter__(self):
        for i in range(0, len(self.labels), 10):
            yield self.images[i:i + 10], self.labels[i:i + 10], torch.arange(i, min(i + 10, len(self.labels)))


def _count_forwards(model, monkeypatch) -> list:
    calls = []
    original = model.forward_features
    def counted(x):
        calls.append(len(x))
        return original(x)
    monkeypatch.setattr(model, 'forward_features', counted)
    return calls


def test_compute_centers_equals_independent_class_means(teacher):
    loader = _CountingLoader()
    centers = compute_class_centers(teacher, loader, K, decimals=4)
    model = teacher.model
    with torch.no_grad():  # same batches as the loader, so the float32 embeddings are bit-identical
        emb = torch.cat([model.forward_head(model.forward_features(teacher.prepare_input(x)), pre_logits=True)
                         for x, _, _ in loader])
    emb = np.round(emb.double().numpy(), 4)  # every value rounded, then the per-class mean rounded (official)
    labels = loader.labels.numpy()
    for k in range(K):
        ref = np.round(np.mean([emb[i] for i in range(len(labels)) if labels[i] == k], axis=0), 4)
        assert np.allclose(centers[k].double().numpy(), ref, rtol=0, atol=1e-6)
    scaled = centers.double().numpy() * 1e4
    assert np.allclose(scaled, np.round(scaled), atol=1e-2)  # every mean rounded to 4 decimals
    assert not np.allclose(compute_class_centers(teacher, loader, K, decimals=None).double().numpy() * 1e4,
                           scaled, atol=1e-2)  # (not already a 4-decimal grid without rounding)
    assert model.training is False
    missing = _CountingLoader(n=5)  # only classes 0..4 (one batch)
    with pytest.raises(CentersError, match='no training image'):
        compute_class_centers(teacher, missing, K)


def test_cache_reused_and_invalidated(teacher, tmp_path, monkeypatch):
    loader = _CountingLoader()
    calls = _count_forwards(teacher.model, monkeypatch)
    key = {'dataset': 'tiny', 'transform': 'T1', 'num_samples': 20}
    first = compute_or_load_centers(teacher, loader, tmp_path, key)
    assert len(calls) == 2 and sum(calls) == 20
    assert len(list(tmp_path.glob('*.safetensors'))) == 1
    prov = json.loads(next(tmp_path.glob('*.json')).read_text())
    assert prov['teacher'] == teacher.source and prov['transform'] == 'T1' and prov['embedding_dim'] == first.shape[1]
    calls.clear()
    again = compute_or_load_centers(teacher, loader, tmp_path, dict(key))
    assert calls == [] and torch.equal(first, again)                  # no teacher forward on a cache hit
    compute_or_load_centers(teacher, loader, tmp_path, {**key, 'transform': 'T2'})
    assert sum(calls) == 20                                           # another transform: recomputed
    calls.clear()
    with torch.no_grad():
        teacher.model.head.fc.weight.add_(1.0)                        # other teacher weights: another key
    try:
        compute_or_load_centers(teacher, loader, tmp_path, key)
        assert sum(calls) == 20
    finally:
        with torch.no_grad():
            teacher.model.head.fc.weight.sub_(1.0)
    assert len(list(tmp_path.glob('*.safetensors'))) == 3


def test_run_hook_on_fashion_mnist(tmp_path, monkeypatch):
    """centers_for_run / the distiller's prepare_for_run hook on a small stratified subset of the embedded data set."""
    cfg = resolve({'teacher': 'regnety_002', 'teacher_pretrained': False, 'teacher_kwargs': ['in_chans=1'],
                   'train_subset': '0.002', 'num_workers': 0, 'batch_size': 64, 'distill': ['nd']})
    torch.manual_seed(2)
    teacher1 = create_teacher('regnety_002', K, pretrained=False, in_chans=1)
    student = create_student('deit_ti_distilled', K, **cfg.student_kwargs)
    from vitkd.build import build_distiller
    from vitkd.data import DataSpec
    spec = DataSpec(num_classes=K, input_size=(1, 28, 28), mean=(0.286,), std=(0.353,), classes=[str(i) for i in
                                                                                                  range(K)])
    distiller = build_distiller(cfg, student, teacher1, spec, num_samples=120, steps_per_epoch=1)
    calls = _count_forwards(teacher1.model, monkeypatch)
    distiller.prepare_for_run(RunContext(cfg, teacher1, spec, cache_dir=tmp_path))
    nd = distiller.losses['nd']
    assert nd.has_centers and sum(calls) == 120 and nd.centers_provenance['num_samples'] == 120
    assert 'RandomResizedCrop' in nd.centers_provenance['transform']
    assert 'RandAugment' not in nd.centers_provenance['transform']
    calls.clear()
    centers, path, _ = centers_for_run(cfg, teacher1, spec, cache_dir=tmp_path)   # seeded crops + cache: same centres
    assert calls == [] and torch.equal(centers, nd.centers)
    # a loss that loaded a file made with another teacher is refused by the hook
    centers_file = tmp_path / 'other.safetensors'
    save_centers(centers_file, centers, {**load_centers(path)[1], 'teacher': 'resnet18.a1_in1k'})
    cfg2 = resolve({**{k: getattr(cfg, k) for k in ('teacher', 'teacher_pretrained', 'train_subset', 'num_workers')},
                    'teacher_kwargs': ['in_chans=1'], 'distill': ['nd'], 'loss_opts': [f'nd.centers={centers_file}']})
    distiller2 = build_distiller(cfg2, create_student('deit_ti_distilled', K, **cfg.student_kwargs), teacher1, spec,
                                 num_samples=120, steps_per_epoch=1)
    with pytest.raises(CentersError, match='computed with teacher'):
        distiller2.prepare_for_run(RunContext(cfg2, teacher1, spec, cache_dir=tmp_path))


class _OneOfTwoRanks:
    """Stands in for one process of two, the ranks run one after the other: ``reduce`` records what this rank sends
    and adds what the other rank sent (given when rank 1 ran first)."""

    def __init__(self, rank: int, partner_sent=()):
        self.process_index, self.num_processes, self.is_main_process = rank, 2, rank == 0
        self.device = torch.device('cpu')
        self.sent, self.partner = [], list(partner_sent)

    def reduce(self, tensor, reduction):
        assert reduction == 'sum'
        self.sent.append(tensor.clone())
        return tensor + self.partner.pop(0) if self.partner else tensor

    def wait_for_everyone(self):
        pass


def test_centres_split_across_two_processes_equal_one_process(tmp_path, monkeypatch):
    """Each rank runs the teacher on half the images (r, r + 2, …); the all-reduced sums give the one-process centres
    (each image's crop is seeded by its index, whatever rank loads it), and only rank 0 writes the cache file."""
    cfg = resolve({'teacher': 'regnety_002', 'teacher_pretrained': False, 'teacher_kwargs': ['in_chans=1'],
                   'train_subset': '0.002', 'num_workers': 0, 'batch_size': 32, 'distill': ['nd']})
    torch.manual_seed(3)
    teacher = create_teacher('regnety_002', K, pretrained=False, in_chans=1)
    from vitkd.data import DataSpec
    spec = DataSpec(num_classes=K, input_size=(1, 28, 28), mean=(0.286,), std=(0.353,),
                    classes=[str(i) for i in range(K)])
    calls = _count_forwards(teacher.model, monkeypatch)
    single, _, _ = centers_for_run(cfg, teacher, spec, cache_dir=tmp_path / 'one')
    assert sum(calls) == 120
    calls.clear()
    rank1 = _OneOfTwoRanks(1)
    centers_for_run(cfg, teacher, spec, rank1, cache_dir=tmp_path / 'two')
    assert sum(calls) == 60 and not list((tmp_path / 'two').glob('*.safetensors'))  # rank 1 writes nothing
    calls.clear()
    split, path, _ = centers_for_run(cfg, teacher, spec, _OneOfTwoRanks(0, rank1.sent), cache_dir=tmp_path / 'two')
    assert sum(calls) == 60 and path.is_file()
    torch.testing.assert_close(split, single, atol=1.01e-4, rtol=0)  # values rounded to 4 decimals either way
    assert (split - single).abs().max() < 1e-6 or (split != single).float().mean() < 0.01


def test_nd_warmup():
    nd = create_loss('nd', warmup=5)
    feats = Features(pooled=torch.randn(4, 6))
    nd.setup(feats, feats, RunInfo(num_classes=K))
    nd.set_centers(_random_centers(6))
    s, t = Features(pooled=torch.randn(4, 6)), Features(pooled=torch.randn(4, 6))
    y = torch.tensor([1, 2, 3, 4])
    full = nd_loss(s.pooled, t.pooled, nd.centers[y]).item()
    images = torch.zeros(4, 3, 2, 2)
    assert nd(s, t, _batch(images, y, epoch=0))['nd'].item() == 0.0
    assert nd(s, t, _batch(images, y, epoch=2))['nd'].item() == pytest.approx(0.4 * full, rel=1e-6)
    assert nd(s, t, _batch(images, y, epoch=5))['nd'].item() == pytest.approx(full, rel=1e-6)


# ---- "++" presets -------------------------------------------------------------------------------------------------

PRESETS = {  # terms of the official recipes still active at epoch 0 (besides CE)
    'kd++': {'nd'}, 'dkd++': set(), 'dist++': {'nd'}, 'deit++': {'nd'},
}


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_preset_warmup_masks_and_composition(name, teacher):
    cfg = resolve({}, load_yaml(str(REPO / 'scripts' / 'configs' / f'{name}.yaml')))
    entries = build_losses(cfg)
    assert {e.loss.name for e in entries} >= {'nd'} and cfg.task_weight == 1.0
    student = _tiny_student()
    distiller = Distiller(student, teacher, entries, _info(), task_weight=cfg.task_weight)
    d_t = teacher.model.num_features
    centers = _random_centers(d_t)
    distiller.losses['nd'].set_centers(centers)
    distiller.eval()
    g = torch.Generator().manual_seed(6)
    images, y = torch.randn(4, 3, 32, 32, generator=g), torch.tensor([1, 5, 5, 9])
    targets = torch.nn.functional.one_hot(y, K).float()
    out0 = distiller(Batch(images, targets, y, progress=0.0))
    weighted = {n: e.weight_at(0.0) * sum(v for t, v in out0['terms'].items() if t.startswith(f'{n}.'))
                for n, e in distiller.entries.items()}
    active = {n for n, v in weighted.items() if float(v) != 0.0}
    assert active == PRESETS[name]
    # from the end of the warm-ups on, every term carries its full weight; "++" = base loss + λ_nd·ND, nothing else
    late = 25.0
    out = distiller(Batch(images, targets, y, progress=late))
    s = distiller.student
    final = s.forward_features(images)
    z_cls, z_dist = s.head(final[:, 0]), s.head_dist(final[:, 1])
    t_final = teacher.model.forward_features(teacher.prepare_input(images))
    z_t, t_emb = teacher.model.forward_head(t_final), teacher.model.forward_head(t_final, pre_logits=True)
    nd_mod = distiller.losses['nd']
    target_centers = smooth_batch_centers(centers[y], nd_mod.center_smoothing, K)  # deit++: ε = 0.1, else identity
    nd_term = nd_loss(nd_mod.adapter(s.forward_head(final, pre_logits=True)), t_emb, target_centers)
    base = next(e for e in entries if e.loss.name != 'nd')
    o = base.loss.options()
    if name == 'kd++':
        base_term = kl_div_logits(z_dist, z_t, o['temperature'])
    elif name == 'dkd++':
        from vitkd.losses.dkd import dkd_loss
        base_term = sum(dkd_loss(z_dist, z_t, y, o['alpha'], o['beta'], o['temperature']))
    elif name == 'dist++':
        from vitkd.losses.dist import dist_loss
        base_term = sum(dist_loss(z_dist, z_t, o['beta'], o['gamma'], o['temperature']))
    else:
        base_term = torch.nn.functional.cross_entropy(z_dist, z_t.argmax(1))
    nd_entry = distiller.entries['nd']
    expected = soft_target_cross_entropy(z_cls, targets) + base.weight * base_term + nd_entry.weight * nd_term
    assert out['loss'].item() == pytest.approx(expected.item(), rel=1e-5)
    # at epoch 0 the total is exactly CE(z_cls) plus the un-warmed terms
    ce = soft_target_cross_entropy(z_cls, targets)
    un_warmed = nd_entry.weight * nd_term if 'nd' in PRESETS[name] else 0.0
    assert out0['loss'].detach().item() == pytest.approx(float((ce + un_warmed).detach()), rel=1e-5)
