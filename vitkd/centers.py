"""Teacher class centres for ND (KD++ family): one pass of the frozen teacher over the training set, cached on disk.

The official recipe (``ImageNet/emb_fea_distribution.py`` of WangYZ1608/Knowledge-Distillation-via-ND):
the teacher in eval mode, no gradients, over the **training set** with the **training crop** (RandomResizedCrop +
horizontal flip + normalisation; no mixup, no RandAugment, no erasing); for every image its pooled pre-logit
embedding t̄, each value rounded to 4 decimals; per class the arithmetic mean (no L2 normalisation), rounded to 4
decimals again. Stock timm gives t̄ as ``forward_head(forward_features(x), pre_logits=True)`` (the
official script needs a patched model returning (embedding, logits)).

Cache: ``<cache_dir>/centers-<key>.safetensors`` (tensor ``centers`` [K, D_t] float32) next to
``centers-<key>.json`` (provenance). The key is the SHA-256 of the canonical JSON of: the teacher source, the
SHA-256 of its state dict (weights and buffers), K, the rounding, and the caller's ``key_parts`` (data set identity,
number of samples, transform repr, seed, …). A matching file is reused without any teacher forward; any change of
teacher, data or transform gives another key and the centres are recomputed. Files are written atomically.

Entry points:

* :func:`compute_or_load_centers` — generic (any teacher, any loader yielding (images, labels, ...)).
* :func:`centers_for_run` — builds the centre transform, data set and key from a run's :class:`vitkd.config.Config`.
  Each process of a multi-process run computes the per-class sums of its share of the images on its device, and
  one all-reduce adds them up (an ImageNet pass is split N ways instead of keeping N − 1 processes waiting).
* :func:`check_provenance` — refuses a centre file made with another teacher (source or weights).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

from .data import EpochSampler, build_datasets, seed_worker
from .errors import UsageError
from .hf_data import HFOptions

__all__ = ['teacher_embeddings', 'compute_class_centers', 'compute_or_load_centers', 'centers_for_run',
           'check_provenance', 'save_centers', 'load_centers', 'weights_sha256', 'default_cache_dir',
           'CentersError']

_logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


class CentersError(UsageError):
    """Centres that cannot be computed or used (message is the one-line user error)."""


def default_cache_dir() -> Path:
    """``$VITKD_CACHE_DIR/centers``, else ``~/.cache/vitkd/centers``."""
    root = os.environ.get('VITKD_CACHE_DIR') or os.path.join(os.path.expanduser('~'), '.cache', 'vitkd')
    return Path(root) / 'centers'


def _unwrap(teacher: nn.Module) -> tuple[nn.Module, Any]:
    """(timm model, input preparation) of a :class:`vitkd.models.Teacher` or a bare timm model."""
    model = getattr(teacher, 'model', teacher)
    prepare = getattr(teacher, 'prepare_input', None) or (lambda x: x)
    return model, prepare


def teacher_embeddings(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled pre-logits t̄ [B, D_t] of a timm model (``forward_head(forward_features(x), pre_logits=True)``)."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 over the state dict (names, dtypes, shapes and bytes of every parameter and buffer)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f'{name}|{t.dtype}|{tuple(t.shape)}|'.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def class_sums(teacher: nn.Module, loader: Iterable, num_classes: int, decimals: Optional[int] = 4,
               log_every: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums of the teacher's pooled pre-logits over ``loader``, on the teacher's device.

    Every embedding value is rounded (``decimals``) before it is summed, in float64, so the sums do not depend on how
    the images were split into batches or processes (beyond float64 summation order).

    Returns:
        (sums [K, D_t] float64, counts [K] float64).
    """
    model, prepare = _unwrap(teacher)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums: Optional[torch.Tensor] = None
    counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
    start = time.time()
    try:
        for i, batch in enumerate(loader):
            images = batch[0].to(device, non_blocking=True)
            labels = torch.as_tensor(batch[1]).long().to(device, non_blocking=True)
            emb = teacher_embeddings(model, prepare(images)).double()  # [B, D_t]
            if decimals is not None:
                emb = emb.round(decimals=decimals)
            if sums is None:
                sums = torch.zeros(num_classes, emb.shape[1], dtype=torch.float64, device=device)
            sums.index_add_(0, labels, emb)
            counts.index_add_(0, labels, torch.ones(len(labels), dtype=torch.float64, device=device))
            if log_every and (i + 1) % log_every == 0:
                _logger.info('class centres: %d batches, %.0f s', i + 1, time.time() - start)
    finally:
        model.train(was_training)
    if sums is None:
        sums = torch.zeros(num_classes, 0, dtype=torch.float64, device=device)
    return sums, counts


