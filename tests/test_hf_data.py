"""``--dataset hf``: Hugging Face ``datasets`` data sets (parquet, ``save_to_disk``, an offline Hub cache) against
the same images as an ImageFolder.

The fixture takes 200 train / 100 validation Fashion-MNIST images (Debian's files), writes them as PNG files in an
ImageFolder tree and, from the very same PNG bytes, as a ``DatasetDict`` (``datasets.Image`` + ``ClassLabel``) saved
as parquet, with ``save_to_disk`` and into a ``datasets`` cache under a temporary ``HF_HOME`` (what an online
``load_dataset('org/name')`` leaves behind), which ``HF_HUB_OFFLINE=1`` then reads.
"""
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

datasets = pytest.importorskip('datasets')

from vitkd.data import IndexedDataset, build_datasets, find_fashion_mnist, read_idx  # noqa: E402
from vitkd.errors import DataFailure  # noqa: E402
from vitkd.hf_data import HFDataError, HFOptions, load_hf_splits  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLASSES = [f'c{i}' for i in range(10)]  # sorted like ImageFolder's folders, so both sources number classes alike
N_TRAIN, N_VAL = 200, 100


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format='PNG')
    return buf.getvalue()


def _fmnist(split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n images of a split in ImageFolder's order (by class, then file name): data-set index i is then the
    same image in both sources, so the per-index augmentation seeds pick the same crops."""
    folder = find_fashion_mnist(None)
    images = read_idx(folder / f'{split}-images-idx3-ubyte.gz')[:n]
    labels = read_idx(folder / f'{split}-labels-idx1-ubyte.gz')[:n].astype(np.int64)
    order = np.argsort(labels, kind='stable')
    return images[order], labels[order]


def _seed_hub_cache(hf_home: Path, parquet_dir: Path, repo_id: str) -> None:
    """The ``datasets`` cache entry an online ``load_dataset(repo_id)`` writes: <cache>/<org>___<name>/default/…"""
    from datasets.packaged_modules.parquet.parquet import Parquet
    org, name = repo_id.split('/')
    cache = hf_home / 'datasets'
    builder = Parquet(cache_dir=str(cache / 'staging'), dataset_name=name, hash='0' * 40, config_id='default',
                      data_files={s: [str(parquet_dir / f'{s}-00000-of-00001.parquet')]
                                  for s in ('train', 'validation')})
    builder.download_and_prepare()
    os.replace(cache / 'staging' / name, cache / f'{org}___{name}')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('hfdata')
    arrays = {'train': _fmnist('train', N_TRAIN), 'validation': _fmnist('t10k', N_VAL)}
    splits = {}
    for split, (images, labels) in arrays.items():
        pngs = [_png(img) for img in images]
        for i, (png, label) in enumerate(zip(pngs, labels)):
            folder = root / 'folder' / ('train' if split == 'train' else 'val') / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f'{i:04d}.png').write_bytes(png)
        features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(names=CLASSES)})
        splits[split] = datasets.Dataset.from_dict(
            {'image': [{'bytes': p, 'path': None} for p in pngs], 'label': labels.tolist()}, features=features)
    dd = datasets.DatasetDict(splits)
    (root / 'parquet' / 'data').mkdir(parents=True)
    for split, ds in dd.items():
        ds.to_parquet(str(root / 'parquet' / 'data' / f'{split}-00000-of-00001.parquet'))
    dd.save_to_disk(str(root / 'disk'))
    _seed_hub_cache(root / 'hf_home', root / 'parquet' / 'data', 'vitkd-test/fmnist-small')
    return dict(root=root, arrays=arrays, dd=dd)


@pytest.mark.parametrize('source', ['parquet', 'parquet/data/*.parquet', 'disk'])
def test_every_local_form_gives_the_images_labels_and_class_names(data, source):
    train, val = load_hf_splits(str(data['root'] / source))
    assert train.classes == val.classes == CLASSES
    for ds, (images, labels) in ((train, data['arrays']['train']), (val, data['arrays']['validation'])):
        assert len(ds) == len(labels) and ds.targets == labels.tolist()
        for i in (0, 17, len(ds) - 1):
            img, label = ds[i]
            assert img.mode == 'RGB' and label == labels[i]
            assert np.array_equal(np.asarray(img), np.repeat(images[i][..., None], 3, axis=2))  # gray → RGB


def test_the_offline_hub_cache_is_read_under_HF_HUB_OFFLINE(data):
    """A fresh process with HF_HOME at the seeded cache and HF_HUB_OFFLINE=1 (no network)."""
    code = ('import sys; from vitkd.hf_data import load_hf_splits; t, v = load_hf_splits(sys.argv[1]); '
            'print(len(t), len(v), ",".join(t.classes), sum(t.targets))')
    env = dict(os.environ, HF_HOME=str(data['root'] / 'hf_home'), HF_HUB_OFFLINE='1', PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, '-c', code, 'hf-hub:vitkd-test/fmnist-small'], capture_output=True,
                            text=True, env=env, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    labels = data['arrays']['train'][1]
    assert result.stdout.split() == [str(N_TRAIN), str(N_VAL), ','.join(CLASSES), str(int(labels.sum()))]


def test_a_hub_id_not_cached_while_offline_is_one_line(tmp_path, capsys, monkeypatch):
    import datasets.config
    import main
    monkeypatch.setattr(datasets.config, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(datasets.config, 'HF_DATASETS_CACHE', tmp_path / 'empty-cache')
    code = main.main(['--data-path', 'hf-hub:nobody/not-cached', '--teacher', 'none', '--distill', 'none',
                      '--output-dir', str(tmp_path / 'o'), '--num-workers', '0'])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith('error: --data-path hf-hub:nobody/not-cached: the data set is not in the local datasets '
                             'cache') and "load_dataset('nobody/not-cached')" in err[0]


def test_columns_are_detected_by_feature_type_and_string_labels_get_sorted_names(tmp_path, data):
    renamed = data['dd'].rename_columns({'image': 'pixels', 'label': 'target'})
    renamed.save_to_disk(str(tmp_path / 'renamed'))
    train, _ = load_hf_splits(str(tmp_path / 'renamed'))
    assert train.classes == CLASSES and train.targets == data['arrays']['train'][1].tolist()
    # no Image / ClassLabel features: an ``img`` column of raw PNG bytes and string labels
    names = ['zebra', 'apple', 'mango']
    raw = datasets.DatasetDict({s: datasets.Dataset.from_dict(
        {'img': [_png(np.full((8, 8), 40 * i, np.uint8)) for i in range(6)], 'label': [names[i % 3] for i in range(6)]})
        for s in ('train', 'validation')})
    raw.save_to_disk(str(tmp_path / 'raw'))
    train, val = load_hf_splits(str(tmp_path / 'raw'))
    assert train.classes == sorted(names)
    assert [train.classes[t] for t in train.targets] == [names[i % 3] for i in range(6)]
    assert np.asarray(val[4][0])[0, 0, 0] == 160


def test_missing_split_column_and_unlabelled_split_errors_name_what_exists(tmp_path, data, caplog):
    path = str(data['root'] / 'disk')
    with pytest.raises(HFDataError, match=r"--val-split 'dev': .* has no such split; it has train, validation"):
        load_hf_splits(path, HFOptions(val_split='dev'))
    with pytest.raises(HFDataError, match=r"--hf-image-column 'picture': split 'train' has no such column; its "
                                          r"columns are image, label"):
        load_hf_splits(path, HFOptions(image_column='picture'))
    # the default validation split falls back to ``test`` (with a log line); a split of -1 labels is refused
    unlabelled = datasets.DatasetDict(train=data['dd']['train'],  # ImageNet's test split: ClassLabel -1 everywhere
                                      test=data['dd']['validation'].map(lambda row: {'label': -1}))
    unlabelled.save_to_disk(str(tmp_path / 'unlabelled'))
    relabelled = datasets.DatasetDict(train=data['dd']['train'], test=data['dd']['validation'])
    relabelled.save_to_disk(str(tmp_path / 'test-only'))
    with caplog.at_level(logging.INFO, logger='vitkd.hf_data'):
        _, val = load_hf_splits(str(tmp_path / 'test-only'))
    assert len(val) == N_VAL and "no 'validation' split, using 'test'" in caplog.text
    with pytest.raises(HFDataError, match=r'label -1 is outside the 10 classes'):
        load_hf_splits(str(tmp_path / 'unlabelled'), HFOptions(label_column='label'))


def test_an_undecodable_row_is_skipped_and_counted_like_a_corrupt_image(tmp_path, data):
    rows = data['dd']['train'].select(range(8)).to_dict()
    rows['image'][3] = {'bytes': b'not an image', 'path': None}
    broken = datasets.Dataset.from_dict(rows, features=data['dd']['train'].features)
    datasets.DatasetDict(train=broken, validation=data['dd']['validation']).save_to_disk(str(tmp_path / 'broken'))
    train, _ = build_datasets('hf', str(tmp_path / 'broken'), np.asarray, np.asarray, hf=HFOptions())
    assert isinstance(train, IndexedDataset)
    got = [train[i] for i in range(len(train))]
    assert train.num_corrupt == 1 and bool(train.corrupt[3])
    assert got[3][2] == 4  # row 3 is replaced by the next readable row
    with pytest.raises(DataFailure, match=r'unreadable image .*broken train row 3'):
        IndexedDataset(train.dataset, skip_corrupt=False)[3]


def test_auto_dataset_picks_hf_for_an_hf_hub_data_path():
    from vitkd.arguments import resolve
    assert resolve({'data_path': 'hf-hub:org/name'}).dataset == 'hf'
    assert resolve({'data_path': '/data/imagenet'}).dataset == 'imagefolder'


def _train_args(out: Path, *data: str) -> list[str]:
    return [*data, '--input-size', '28', '--student', 'deit_ti_distilled', '--student-kwargs', 'img_size=28',
            'patch_size=4', 'depth=2', 'embed_dim=48', 'num_heads=3', '--teacher', 'none', '--distill', 'none',
            '--epochs', '1', '--max-steps', '4', '--batch-size', '16', '--num-workers', '0', '--lr', '1e-3',
            '--unscale-lr', '--warmup-epochs', '0', '--log-every', '1', '--output-dir', str(out), '--threads', '1']


def test_the_same_run_over_an_image_folder_and_a_dataset_exports_identical_weights(data, tmp_path):
    """Full DeiT augmentation (RandAugment, erasing, mixup/cutmix) seeded per sample index: bit-equal tensors."""
    import main
    root = data['root']
    assert main.main(_train_args(tmp_path / 'folder', '--data-path', str(root / 'folder'))) == 0
    assert main.main(_train_args(tmp_path / 'hf', '--dataset', 'hf', '--data-path', str(root / 'parquet'))) == 0
    a = load_file(str(tmp_path / 'folder' / 'student' / 'model.safetensors'))
    b = load_file(str(tmp_path / 'hf' / 'student' / 'model.safetensors'))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    summaries = [json.loads((tmp_path / d / 'summary.json').read_text()) for d in ('folder', 'hf')]
    assert summaries[0]['steps'] == summaries[1]['steps'] == 4
    assert summaries[0]['student'] == summaries[1]['student']  # the same 100 validation images, the same metrics
    logs = [[r for r in map(json.loads, (tmp_path / d / 'log.jsonl').read_text().splitlines()) if r['kind'] == 'step']
            for d in ('folder', 'hf')]
    assert len(logs[0]) == 4 and [r['loss'] for r in logs[0]] == [r['loss'] for r in logs[1]]
    assert len({r['loss'] for r in logs[0]}) > 1  # it trained on changing batches, not on one repeated input
