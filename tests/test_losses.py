"""The loss interface: generic checks over every registered method, and DeiT/KD values against a second computation."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import vitkd
from vitkd.build import check_taps
from vitkd.distiller import Distiller, LossEntry
from vitkd.features import Features
from vitkd.losses import LOSS_REGISTRY, LossSpecError, RunInfo, create_loss, get_loss_class, list_losses
from vitkd.losses.base import Batch
from vitkd.losses.functional import kl_div_logits

NUM_CLASSES = 10
# an epoch where each method's own phase trains the student (FT pre-trains its paraphraser alone for 30 epochs)
EPOCH = {'ft': 31.5}


def _info(student_name, kwargs):
    return RunInfo(num_classes=NUM_CLASSES, num_samples=64, epochs=4, steps_per_epoch=4, input_size=(3, 32, 32),
                   student_name=student_name, student_kwargs=kwargs)


STUDENTS = {
    'vkd_vit': ('deit_ti_distilled', dict(img_size=32, patch_size=4, depth=4, embed_dim=48, num_heads=2)),
    'resnet': ('resnet18', {}),
}


def _prepare_loss(loss, distiller):
    """Methods that need data-derived state (ND's class centres) get random but valid state."""
    if hasattr(loss, 'set_centers'):
        width = distiller.teacher_features(torch.zeros(2, 3, 32, 32)).pooled.shape[-1]
        loss.set_centers(torch.randn(NUM_CLASSES, width))


@pytest.mark.parametrize('student_kind', list(STUDENTS))
@pytest.mark.parametrize('name', sorted(LOSS_REGISTRY))
def test_every_loss_trains_the_student_and_never_the_teacher(name, student_kind):
    student_name, kwargs = STUDENTS[student_kind]
    loss_cls = LOSS_REGISTRY[name]
    torch.manual_seed(0)
    student = vitkd.create_student(student_name, NUM_CLASSES, **kwargs)
    teacher = vitkd.create_teacher('resnet18', NUM_CLASSES, pretrained=False)  # CNN teacher, widths differ
    if loss_cls.requires_dist_head and student_kind == 'resnet':  # token methods refuse such students clearly
        with pytest.raises(LossSpecError, match='needs a student with a distillation token'):
            Distiller(student, teacher, [LossEntry(create_loss(name))], _info(student_name, kwargs))
        return
    loss = create_loss(name)
    distiller = Distiller(student, teacher, [LossEntry(loss)], _info(student_name, kwargs))
    check_taps(distiller)  # the CLI's pre-flight check accepts every default tap (incl. 'name:input' pre-hooks)
    _prepare_loss(loss, distiller)
    before = {n: p.detach().clone() for n, p in distiller.named_parameters()}
    teacher_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    optimizer = torch.optim.AdamW(distiller.parameters(), lr=1e-3)
    distiller.train()
    for step in range(2):
        x = torch.randn(8, 3, 32, 32)
        labels = torch.randint(0, NUM_CLASSES, (8,))
        targets = F.one_hot(labels, NUM_CLASSES).float()
        out = distiller(Batch(x, targets, labels, index=torch.arange(8) + 8 * step, progress=EPOCH.get(name, 1.5),
                              step=step))
        assert torch.isfinite(out['loss'])
        assert all(torch.isfinite(v).all() for v in out['terms'].values())
        optimizer.zero_grad()
        out['loss'].backward()
        assert all(p.grad is None for p in teacher.parameters())
        if step == 0:
            grads = {n: p.grad for n, p in distiller.named_parameters() if p.requires_grad}
            student_grads = [g for n, g in grads.items() if n.startswith('student.') and g is not None]
            assert student_grads and any(g.abs().sum() > 0 for g in student_grads)
            own = [n for n in grads if n.startswith('losses.')]
            if own and name != 'none':
                assert any(grads[n] is not None and grads[n].abs().sum() > 0 for n in own), f'{name}: no grad to its parts'
        optimizer.step()
    changed = [n for n, p in distiller.named_parameters() if n.startswith('student.') and not torch.equal(p, before[n])]
    assert changed
    assert all(torch.equal(p, teacher_before[n]) for n, p in teacher.named_parameters())
    assert not teacher.training


def test_check_taps_names_a_module_that_does_not_exist():
    student = vitkd.create_student(*STUDENTS['resnet'][:1], NUM_CLASSES)
    teacher = vitkd.create_teacher('resnet18', NUM_CLASSES, pretrained=False)
    loss = create_loss('fitnet')
    distiller = Distiller(student, teacher, [LossEntry(loss)], _info('resnet18', {}))
    loss.teacher_taps = loss.teacher_taps.__class__(modules=('layer4.1.act2:input', 'layer9.act:input'))
    with pytest.raises(LossSpecError, match=r"modules that do not exist: layer9.act:input \("):
        check_taps(distiller)


def test_list_losses_names_every_method_with_its_paper():
    listed = dict(vitkd.list_losses())
    assert {'none', 'kd', 'deit_hard', 'deit_soft'} <= set(listed)
    assert all(paper for paper in listed.values())


def test_unknown_loss_or_option_lists_what_is_valid():
    with pytest.raises(LossSpecError, match='unknown loss .*registered: .*deit_hard'):
        create_loss('deit_hardd')
    with pytest.raises(LossSpecError, match="no option tau; its options: temperature, head, reduction"):
        create_loss('kd', tau=2)


def _kl_by_hand(z_s, z_t, T):
    total = 0.0
    for row_s, row_t in zip(z_s.tolist(), z_t.tolist()):
        es = [math.exp(v / T) for v in row_s]
        et = [math.exp(v / T) for v in row_t]
        ps = [v / sum(es) for v in es]
        pt = [v / sum(et) for v in et]
        total += sum(t * (math.log(t) - math.log(s)) for s, t in zip(ps, pt))
    return total


@pytest.mark.parametrize('T', [1.0, 4.0])
def test_kl_reductions_match_a_hand_computation(T):
    torch.manual_seed(0)
    z_s, z_t = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    by_hand = _kl_by_hand(z_s, z_t, T)
    assert kl_div_logits(z_s, z_t, T, 'batchmean').item() == pytest.approx(by_hand / 5 * T * T, rel=1e-9)
    assert kl_div_logits(z_s, z_t, T, 'numel').item() == pytest.approx(by_hand / 35 * T * T, rel=1e-9)
    assert kl_div_logits(z_t, z_t, T).item() == pytest.approx(0.0, abs=1e-12)
    shifted = kl_div_logits(z_s + torch.randn(5, 1, dtype=torch.float64), z_t, T)
    assert shifted.item() == pytest.approx(kl_div_logits(z_s, z_t, T).item(), rel=1e-9)


def _features(z_cls, z_dist):
    return Features(logits=z_cls, logits_dist=z_dist)


def _batch(b, k):
    labels = torch.randint(0, k, (b,))
    return Batch(images=torch.zeros(b, 3, 4, 4), targets=F.one_hot(labels, k).float(), labels=labels, labels_b=labels)


def test_deit_hard_is_ce_against_teacher_argmax():
    torch.manual_seed(0)
    z_cls, z_dist, z_t = torch.randn(6, 5), torch.randn(6, 5), torch.randn(6, 5)
    loss = create_loss('deit_hard')
    out = loss(_features(z_cls, z_dist), Features(logits=z_t), _batch(6, 5))
    y_t = [max(range(5), key=lambda k: row[k]) for row in z_t.tolist()]
    by_hand = sum(-math.log(math.exp(r[y]) / sum(math.exp(v) for v in r)) for r, y in zip(z_dist.tolist(), y_t)) / 6
    assert out['hard'].item() == pytest.approx(0.5 * by_hand, rel=1e-5)
    assert loss.task_weight(0) == 0.5
    # any teacher logits with the same row-wise argmax give the same loss
    same_argmax = F.one_hot(z_t.argmax(-1), 5).float() * 10
    assert loss(_features(z_cls, z_dist), Features(logits=same_argmax), _batch(6, 5))['hard'].item() == \
        pytest.approx(out['hard'].item(), rel=1e-6)


def test_deit_soft_reductions_and_alpha():
    torch.manual_seed(0)
    z_dist, z_t = torch.randn(4, 9), torch.randn(4, 9)
    soft = create_loss('deit_soft', alpha=0.5, temperature=2.0)
    soft_deit = create_loss('deit_soft', alpha=0.5, temperature=2.0, reduction='numel')
    a = soft(_features(z_dist, z_dist), Features(logits=z_t), _batch(4, 9))['soft'].item()
    b = soft_deit(_features(z_dist, z_dist), Features(logits=z_t), _batch(4, 9))['soft'].item()
    assert a == pytest.approx(0.5 * _kl_by_hand(z_dist, z_t, 2.0) / 4 * 4.0, rel=1e-5)
    assert b == pytest.approx(a / 9, rel=1e-6)  # DeiT's numel reduction is batchmean / K


def test_deit_alpha_routes_gradients_to_the_heads(tiny_vkd_student, tiny_teacher):
    def head_grads(alpha):
        student = tiny_vkd_student
        student.zero_grad()
        d = Distiller(student, tiny_teacher, [LossEntry(create_loss('deit_hard', alpha=alpha))],
                      RunInfo(num_classes=10, input_size=(3, 32, 32)))
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        d(Batch(x, F.one_hot(y, 10).float(), y))['loss'].backward()
        grad = lambda p: 0.0 if p.grad is None else p.grad.abs().sum().item()  # noqa: E731
        return grad(student.head.weight), grad(student.head_dist.weight)
    cls0, dist0 = head_grads(0.0)
    cls1, dist1 = head_grads(1.0)
    assert cls0 > 0 and dist0 == 0
    assert cls1 == 0 and dist1 > 0


def test_none_on_a_distilled_student_trains_both_heads(tiny_vkd_student):
    d = Distiller(tiny_vkd_student, None, [LossEntry(create_loss('none'))], RunInfo(num_classes=10, input_size=(3, 32, 32)))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    out = d(Batch(x, F.one_hot(y, 10).float(), y))
    out['loss'].backward()
    assert tiny_vkd_student.head.weight.grad.abs().sum() > 0 and tiny_vkd_student.head_dist.weight.grad.abs().sum() > 0
    z = tiny_vkd_student.forward_features(x)
    avg = (tiny_vkd_student.head(z[:, 0]) + tiny_vkd_student.head_dist(z[:, 1])) / 2
    expected = -(F.one_hot(y, 10) * F.log_softmax(avg, -1)).sum(-1).mean()
    assert out['terms']['task'].item() == pytest.approx(expected.item(), rel=1e-5)


def test_kd_matches_hinton_formula_and_weight_warmup(tiny_vkd_student, tiny_teacher):
    """In float64: the KL of two close distributions (~4e-3 here) cancels O(1) terms, so a float32 forward's rounding
    would be amplified ~1000x relative and depend on the machine's kernels; in float64 it stays ~1e-13."""
    student, teacher = tiny_vkd_student.double(), tiny_teacher.double()
    entry = LossEntry(create_loss('kd', temperature=3.0), weight=2.0, warmup_epochs=4)
    assert entry.weight_at(1.0) == pytest.approx(0.5) and entry.weight_at(10) == 2.0
    d = Distiller(student, teacher, [entry], RunInfo(num_classes=10, input_size=(3, 32, 32)))
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (4,))
    out = d(Batch(x, F.one_hot(y, 10).double(), y, progress=2.0))
    with torch.no_grad():
        feats = student.forward_features(x)
        z_dist = student.head_dist(feats[:, 1])
        z_t = teacher.model(x)
        z_cls = student.head(feats[:, 0])
    assert out['terms']['kd.kl'].dtype == torch.float64
    kd = _kl_by_hand(z_dist, z_t, 3.0) / 4 * 9
    task = -(F.one_hot(y, 10) * F.log_softmax(z_cls, -1)).sum(-1).mean().item()  # task CE on the class head only
    assert out['terms']['kd.kl'].item() == pytest.approx(kd, rel=1e-9)
    assert out['loss'].item() == pytest.approx(task + 1.0 * kd, rel=1e-9)  # weight 2 half-way through its warm-up


