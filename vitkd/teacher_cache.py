"""Teacher-output cache: run the frozen teacher once per (epoch of augmentation, sample), replay it afterwards.

The design of TinyViT's fast distillation ("TinyViT: Fast Pretraining Distillation for Small Vision Transformers",
Wu et al., ECCV 2022, arXiv:2207.10666) and FKD ("A Fast Knowledge Distillation Framework for Visual Recognition",
Shen & Xing, ECCV 2022, arXiv:2112.01528): the teacher's outputs are stored for E_c epochs of augmentation together
with the seeds that reproduce that augmentation; training replays the seeds and reads the outputs instead of running
the teacher. ``--teacher-cache DIR`` turns it on: an epoch whose data epoch is not cached yet runs the teacher live and
records it (or ``scripts/cache_teacher.py`` records E_c epochs up front, without a student); an epoch whose data
epoch is cached replays it. Epoch e uses data epoch ``e mod E_c`` (``--teacher-cache-epochs``; default
min(``--epochs``, :data:`DEFAULT_EPOCHS`)): the augmentations cycle after E_c epochs, as in FKD, which bounds the disk
(ImageNet-1k with RegNetY-160's pooled features takes 7.8 GB per data epoch: ``scripts/scale_estimate.py``); a
cache with E_c = ``--epochs`` repeats nothing, as in TinyViT.

Why a replay is exact
    Every random choice of an epoch is a function of (seed, epoch): :class:`vitkd.data.EpochSampler` draws the order and
    one augmentation seed per sample, :class:`vitkd.data.IndexedDataset` runs each sample's transform with the global
    generators seeded by that seed, and the engine runs mixup/cutmix with them seeded by
    :meth:`~vitkd.data.EpochSampler.mix_seed` (seed, epoch, first index of the batch). So the (mixed) image the
    student sees at (data epoch, index) is reproducible, and so is the teacher's output on it. The cache key is
    (data epoch, data-set index), never the index alone: a cache keyed by index (torchdistill's) serves from the
    second epoch on the teacher's output on *another* augmentation of the image — and under mixup on another mix
    partner — which ``tests/test_teacher_cache.py`` shows gives different losses. Each record also stores the sample's
    index, its augmentation seed and its batch's mixup seed; a replay whose values differ (another seed, data set,
    batch layout) stops with an error instead of training on mismatched targets.

Files (one writer per file: every process writes and reads only its own)
    ``meta.json``                           what the cache holds (:func:`run_fingerprint`, E_c, format and vitkd
                                            version, records per process); written once by the main process
    ``epoch_EEEE/process_PPP.rec``          process P's records of data epoch E, in the order it visits them
                                            (record r = sample j of its batch b, r = b·B + j): a 4096-byte header
                                            (magic, format, vitkd version, SHA-256 of ``meta.json``'s content, data
                                            epoch, process, record count and layout), then fixed-size records
    ``epoch_EEEE/process_PPP.done``         written (atomically) once every record of the file was written and read
                                            back intact; an epoch is complete when all processes' markers exist

    One record (NumPy structured dtype, little-endian, no padding):

    ========== ===================== ===================================================================
    field      dtype, shape          content
    ========== ===================== ===================================================================
    index      int64                 data-set index of the sample (checked on replay)
    seed       uint64                its augmentation seed (checked on replay)
    mix_seed   uint64                the mixup seed of its batch (checked on replay)
    logits     float16 [k]           teacher logits: the k largest (k = K: all of them, in class order)
    classes    int16/int32 [k]       their classes (only when k < K)
    rest       float32               logit of every other class (only when k < K): the remaining probability
                                     mass 1 − Σ_topk p spread uniformly over the K − k others (TinyViT's
                                     sparse soft label); softmax of the rebuilt row is that label exactly
    pooled     bfloat16 [D]          teacher pooled pre-logits (only when a loss asks for them; bf16 has fp32's
                                     range, so no value overflows)
    check      uint32                CRC-32 of the record's other bytes, seeded by the file's identity (meta
                                     digest, data epoch, process): a torn, zeroed or foreign record fails it
    ========== ===================== ===================================================================

    Storage per sample per epoch = 28 + 2k (+ 2k or 4k for the classes, + 4, when k < K) + 2D bytes (D only with a
    pooled tap): 1000 classes, k = 10, no pooled: 72 B (ImageNet-1k, 1.28 M images: 92 MB per epoch); with
    RegNetY-160's pooled features (D = 3024) 6.1 KB (7.8 GB per epoch); the embedded Fashion-MNIST run (K = 10, all
    logits, regnety_002 pooled D = 368): 784 B (47 MB per epoch for 60k images).

Integrity
    Before recording, the cache states its size and refuses, in one line, when the disk cannot hold it
    (``shutil.disk_usage``); each process reserves its file's blocks when it creates it (``posix_fallocate``), so a
    full disk is one line at the start of an epoch, never a crash in the middle. A replay reads nothing it has not
    checked: ``meta.json`` against this run (teacher weights, data, augmentation, batch layout, format and vitkd
    version), each file's header against ``meta.json`` and its size against the header (a truncated file), each
    record's checksum, index and seeds as it is read. Any mismatch is a :class:`TeacherCacheError` naming the file and
    what differs (exit 2), and the cache is never replayed.

The GPU path
    Recording copies the teacher's outputs to pinned host memory without blocking (``non_blocking=True``) and writes
    them to the file once their copy has finished (a CUDA event, polled at the next batch; waited for only when the
    epoch closes); replay copies the records into pinned memory and to the device without blocking, and rebuilds the
    logits there. No step waits for the device.

Only the taps that fit this format are cacheable: teacher logits and pooled features (KD, DeiT, DIST, DKD, VkD,
ND, CRD, RKD, PKT, CC, IRG's logits+pooled…). Feature maps (FitNet, AT, ReviewKD, NORM, …) are an error, as are losses
that run the teacher again on other inputs (their extra teacher forwards stay live anyway). A cache records one
batch layout: the mixup pairing is inside each process's batch and the records are in each process's visiting order,
so the per-process batch size and the number of processes must match between recording and replay (checked, with the
seed, the data, the augmentation, the precision and a hash of the teacher's weights, in ``meta.json``).
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import zlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .version import __version__ as VITKD_VERSION
from .config import Config, ConfigError
from .features import Features, TapSpec

__all__ = ['TeacherCache', 'TeacherCacheError', 'compress_logits', 'expand_logits', 'run_fingerprint',
           'teacher_weights_hash', 'record_dtype', 'cache_bytes', 'FORMAT_VERSION', 'DEFAULT_EPOCHS']

_logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
DEFAULT_EPOCHS = 10  # data epochs cached when --teacher-cache-epochs is not given (FKD-style cycling bounds the disk)
HEADER_BYTES = 4096
MAGIC = b'vitkd teacher cache\n'
# Config fields that determine the images a data epoch is made of (with the teacher they determine its outputs).
_DATA_FIELDS = ('dataset', 'data_path', 'train_subset', 'input_size', 'seed', 'batch_size', 'aa', 'three_augment',
                'color_jitter', 'scale', 'hflip', 'train_interpolation', 'reprob', 'remode', 'recount', 'mixup',
                'cutmix', 'mixup_prob', 'mixup_switch_prob', 'mixup_mode', 'mixed_precision', 'teacher',
                'teacher_arch', 'teacher_kwargs')


class TeacherCacheError(ConfigError):
    """A cache folder that cannot serve this run: another run's, damaged or truncated, or too large for its disk
    (one-line message naming the file)."""


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
    return dict(world_size=world_size, num_samples=num_samples, num_classes=num_classes,
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




# ---- the record layout ---------------------------------------------------------------------------------------------

def record_dtype(num_classes: int, topk: int, logits: bool, pooled_dim: Optional[int]) -> np.dtype:
    """The NumPy structured dtype of one record (see the module docstring's table).

    Args:
        num_classes: K.
        topk: k logits kept (k ≥ K: all of them).
        logits: whether logits are stored.
        pooled_dim: D of the pooled features, or None when they are not stored.
    """
    fields = [('index', '<i8'), ('seed', '<u8'), ('mix_seed', '<u8')]
    if logits:
        k = min(topk, num_classes)
        fields.append(('logits', '<f2', (k,)))
        if k < num_classes:
            fields += [('classes', '<i2' if num_classes <= 32767 else '<i4', (k,)), ('rest', '<f4')]
    if pooled_dim is not None:
        fields.append(('pooled', '<i2', (pooled_dim,)))  # bfloat16 bit patterns (NumPy has no bfloat16)
    fields.append(('check', '<u4'))
    return np.dtype(fields)


def cache_bytes(records_per_process: int, world_size: int, epochs: int, dtype: np.dtype) -> int:
    """Bytes of a cache of ``epochs`` data epochs (record files with their headers; the JSON files are negligible)."""
    return epochs * world_size * (HEADER_BYTES + records_per_process * dtype.itemsize)


def _gigabytes(n: int) -> str:
    return f'{n / 1e9:.2f} GB'


def _checksums(records: np.ndarray, seed: int) -> np.ndarray:
    """[n] CRC-32 of each record's bytes but its last four (the ``check`` field), seeded with ``seed``."""
    raw = records.view(np.uint8).reshape(len(records), records.dtype.itemsize)
    return np.fromiter((zlib.crc32(row[:-4].tobytes(), seed) for row in raw), dtype=np.uint32, count=len(records))


def _reserve(file: int, size: int) -> None:
    """Allocate the file's blocks now (the disk is full now or never during the epoch); a file system that cannot
    (``posix_fallocate`` unsupported) is written without the reservation."""
    try:
        os.posix_fallocate(file, 0, size)
    except (AttributeError, OSError) as e:
        if getattr(e, 'errno', None) == errno.ENOSPC:
            raise


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of a device tensor, started without waiting: pinned memory, ``non_blocking`` (a host tensor is
    returned as it is)."""
    if tensor.device.type == 'cpu':
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` on ``device``, copied from pinned memory without blocking the host."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == 'cpu':
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


# ---- the cache -----------------------------------------------------------------------------------------------------

class TeacherCache:
    """Records and replays the teacher taps of a run, keyed by (data epoch, process, position in its epoch), each
    record checked against its data-set index and seeds.

    Args:
        root: the cache folder (created when missing).
        fingerprint: :func:`run_fingerprint` of this run (at least ``num_samples``, ``num_classes``, ``topk``,
            ``logits``, ``pooled``, ``pooled_dim``); an existing cache must have been recorded with the same.
        epochs: E_c, the number of data epochs the cache holds (None: the existing cache's, else required).
        live: the live teacher (``Distiller.teacher_features``), used for epochs not recorded yet.
        records_per_process: samples each process visits in a full epoch (its batches × the batch size).
        is_main: this process writes the shared files (``meta.json``).
        barrier: waits for every process (``accelerator.wait_for_everyone``; a no-op on one process).
        device: where replayed features go.
        process_index, world_size: this process and the number of processes (one record file each).
    """

    def __init__(self, root: str | os.PathLike, fingerprint: dict, epochs: Optional[int],
                 live: Callable[[torch.Tensor], Features], records_per_process: int, is_main: bool = True,
                 barrier: Callable[[], None] = lambda: None, device: torch.device | str = 'cpu',
                 process_index: int = 0, world_size: int = 1):
        self.root, self.live, self.is_main, self.barrier = Path(root), live, is_main, barrier
        self.device = torch.device(device)
        self.process_index, self.world_size = process_index, world_size
        self.records = int(records_per_process)
        meta_path = self.root / 'meta.json'
        wanted = {**fingerprint, 'format': FORMAT_VERSION, 'vitkd_version': VITKD_VERSION,
                  'records_per_process': self.records, 'world_size': world_size}
        if self.is_main and not meta_path.exists():
            if epochs is None:
                raise TeacherCacheError(f'--teacher-cache {self.root}: a new cache needs its number of epochs')
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = meta_path.with_suffix('.tmp')
            tmp.write_text(json.dumps({**wanted, 'epochs': int(epochs)}, indent=1, sort_keys=True) + '\n')
            tmp.replace(meta_path)
        self.barrier()
        try:
            text = meta_path.read_text()
            meta = json.loads(text)
            if not isinstance(meta, dict):
                raise ValueError('not a JSON object')
        except (OSError, ValueError) as e:
            raise TeacherCacheError(f'--teacher-cache {self.root}: unreadable meta.json ({e}); use another '
                                    'folder') from None
        if (meta.get('format'), meta.get('vitkd_version')) != (FORMAT_VERSION, VITKD_VERSION):
            written_by = meta.get('vitkd_version', 'an older vitkd')
            raise TeacherCacheError(f'--teacher-cache {self.root} was written by vitkd {written_by} (cache format '
                                    f'{meta.get("format")}); this is vitkd {VITKD_VERSION} (format {FORMAT_VERSION}): '
                                    'use another folder')
        differing = sorted(k for k in set(meta) | set(wanted) if k != 'epochs' and meta.get(k) != wanted.get(k))
        if differing:
            shown = ', '.join(f'{k}={meta.get(k)!r} (this run: {wanted.get(k)!r})' for k in differing[:4])
            raise TeacherCacheError(f'--teacher-cache {self.root} was recorded for another run: {shown}; use another '
                                    'folder (or the recording run\'s settings)')
        if epochs is not None and int(epochs) != int(meta['epochs']):
            raise TeacherCacheError(f'--teacher-cache {self.root} holds {meta["epochs"]} epochs, this run asks for '
                                    f'--teacher-cache-epochs {epochs}')
        self.digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
        self.epochs = int(meta['epochs'])
        self.num_samples, self.num_classes = int(meta['num_samples']), int(meta['num_classes'])
        self.topk, self.pooled_dim = int(meta['topk']), meta['pooled_dim']
        self.store_logits, self.store_pooled = bool(meta['logits']), bool(meta['pooled'])
        self.dtype = record_dtype(self.num_classes, self.topk, self.store_logits,
                                  self.pooled_dim if self.store_pooled else None)
        self.mode: Optional[str] = None  # 'record' / 'replay' within an epoch
        self.data_epoch_now: Optional[int] = None
        self.sample_seeds: Optional[np.ndarray] = None
        self.file: Optional[int] = None  # descriptor of this process's record file of the open epoch
        self.pending: list = []          # recorded batches whose host copies are in flight
        self.stats = {'replayed': 0, 'recorded': 0}
        self._check_disk()

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
            epochs = min(cfg.epochs, DEFAULT_EPOCHS)
        world, batch = accelerator.num_processes, cfg.batch_size
        per_process = (num_samples // batch // world) * batch  # drop_last loader batches, sharded per process
        return cls(cfg.teacher_cache, fingerprint, epochs, distiller.teacher_features, per_process,
                   is_main=accelerator.is_main_process, barrier=accelerator.wait_for_everyone,
                   device=accelerator.device, process_index=accelerator.process_index, world_size=world)

    # ---- size ----------------------------------------------------------------------------------------------------

    def _check_disk(self) -> None:
        """State the cache's size and refuse when the disk cannot hold the epochs still to record."""
        total = cache_bytes(self.records, self.world_size, self.epochs, self.dtype)
        todo = sum(not self.is_complete(e) for e in range(self.epochs))
        needed = cache_bytes(self.records, self.world_size, todo, self.dtype)
        needed -= sum(p.stat().st_size for e in range(self.epochs) if not self.is_complete(e)
                      for p in self._epoch_dir(e).glob('process_*.rec'))  # space already reserved
        free = shutil.disk_usage(self.root).free
        if self.is_main:
            _logger.info('teacher cache %s: %d data epochs x %d samples x %d B = %s (%d epochs, %s, still to record; '
                         '%s free)', self.root, self.epochs, self.records * self.world_size, self.dtype.itemsize,
                         _gigabytes(total), todo, _gigabytes(max(0, needed)), _gigabytes(free))
        if needed > free:
            raise TeacherCacheError(f'--teacher-cache {self.root}: recording {todo} data epochs needs '
                                    f'{_gigabytes(needed)} ({self.records * self.world_size} samples x '
                                    f'{self.dtype.itemsize} B per epoch), the disk has {_gigabytes(free)} free; '
                                    'free space, use another folder or fewer --teacher-cache-epochs')

    # ---- epochs ------------------------------------------------------------------------------------------------------

    def data_epoch(self, epoch: int) -> int:
        """The data epoch (order, augmentation, mixup, cached outputs) that training epoch ``epoch`` uses."""
        return int(epoch) % self.epochs

    def _epoch_dir(self, data_epoch: int) -> Path:
        return self.root / f'epoch_{data_epoch:04d}'

    def _file(self, data_epoch: int, process: Optional[int] = None, suffix: str = '.rec') -> Path:
        process = self.process_index if process is None else process
        return self._epoch_dir(data_epoch) / f'process_{process:03d}{suffix}'

    def is_complete(self, data_epoch: int) -> bool:
        """Every process's record file of ``data_epoch`` was written and read back intact."""
        return all(self._file(data_epoch, p, '.done').exists() for p in range(self.world_size))

    def _header(self, data_epoch: int) -> dict:
        return dict(format=FORMAT_VERSION, vitkd_version=VITKD_VERSION, meta_sha256=self.digest,
                    data_epoch=data_epoch, process=self.process_index, world_size=self.world_size,
                    records=self.records, record_bytes=self.dtype.itemsize, fields=str(self.dtype.descr))

    def _seed(self, data_epoch: int) -> int:
        """The checksum seed of a file: its identity, so a record moved from another cache, epoch or process fails."""
        return zlib.crc32(f'{self.digest}:{data_epoch}:{self.process_index}'.encode())

    def begin_epoch(self, data_epoch: int, sample_seeds: np.ndarray) -> str:
        """Open data epoch ``data_epoch``: replay it when complete, else (re)record it. Returns the mode.

        Args:
            sample_seeds: [N] the augmentation seeds the sampler gives this data epoch
                (:meth:`vitkd.data.EpochSampler.sample_seeds`).
        """
        self.data_epoch_now = data_epoch
        self.sample_seeds = np.asarray(sample_seeds, dtype=np.uint64)
        self.mode = 'replay' if self.is_complete(data_epoch) else 'record'
        self.barrier()  # every process has decided before any marker is removed
        path = self._file(data_epoch)
        if self.mode == 'replay':
            self.file = self._open_for_replay(data_epoch, path)
            return self.mode
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file(data_epoch, suffix='.done').unlink(missing_ok=True)
        header = MAGIC + json.dumps(self._header(data_epoch), sort_keys=True).encode()
        size = HEADER_BYTES + self.records * self.dtype.itemsize
        self.file = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(self.file, size)  # a re-recorded epoch keeps no record of another layout
            _reserve(self.file, size)
            os.pwrite(self.file, header.ljust(HEADER_BYTES - 1) + b'\n', 0)
        except OSError as e:
            os.close(self.file)
            self.file = None
            raise TeacherCacheError(f'teacher cache {path}: cannot reserve {_gigabytes(size)} ({e.strerror}); free '
                                    'space or use another --teacher-cache folder') from None
        return self.mode

    def _open_for_replay(self, data_epoch: int, path: Path) -> int:
        """This process's record file of a complete epoch, its header and size checked against ``meta.json``."""
        def refuse(why: str) -> TeacherCacheError:
            return TeacherCacheError(f'teacher cache {path}: {why}; it is not replayed (delete the folder or use '
                                     'another --teacher-cache)')
        try:
            file = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise refuse(f'cannot be read ({e.strerror})') from None
        raw = os.pread(file, HEADER_BYTES, 0)
        expected = self._header(data_epoch)
        try:
            if not raw.startswith(MAGIC):
                raise ValueError('not a vitkd teacher-cache file')
            header = json.loads(raw[len(MAGIC):].decode())
        except (ValueError, UnicodeDecodeError) as e:
            os.close(file)
            raise refuse(f'has a damaged header ({str(e)[:60]})') from None
        differing = [k for k in expected if header.get(k) != expected[k]]
        size, want = os.fstat(file).st_size, HEADER_BYTES + self.records * self.dtype.itemsize
        if differing:
            os.close(file)
            raise refuse(f'was written for another cache ({", ".join(differing)} differ from meta.json)')
        if size != want:
            os.close(file)
            raise refuse(f'is truncated or damaged ({size} bytes, its header says {want})')
        return file

    def end_epoch(self, complete: bool) -> None:
        """Close the epoch. A recorded epoch that every batch of went through is read back: when every record is
        intact its ``.done`` marker is written (after every process has written); otherwise (an interrupted
        recording) it stays incomplete and is recorded again the next time."""
        if self.mode == 'record':
            self._drain(wait=True)
            os.fsync(self.file)
            if complete:
                intact = self._count_intact()
                if intact == self.records:
                    done = self._file(self.data_epoch_now, suffix='.done')
                    tmp = done.with_suffix('.tmp')
                    tmp.write_text(json.dumps({'records': intact, 'meta_sha256': self.digest}) + '\n')
                    tmp.replace(done)
                else:
                    _logger.warning('teacher cache %s: %d of %d records intact; data epoch %d will be recorded again',
                                    self._file(self.data_epoch_now), intact, self.records, self.data_epoch_now)
        if self.file is not None:
            os.close(self.file)
        self.barrier()
        self.file, self.mode, self.pending = None, None, []

    def _count_intact(self, chunk: int = 4096) -> int:
        seed, intact = self._seed(self.data_epoch_now), 0
        for start in range(0, self.records, chunk):
            n = min(chunk, self.records - start)
            records = self._pread(start, n)
            intact += int((_checksums(records, seed) == records['check']).sum())
        return intact

    def _pread(self, position: int, n: int) -> np.ndarray:
        raw = os.pread(self.file, n * self.dtype.itemsize, HEADER_BYTES + position * self.dtype.itemsize)
        if len(raw) != n * self.dtype.itemsize:
            raise TeacherCacheError(f'teacher cache {self._file(self.data_epoch_now)}: truncated at record '
                                    f'{position + len(raw) // self.dtype.itemsize}; it is not replayed (delete the '
                                    'folder or use another --teacher-cache)')
        return np.frombuffer(raw, dtype=self.dtype)

    # ---- batches -----------------------------------------------------------------------------------------------------

    def features(self, images: torch.Tensor, index, mix_seed: int, batch_number: int) -> Features:
        """The teacher taps of this batch: read from the cache (replay) or computed live and written (record).

        Args:
            images: [B, C, H, W] the (mixed) student input; only used when recording.
            index: [B] data-set indices, on the host (a NumPy array or a CPU tensor).
            mix_seed: the batch's mixup seed (:meth:`vitkd.data.EpochSampler.mix_seed`).
            batch_number: the batch's number in this process's epoch (records b·B … b·B + B − 1).
        """
        if self.mode is None:
            raise RuntimeError('TeacherCache.features outside begin_epoch/end_epoch')
        rows = np.asarray(index, dtype=np.int64)
        position = batch_number * len(rows)
        if position + len(rows) > self.records:
            raise TeacherCacheError(f'teacher cache {self.root}: batch {batch_number} of {len(rows)} samples is past '
                                    f'the {self.records} samples a process visits per epoch (another batch layout)')
        if self.mode == 'replay':
            return self._read(position, rows, mix_seed)
        feats = self.live(images)
        self._stage(position, rows, feats, mix_seed)
        return feats

    def _stage(self, position: int, rows: np.ndarray, feats: Features, mix_seed: int) -> None:
        """Start the host copies of this batch's outputs; they are written once the copies are done."""
        values = {}
        if self.store_logits:
            if feats.logits_dist is not None:
                raise TeacherCacheError('--teacher-cache: teachers with a distillation head are not supported')
            values = compress_logits(feats.logits.detach(), self.topk)
            if 'classes' in values:
                values['classes'] = values['classes'].to(torch.int16 if self.num_classes <= 32767 else torch.int32)
        if self.store_pooled:
            values['pooled'] = feats.pooled.detach().to(torch.bfloat16).view(torch.int16)  # [B, D] bf16 bits
        host = {name: _to_host(value) for name, value in values.items()}
        event = None
        if any(value.device.type == 'cuda' for value in values.values()):
            event = torch.cuda.Event()
            event.record()
        self.pending.append((event, position, rows, mix_seed, host))
        self._drain(wait=False)

    def _drain(self, wait: bool) -> None:
        """Write the staged batches whose copies have finished, in order (all of them when ``wait``)."""
        while self.pending:
            event, position, rows, mix_seed, host = self.pending[0]
            if event is not None and not wait and not event.query():
                return
            if event is not None and wait:
                event.synchronize()
            self.pending.pop(0)
            records = np.zeros(len(rows), dtype=self.dtype)
            records['index'], records['seed'], records['mix_seed'] = rows, self.sample_seeds[rows], mix_seed
            for name, value in host.items():
                records[name] = value.numpy().reshape(records[name].shape)
            records['check'] = _checksums(records, self._seed(self.data_epoch_now))
            os.pwrite(self.file, records.tobytes(), HEADER_BYTES + position * self.dtype.itemsize)
            self.stats['recorded'] += len(rows)

    def _read(self, position: int, rows: np.ndarray, mix_seed: int) -> Features:
        records = self._pread(position, len(rows))
        where = f'teacher cache {self._file(self.data_epoch_now)}'
        bad = np.flatnonzero(_checksums(records, self._seed(self.data_epoch_now)) != records['check'])
        if len(bad):
            raise TeacherCacheError(f'{where}: record {position + int(bad[0])} fails its checksum (a damaged file, or '
                                    'one from another cache); it is not replayed (delete the folder or use another '
                                    '--teacher-cache)')
        if not np.array_equal(records['index'], rows):
            raise TeacherCacheError(f'{where}: records {position}… hold samples {records["index"][:4].tolist()}, this '
                                    f'batch is {rows[:4].tolist()} (another data set, seed or batch layout)')
        if not np.array_equal(records['seed'], self.sample_seeds[rows]):
            raise TeacherCacheError(f'{where}: the recorded augmentation seeds differ from this run\'s (another seed '
                                    'or data set); use another --teacher-cache folder')
        if not (records['mix_seed'] == np.uint64(mix_seed)).all():
            raise TeacherCacheError(f'{where}: a batch\'s mixup seed differs from the recorded one (another batch '
                                    'layout or seed); use another --teacher-cache')
        feats = Features()
        if self.store_logits:
            stored = {name: _to_device(records[name], self.device) for name in ('logits', 'classes', 'rest')
                      if name in self.dtype.names}
            feats.logits = expand_logits(stored, self.num_classes)
        if self.store_pooled:
            feats.pooled = _to_device(records['pooled'], self.device).view(torch.bfloat16).float()
        self.stats['replayed'] += len(rows)
        return feats