def centers_from_sums(sums: torch.Tensor, counts: torch.Tensor, decimals: Optional[int] = 4) -> torch.Tensor:
    """C [K, D_t] float32 on the host: the per-class means (rounded to ``decimals``); every class must have images."""
    if sums.shape[1] == 0:
        raise CentersError('class centres: the data loader yielded no batch')
    sums, counts = sums.cpu(), counts.cpu()
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        raise CentersError(f'class centres: no training image of classes {missing[:10]}'
                           f'{" …" if len(missing) > 10 else ""} ({len(missing)} of {len(counts)}); '
                           'ND needs every class')
    centers = sums / counts[:, None]
    if decimals is not None:
        centers = centers.round(decimals=decimals)
    return centers.float()


def compute_class_centers(teacher: nn.Module, loader: Iterable, num_classes: int, decimals: Optional[int] = 4,
                          log_every: int = 100) -> torch.Tensor:
    """Per-class mean of the teacher's pooled pre-logits over ``loader`` (one process).

    Args:
        teacher: a :class:`vitkd.models.Teacher` (its input re-normalisation is applied) or a timm model.
        loader: yields (images [B, C, H, W], labels [B], ...).
        num_classes: K.
        decimals: round every embedding value and every mean to this many decimals (official: 4); None = no rounding.
        log_every: log progress every this many batches.

    Returns:
        C [K, D_t] float32.
    """
    return centers_from_sums(*class_sums(teacher, loader, num_classes, decimals, log_every), decimals)


def save_centers(path: Path, centers: torch.Tensor, provenance: dict) -> None:
    """Write ``path`` (.safetensors) and its provenance ``path.with_suffix('.json')`` atomically."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    save_file({'centers': centers.detach().float().cpu().contiguous()}, str(tmp),
              metadata={'provenance': json.dumps(provenance, sort_keys=True)})
    meta = path.with_suffix('.json')
    tmp_meta = meta.with_name(f'.{meta.name}.{os.getpid()}.tmp')
    tmp_meta.write_text(json.dumps(provenance, indent=1, sort_keys=True) + '\n')
    os.replace(tmp_meta, meta)
    os.replace(tmp, path)


def load_centers(path: Path) -> tuple[torch.Tensor, dict]:
    """(C [K, D_t] float32, provenance) from a file written by :func:`save_centers`."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework='pt') as f:
            centers = f.get_tensor('centers').float()
            provenance = json.loads((f.metadata() or {}).get('provenance', '{}'))
    except Exception as e:  # noqa: BLE001 - any unreadable file becomes the same one-line error
        raise CentersError(f'{path} is not a vitkd centre file ({e})') from None
    return centers, provenance


def _cache_key(teacher: nn.Module, num_classes: int, decimals: Optional[int], key_parts: dict,
               teacher_source: Optional[str]) -> dict:
    model, _ = _unwrap(teacher)
    return {'format': FORMAT_VERSION,
            'teacher': teacher_source or getattr(teacher, 'source', None) or type(model).__name__,
            'teacher_weights_sha256': weights_sha256(model), 'num_classes': num_classes, 'decimals': decimals,
            'embedding': 'forward_head(forward_features(x), pre_logits=True), eval mode', **key_parts}


