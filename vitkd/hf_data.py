"""Hugging Face ``datasets`` as a vitkd data source (``--dataset hf``).

``--data-path`` names the data set in one of three forms:

* a Hub id, ``org/name`` or ``hf-hub:org/name`` (the prefix also selects this source under ``--dataset auto``),
  loaded with ``datasets.load_dataset`` — from the local cache when ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` is set;
* a folder written by ``DatasetDict.save_to_disk`` (``load_from_disk``);
* parquet files: a folder of them, one file, or a glob; a file belongs to the split its name says
  (``train-00000-of-00004.parquet``, ``data/validation/…``; the ``datasets`` naming convention), else to
  ``train``.

The image column defaults to the one whose feature is ``datasets.Image`` (else ``image``/``img``), the label column to
the ``ClassLabel`` one (else ``label``); class names come from the ``ClassLabel`` feature (integer labels without one
are named by their number, string labels are sorted like ImageFolder's folders). Splits are chosen by name
(``--train-split``, ``--val-split``); the default validation split falls back to ``val``, then ``test``.

:class:`HFImageDataset` is map-style and yields ``(PIL image, label)`` like torchvision's ImageFolder (images decoded
by PIL and converted to RGB, the same loader), so vitkd's :class:`vitkd.data.IndexedDataset` / ``EpochSampler`` path
— per-index augmentation seeds, exact resume, the teacher cache, sharding over processes — applies unchanged, and an
undecodable row raises PIL's error, which ``IndexedDataset`` counts like a corrupt image file.
"""
from __future__ import annotations

import glob
import io
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .images import CorruptImage, to_rgb
from .errors import HubError, UsageError, server_failure

__all__ = ['HF_PREFIX', 'HFOptions', 'HFImageDataset', 'HFDataError', 'load_hf_splits']

_logger = logging.getLogger(__name__)

HF_PREFIX = 'hf-hub:'
VAL_FALLBACKS = ('val', 'test')  # tried in order when the default validation split is missing
# split keywords of the datasets naming convention: a path part (or file-name prefix) that starts with one of them
_SPLIT_WORDS = {'train': ('train', 'training'), 'validation': ('validation', 'valid', 'val', 'dev'),
                'test': ('test', 'testing', 'eval')}


class HFDataError(UsageError):
    """A Hugging Face data set, split or column that cannot be used (message is the one-line user error)."""


@dataclass
class HFOptions:
    """Which columns and splits of a ``datasets`` data set a run uses (None column = auto-detect)."""
    image_column: Optional[str] = None
    label_column: Optional[str] = None
    train_split: str = 'train'
    val_split: str = 'validation'

    @classmethod
    def from_config(cls, cfg) -> 'HFOptions':
        """The options of a :class:`vitkd.config.Config`."""
        return cls(cfg.hf_image_column, cfg.hf_label_column, cfg.train_split, cfg.val_split)


def _offline() -> bool:
    from datasets import config
    return bool(config.HF_HUB_OFFLINE)


def _load_hub(repo_id: str):
    import datasets
    from huggingface_hub import constants
    try:
        return datasets.load_dataset(repo_id)
    except Exception as e:  # noqa: BLE001 - a Hub that failed is said as such; other errors are sorted below
        failure = None if _offline() else server_failure(e)
        if failure is not None:
            raise HubError(f'--data-path {HF_PREFIX}{repo_id}: downloading it failed: the Hub ({constants.ENDPOINT}) '
                           f'{failure}; rerun the same command later (what was downloaded stays in the cache)') \
                from None
        if not isinstance(e, (ConnectionError, FileNotFoundError, ValueError)):
            raise
        # offline and uncached: ConnectionError (OfflineModeIsEnabled) or the cache factory's FileNotFoundError
        if _offline():
            raise HFDataError(
                f'--data-path {HF_PREFIX}{repo_id}: the data set is not in the local datasets cache and '
                'HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set; fetch it once with network access '
                f'(python -c "import datasets; datasets.load_dataset(\'{repo_id}\')", same HF_HOME) or unset '
                'the offline variable') from None
        raise HFDataError(f'--data-path {HF_PREFIX}{repo_id}: cannot load the data set '
                          f'({" ".join(str(e).split())})') from None


def _split_of(path: str) -> str:
    """The split a parquet file belongs to by its path (datasets' naming convention), ``train`` by default."""
    parts = re.split(r'[/\\]', path)
    for part in reversed(parts):
        head = re.split(r'[-_.\s]', part.lower(), maxsplit=1)[0]
        for split, words in _SPLIT_WORDS.items():
            if head in words:
                return split
    return 'train'


