"""The teacher-output cache replays the teacher exactly (up to fp16) under random augmentation and mixup.

The real engine (``train_one_epoch``) runs a tiny distilled DeiT + a random regnety_002 teacher with VkD (teacher
logits and pooled features) and DIST, RandAugment + random-resized crops + flips + random erasing and mixup/cutmix on,
with a zero learning rate (the student never changes, so every step's losses are a function of the batch and the
teacher's outputs only). Epochs recorded with the live teacher are compared with the same epochs replayed from the
cache, and with a cache keyed by the sample index alone (torchdistill's), which must be wrong.
"""
import json
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from timm.data import create_transform
from torch.utils.data import DataLoader

import vitkd
from vitkd.engine import TrainState, train_one_epoch
from vitkd.training import EpochBatches, NonFiniteGuard
from vitkd.config import Config
from vitkd.data import ArrayImageDataset, BatchMixer, EpochSampler, IndexedDataset, TransformedDataset, mix_batch
from vitkd.distiller import Distiller, LossEntry
from vitkd.features import Features
from vitkd.losses import RunInfo, create_loss
from vitkd.teacher_cache import (HEADER_BYTES, TeacherCache, TeacherCacheError, _to_device, cache_bytes,
                                 compress_logits, expand_logits, record_dtype)

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

    def features(self, images, index, mix_seed, batch_number):
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


def _records(cache_dir, data_epoch: int, cache) -> np.ndarray:
    """A record file read independently of the cache: NumPy's reader after the fixed-size header."""
    return np.fromfile(cache_dir / f'epoch_{data_epoch:04d}' / 'process_000.rec', dtype=cache.dtype,
                       offset=HEADER_BYTES)


def test_cache_files_hold_per_sample_seeds_in_visiting_order_and_a_done_marker(recorded):
    cache_dir, cache = recorded['cache_dir'], recorded['cache']
    sampler = EpochSampler(N, recorded['cfg'].seed)
    assert cache.dtype.names == ('index', 'seed', 'mix_seed', 'logits', 'pooled', 'check')  # all K logits kept
    for data_epoch in (0, 1):
        folder = cache_dir / f'epoch_{data_epoch:04d}'
        records = _records(cache_dir, data_epoch, cache)
        sampler.set_epoch(data_epoch)
        keys = [i for i, _ in sampler]
        assert records['index'].tolist() == keys  # one process: record r is the r-th sample visited
        np.testing.assert_array_equal(records['seed'], sampler.sample_seeds(data_epoch)[keys])
        assert json.loads((folder / 'process_000.done').read_text())['records'] == N  # 48 = 6 full batches
        assert records['logits'].shape == (N, K) and records['pooled'].dtype == np.int16  # bf16 bit patterns
        for start in range(0, N, BATCH):  # each batch's records carry its mixup seed, computed independently
            assert set(records['mix_seed'][start:start + BATCH].tolist()) == {sampler.mix_seed(data_epoch,
                                                                                               keys[start])}
        seed = zlib.crc32(f'{cache.digest}:{data_epoch}:0'.encode())
        assert [zlib.crc32(r.tobytes()[:-4], seed) for r in records] == records['check'].tolist()
    assert not (cache_dir / 'epoch_0002').exists()


def test_stored_features_are_the_teachers_rounded_to_bfloat16_and_logits_to_float16(recorded):
    """The first batch of data epoch 0, run through the live teacher again, against its records."""
    _, _, distiller, _, loader, mixer = recorded['setup']
    cache = recorded['cache']
    records = _records(recorded['cache_dir'], 0, cache)[:BATCH]
    loader.set_epoch(0)
    images, labels, index = next(iter(loader))
    images, _, _, _ = mix_batch(mixer, EpochSampler(N, recorded['cfg'].seed), 0, images, labels, index.numpy())
    with torch.no_grad():
        live = distiller.teacher_features(images)
    assert records['index'].tolist() == index.tolist()
    pooled = torch.from_numpy(records['pooled'].copy()).view(torch.bfloat16)
    assert torch.equal(pooled, live.pooled.to(torch.bfloat16))
    assert torch.equal(torch.from_numpy(records['logits'].copy()), live.logits.half())


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


