"""Teacher-output cache: run the frozen teacher once per (epoch of augmentation, sample), replay it afterwards.

The design of TinyViT's fast distillation ("TinyViT: Fast Pretraining Distillation for Small Vision Transformers",
Wu et al., ECCV 2022, arXiv:2207.10666) and FKD ("A Fast Knowledge Distillation Framework for Visual Recognition",
Shen & Xing, ECCV 2022, arXiv:2112.01528): the teacher's outputs are stored for E_c epochs of augmentation together
with the seeds that reproduce that augmentation; training replays the seeds and reads the outputs instead of running
the teacher. ``--teacher-cache DIR`` turns it on: an epoch whose data epoch is not cached yet runs the teacher live and
records it (or ``scripts/cache_teacher.py`` records E_c epochs up front, without a student); an epoch whose data
epoch is cached replays it. Epoch e uses data epoch ``e mod E_c`` (``--teacher-cache-epochs``, default ``--epochs``:
no repetition, the cache pays off over repeated runs with the same teacher and data, as in TinyViT; fewer epochs cycle
the augmentations, as in FKD, and pay off within one run).

Why a replay is exact
    Every random choice of an epoch is a function of (seed, epoch): :class:`vitkd.data.EpochSampler` draws the order and
    one augmentation seed per sample, :class:`vitkd.data.IndexedDataset` runs each sample's transform with the global
    generators seeded by that seed, and the engine runs mixup/cutmix with them seeded by
    :meth:`~vitkd.data.EpochSampler.mix_seed` (seed, epoch, first index of the batch). So the (mixed) image the
    student sees at (data epoch, index) is reproducible, and so is the teacher's output on it. The cache key is
    (data epoch, data-set index), never the index alone: a cache keyed by index (torchdistill's) serves from the
    second epoch on the teacher's output on *another* augmentation of the image — and under mixup on another mix
    partner — which ``tests/test_teacher_cache.py`` shows gives different losses. Each record also stores the sample's
    augmentation seed and its batch's mixup seed; a replay whose seeds differ (another seed, data set, batch layout)
    stops with an error instead of training on mismatched targets.

What is stored (per data epoch, arrays indexed by data-set index; ``np.lib.format`` memory maps, so every process
writes its own rows of one file and reads only the rows of its batch)
    ============== ======================= =================================================================
    file           dtype, shape            content
    ============== ======================= =================================================================
    seeds.npy      uint64 [N]              augmentation seed of each sample (checked on replay)
    mix_seeds.npy  uint64 [N]              mixup seed of the batch the sample was in (checked per batch)
    written.npy    uint8 [N]               1 = recorded
    logits.npy     float16 [N, k]          teacher logits: the k largest (k = K: all of them, in class order)
    classes.npy    int16/int32 [N, k]      their classes (only when k < K)
    rest.npy       float32 [N]             logit of every other class (only when k < K): the remaining probability
                                           mass 1 − Σ_topk p spread uniformly over the K − k others (TinyViT's
                                           sparse soft label); softmax of the rebuilt row is that label exactly
    pooled.npy     float16 [N, D]          teacher pooled pre-logits (only when a loss asks for them)
    complete       JSON marker             written when every sample of the epoch has been recorded
    ============== ======================= =================================================================

    Storage per sample per epoch = 17 + 2k (+ 2k or 4k for the classes, + 4, when k < K) + 2D bytes (+ 2D only with a
    pooled tap): 1000 classes, k = 10, no pooled: 81 B (ImageNet-1k, 1.28 M images: 104 MB per epoch); with
    RegNetY-160's pooled features (D = 3024) 6.1 KB (7.8 GB per epoch); the embedded Fashion-MNIST run (K = 10,
    all logits, regnety_002 pooled D = 368): 773 B (46 MB per epoch for 60k images).

Only the taps that fit this format are cacheable: teacher logits and pooled features (KD, DeiT, DIST, DKD, VkD,
ND, CRD, RKD, PKT, CC, IRG's logits+pooled…). Feature maps (FitNet, AT, ReviewKD, NORM, …) are an error, as are losses
that run the teacher again on other inputs (their extra teacher forwards stay live anyway). A cache records one
batch layout: the mixup pairing is inside each process's batch, so the per-process batch size and the number of
processes must match between recording and replay (checked, with the seed, the data, the augmentation, the
precision and a hash of the teacher's weights, in ``meta.json``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .config import Config, ConfigError
from .features import Features, TapSpec

__all__ = ['TeacherCache', 'TeacherCacheError', 'compress_logits', 'expand_logits', 'run_fingerprint',
           'teacher_weights_hash', 'FORMAT_VERSION']

_logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Config fields that determine the images a data epoch is made of (with the teacher they determine its outputs).
_DATA_FIELDS = ('dataset', 'data_path', 'train_subset', 'input_size', 'seed', 'batch_size', 'aa', 'three_augment',
                'color_jitter', 'scale', 'hflip', 'train_interpolation', 'reprob', 'remode', 'recount', 'mixup',
                'cutmix', 'mixup_prob', 'mixup_switch_prob', 'mixup_mode', 'mixed_precision', 'teacher',
                'teacher_arch', 'teacher_kwargs')


class TeacherCacheError(ConfigError):
    """A cache folder that cannot serve this run (one-line message)."""


# ---- the logit format ----------------------------------------------------------------------------------------------

def compress_logits(logits: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """[B, K] fp32 logits → what the cache stores: all of them (k ≥ K) or the top k + the logit of the rest.

    The rest logit r satisfies (K − k)·exp(r − lse) = 1 − Σ_topk softmax(z), i.e. softmax of the rebuilt row keeps
    the top-k probabilities and spreads the remaining mass uniformly over the other classes.
    """
    logits = logits.float()
    num_classes = logits.shape[1]
    if k >= num_classes:
        return {'logits': logits.half()}
    values, classes = logits.topk(k, dim=1)                                   # [B, k]
    lse = torch.logsumexp(logits, dim=1)                                      # [B]
    top_mass = torch.exp(values - lse[:, None]).sum(1)                        # [B]
    rest_mass = (1 - top_mass).clamp_min(1e-30) / (num_classes - k)           # probability of each other class
    return {'logits': values.half(), 'classes': classes, 'rest': torch.log(rest_mass) + lse}


def expand_logits(stored: dict[str, torch.Tensor], num_classes: int) -> torch.Tensor:
    """Inverse of :func:`compress_logits` (up to fp16 rounding): [B, K] fp32 logits."""
    values = stored['logits'].float()
    if 'classes' not in stored:
        return values
    full = stored['rest'].float()[:, None].repeat(1, num_classes)             # [B, K]
    return full.scatter(1, stored['classes'].long(), values)


# ---- identity of what a cache holds --------------------------------------------------------------------------------

def teacher_weights_hash(model: torch.nn.Module) -> str:
    """SHA-1 over the teacher's state dict (names, shapes, bytes): a cache never serves another teacher."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f'{name}:{tuple(t.shape)}:{t.dtype}'.encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run_fingerprint(cfg: Config, world_size: int, num_samples: int, num_classes: int, teacher_hash: str,
                    spec: TapSpec, topk: int, pooled_dim: Optional[int]) -> dict:
    """Everything that decides the records of a data epoch; two runs may share a cache iff these are equal."""
    data = {name: getattr(cfg, name) for name in _DATA_FIELDS}
    data['scale'] = [float(v) for v in data['scale']]
    if cfg.dataset == 'hf':  # the columns and splits read decide the images too
        data.update({name: getattr(cfg, name) for name in ('hf_image_column', 'hf_label_column', 'train_split')})
    return dict(format=FORMAT_VERSION, world_size=world_size, num_samples=num_samples, num_classes=num_classes,
                teacher_weights_sha1=teacher_hash, logits=bool(spec.logits), pooled=bool(spec.pooled),
                pooled_dim=pooled_dim, topk=min(topk, num_classes), **data)