def _load_parquet(files: list[str], where: str):
    import datasets
    by_split: dict[str, list[str]] = {}
    for f in sorted(files):
        by_split.setdefault(_split_of(os.path.relpath(f, where) if os.path.isdir(where) else os.path.basename(f)),
                            []).append(f)
    return datasets.load_dataset('parquet', data_files=by_split)


def _load_any(data_path: str):
    """A ``DatasetDict`` from a Hub id, a ``save_to_disk`` folder or parquet files (see the module docstring)."""
    import datasets
    if data_path.startswith(HF_PREFIX):
        return _load_hub(data_path[len(HF_PREFIX):])
    path = Path(data_path)
    if path.is_dir():
        if (path / 'dataset_dict.json').is_file() or (path / 'state.json').is_file():
            loaded = datasets.load_from_disk(str(path))
            return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
        files = glob.glob(str(path / '**' / '*.parquet'), recursive=True)
        if not files:
            raise HFDataError(f'--data-path {data_path!r} holds neither a save_to_disk data set (dataset_dict.json) '
                              'nor parquet files')
        return _load_parquet(files, str(path))
    if any(ch in data_path for ch in '*?['):
        files = glob.glob(data_path, recursive=True)
        if not files:
            raise HFDataError(f'--data-path {data_path!r}: the pattern matches no file')
        return _load_parquet(files, os.path.dirname(data_path.split('*')[0]) or '.')
    if path.is_file():
        if path.suffix != '.parquet':
            raise HFDataError(f'--data-path {data_path!r}: a file must be .parquet (or give a folder or a Hub id)')
        return _load_parquet([str(path)], str(path.parent))
    if re.fullmatch(r'[\w.-]+/[\w.-]+', data_path):
        return _load_hub(data_path)
    raise HFDataError(f'--data-path {data_path!r} is not a Hub id (org/name or hf-hub:org/name), a save_to_disk '
                      'folder, or parquet files')


def _pick_split(splits, wanted: str, fallbacks: tuple[str, ...], option: str, where: str):
    if wanted in splits:
        return wanted
    for name in fallbacks:
        if name in splits:
            _logger.info('%s: no %r split, using %r for validation', where, wanted, name)
            return name
    raise HFDataError(f'{option} {wanted!r}: {where} has no such split; it has {", ".join(sorted(splits))}')


def _pick_column(features, wanted: Optional[str], kind: type, names: tuple[str, ...], option: str, split: str) -> str:
    columns = list(features)
    if wanted is not None:
        if wanted not in features:
            raise HFDataError(f'{option} {wanted!r}: split {split!r} has no such column; its columns are '
                              f'{", ".join(columns)}')
        return wanted
    typed = [name for name, feature in features.items() if isinstance(feature, kind)]
    if typed:
        return typed[0]
    for name in names:
        if name in features:
            return name
    raise HFDataError(f'split {split!r} has no {kind.__name__} column nor one named {" or ".join(names)}; pass '
                      f'{option} (its columns are {", ".join(columns)})')


class HFImageDataset(Dataset):
    """One split of a ``datasets`` data set as (PIL RGB image, int label) pairs, map-style.

    Args:
        data: the split (``datasets.Dataset``).
        image_column, label_column: the columns to read.
        classes: class names; ``label_to_index`` maps string labels to their index (None: labels are indices).
        name: how rows are named in warnings (``<source> <split>``).
    """

    def __init__(self, data, image_column: str, label_column: str, classes: list[str],
                 label_to_index: Optional[dict[str, int]], name: str):
        from datasets import Image as ImageFeature
        data = data.select_columns([image_column, label_column])
        if isinstance(data.features[image_column], ImageFeature):  # decode ourselves: bad bytes raise PIL's errors
            data = data.cast_column(image_column, ImageFeature(decode=False))
        self.data, self.image_column, self.name, self.classes = data, image_column, name, classes
        labels = data[label_column]
        self.targets = [label_to_index[v] for v in labels] if label_to_index is not None else [int(v) for v in labels]
        bad = [t for t in self.targets if not 0 <= t < len(classes)]
        if bad:
            raise HFDataError(f'{name}: label {bad[0]} is outside the {len(classes)} classes (an unlabelled split? '
                              'choose a labelled one with --val-split / --train-split)')

    def __len__(self) -> int:
        return len(self.targets)

    def sample_name(self, index: int) -> str:
        """How a row is named in the unreadable-image warning."""
        return f'{self.name} row {index}'

    def __getitem__(self, index: int):
        """(RGB image, label); a row whose image cannot be decoded is a :class:`vitkd.data.CorruptImage`, which the
        training set skips and counts like an unreadable file (or refuses with ``--no-skip-corrupt``)."""
        try:
            return _to_rgb(self.data[index][self.image_column]), self.targets[index]
        except CorruptImage:
            raise
        except (OSError, SyntaxError, ValueError, TypeError, EOFError, struct.error) as e:
            raise CorruptImage(f'{type(e).__name__}: {e}') from None