def _copy(recorded, tmp_path) -> Path:
    copy = tmp_path / 'cache'
    shutil.copytree(recorded['cache_dir'], copy)
    return copy


def _replay_first_batch(recorded, cache_dir, data_epoch: int = 1, mix_offset: int = 0):
    """Open ``data_epoch`` of the cache in ``cache_dir`` and read its first batch (as the engine would)."""
    cfg = _config(cache_dir)
    cache = TeacherCache.for_run(cfg, recorded['setup'][2], recorded['setup'][0], N, (3, 32, 32))
    sampler = EpochSampler(N, cfg.seed)
    sampler.set_epoch(data_epoch)
    keys = np.array([i for i, _ in sampler][:BATCH])
    assert cache.begin_epoch(data_epoch, sampler.sample_seeds(data_epoch)) == 'replay'
    try:
        return cache.features(None, keys, sampler.mix_seed(data_epoch, int(keys[0])) + mix_offset, 0)
    finally:
        cache.end_epoch(complete=False)


def test_a_replayed_batch_with_another_mixup_seed_is_an_error(recorded):
    assert _replay_first_batch(recorded, recorded['cache_dir']).pooled.shape == (BATCH, 368)
    with pytest.raises(TeacherCacheError, match='mixup seed'):
        _replay_first_batch(recorded, recorded['cache_dir'], mix_offset=1)


def test_a_truncated_record_file_is_named_and_never_replayed(recorded, tmp_path):
    copy = _copy(recorded, tmp_path)
    path = copy / 'epoch_0001' / 'process_000.rec'
    os.truncate(path, path.stat().st_size - 100)
    with pytest.raises(TeacherCacheError, match=r'process_000.rec: is truncated or damaged .* not replayed'):
        _replay_first_batch(recorded, copy)


def test_a_damaged_record_fails_its_checksum(recorded, tmp_path):
    copy = _copy(recorded, tmp_path)
    path = copy / 'epoch_0001' / 'process_000.rec'
    data = bytearray(path.read_bytes())
    data[HEADER_BYTES + 3 * recorded['cache'].dtype.itemsize + 40] ^= 0x10  # one bit of record 3
    path.write_bytes(bytes(data))
    with pytest.raises(TeacherCacheError, match='record 3 fails its checksum'):
        _replay_first_batch(recorded, copy)


def test_a_record_file_of_another_cache_or_epoch_is_refused(recorded, tmp_path):
    """A file copied in from another data epoch (or another cache: its header names another meta.json) is refused
    from its header; with the header rewritten to match, from its records' checksums, seeded by the file's
    identity."""
    copy = _copy(recorded, tmp_path)
    epoch0, epoch1 = (copy / f'epoch_000{e}' / 'process_000.rec' for e in (0, 1))
    shutil.copy(epoch0, epoch1)
    with pytest.raises(TeacherCacheError, match='written for another cache .data_epoch differ'):
        _replay_first_batch(recorded, copy)
    header = epoch1.read_bytes()[:HEADER_BYTES].replace(b'"data_epoch": 0', b'"data_epoch": 1')
    epoch1.write_bytes(header + epoch0.read_bytes()[HEADER_BYTES:])
    with pytest.raises(TeacherCacheError, match='record 0 fails its checksum'):
        _replay_first_batch(recorded, copy)


def test_a_cache_of_another_vitkd_version_or_format_is_refused(recorded, tmp_path):
    copy = _copy(recorded, tmp_path)
    meta = json.loads((copy / 'meta.json').read_text())
    for change in ({'format': 1}, {'vitkd_version': '0.0.1'}):
        (copy / 'meta.json').write_text(json.dumps({**meta, **change}))
        with pytest.raises(TeacherCacheError, match=r'was written by vitkd .* use another folder'):
            _replay_first_batch(recorded, copy)


