"""The teacher-output cache replays the teacher exactly (up to fp16) under random augmentation and mixup.

The real engine (``train_one_epoch``) runs a tiny distilled DeiT + a random regnety_002 teacher with VkD (teacher
logits and pooled features) and DIST, RandAugment + random-resized crops + flips + random erasing and mixup/cutmix on,
with a zero learning rate (the student never changes, so every step's losses are a function of the batch and the
teacher's outputs only). Epochs recorded with the live teacher are compared with the same epochs replayed from the
cache, and with a cache keyed by the sample index alone (torchdistill's), which must be wrong.
"""
import json

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from timm.data import create_transform
from torch.utils.data import DataLoader

import vitkd
from vitkd.engine import TrainState, train_one_epoch
from vitkd.training import EpochBatches, NonFiniteGuard
from vitkd.build import BatchMixer
from vitkd.config import Config
from vitkd.data import ArrayImageDataset, EpochSampler, IndexedDataset, TransformedDataset
from vitkd.distiller import Distiller, LossEntry
from vitkd.features import Features
from vitkd.losses import RunInfo, create_loss
from vitkd.teacher_cache import TeacherCache, TeacherCacheError, compress_logits, expand_logits

torch.set_num_threads(1)
N, BATCH, K = 48, 8, 10
TERMS = ('task', 'vkd.repr', 'vkd.kl', 'dist.inter', 'dist.intra', 'loss')


# ---- the stored logit format ---------------------------------------------------------------------------------------

def test_topk_logits_rebuild_tinyvit_sparse_label():
    torch.manual_seed(0)
    logits = torch.randn(5, 12) * 3
    k = 4
    rebuilt = expand_logits(compress_logits(logits, k), 12)                  # [5, 12]
    p = np.exp(logits.numpy().astype(np.float64))
    p /= p.sum(1, keepdims=True)
    q = torch.softmax(rebuilt.double(), 1).numpy()
    for b in range(5):  # by hand: the k largest probabilities kept, the rest shared equally
        top = np.argsort(-p[b])[:k]
        rest = [c for c in range(12) if c not in top]
        np.testing.assert_allclose(q[b, top], p[b, top], rtol=2e-3)        # fp16 logits
        np.testing.assert_allclose(q[b, rest], (1 - p[b, top].sum()) / (12 - k), rtol=2e-3)
        assert set(rebuilt[b].topk(k).indices.tolist()) == set(top.tolist())


def test_all_logits_are_kept_when_k_covers_the_classes():
    logits = torch.randn(3, 6) * 4
    stored = compress_logits(logits, 6)
    assert set(stored) == {'logits'} and stored['logits'].dtype == torch.float16
    torch.testing.assert_close(expand_logits(stored, 6), logits, atol=1e-2, rtol=1e-3)


# ---- end to end through the engine ---------------------------------------------------------------------------------

def _config(cache_dir, batch=BATCH, **overrides) -> Config:
    values = dict(dataset='imagefolder', data_path='mem', seed=5, batch_size=batch, aa='rand-m9-mstd0.5-inc1',
                  scale=[0.3, 1.0], hflip=0.5, reprob=0.25, color_jitter=0.0, mixup=0.8, cutmix=1.0, smoothing=0.1,
                  mixup_mode='batch', teacher='regnety_002', epochs=3, teacher_cache=str(cache_dir),
                  teacher_cache_epochs=2, teacher_cache_topk=K)  # all logits: exact up to fp16 (top-k is lossy)
    values.update(overrides)
    return Config(**values)


class _NoSchedule:
    def step_update(self, num_updates):
        pass


