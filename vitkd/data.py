"""Data sets, transforms and loaders.

* ``fashion_mnist`` — the embedded default: Zalando's Fashion-MNIST (MIT; 60k train / 10k test, 10 classes, 28×28
  gray) read from Debian's ``dataset-fashion-mnist`` files, or from a torchvision root, or downloaded by
  torchvision when the network allows.
* ``cifar10`` / ``cifar100`` — torchvision (a local root, or downloaded).
* ``imagefolder`` — the ImageNet layout ``<data-path>/{train,val}/<class>/<image>``, optionally a subset by fraction or
  by a list file.
* ``hf`` — a Hugging Face ``datasets`` data set: a Hub id, a ``save_to_disk`` folder or parquet files
  (:mod:`vitkd.hf_data`).

Every training sample is returned as ``(image, label, index)`` so losses that need sample indices (CRD) get them.
Transforms are timm's (``create_transform``); mixup is ``timm.data.Mixup``.
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import os
import multiprocessing
import multiprocessing.context
import random
import signal
import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import Mixup
from timm.data.mixup import mixup_target
from torch.utils.data import Dataset, Sampler
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from .config import Config
from .errors import ConfigError, DataFailure, UsageError
from .hf_data import load_hf_splits
from .images import CorruptImage, load_image, to_rgb

__all__ = ['DataSpec', 'BatchMixer', 'build_datasets', 'build_eval_dataset', 'IndexedDataset', 'EvalDataset',
           'EpochSampler', 'read_idx', 'find_fashion_mnist', 'DataError', 'DATASET_STATS', 'seed_worker',
           'dataset_targets', 'seeded_rngs', 'find_epoch_sampler', 'mix_batch', 'sample_path', 'train_set_fingerprint',
           'CorruptImage', 'to_rgb']

_logger = logging.getLogger(__name__)

DEBIAN_FASHION_MNIST = Path('/usr/share/datasets/fashion-mnist')
DATASETS = ('fashion_mnist', 'cifar10', 'cifar100', 'imagefolder', 'hf')

# mean/std of the training images; (C,) tuples
DATASET_STATS = {
    'fashion_mnist': dict(mean=(0.2860,), std=(0.3530,), input_size=(1, 28, 28), num_classes=10),
    'cifar10': dict(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), input_size=(3, 32, 32),
                    num_classes=10),
    'cifar100': dict(mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), input_size=(3, 32, 32),
                     num_classes=100),
}


class DataError(UsageError):
    """A data path or option that cannot be used (message is the one-line user error)."""


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip'd): 2 zero bytes, type byte, ndim byte, big-endian int32 dims, uint8 data."""
    opener = gzip.open if str(path).endswith('.gz') else open
    with opener(path, 'rb') as f:
        zero, dtype, ndim = struct.unpack('>HBB', f.read(4))
        if zero != 0 or dtype != 0x08:
            raise DataError(f'{path} is not an unsigned-byte IDX file')
        dims = struct.unpack('>' + 'I' * ndim, f.read(4 * ndim))
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(dims)


def find_fashion_mnist(root: Optional[str]) -> Path:
    """Folder holding the four Fashion-MNIST IDX files: ``root`` (or ``root/FashionMNIST/raw``) or Debian's copy."""
    candidates = [Path(root), Path(root) / 'FashionMNIST' / 'raw'] if root else []
    candidates.append(DEBIAN_FASHION_MNIST)
    for folder in candidates:
        if any((folder / f'train-images-idx3-ubyte{ext}').is_file() for ext in ('.gz', '')):
            return folder
    raise DataError(f'Fashion-MNIST files not found in {", ".join(map(str, candidates))}; run scripts/setup.sh '
                    '(installs Debian\'s dataset-fashion-mnist) or pass --data-path to a torchvision root')