def _to_rgb(value: Any) -> Image.Image:
    """PIL RGB image from a stored image: ``{'bytes', 'path'}`` (datasets.Image), bytes, a path, an array or PIL.

    Decoding is the image folder's (:func:`vitkd.data.to_rgb` after ``Image.open``), so the same file gives the same
    tensor from both sources.
    """
    if isinstance(value, dict):
        value = value.get('bytes') or value.get('path')
    if isinstance(value, (bytes, bytearray)):
        with Image.open(io.BytesIO(value)) as img:
            img.load()
            return to_rgb(img)
    if isinstance(value, str):
        with open(value, 'rb') as f, Image.open(f) as img:
            img.load()
            return to_rgb(img)
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if value is None:
        raise ValueError('empty image cell')
    return Image.fromarray(np.asarray(value, dtype=np.uint8)).convert('RGB')


def _label_space(splits: list, label_column: str) -> tuple[list[str], Optional[dict[str, int]]]:
    """(class names, string-label → index map or None) shared by the splits."""
    from datasets import ClassLabel
    feature = splits[0].features[label_column]
    if isinstance(feature, ClassLabel):
        for other in splits[1:]:
            if other.features[label_column] != feature:
                raise HFDataError(f'the splits disagree on the classes of column {label_column!r}')
        return list(feature.names), None
    values = [v for s in splits for v in s.unique(label_column)]
    if all(isinstance(v, str) for v in values):
        names = sorted(set(values))
        return names, {n: i for i, n in enumerate(names)}
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return [str(i) for i in range(max(values) + 1)], None
    raise HFDataError(f'label column {label_column!r} holds neither integers nor strings; pass --hf-label-column')


def load_hf_splits(data_path: Optional[str], options: Optional[HFOptions] = None, train: bool = True
                   ) -> tuple[Optional[HFImageDataset], HFImageDataset]:
    """(train split or None, validation split) of the data set ``data_path`` names.

    Args:
        data_path: a Hub id (``org/name``, ``hf-hub:org/name``), a ``save_to_disk`` folder or parquet files.
        options: columns and split names (defaults: auto-detected columns, ``train`` / ``validation``).
        train: also load the train split (False for evaluation only).
    """
    if not data_path:
        raise HFDataError('--dataset hf needs --data-path <Hub id | save_to_disk folder | parquet files>')
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise HFDataError('--dataset hf needs the datasets package (pip install datasets)') from None
    options = options or HFOptions()
    loaded = _load_any(data_path)
    val_name = _pick_split(loaded, options.val_split, VAL_FALLBACKS if options.val_split == 'validation' else (),
                           '--val-split', data_path)
    names = [val_name]
    if train:
        names.insert(0, _pick_split(loaded, options.train_split, (), '--train-split', data_path))
    splits = [loaded[n] for n in names]
    from datasets import ClassLabel
    from datasets import Image as ImageFeature
    image_col = _pick_column(splits[0].features, options.image_column, ImageFeature, ('image', 'img'),
                             '--hf-image-column', names[0])
    label_col = _pick_column(splits[0].features, options.label_column, ClassLabel, ('label',),
                             '--hf-label-column', names[0])
    for name, split in zip(names[1:], splits[1:]):
        for col, option in ((image_col, '--hf-image-column'), (label_col, '--hf-label-column')):
            if col not in split.features:
                raise HFDataError(f'{option} {col!r}: split {name!r} has no such column; its columns are '
                                  f'{", ".join(split.features)}')
    classes, to_index = _label_space(splits, label_col)
    made = [HFImageDataset(split, image_col, label_col, classes, to_index, f'{data_path} {name}')
            for name, split in zip(names, splits)]
    return (made[0] if train else None), made[-1]