def _compute_or_load(teacher: nn.Module, loader: Iterable, cache_dir: Path, key_parts: dict,
                     num_classes: Optional[int], decimals: Optional[int], teacher_source: Optional[str],
                     accelerator=None) -> tuple[torch.Tensor, Path, dict]:
    """The cached centres when the key matches (on every process), else computed from ``loader`` — each process's
    share of the training set, its sums all-reduced — and written by the main process. Returns (C, the cache path,
    the provenance), the same on every process whether or not its file system holds the file."""
    model, _ = _unwrap(teacher)
    num_classes = num_classes or model.num_classes
    key = _cache_key(teacher, num_classes, decimals, key_parts, teacher_source)
    canonical = json.dumps(key, sort_keys=True, default=str)
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    path = Path(cache_dir) / f'centers-{digest[:20]}.safetensors'
    cached, provenance = _load_cached(path, digest, num_classes)
    distributed = accelerator is not None and accelerator.num_processes > 1
    if distributed:  # every process must take the same branch (a node-local cache can hit on one node only)
        misses = accelerator.reduce(torch.tensor([float(cached is None)], device=accelerator.device), 'sum')
        if misses.item() > 0:
            cached = None
    if cached is not None:
        _logger.info('class centres: reusing %s', path)
        return cached, path, provenance
    _logger.info('class centres: one teacher pass over the training set (cache %s)', path)
    sums, counts = class_sums(teacher, loader, num_classes, decimals)
    if distributed:
        sums, counts = accelerator.reduce(sums, 'sum'), accelerator.reduce(counts, 'sum')
    centers = centers_from_sums(sums, counts, decimals)
    provenance = {**json.loads(canonical), 'key': digest, 'embedding_dim': centers.shape[1],
                  'created': time.strftime('%Y-%m-%dT%H:%M:%S')}
    if accelerator is None or accelerator.is_main_process:
        save_centers(path, centers, provenance)
    if distributed:
        accelerator.wait_for_everyone()
    return centers, path, provenance


def _load_cached(path: Path, digest: str, num_classes: int) -> tuple[Optional[torch.Tensor], dict]:
    if not path.is_file():
        return None, {}
    try:
        centers, provenance = load_centers(path)
    except CentersError as e:
        _logger.warning('ignoring unreadable centre cache %s (%s)', path, e)
        return None, {}
    if provenance.get('key') == digest and tuple(centers.shape)[0] == num_classes:
        return centers, provenance
    _logger.warning('centre cache %s does not match its key; recomputing', path)
    return None, {}


def compute_or_load_centers(teacher: nn.Module, loader: Iterable, cache_dir: str | Path, key_parts: dict,
                            num_classes: Optional[int] = None, decimals: Optional[int] = 4,
                            teacher_source: Optional[str] = None) -> torch.Tensor:
    """The teacher's class centres C [K, D_t], from the disk cache when the key matches, else computed and cached.

    Args:
        teacher: a :class:`vitkd.models.Teacher` or a timm model (put in eval mode for the pass, then restored).
        loader: yields (images, labels, ...) — the training set with the training crop, no mixup.
        cache_dir: folder of the cache.
        key_parts: JSON-able facts that identify the data and the transform (data set, size, transform repr, seed).
        num_classes: K (default: the teacher's head width).
        decimals: rounding of every value and of the means (official: 4; None = none).
        teacher_source: teacher identity for the key (default: ``teacher.source`` or the class name).
    """
    return _compute_or_load(teacher, loader, Path(cache_dir), key_parts, num_classes, decimals, teacher_source)[0]