class ArrayImageDataset(Dataset):
    """In-memory uint8 images [N, H, W] or [N, H, W, C] with integer labels, served as PIL images."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str], transform=None):
        self.images, self.targets, self.classes, self.transform = images, [int(t) for t in labels], list(classes), transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i])
        return (self.transform(img) if self.transform else img), self.targets[i]


class EpochSampler(Sampler):
    """Shuffled sampling whose every random choice is a function of (seed, epoch): exact resume, any worker count.

    Yields ``(index, sample_seed)`` keys for :class:`IndexedDataset`: the epoch's permutation is drawn from
    ``(seed, epoch)`` and each sample's augmentation seed from ``(seed, epoch, index)``. A run resumed mid-epoch
    (``skip_first_batches``) therefore sees the same batches with the same augmentations as an uninterrupted run,
    whatever the number of loader workers or processes (each sample's seed does not depend on which worker or
    rank loads it). Accelerate's data loaders call :meth:`set_epoch`.

    Repeated augmentation (Hoffer et al. 2020; DeiT's ``RASampler``), ``repeats`` R > 1: the permutation's first
    ~N/R images each appear R times, every copy with its own augmentation seed, and the epoch keeps N samples (DeiT's
    convention). The sampler is global and Accelerate gives process p the batches p, p + W, p + 2W, … of it
    (``split_batches=False``), so the order is laid out for that sharding: the k-th sample of process r's batch in
    global step g is item ``g·B·W + r + k·W`` of the repeated list, exactly DeiT's ``indices[rank::world]`` split, and
    the R copies of an image land on R different processes when W ≥ R.
    """

    def __init__(self, num_samples: int, seed: int = 0, repeats: int = 1, batch_size: int = 1, world_size: int = 1):
        if repeats < 1:
            raise ValueError(f'repeats must be >= 1, got {repeats}')
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0
        self.repeats, self.batch_size, self.world_size = repeats, batch_size, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def _streams(self, epoch: int):
        return np.random.SeedSequence((self.seed, epoch)).spawn(2)  # (order, augmentation)

    def sample_seeds(self, epoch: int) -> np.ndarray:
        """[N, R] uint64 (squeezed to [N] when R = 1): the augmentation seed of every copy of every data-set index."""
        seeds = self._streams(epoch)[1].generate_state(self.num_samples * self.repeats, np.uint64)
        return seeds if self.repeats == 1 else seeds.reshape(self.num_samples, self.repeats)

    def mix_seed(self, epoch: int, first_index: int) -> int:
        """Seed of the batch-level randomness (mixup/cutmix λ, box, switch) of the batch that starts with data-set
        index ``first_index`` in ``epoch``: batches of one epoch are disjoint, so (seed, epoch, first index) names the
        batch whatever the process, worker or resume point (with repeats, two batches that start with copies of one
        image share their draws)."""
        return int(np.random.SeedSequence((self.seed, epoch, 1 + int(first_index), 0x6d6978)).generate_state(
            1, np.uint64)[0])

    def order(self, epoch: int) -> list[tuple[int, int]]:
        """The epoch's ``(index, copy)`` pairs in yield order."""
        gen = torch.Generator().manual_seed(int(self._streams(epoch)[0].generate_state(1, np.uint64)[0]))
        perm = torch.randperm(self.num_samples, generator=gen).numpy().tolist()  # a host tensor: read as NumPy
        if self.repeats == 1:
            return [(i, 0) for i in perm]
        repeated = [(i, c) for i in perm for c in range(self.repeats)]  # [R·N]
        chunk, w = self.batch_size * self.world_size, self.world_size
        out = []
        for pos in range(self.num_samples):  # position in the global order -> (global step, process, slot)
            step, within = divmod(pos, chunk)
            rank, slot = divmod(within, self.batch_size)
            out.append(repeated[min(step * chunk + rank + slot * w, len(repeated) - 1)])
        return out

    def __iter__(self):
        seeds = self.sample_seeds(self.epoch).reshape(self.num_samples, self.repeats)
        for i, copy in self.order(self.epoch):
            yield i, int(seeds[i, copy])


class BatchMixer:
    """timm ``Mixup``/CutMix plus label smoothing, returning the mixup metadata the losses need.

    Returns (images, soft targets [B, K], {'labels_b', 'lam'}). In timm's ``batch`` mode sample i is mixed with
    sample B−1−i with one λ per batch, so ``labels_b = labels.flip(0)``.
    """

    def __init__(self, cfg: Config, num_classes: int):
        self.num_classes, self.smoothing = num_classes, cfg.smoothing
        active = cfg.mixup > 0 or cfg.cutmix > 0
        self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                           switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                           num_classes=num_classes) if active else None
        if self.mixup is not None and cfg.mixup_mode != 'batch':
            raise ConfigError(f'--mixup-mode {cfg.mixup_mode!r}: vitkd supports batch mode (losses need one λ and '
                              'the flip pairing); use --mixup-mode batch')

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        if self.mixup is None:
            targets = mixup_target(labels, self.num_classes, 1.0, self.smoothing)
            return images, targets, {'labels_b': labels, 'lam': 1.0}
        if images.shape[0] % 2:
            raise ConfigError(f'mixup needs an even batch, got {images.shape[0]}')
        lam = self.mixup._mix_batch(images)  # mixes images in place, returns λ (area-corrected for cutmix)
        targets = mixup_target(labels, self.num_classes, lam, self.smoothing)
        return images, targets, {'labels_b': labels.flip(0), 'lam': float(lam)}