def _setup(cfg: Config):
    """Accelerator, prepared distiller/optimizer/loader, mixer; the student never moves (lr 0)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (N, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, K, N)
    tf = create_transform(32, is_training=True, scale=tuple(cfg.scale), hflip=cfg.hflip, auto_augment=cfg.aa,
                          re_prob=cfg.reprob, color_jitter=None, mean=(0.5,) * 3, std=(0.25,) * 3)
    train = IndexedDataset(TransformedDataset(ArrayImageDataset(images, labels, [str(c) for c in range(K)]), tf))
    loader = DataLoader(train, cfg.batch_size, sampler=EpochSampler(N, cfg.seed), drop_last=True, num_workers=0)
    torch.manual_seed(0)
    student = vitkd.create_student('deit_tiny_distilled_patch16_224', K, img_size=32, patch_size=8, depth=2,
                                   embed_dim=32, num_heads=2)
    teacher = vitkd.create_teacher('regnety_002', K, pretrained=False)
    teacher.set_student_normalization((0.5,) * 3, (0.25,) * 3)
    info = RunInfo(num_classes=K, num_samples=N, epochs=cfg.epochs, input_size=(3, 32, 32), mean=(0.5,) * 3,
                   std=(0.25,) * 3)
    distiller = Distiller(student, teacher, [LossEntry(create_loss('vkd')), LossEntry(create_loss('dist'))], info)
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.0)
    accelerator = Accelerator(cpu=True)
    model, optimizer, loader = accelerator.prepare(distiller, optimizer, loader)
    return accelerator, model, distiller, optimizer, loader, BatchMixer(cfg, K)


def _epoch(setup, epoch: int, cache) -> list[dict]:
    accelerator, model, _, optimizer, loader, mixer = setup
    records = []
    train_one_epoch(model, EpochBatches(loader, accelerator, mixer, cache), optimizer, _NoSchedule(), accelerator,
                    TrainState(epoch=epoch), NonFiniteGuard('stop', model, accelerator), log_every=1,
                    log_fn=records.append)
    return [{k: r[k] for k in TERMS} for r in records]


def _max_rel_diff(a: list[dict], b: list[dict]) -> float:
    assert len(a) == len(b) == N // BATCH
    return max(abs(x[k] - y[k]) / max(abs(y[k]), 1e-3) for x, y in zip(a, b) for k in TERMS)


class _IndexOnlyCache:
    """torchdistill's design: teacher outputs stored per sample index, served in every epoch."""

    def __init__(self, live):
        self.live, self.store, self.mode = live, {}, None

    def data_epoch(self, epoch):
        return epoch

    def begin_epoch(self, data_epoch, sample_seeds):
        self.mode = 'replay' if self.store else 'record'

    def features(self, images, index, mix_seed):
        if self.mode == 'record':
            feats = self.live(images)
            for row, i in enumerate(index.tolist()):
                self.store[i] = (feats.logits[row], feats.pooled[row])
            return feats
        return Features(logits=torch.stack([self.store[i][0] for i in index.tolist()]),
                        pooled=torch.stack([self.store[i][1] for i in index.tolist()]))

    def end_epoch(self, complete):
        self.mode = None


@pytest.fixture(scope='module')
def recorded(tmp_path_factory):
    """Epochs 0 and 1 recorded (live teacher), then epochs 0, 1 and 2 (= data epoch 0) replayed from the cache."""
    cache_dir = tmp_path_factory.mktemp('cache')
    cfg = _config(cache_dir)
    setup = _setup(cfg)
    accelerator, _, distiller = setup[0], setup[1], setup[2]
    cache = TeacherCache.for_run(cfg, distiller, accelerator, N, (3, 32, 32))
    live = [_epoch(setup, e, cache) for e in (0, 1)]
    assert cache.stats == {'recorded': 2 * N, 'replayed': 0}
    calls = []
    real = distiller.teacher_features
    distiller.teacher_features = lambda x: calls.append(1) or real(x)  # count live teacher passes
    replay = [_epoch(setup, e, cache) for e in (0, 1, 2)]
    distiller.teacher_features = real
    return dict(cfg=cfg, setup=setup, cache=cache, cache_dir=cache_dir, live=live, replay=replay, teacher_calls=calls)


def test_replayed_epochs_give_the_live_teacher_losses(recorded):
    live, replay, cache = recorded['live'], recorded['replay'], recorded['cache']
    assert recorded['teacher_calls'] == [] and cache.stats['replayed'] == 3 * N  # the teacher never ran
    assert _max_rel_diff(replay[0], live[0]) < 5e-3  # fp16 logits / pooled features
    assert _max_rel_diff(replay[1], live[1]) < 5e-3
    assert _max_rel_diff(replay[2], live[0]) < 5e-3  # epoch 2 replays data epoch 2 mod 2 = 0
    # the two data epochs are different augmentations and mixes: comparing across them is not trivially equal
    assert _max_rel_diff(live[1], live[0]) > 5e-2