def _dataset_fingerprint(dataset) -> dict:
    """Identity of a (wrapped) training set: its size, a hash of its label sequence and of its file list."""
    ds, labels, files = dataset, None, None
    for _ in range(8):  # IndexedDataset → TransformedDataset → Subset / ImageFolder / arrays
        labels = labels if labels is not None else getattr(ds, 'targets', None)
        files = files if files is not None else getattr(ds, 'samples', None)
        if not hasattr(ds, 'dataset'):
            break
        ds = ds.dataset
    out = {'num_samples': len(dataset)}
    if labels is not None:
        out['labels_sha256'] = hashlib.sha256(json.dumps([int(t) for t in labels]).encode()).hexdigest()
    if files is not None:
        out['files_sha256'] = hashlib.sha256('\n'.join(str(p) for p, _ in files).encode()).hexdigest()
    return out


def centers_for_run(cfg, teacher, spec, accelerator=None, cache_dir: Optional[str | Path] = None,
                    decimals: Optional[int] = 4) -> tuple[torch.Tensor, Path, dict]:
    """Class centres for a run: the training set with the training crop only (RandomResizedCrop at ``cfg.scale``,
    flip ``cfg.hflip``, the student's normalisation; no RandAugment / colour jitter / erasing / mixup).

    Each image's crop and flip are seeded by (``cfg.seed``, its index), so the centres do not depend on the number of
    processes or loader workers. With an ``accelerator`` on N processes, process r takes the images r, r + N, … on
    its own device, and the per-class sums are all-reduced; the teacher runs in the precision it was cast to.

    Returns:
        (C [K, D_t], path of the cache file, provenance).
    """
    from timm.data import create_transform
    from torch.utils.data import DataLoader

    transform = create_transform(spec.input_size, is_training=True, scale=tuple(cfg.scale), hflip=cfg.hflip,
                                 interpolation=cfg.train_interpolation, mean=spec.mean, std=spec.std,
                                 color_jitter=None, auto_augment=None, re_prob=0.0)
    hf = HFOptions.from_config(cfg)
    train, _ = build_datasets(cfg.dataset, cfg.data_path, transform, transform, cfg.train_subset, cfg.seed,
                              cfg.skip_corrupt, hf=hf)
    key_parts = {'dataset': cfg.dataset, 'data_path': str(Path(cfg.data_path).resolve()) if cfg.data_path else None,
                 'train_subset': cfg.train_subset, 'transform': repr(transform), 'seed': cfg.seed,
                 'augmentation_seeds': 'per image index', 'input_size': list(spec.input_size),
                 **_dataset_fingerprint(train)}
    if cfg.dataset == 'hf':  # the columns and split read
        key_parts['hf'] = vars(hf)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    seeds = EpochSampler(len(train), cfg.seed).sample_seeds(0)  # [N] one augmentation seed per image
    keys = [(i, int(seeds[i])) for i in range(rank, len(train), world)]
    workers = cfg.num_workers if cfg.num_workers is not None else 0
    loader = DataLoader(train, batch_size=cfg.batch_size, sampler=keys, drop_last=False, num_workers=workers,
                        worker_init_fn=seed_worker, pin_memory=torch.cuda.is_available())
    return _compute_or_load(teacher, loader, cache, key_parts, spec.num_classes, decimals,
                            getattr(teacher, 'source', None), accelerator)


def check_provenance(provenance: dict, teacher) -> None:
    """Refuse centres whose provenance names another teacher (source or weights) than ``teacher``."""
    if 'teacher' not in provenance:
        _logger.warning('class centres without vitkd provenance (%s): their teacher cannot be checked',
                        provenance.get('path', '?'))
        return
    source = getattr(teacher, 'source', None)
    if source is not None and provenance['teacher'] != source:
        raise CentersError(f'the class centres were computed with teacher {provenance["teacher"]!r}, but the run\'s '
                           f'teacher is {source!r}; recompute them (scripts/compute_centers.py)')
    model, _ = _unwrap(teacher)
    if provenance.get('teacher_weights_sha256') not in (None, weights_sha256(model)):
        raise CentersError(f'the class centres were computed with other weights of teacher {source!r}; recompute '
                           'them (scripts/compute_centers.py)')