def mix_batch(mixup_fn: Callable, sampler: Optional[EpochSampler], data_epoch: int, images: torch.Tensor,
              labels: torch.Tensor, index: torch.Tensor):
    """``mixup_fn(images, labels)`` with its random draws seeded by the batch (:meth:`EpochSampler.mix_seed`).

    Returns (images, targets, mix metadata, mix seed); without an :class:`EpochSampler` the draws come from the global
    generators as they are and the seed is None.
    """
    if sampler is None:
        return (*mixup_fn(images, labels), None)
    seed = sampler.mix_seed(data_epoch, int(index[0]))
    with seeded_rngs(seed):  # λ, cutmix box and the mixup/cutmix switch are a function of the batch
        return (*mixup_fn(images, labels), seed)


def find_epoch_sampler(loader) -> Optional[EpochSampler]:
    """The :class:`EpochSampler` behind a (possibly Accelerate-prepared) data loader, or None."""
    seen = set()
    stack = [loader]
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, EpochSampler):
            return obj
        stack += [getattr(obj, name, None) for name in ('sampler', 'batch_sampler', 'base_dataloader')]
    return None


@contextmanager
def seeded_rngs(seed: int):
    """Python's, NumPy's and torch's CPU global generators seeded for one sample, restored afterwards."""
    saved = random.getstate(), np.random.get_state(), torch.random.default_generator.get_state()
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.random.default_generator.set_state(saved[2])


class IndexedDataset(Dataset):
    """Wraps a (image, label) data set to yield (image, label, index); corrupt images are skipped and counted.

    Keys are plain indices, or ``(index, sample_seed)`` pairs from :class:`EpochSampler`: then the sample's random
    augmentation runs with the global Python/NumPy/torch-CPU generators seeded by ``sample_seed`` (and restored
    afterwards, so loading in the main process leaves the training randomness untouched).

    An unreadable image (PIL's errors on corrupt or truncated files) is replaced by the next readable index, with a
    warning naming the file, and flagged in :attr:`corrupt`: a [N] uint8 tensor in shared memory, so the flags set by
    loader worker processes are seen by the main process (:attr:`num_corrupt`; the engine clears them at the start of
    each epoch and reports the epoch's count). With ``skip_corrupt=False`` the first unreadable image is an error.
    """

    def __init__(self, dataset: Dataset, skip_corrupt: bool = True):
        self.dataset, self.skip_corrupt = dataset, skip_corrupt
        self.corrupt = torch.zeros(len(dataset), dtype=torch.uint8).share_memory_()  # [N] 1 = found unreadable

    @property
    def num_corrupt(self) -> int:
        """Distinct unreadable images found since the last :meth:`reset_corrupt`."""
        return int(self.corrupt.sum())

    def reset_corrupt(self) -> None:
        self.corrupt.zero_()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            index, sample_seed = key
            with seeded_rngs(sample_seed):
                return self._load(index)
        return self._load(key)

    def _load(self, i: int):
        for offset in range(len(self)):
            j = (i + offset) % len(self)
            try:
                image, label = self.dataset[j]
                return image, label, j
            except (CorruptImage, OSError, SyntaxError) as e:  # decoding only: an augmentation's error propagates
                where = sample_path(self.dataset, j)
                if not self.skip_corrupt:
                    raise DataFailure(f'unreadable image {where} ({e}); fix or remove it, or pass --skip-corrupt to '
                                      'skip and count such images') from None
                self.corrupt[j] = 1
                _logger.warning('skipping unreadable image %s (%s)', where, e)
        raise DataFailure('every image in the data set is unreadable (see the warnings above for why)')