def test_a_cache_keyed_by_index_alone_gives_wrong_losses(recorded):
    accelerator, _, distiller = recorded['setup'][:3]
    index_only = _IndexOnlyCache(distiller.teacher_features)
    _epoch(recorded['setup'], 0, index_only)                  # records epoch 0's teacher outputs by index
    stale = _epoch(recorded['setup'], 1, index_only)          # serves them in epoch 1: other crops, flips, mixes
    assert _max_rel_diff(stale, recorded['live'][1]) > 5e-2   # fails the tolerance the real cache meets


def test_cache_files_hold_per_sample_seeds_and_a_complete_marker(recorded):
    cache_dir = recorded['cache_dir']
    sampler = EpochSampler(N, recorded['cfg'].seed)
    for data_epoch in (0, 1):
        folder = cache_dir / f'epoch_{data_epoch:04d}'
        np.testing.assert_array_equal(np.load(folder / 'seeds.npy'), sampler.sample_seeds(data_epoch))
        assert json.loads((folder / 'complete').read_text()) == {'samples': N}  # 48 = 6 full batches
        assert np.load(folder / 'logits.npy').shape == (N, K) and not (folder / 'classes.npy').exists()
        assert np.load(folder / 'pooled.npy').dtype == np.float16
        # every batch's samples carry that batch's mixup seed, computed independently from the epoch's order
        mix = np.load(folder / 'mix_seeds.npy')
        sampler.set_epoch(data_epoch)
        keys = [i for i, _ in sampler]
        for start in range(0, N, BATCH):
            batch = keys[start:start + BATCH]
            assert set(mix[batch].tolist()) == {sampler.mix_seed(data_epoch, batch[0])}
    assert not (cache_dir / 'epoch_0002').exists()


def test_a_cache_refuses_another_batch_layout_or_teacher(recorded):
    _, _, distiller = recorded['setup'][:3]
    accelerator = recorded['setup'][0]
    with pytest.raises(TeacherCacheError, match='batch_size=8'):
        TeacherCache.for_run(_config(recorded['cache_dir'], batch=4), distiller, accelerator, N, (3, 32, 32))
    with pytest.raises(TeacherCacheError, match='holds 2 epochs'):
        TeacherCache.for_run(_config(recorded['cache_dir'], teacher_cache_epochs=3), distiller, accelerator, N,
                             (3, 32, 32))
    with torch.no_grad():
        distiller.teacher.model.head.fc.bias.add_(1.0)
    try:
        with pytest.raises(TeacherCacheError, match='teacher_weights_sha1'):
            TeacherCache.for_run(recorded['cfg'], distiller, accelerator, N, (3, 32, 32))
    finally:
        with torch.no_grad():
            distiller.teacher.model.head.fc.bias.sub_(1.0)


def test_a_replayed_batch_with_another_mixup_seed_is_an_error(recorded, tmp_path):
    import shutil
    copy = tmp_path / 'cache'
    shutil.copytree(recorded['cache_dir'], copy)
    mix = np.load(copy / 'epoch_0001' / 'mix_seeds.npy')
    mix[:] += np.uint64(1)
    np.save(copy / 'epoch_0001' / 'mix_seeds.npy', mix)
    cfg = _config(copy)
    cache = TeacherCache.for_run(cfg, recorded['setup'][2], recorded['setup'][0], N, (3, 32, 32))
    with pytest.raises(TeacherCacheError, match='mixup seed'):
        _epoch(recorded['setup'], 1, cache)


def test_feature_map_losses_are_not_cacheable(tmp_path):
    torch.manual_seed(0)
    student = vitkd.create_student('deit_tiny_distilled_patch16_224', K, img_size=32, patch_size=8, depth=2,
                                   embed_dim=32, num_heads=2)
    teacher = vitkd.create_teacher('regnety_002', K, pretrained=False)
    distiller = Distiller(student, teacher, [LossEntry(create_loss('fitnet'))],
                          RunInfo(num_classes=K, input_size=(3, 32, 32)))
    with pytest.raises(TeacherCacheError, match='fitnet also need teacher blocks'):
        TeacherCache.for_run(_config(tmp_path / 'c'), distiller, Accelerator(cpu=True), N, (3, 32, 32))