def test_a_cache_the_disk_cannot_hold_is_refused_before_recording(recorded, tmp_path, monkeypatch):
    """The size is computed from the record layout: E_c epochs × N records (+ a header per file)."""
    cfg = _config(tmp_path / 'new')
    per_epoch = HEADER_BYTES + N * record_dtype(K, K, True, 368).itemsize
    free = 2 * per_epoch - 1  # two data epochs do not fit
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(10 ** 12, 10 ** 12 - free, free))
    with pytest.raises(TeacherCacheError, match=f'recording 2 data epochs needs .* the disk has'):
        TeacherCache.for_run(cfg, recorded['setup'][2], recorded['setup'][0], N, (3, 32, 32))
    assert cache_bytes(N, 1, 2, record_dtype(K, K, True, 368)) == 2 * per_epoch > free


def test_replay_copies_from_pinned_memory_without_blocking(monkeypatch):
    """The meta device stands in for CUDA: the replayed arrays are pinned, then copied with ``non_blocking``."""
    calls = []
    monkeypatch.setattr(torch.Tensor, 'pin_memory', lambda self: calls.append('pin') or self)
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        calls.append(('to', kwargs.get('non_blocking')))
        return real_to(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, 'to', to)
    out = _to_device(np.zeros((2, 3), dtype=np.float16), torch.device('meta'))
    assert out.device.type == 'meta' and calls == ['pin', ('to', True)]


def test_feature_map_losses_are_not_cacheable(tmp_path):
    torch.manual_seed(0)
    student = vitkd.create_student('deit_tiny_distilled_patch16_224', K, img_size=32, patch_size=8, depth=2,
                                   embed_dim=32, num_heads=2)
    teacher = vitkd.create_teacher('regnety_002', K, pretrained=False)
    distiller = Distiller(student, teacher, [LossEntry(create_loss('fitnet'))],
                          RunInfo(num_classes=K, input_size=(3, 32, 32)))
    with pytest.raises(TeacherCacheError, match='fitnet also need teacher blocks'):
        TeacherCache.for_run(_config(tmp_path / 'c'), distiller, Accelerator(cpu=True), N, (3, 32, 32))


def test_main_refuses_a_truncated_cache_in_one_line_with_exit_2(tmp_path):
    """The command line: ``scripts/cache_teacher.py`` records data epoch 0; after its record file is cut short,
    ``main.py`` stops with one ``error:`` line naming the file (exit 2, the README's code for a damaged file given on
    the command line)."""
    import subprocess
    import sys
    from test_gpu_path import REPO, TINY
    cache = tmp_path / 'cache'
    options = [*TINY, '--distill', 'kd', '--train-subset', '0.0006', '--epochs', '1', '--teacher-cache', str(cache),
               '--teacher-cache-epochs', '1']
    first = subprocess.run([sys.executable, str(REPO / 'scripts' / 'cache_teacher.py'), *options, '--output-dir',
                            str(tmp_path / 'a')], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    record_file = cache / 'epoch_0000' / 'process_000.rec'
    os.truncate(record_file, record_file.stat().st_size // 2)
    second = subprocess.run([sys.executable, str(REPO / 'main.py'), *options, '--output-dir', str(tmp_path / 'b')],
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 2, second.stderr[-2000:]
    errors = [line for line in second.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'process_000.rec: is truncated' in errors[0], second.stderr[-2000:]
    assert 'Traceback' not in second.stderr


def test_a_full_disk_while_reserving_an_epoch_is_one_line(recorded, tmp_path, monkeypatch):
    """The file's blocks are reserved when an epoch starts recording: no space then is a one-line refusal (a file
    system without ``posix_fallocate`` records without the reservation)."""
    import errno as errno_codes
    cfg = _config(tmp_path / 'new')
    cache = TeacherCache.for_run(cfg, recorded['setup'][2], recorded['setup'][0], N, (3, 32, 32))
    seeds = EpochSampler(N, cfg.seed).sample_seeds(0)

    def fallocate(errno_code):
        def fail(fd, offset, size):
            raise OSError(errno_code, os.strerror(errno_code))
        return fail
    monkeypatch.setattr(os, 'posix_fallocate', fallocate(errno_codes.EOPNOTSUPP))
    assert cache.begin_epoch(0, seeds) == 'record'
    cache.end_epoch(complete=False)
    monkeypatch.setattr(os, 'posix_fallocate', fallocate(errno_codes.ENOSPC))
    with pytest.raises(TeacherCacheError, match=r'process_000.rec: cannot reserve .* \(No space left on device\)'):
        cache.begin_epoch(0, seeds)