class EvalDataset(IndexedDataset):
    """Validation (image, label) pairs; an unreadable image comes back as its next readable neighbour with label -1,
    which evaluation leaves out of every metric (counted in :attr:`num_corrupt`, warned naming the file), or, with
    ``skip_corrupt=False``, a one-line :class:`DataError`."""

    def __init__(self, dataset: Dataset, skip_corrupt: bool = True):
        super().__init__(dataset, skip_corrupt)
        self.classes = list(dataset.classes)

    def __getitem__(self, i: int):
        image, label, j = self._load(i)
        return image, label if j == i else -1


def sample_path(dataset, index: int) -> str:
    """The file behind ``dataset[index]`` through Transformed/Subset wrappers (``index <i>`` when not a file)."""
    while dataset is not None:
        if hasattr(dataset, 'indices') and hasattr(dataset, 'dataset'):  # torch Subset
            index, dataset = int(dataset.indices[index]), dataset.dataset
            continue
        samples = getattr(dataset, 'samples', None)
        if samples is not None:  # torchvision ImageFolder: (path, class) pairs
            return str(samples[index][0])
        if hasattr(dataset, 'sample_name'):  # a row of a Hugging Face data set
            return dataset.sample_name(index)
        dataset = getattr(dataset, 'dataset', None)
    return f'index {index}'


def train_set_fingerprint(dataset) -> dict:
    """What identifies a training set: ``{'samples': N, 'sha256': …}`` over its samples in order.

    A sample is its file path relative to the data root with its class (an image folder, after any subset), or its
    label (an in-memory or Hugging Face set, whose rows have no file). A checkpoint keeps it, so a resume can tell
    that images were added, removed or renamed since the run started: a moved data folder keeps its fingerprint.
    """
    keep: Optional[list[int]] = None  # positions in the innermost set, through Subset wrappers
    items: Optional[list[str]] = None
    while dataset is not None and items is None:
        if hasattr(dataset, 'indices') and hasattr(dataset, 'dataset'):  # torch Subset
            outer = [int(i) for i in dataset.indices]
            keep = outer if keep is None else [outer[i] for i in keep]
            dataset = dataset.dataset
            continue
        samples = getattr(dataset, 'samples', None)
        targets = getattr(dataset, 'targets', None)
        if samples is not None:
            root = getattr(dataset, 'root', '') or ''
            items = [f'{os.path.relpath(path, root)}\t{label}' for path, label in samples]
        elif targets is not None:
            items = [str(int(label)) for label in targets]
        else:
            dataset = getattr(dataset, 'dataset', None)
    if items is None:
        return {}
    if keep is not None:
        items = [items[i] for i in keep]
    return {'samples': len(items), 'sha256': hashlib.sha256('\n'.join(items).encode()).hexdigest()}


FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                         'Ankle boot')


