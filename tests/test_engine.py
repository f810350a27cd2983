"""The engine on Accelerate (CPU): a short training changes the student only; evaluation counts like a hand count."""
import pytest
import torch
import torch.nn as nn
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

import vitkd
from vitkd.engine import NonFiniteLossError, TrainState, evaluate, train_one_epoch
from vitkd.build import build_optimizer, build_scheduler
from vitkd.config import Config
from vitkd.data import BatchMixer
from vitkd.distiller import Distiller, LossEntry
from vitkd.evaluation import _topk_correct
from vitkd.losses import RunInfo, create_loss
from vitkd.training import EpochBatches, NonFiniteGuard


class _Indexed(TensorDataset):
    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x, y, i


def _setup(loss_name='deit_hard', n=16, batch=4):
    torch.manual_seed(0)
    student = vitkd.create_student('deit_ti_distilled', 10, img_size=32, patch_size=4, depth=2, embed_dim=48,
                                   num_heads=2)
    teacher = vitkd.create_teacher('regnety_002', 10, pretrained=False)
    distiller = Distiller(student, teacher, [LossEntry(create_loss(loss_name))], RunInfo(num_classes=10,
                                                                                          input_size=(3, 32, 32)))
    cfg = Config(epochs=2, lr=1e-3, warmup_epochs=0, mixup=0.8, cutmix=1.0, smoothing=0.1)
    data = _Indexed(torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,)))
    loader = DataLoader(data, batch, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
    optimizer = build_optimizer(cfg, distiller, cfg.lr)
    scheduler = build_scheduler(cfg, optimizer, len(loader))
    return cfg, distiller, teacher, loader, optimizer, scheduler


def test_two_steps_change_the_student_and_not_the_teacher():
    cfg, distiller, teacher, loader, optimizer, scheduler = _setup()
    accelerator = Accelerator(cpu=True)
    model, optimizer, loader = accelerator.prepare(distiller, optimizer, loader)
    student_before = {k: v.clone() for k, v in distiller.student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    state = TrainState(max_steps=2)
    stats = train_one_epoch(model, EpochBatches(loader, accelerator, BatchMixer(cfg, 10)), optimizer, scheduler,
                            accelerator, state, NonFiniteGuard('stop', model, accelerator))
    assert state.step == 2 and state.stop_reason.startswith('max_steps')
    assert set(stats) >= {'loss', 'task', 'deit_hard.hard', 'img_per_s'}
    changed = [k for k, v in distiller.student.state_dict().items() if not torch.equal(v, student_before[k])]
    assert 'blocks.0.attn.qkv.weight' in changed and 'head_dist.weight' in changed
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())  # incl. BN running stats
    assert not teacher.model.training


def test_mixer_gives_the_losses_the_mixed_pairing():
    cfg = Config(mixup=1.0, cutmix=0.0, mixup_prob=1.0, smoothing=0.0)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    mixed, targets, meta = BatchMixer(cfg, 5)(x.clone(), y)
    lam = meta['lam']
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
    assert meta['labels_b'].tolist() == [3, 2, 1, 0]
    expected = lam * torch.eye(5)[y] + (1 - lam) * torch.eye(5)[y.flip(0)]
    torch.testing.assert_close(targets, expected)


def test_non_finite_loss_stops_with_the_term_named():
    cfg, distiller, teacher, loader, optimizer, scheduler = _setup('kd')
    with torch.no_grad():
        distiller.student.head_dist.weight.fill_(float('nan'))
    accelerator = Accelerator(cpu=True)
    with pytest.raises(NonFiniteLossError, match=r'non-finite loss.*kd\.kl.*step'):
        train_one_epoch(distiller, EpochBatches(loader, accelerator, BatchMixer(cfg, 10)), optimizer, scheduler,
                        accelerator, TrainState(), NonFiniteGuard('stop', distiller, accelerator))


class _FixedHeads(nn.Module):
    """A 'student' whose cls/dist logits are given per sample: forward_features returns [B, 2 + 0, K] tokens."""
    num_prefix_tokens = 2

    def __init__(self):
        super().__init__()
        self.head = nn.Identity()
        self.head_dist = nn.Identity()
        self.head_drop = nn.Identity()

    def forward_features(self, x):
        return x  # x is [B, 2, K]: row 0 = cls logits, row 1 = dist logits


def test_evaluate_matches_a_hand_count():
    torch.manual_seed(0)
    n, k = 23, 7
    logits = torch.randn(n, 2, k)
    labels = torch.randint(0, k, (n,))
    loader = DataLoader(TensorDataset(logits, labels), batch_size=5)
    metrics = evaluate(_FixedHeads(), loader, Accelerator(cpu=True))

    def count(z, topk):
        hits = 0
        for row, y in zip(z.tolist(), labels.tolist()):
            order = sorted(range(k), key=lambda c: -row[c])
            hits += y in order[:topk]
        return 100.0 * hits / n
    assert metrics['cls_top1'] == pytest.approx(count(logits[:, 0], 1))
    assert metrics['dist_top5'] == pytest.approx(count(logits[:, 1], 5))
    assert metrics['avg_top1'] == pytest.approx(count(logits.mean(1), 1))
    assert metrics['samples'] == n


def test_evaluate_leaves_out_unreadable_images():
    torch.manual_seed(1)
    n, k = 20, 5
    logits = torch.randn(n, 2, k)
    labels = torch.randint(0, k, (n,))
    unreadable = torch.zeros(n, dtype=torch.bool)
    unreadable[[0, 7, 19]] = True  # EvalDataset gives such images label -1
    loader = DataLoader(TensorDataset(logits, labels.masked_fill(unreadable, -1)), batch_size=6)
    metrics = evaluate(_FixedHeads(), loader, Accelerator(cpu=True))
    kept = ~unreadable
    top1 = (logits[kept, 0].argmax(-1) == labels[kept]).float().mean().item() * 100
    assert metrics['cls_top1'] == pytest.approx(top1)
    assert metrics['samples'] == n - 3 and metrics['unreadable'] == 3


def test_topk_with_fewer_classes_than_k():
    hits = _topk_correct(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([0, -1]))
    assert hits.tolist() == [[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]]


def test_scheduler_follows_the_cosine_formula_per_step():
    import math
    cfg = Config(epochs=4, lr=1e-3, min_lr=1e-5, warmup_epochs=1, warmup_lr=1e-6, sched='cosine')
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch=10)
    lrs = {}
    for t in (0, 5, 10, 25, 39):
        scheduler.step_update(num_updates=t)
        lrs[t] = optimizer.param_groups[0]['lr']
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[5] == pytest.approx(1e-6 + 5 * (1e-3 - 1e-6) / 10)  # linear warm-up over 10 steps
    for t in (10, 25, 39):  # cosine counted from step 0 over 40 steps (timm: warm-up is not a prefix)
        assert lrs[t] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * t / 40)))