def test_token_loss_on_a_student_without_dist_token_is_a_clear_error(tiny_teacher):
    student = timm.create_model('resnet18', num_classes=10)
    with pytest.raises(LossSpecError, match='needs a student with a distillation token'):
        Distiller(student, tiny_teacher, [LossEntry(create_loss('deit_hard'))], RunInfo(num_classes=10))


def test_weight_decay_groups_exclude_tokens_norms_and_parametrisations(tiny_deit_student):
    from vitkd.build import build_optimizer
    from vitkd.config import Config
    d = Distiller(tiny_deit_student, None, [LossEntry(create_loss('none'))], RunInfo(num_classes=10))
    d.extra = torch.nn.utils.parametrizations.orthogonal(torch.nn.Linear(4, 6, bias=False))
    optimizer = build_optimizer(Config(opt='adamw', weight_decay=0.05), d, 1e-3)
    no_decay = {id(p) for g in optimizer.param_groups if g['weight_decay'] == 0 for p in g['params']}
    names = {n for n, p in d.named_parameters() if id(p) in no_decay}
    for expected in ('student.pos_embed', 'student.cls_token', 'student.dist_token', 'student.norm.weight',
                     'student.head.bias', 'extra.parametrizations.weight.original'):
        assert expected in names
    assert 'student.blocks.0.attn.qkv.weight' not in names