def _fashion_mnist(root: Optional[str], train: bool) -> ArrayImageDataset:
    try:
        folder = find_fashion_mnist(root)
    except DataError:
        if not root:
            raise
        from torchvision.datasets import FashionMNIST  # downloads when the network allows
        try:
            ds = FashionMNIST(root, train=train, download=True)
        except Exception as e:  # noqa: BLE001 - any download failure becomes the same one-line error
            raise DataError(f'Fashion-MNIST not found under {root!r} and the download failed ({e})') from None
        return ArrayImageDataset(ds.data.numpy(), ds.targets.numpy(), FASHION_MNIST_CLASSES)
    split = 'train' if train else 't10k'
    def path(kind):
        p = folder / f'{split}-{kind}-idx{3 if kind == "images" else 1}-ubyte.gz'
        return p if p.is_file() else p.with_suffix('')
    return ArrayImageDataset(read_idx(path('images')), read_idx(path('labels')), FASHION_MNIST_CLASSES)


def _cifar(name: str, root: Optional[str], train: bool) -> Dataset:
    from torchvision.datasets import CIFAR10, CIFAR100
    cls = CIFAR10 if name == 'cifar10' else CIFAR100
    root = root or os.path.join(os.path.expanduser('~'), '.cache', 'vitkd', name)
    try:
        return cls(root, train=train, download=True)
    except Exception as e:  # noqa: BLE001
        raise DataError(f'{name} not found under {root!r} and the download failed ({e}); pass --data-path') from None


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, also for 0 bits kept.

    timm's RandAugment with increasing magnitudes (DeiT's ``rand-m9-mstd0.5-inc1``) maps the clipped magnitude 10 to
    ``4 - 4 = 0`` bits; a Gaussian draw of m=9, std 0.5 reaches it about 2 % of the time. Pillow >= 10 refuses
    ``ImageOps.posterize(img, 0)`` ("bits must be between or equal to 1 and 8"), older Pillow and TensorFlow's
    reference keep no bit: a black image. That is what 0 bits gives here.
    """
    from PIL import ImageOps
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _install_posterize() -> None:
    from timm.data import auto_augment
    for name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = _posterize


_install_posterize()


def _scan_image_folder(directory: str, class_to_idx: dict, extensions) -> list[tuple[str, int]]:
    """(path, class) of every image below each class folder: directory symlinks are followed, each real folder is
    visited once (a symlink loop is not followed round), names starting with a dot (folders and files) are skipped,
    other files without an image extension are skipped with one warning that counts and names them."""
    instances, strays = [], []
    for name in sorted(class_to_idx):
        seen = set()
        for root, dirs, files in os.walk(os.path.join(directory, name), followlinks=True):
            real = os.path.realpath(root)
            if real in seen:
                dirs[:] = []
                continue
            seen.add(real)
            dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
            visible = [f for f in sorted(files) if not f.startswith('.')]
            instances += [(os.path.join(root, f), class_to_idx[name]) for f in visible
                          if f.lower().endswith(extensions)]
            strays += [os.path.relpath(os.path.join(root, f), directory) for f in visible
                       if not f.lower().endswith(extensions)]
    if strays:  # notes, CSVs, archives beside the images: not training data, but the user should know they were left
        _logger.warning('ignored %d file(s) of %s that are not images by their extension (%s): %s', len(strays),
                        directory, ', '.join(extensions), ', '.join(strays[:5]) + (' …' if len(strays) > 5 else ''))
    return instances


class SafeImageFolder(ImageFolder):
    """torchvision's ImageFolder with vitkd's scanning rules (:func:`_scan_image_folder`): folders whose names start
    with a dot (``.ipynb_checkpoints``, ``.git``) are not classes, symlink loops are not followed round."""

    def find_classes(self, directory):
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith('.'))
        if not classes:
            raise FileNotFoundError(f'no class folder in {directory}')
        return classes, {c: i for i, c in enumerate(classes)}

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        return _scan_image_folder(str(directory), class_to_idx, tuple(extensions or IMG_EXTENSIONS))


def _image_folder(path: str, split: str, subset: Optional[str], seed: int) -> Dataset:
    root = Path(path) / split
    if not root.is_dir():
        raise DataError(f'--data-path {path!r} has no {split}/ folder; expected the ImageFolder layout '
                        f'{path}/train/<class>/<image> and {path}/val/<class>/<image>')
    class_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith('.')]
    if not class_dirs:
        raise DataError(f'{root} holds no class folders; expected {root}/<class>/<image>')
    try:
        ds = SafeImageFolder(str(root), loader=load_image, allow_empty=True)
    except (FileNotFoundError, TypeError) as e:
        raise DataError(f'{root} is not an ImageFolder tree ({e})') from None
    if len(ds) == 0:
        raise DataError(f'{root} holds no images with a known extension')
    counts = np.bincount(np.asarray(ds.targets, dtype=np.int64), minlength=len(ds.classes))
    empty = [name for name, n in zip(ds.classes, counts) if n == 0]
    if empty:  # the class keeps its output unit (train/ and val/ must agree) but has nothing to learn from
        _logger.warning('%d class folder(s) of %s hold no images: %s', len(empty), root, ', '.join(empty))
    if subset and split == 'train':
        ds = _subset(ds, subset, seed)
    return ds


def _is_fraction(subset: str) -> bool:
    try:
        float(subset)
    except ValueError:
        return False
    return True


def _subset(ds, subset: str, seed: int):
    """A fraction (``0.01``: stratified per class, seeded) or a list file of relative paths, one per line."""
    from torch.utils.data import Subset
    try:
        fraction = float(subset)
    except ValueError:
        fraction = None
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise DataError(f'--train-subset {subset!r}: a fraction must be in (0, 1]')
        rng = random.Random(seed)
        by_class: dict[int, list[int]] = {}
        for i, t in enumerate(ds.targets):
            by_class.setdefault(t, []).append(i)
        keep = sorted(i for idx in by_class.values() for i in rng.sample(idx, max(1, round(len(idx) * fraction))))
    else:
        list_file = Path(subset)
        if not list_file.is_file():
            raise DataError(f'--train-subset {subset!r} is neither a fraction in (0, 1] nor a list file')
        wanted = {line.strip() for line in list_file.read_text().splitlines() if line.strip()}
        rel = [os.path.relpath(p, ds.root) for p, _ in ds.samples]
        keep = [i for i, r in enumerate(rel) if r in wanted or os.path.basename(r) in wanted]
        if not keep:
            raise DataError(f'none of the {len(wanted)} files listed in {subset} is in {ds.root}')
    sub = Subset(ds, keep)
    sub.classes, sub.targets = ds.classes, [ds.targets[i] for i in keep]
    return sub


@dataclass
class DataSpec:
    """What the data set says about itself: classes, input size and normalisation for the student."""
    num_classes: int
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str]


class TransformedDataset(Dataset):
    """Applies ``transform`` to the image of a (image, label) data set."""

    def __init__(self, dataset: Dataset, transform: Callable):
        self.dataset, self.transform = dataset, transform
        self.classes = getattr(dataset, 'classes', None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        return self.transform(image), label


def build_datasets(dataset: str, data_path: Optional[str], train_transform, eval_transform, subset: Optional[str] = None,
                   seed: int = 0, skip_corrupt: bool = True, hf=None):
    """(train, val) data sets: train yields (image, label, index), val yields (image, label).

    ``hf`` is the :class:`vitkd.hf_data.HFOptions` (columns, splits) of ``dataset == 'hf'``.
    """
    if dataset == 'fashion_mnist':
        train, val = _fashion_mnist(data_path, True), _fashion_mnist(data_path, False)
        if subset:
            train = _subset(train, subset, seed)
    elif dataset in ('cifar10', 'cifar100'):
        train, val = _cifar(dataset, data_path, True), _cifar(dataset, data_path, False)
        if subset:
            train = _subset(train, subset, seed)
    elif dataset == 'imagefolder':
        if not data_path:
            raise DataError('--dataset imagefolder needs --data-path <folder with train/ and val/>')
        if not Path(data_path).is_dir():
            raise DataError(f'--data-path {data_path!r} does not exist or is not a folder')
        train = _image_folder(data_path, 'train', subset, seed)
        val = _image_folder(data_path, 'val', None, seed)
        if train.classes != val.classes:
            only = [f'{split} only: {", ".join(sorted(set(a) - set(b))[:5])}' for split, a, b in
                    (('train/', train.classes, val.classes), ('val/', val.classes, train.classes)) if set(a) - set(b)]
            raise DataError(f'train/ has {len(train.classes)} classes and val/ has {len(val.classes)}; they must hold '
                            f'the same class folders ({"; ".join(only)})')
    elif dataset == 'hf':
        train, val = load_hf_splits(data_path, hf)
        if subset:
            if not _is_fraction(subset):
                raise DataError(f'--train-subset {subset!r}: with --dataset hf it must be a fraction in (0, 1]')
            train = _subset(train, subset, seed)
    else:
        raise DataError(f'--dataset {dataset!r} is not one of {", ".join(DATASETS)}')
    train = IndexedDataset(TransformedDataset(train, train_transform), skip_corrupt)
    val = EvalDataset(TransformedDataset(val, eval_transform), skip_corrupt)
    return train, val


def build_eval_dataset(dataset: str, data_path: Optional[str], eval_transform, skip_corrupt: bool = True,
                       hf=None) -> Dataset:
    """The validation set alone (for ``--eval-student``: no scan of a large train/ folder); yields (image, label)."""
    if dataset == 'fashion_mnist':
        val = _fashion_mnist(data_path, False)
    elif dataset in ('cifar10', 'cifar100'):
        val = _cifar(dataset, data_path, False)
    elif dataset == 'imagefolder':
        if not data_path or not Path(data_path).is_dir():
            raise DataError(f'--data-path {data_path!r} does not exist or is not a folder')
        val = _image_folder(data_path, 'val', None, 0)
    elif dataset == 'hf':
        val = load_hf_splits(data_path, hf, train=False)[1]
    else:
        raise DataError(f'--dataset {dataset!r} is not one of {", ".join(DATASETS)}')
    return EvalDataset(TransformedDataset(val, eval_transform), skip_corrupt)


def dataset_targets(dataset) -> Optional[torch.Tensor]:
    """[N] labels of a (possibly wrapped) data set, found through ``.dataset`` links; None when it has none."""
    while dataset is not None:
        targets = getattr(dataset, 'targets', None)
        if targets is not None:
            return torch.as_tensor(targets, dtype=torch.long)
        dataset = getattr(dataset, 'dataset', None)
    return None


def seed_worker(worker_id: int) -> None:
    """DataLoader worker seeding: numpy/random follow torch's per-worker seed (deterministic augmentation)."""
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