def _check_cacheable(spec: TapSpec, losses: list[str]) -> None:
    extra = [what for what, on in (('blocks', spec.blocks), ('modules', spec.modules), ('tokens/feature maps',
                                                                                        spec.tokens)) if on]
    if extra:
        raise TeacherCacheError(f'--teacher-cache stores teacher logits and pooled features only; the methods '
                                f'{", ".join(losses)} also need teacher {", ".join(extra)}')
    if not (spec.logits or spec.pooled):
        raise TeacherCacheError(f'--teacher-cache: the methods {", ".join(losses)} need no teacher outputs to cache')


# ---- the cache -----------------------------------------------------------------------------------------------------

class TeacherCache:
    """Records and replays the teacher taps of a run, keyed by (data epoch, data-set index).

    Args:
        root: the cache folder (created when missing).
        fingerprint: :func:`run_fingerprint` of this run; an existing cache must have been recorded with the same.
        epochs: E_c, the number of data epochs the cache holds (None: the existing cache's, else required).
        live: the live teacher (``Distiller.teacher_features``), used for epochs not recorded yet.
        is_main: this process writes the shared files (meta, markers, new arrays).
        barrier: waits for every process (``accelerator.wait_for_everyone``; a no-op on one process).
        device: where replayed features go.
        samples_per_epoch: how many samples a full epoch visits (checked before an epoch is marked complete).
    """

    def __init__(self, root: str | os.PathLike, fingerprint: dict, epochs: Optional[int],
                 live: Callable[[torch.Tensor], Features], is_main: bool = True,
                 barrier: Callable[[], None] = lambda: None, device: torch.device | str = 'cpu',
                 samples_per_epoch: Optional[int] = None):
        self.root, self.live, self.is_main, self.barrier = Path(root), live, is_main, barrier
        self.samples_per_epoch = samples_per_epoch
        self.device = torch.device(device)
        self.fingerprint = dict(fingerprint)
        meta_path = self.root / 'meta.json'
        if self.is_main and not meta_path.exists():
            if epochs is None:
                raise TeacherCacheError(f'--teacher-cache {self.root}: a new cache needs its number of epochs')
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = meta_path.with_suffix('.tmp')
            tmp.write_text(json.dumps({**self.fingerprint, 'epochs': int(epochs)}, indent=1) + '\n')
            tmp.replace(meta_path)
        self.barrier()
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TeacherCacheError(f'--teacher-cache {self.root}: unreadable meta.json ({e})') from None
        differing = sorted(k for k in set(meta) | set(self.fingerprint) if k != 'epochs' and
                           meta.get(k) != self.fingerprint.get(k))
        if differing:
            shown = ', '.join(f'{k}={meta.get(k)!r} (this run: {self.fingerprint.get(k)!r})' for k in differing[:4])
            raise TeacherCacheError(f'--teacher-cache {self.root} was recorded for another run: {shown}; use another '
                                    'folder (or the recording run\'s settings)')
        if epochs is not None and int(epochs) != int(meta['epochs']):
            raise TeacherCacheError(f'--teacher-cache {self.root} holds {meta["epochs"]} epochs, this run asks for '
                                    f'--teacher-cache-epochs {epochs}')
        self.epochs = int(meta['epochs'])
        self.num_samples, self.num_classes = int(meta['num_samples']), int(meta['num_classes'])
        self.topk, self.pooled_dim = int(meta['topk']), meta['pooled_dim']
        self.store_logits, self.store_pooled = bool(meta['logits']), bool(meta['pooled'])
        self.mode: Optional[str] = None  # 'record' / 'replay' within an epoch
        self.data_epoch_now: Optional[int] = None
        self.arrays: dict[str, np.ndarray] = {}
        self.stats = {'replayed': 0, 'recorded': 0}

    @classmethod
    def for_run(cls, cfg: Config, distiller, accelerator, num_samples: int,
                input_size: tuple[int, int, int]) -> 'TeacherCache':
        """The cache of a run (``--teacher-cache``): checks the taps, fingerprints the run.

        Args:
            distiller: the unwrapped :class:`vitkd.distiller.Distiller` (its teacher, taps and live teacher pass).
            num_samples: training-set size N.
            input_size: (C, H, W) of the student input (to probe the pooled width).
        """
        teacher = distiller.teacher
        if teacher is None or not distiller.needs_teacher:
            raise TeacherCacheError('--teacher-cache needs a teacher that some --distill method uses')
        spec = distiller.teacher_spec
        _check_cacheable(spec, list(distiller.entries))
        pooled_dim = None
        if spec.pooled:
            probe = distiller.teacher_features(torch.zeros(1, *input_size, device=accelerator.device))
            pooled_dim = int(probe.pooled.shape[1])
        fingerprint = run_fingerprint(cfg, accelerator.num_processes, num_samples, teacher.num_classes,
                                      teacher_weights_hash(teacher.model), spec, cfg.teacher_cache_topk, pooled_dim)
        epochs = cfg.teacher_cache_epochs
        if epochs is None and not (Path(cfg.teacher_cache) / 'meta.json').exists():
            epochs = cfg.epochs
        world, batch = accelerator.num_processes, cfg.batch_size
        visited = (num_samples // batch // world) * world * batch  # drop_last loader batches, sharded per process
        return cls(cfg.teacher_cache, fingerprint, epochs, distiller.teacher_features,
                   is_main=accelerator.is_main_process, barrier=accelerator.wait_for_everyone,
                   device=accelerator.device, samples_per_epoch=visited)

    # ---- epochs ------------------------------------------------------------------------------------------------------

    def data_epoch(self, epoch: int) -> int:
        """The data epoch (order, augmentation, mixup, cached outputs) that training epoch ``epoch`` uses."""
        return int(epoch) % self.epochs

    def _epoch_dir(self, data_epoch: int) -> Path:
        return self.root / f'epoch_{data_epoch:04d}'

    def is_complete(self, data_epoch: int) -> bool:
        return (self._epoch_dir(data_epoch) / 'complete').exists()

    def _shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        n, k, num_classes = self.num_samples, self.topk, self.num_classes
        shapes = {'seeds': ((n,), np.uint64), 'mix_seeds': ((n,), np.uint64), 'written': ((n,), np.uint8)}
        if self.store_logits:
            shapes['logits'] = ((n, k), np.float16)
            if k < num_classes:
                shapes['classes'] = ((n, k), np.int16 if num_classes <= 32767 else np.int32)
                shapes['rest'] = ((n,), np.float32)
        if self.store_pooled:
            shapes['pooled'] = ((n, self.pooled_dim), np.float16)
        return shapes

    def begin_epoch(self, data_epoch: int, sample_seeds: np.ndarray) -> str:
        """Open data epoch ``data_epoch``: replay it when complete, else (re)record it. Returns the mode.

        Args:
            sample_seeds: [N] the augmentation seeds the sampler gives this data epoch
                (:meth:`vitkd.data.EpochSampler.sample_seeds`).
        """
        folder = self._epoch_dir(data_epoch)
        self.data_epoch_now = data_epoch
        self.mode = 'replay' if self.is_complete(data_epoch) else 'record'
        shapes = self._shapes()
        if self.mode == 'record' and self.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            for name, (shape, dtype) in shapes.items():
                path = folder / f'{name}.npy'
                if not path.exists():  # a partly recorded epoch (interrupted run) keeps its rows
                    np.lib.format.open_memmap(path, mode='w+', dtype=dtype, shape=shape).flush()
            seeds = np.lib.format.open_memmap(folder / 'seeds.npy', mode='r+')
            seeds[:] = sample_seeds
            seeds.flush()
        self.barrier()
        mode = 'r' if self.mode == 'replay' else 'r+'
        self.arrays = {name: np.load(folder / f'{name}.npy', mmap_mode=mode) for name in shapes}
        if not np.array_equal(self.arrays['seeds'], np.asarray(sample_seeds, dtype=np.uint64)):
            raise TeacherCacheError(f'teacher cache {folder}: the recorded augmentation seeds differ from this run\'s '
                                    '(another seed or data set); use another --teacher-cache folder')
        return self.mode

    def end_epoch(self, complete: bool) -> None:
        """Close the epoch; a fully recorded one gets its ``complete`` marker (after every process has written)."""
        if self.mode == 'record':
            for array in self.arrays.values():
                if isinstance(array, np.memmap):
                    array.flush()
            self.barrier()
            if complete and self.is_main:
                folder = self._epoch_dir(self.data_epoch_now)
                written = int(np.load(folder / 'written.npy', mmap_mode='r').sum())
                if self.samples_per_epoch is not None and written != self.samples_per_epoch:
                    raise TeacherCacheError(f'teacher cache {folder}: {written} samples recorded, a full epoch visits '
                                            f'{self.samples_per_epoch}')
                tmp = folder / 'complete.tmp'
                tmp.write_text(json.dumps({'samples': written}) + '\n')
                tmp.replace(folder / 'complete')
            self.barrier()
        self.arrays, self.mode = {}, None

    # ---- batches -----------------------------------------------------------------------------------------------------

    def features(self, images: torch.Tensor, index: torch.Tensor, mix_seed: int) -> Features:
        """The teacher taps of this batch: read from the cache (replay) or computed live and written (record).

        Args:
            images: [B, C, H, W] the (mixed) student input; only used when recording.
            index: [B] data-set indices.
            mix_seed: the batch's mixup seed (:meth:`vitkd.data.EpochSampler.mix_seed`).
        """
        if self.mode is None:
            raise RuntimeError('TeacherCache.features outside begin_epoch/end_epoch')
        rows = index.detach().cpu().numpy().astype(np.int64)
        if self.mode == 'replay':
            return self._read(rows, mix_seed)
        feats = self.live(images)
        self._write(rows, feats, mix_seed)
        return feats

    def _write(self, rows: np.ndarray, feats: Features, mix_seed: int) -> None:
        a = self.arrays
        if self.store_logits:
            if feats.logits_dist is not None:
                raise TeacherCacheError('--teacher-cache: teachers with a distillation head are not supported')
            for name, value in compress_logits(feats.logits.detach(), self.topk).items():
                a[name][rows] = value.cpu().numpy().astype(a[name].dtype)
        if self.store_pooled:
            pooled = feats.pooled.detach().float().cpu()
            if pooled.abs().max() > 65504:
                raise TeacherCacheError('--teacher-cache: teacher pooled features exceed the float16 range')
            a['pooled'][rows] = pooled.half().numpy()
        a['mix_seeds'][rows] = np.uint64(mix_seed)
        a['written'][rows] = 1
        self.stats['recorded'] += len(rows)

    def _read(self, rows: np.ndarray, mix_seed: int) -> Features:
        a = self.arrays
        if not a['written'][rows].all():
            missing = rows[a['written'][rows] == 0][:5]
            raise TeacherCacheError(f'teacher cache epoch {self.data_epoch_now}: samples {missing.tolist()} were never '
                                    'recorded (a corrupt cache or another batch layout)')
        if not (a['mix_seeds'][rows] == np.uint64(mix_seed)).all():
            raise TeacherCacheError(f'teacher cache epoch {self.data_epoch_now}: a batch\'s mixup seed differs from '
                                    'the recorded one (another batch layout or seed); use another --teacher-cache')
        feats = Features()
        if self.store_logits:
            stored = {name: torch.from_numpy(np.ascontiguousarray(a[name][rows]))
                      for name in ('logits', 'classes', 'rest') if name in a}
            feats.logits = expand_logits(stored, self.num_classes).to(self.device)
        if self.store_pooled:
            feats.pooled = torch.from_numpy(np.ascontiguousarray(a['pooled'][rows])).float().to(self.device)
        self.stats['replayed'] += len(rows)
        return feats