def test_every_option_of_every_method_declares_a_domain():
    """Each constructor option of each registered method states its accepted values beside its default
    (``Annotated[type, Domain]``), and its default lies inside them."""
    import inspect
    from vitkd.domains import Domain
    from vitkd.losses.base import option_domains
    missing, outside = [], []
    for name, _ in list_losses():
        cls = get_loss_class(name)
        defaults = inspect.signature(cls.__init__).parameters
        for option, domain in option_domains(cls).items():
            if not isinstance(domain, Domain):
                missing.append(f'{name}.{option}')
                continue
            try:
                domain.check(defaults[option].default)
            except ValueError:
                outside.append(f'{name}.{option}={defaults[option].default!r}')
    assert not missing, f'options without a domain beside their default: {missing}'
    assert not outside, f'defaults outside their own domain: {outside}'


def test_create_loss_checks_options_against_their_domains():
    """The Python API applies the same domains as the command line: a value outside is a one-line usage error."""
    with pytest.raises(LossSpecError, match=r"kd's temperature must be a number > 0, got 0"):
        create_loss('kd', temperature=0)
    with pytest.raises(LossSpecError, match=r"irg's student_blocks must be a list of 2 values"):
        create_loss('irg', student_blocks=[3])
    assert create_loss('fitnet', student_blocks=3).student_blocks == (3,)