class _PreemptibleWorker(multiprocessing.context.ForkProcess):
    """A loader worker that leaves Ctrl-C and the scheduler's SIGTERM to the main process.

    A preempted job gets SIGTERM on every process, Ctrl-C reaches the whole process group, and torch aborts the
    main process as soon as a worker dies; the main process instead checkpoints at the next step boundary and then
    shuts its workers down. The worker is forked with SIGTERM blocked (so every thread it starts blocks it too) and
    a watcher thread exits it only when the sender is its parent or the parent is gone — the parent terminates its
    workers at exit — which is what torch's own worker handler checks and a Python handler cannot.
    """

    def start(self) -> None:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def run(self) -> None:  # in the worker, before torch's worker loop
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        parent = os.getppid()

        def watch() -> None:
            while True:
                info = signal.sigwaitinfo({signal.SIGTERM})
                if info.si_pid == parent or os.getppid() != parent:
                    os._exit(0)

        threading.Thread(target=watch, name='vitkd-sigterm-watch', daemon=True).start()
        super().run()


class _PreemptibleContext(multiprocessing.context.ForkContext):
    Process = _PreemptibleWorker


def worker_context(num_workers: int):
    """The ``multiprocessing_context`` for vitkd's loaders: preemption-safe workers on POSIX (else the default)."""
    if num_workers <= 0 or not hasattr(signal, 'sigwaitinfo') or 'fork' not in multiprocessing.get_all_start_methods():
        return None
    return _PreemptibleContext()
