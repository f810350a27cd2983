"""Dense data: the embedded scenes (deterministic, exact boxes and masks), augmentation that moves boxes and masks
with the image, per-sample seeding, COCO files and segmentation folders read back against hand-made fixtures."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitkd.dense.data import (CocoDetectionSource, DenseAugment, DenseDataset, FashionScenes, SegmentationFolderSource,
                              collate_dense, letterbox)
from vitkd.dense.models import IGNORE_INDEX
from vitkd.errors import DataFailure, UsageError


@pytest.fixture(scope='module')
def scenes():
    return FashionScenes('val', 64)


def test_scenes_are_a_function_of_the_index(scenes):
    again = FashionScenes('val', 64)
    for i in (0, 7, 499):
        a, b = scenes[i], again[i]
        assert all(torch.equal(a[k], b[k]) for k in ('image', 'boxes', 'labels', 'mask'))
    assert not torch.equal(scenes[0]['image'], scenes[1]['image'])


def test_scene_boxes_and_masks_are_exact(scenes):
    """Single-object scenes: the box is the extent of the labelled mask pixels, the mask holds 1 + the label there and
    the image is bright exactly where the mask is labelled (grey level >= 32). Any scene: boxes inside the canvas,
    labels in 0..9, mask values in 0..10."""
    singles = 0
    for i in range(60):
        s = scenes[i]
        assert ((s['boxes'] >= 0) & (s['boxes'] <= 64)).all() and s['labels'].max() <= 9
        assert int(s['mask'].max()) <= 10
        if len(s['labels']) != 1:
            continue
        singles += 1
        ys, xs = torch.nonzero(s['mask'] > 0, as_tuple=True)
        extent = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        assert torch.equal(s['boxes'][0], extent)
        assert set(s['mask'].unique().tolist()) == {0, 1 + int(s['labels'][0])}
        assert torch.equal(s['mask'] > 0, s['image'][0] * 255 >= 31.999)
    assert singles >= 5  # the scenes have 1–3 objects: some single-object ones are in the first 60


def _rectangle_sample(box=(10, 20, 30, 44), size=64):
    x1, y1, x2, y2 = box
    image = torch.zeros(1, size, size)
    image[:, y1:y2, x1:x2] = 1.0
    mask = torch.zeros(size, size, dtype=torch.int64)
    mask[y1:y2, x1:x2] = 3
    return dict(image=image, boxes=torch.tensor([list(map(float, box))]), labels=torch.tensor([2]), mask=mask)


def test_flip_moves_boxes_and_masks_exactly():
    sample = _rectangle_sample()
    flipped = DenseAugment(hflip=1.0)(sample, np.random.default_rng(0))
    assert torch.equal(flipped['boxes'], torch.tensor([[64 - 30., 20., 64 - 10., 44.]]))
    assert torch.equal(flipped['mask'], sample['mask'].flip(-1))
    assert torch.equal(flipped['image'], sample['image'].flip(-1))


@pytest.mark.parametrize('seed', range(6))
def test_scale_jitter_keeps_boxes_on_the_moved_object(seed):
    """After a random resize and cut/pad the box still bounds the object: the labelled mask pixels and the bright image
    pixels span the box up to one pixel (nearest-neighbour resampling of the mask moves an edge by < 1 px)."""
    out = DenseAugment(hflip=0.5, scale_range=(0.6, 1.5))(_rectangle_sample(), np.random.default_rng(seed))
    assert len(out['boxes']) == 1
    ys, xs = torch.nonzero(out['mask'] == 3, as_tuple=True)
    extent = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    assert (out['boxes'][0] - extent).abs().max() <= 1.0
    bright_ys, bright_xs = torch.nonzero(out['image'][0] > 0.5, as_tuple=True)
    bright = torch.tensor([bright_xs.min(), bright_ys.min(), bright_xs.max() + 1, bright_ys.max() + 1]).float()
    assert (bright - extent).abs().max() <= 1.0
    assert set(out['mask'].unique().tolist()) <= {0, 3, IGNORE_INDEX}  # padding is unlabelled, never a class


def test_a_box_cut_away_by_the_jitter_is_dropped():
    sample = _rectangle_sample(box=(0, 0, 6, 6))
    dropped = [len(DenseAugment(0.0, (1.5, 1.5))(sample, np.random.default_rng(s))['labels']) for s in range(20)]
    assert 0 in dropped and 1 in dropped  # some offsets keep the corner object, others cut it off entirely


def test_dense_dataset_augments_by_the_sample_seed(scenes):
    data = DenseDataset(scenes, 'segment', (0.5,), (0.25,), DenseAugment(0.5, (0.8, 1.25)))
    a, b, c = data[(3, 11)], data[(3, 11)], data[(3, 12)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == 3
    assert not torch.equal(a[0], c[0])
    plain = DenseDataset(scenes, 'segment', (0.5,), (0.25,))[3]
    assert torch.allclose(plain[0], (scenes[3]['image'] - 0.5) / 0.25)
    images, masks, index = collate_dense([a, c])
    assert images.shape == (2, 1, 64, 64) and masks.shape == (2, 64, 64) and index.tolist() == [3, 3]
    boxes = DenseDataset(scenes, 'detect', (0.5,), (0.25,))
    _, targets, _ = collate_dense([boxes[0], boxes[1]])
    assert isinstance(targets, list) and torch.equal(targets[1]['boxes'], scenes[1]['boxes'])


def test_letterbox_scales_boxes_and_pads_masks():
    image, mask = torch.rand(3, 20, 40), torch.ones(20, 40, dtype=torch.int64)
    out, out_mask, boxes = letterbox(image, 64, mask, torch.tensor([[4., 2., 14., 7.]]))
    assert out.shape == (3, 64, 64) and (out[:, 32:] == 0).all()
    assert (out_mask[:32] == 1).all() and (out_mask[32:] == IGNORE_INDEX).all()
    assert torch.allclose(boxes, torch.tensor([[4 * 1.6, 2 * 1.6, 14 * 1.6, 7 * 1.6]]))


def _rle_square(height: int, width: int, top: int, bottom: int, left: int, right: int) -> dict:
    """COCO's uncompressed RLE (column-major run lengths, starting with zeros) of rows [top, bottom) × columns
    [left, right), written out by hand."""
    counts, run, value = [], 0, 0
    for x in range(width):
        for y in range(height):
            pixel = int(top <= y < bottom and left <= x < right)
            if pixel != value:
                counts.append(run)
                run, value = 0, pixel
            run += 1
    counts.append(run)
    return {'size': [height, width], 'counts': counts}


def _write_coco(root, split='val', masks=False):
    (root / 'annotations').mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    Image.fromarray(np.full((20, 40, 3), 128, np.uint8)).save(root / split / 'a.png')
    Image.fromarray(np.full((32, 32, 3), 64, np.uint8)).save(root / split / 'b.png')
    data = {'images': [{'id': 7, 'file_name': 'a.png', 'width': 40, 'height': 20},
                       {'id': 3, 'file_name': 'b.png', 'width': 32, 'height': 32}],
            'categories': [{'id': 18, 'name': 'dog'}, {'id': 1, 'name': 'person'}],
            'annotations': [{'id': 1, 'image_id': 7, 'category_id': 18, 'bbox': [4, 2, 10, 5], 'area': 50,
                             'iscrowd': 0},
                            {'id': 2, 'image_id': 7, 'category_id': 1, 'bbox': [0, 0, 40, 20], 'area': 800,
                             'iscrowd': 1},
                            {'id': 3, 'image_id': 3, 'category_id': 1, 'bbox': [1, 1, 8, 8], 'area': 64,
                             'iscrowd': 0}]}
    if masks:  # a polygon (the 10×5 box), a crowd RLE (left out), an uncompressed RLE (the 8×8 box)
        segmentations = ([[4, 2, 14, 2, 14, 7, 4, 7]], _rle_square(20, 40, 0, 20, 0, 40), _rle_square(32, 32, 1, 9, 1, 9))
        for ann, segmentation in zip(data['annotations'], segmentations):
            ann['segmentation'] = segmentation
    (root / 'annotations' / f'instances_{split}.json').write_text(json.dumps(data))


def test_coco_source_reads_boxes_and_categories(tmp_path):
    _write_coco(tmp_path)
    source = CocoDetectionSource(str(tmp_path), 'val', 64)
    assert source.classes == ['person', 'dog']  # ids 1, 18 → labels 0, 1
    first = source[1]  # image id 7 (ids sorted: 3, 7): 40×20 → scale 1.6; the crowd box is left out
    assert first['labels'].tolist() == [1]
    assert torch.allclose(first['boxes'], torch.tensor([[4 * 1.6, 2 * 1.6, 14 * 1.6, 7 * 1.6]]))
    assert first['image'].shape == (3, 64, 64)
    assert torch.allclose(source[0]['boxes'], torch.tensor([[2., 2., 18., 18.]]))  # 32 px → 64: ×2
    with pytest.raises(UsageError, match='instances_train.json'):
        CocoDetectionSource(str(tmp_path), 'train', 64)


def test_coco_source_decodes_polygon_and_rle_masks_and_letterboxes_them(tmp_path):
    _write_coco(tmp_path, masks=True)
    source = CocoDetectionSource(str(tmp_path), 'val', 64)
    assert source.has_masks
    expected = torch.zeros(64, 64, dtype=torch.uint8)
    expected[2:18, 2:18] = 1  # the RLE's rows/columns 1..8 of a 32 px image, ×2
    assert torch.equal(source[0]['instances'], expected[None])
    polygon = source[1]['instances']  # 40×20 → ×1.6, padded below
    assert polygon.shape == (1, 64, 64) and polygon[0, 32:].sum() == 0
    assert abs(int(polygon.sum()) - 10 * 5 * 1.6 ** 2) <= 2 * (10 + 5) * 1.6 + 4  # the area, up to its boundary pixels
    flipped = DenseAugment(hflip=1.0)(source[0], np.random.default_rng(0))
    assert torch.equal(flipped['instances'], expected.flip(-1)[None])
    data = DenseDataset(source, 'detect', (0.5,) * 3, (0.5,) * 3)
    assert 'masks' not in data[0][1] and torch.equal(DenseDataset(source, 'detect', (0.5,) * 3, (0.5,) * 3,
                                                                  instance_masks=True)[0][1]['masks'], expected[None])


def test_coco_masks_on_some_annotations_only_is_a_one_line_error(tmp_path):
    _write_coco(tmp_path, masks=True)
    ann_file = tmp_path / 'annotations' / 'instances_val.json'
    data = json.loads(ann_file.read_text())
    del data['annotations'][2]['segmentation']
    ann_file.write_text(json.dumps(data))
    with pytest.raises(UsageError, match='1 of 2 non-crowd annotations have a segmentation'):
        CocoDetectionSource(str(tmp_path), 'val', 64)


def _write_segfolder(root, bad_value=None):
    (root / 'classes.txt').write_text('road\ncar\nsky\n')
    for sub in ('images', 'masks'):
        (root / 'val' / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((16, 32, 3), np.uint8)).save(root / 'val' / 'images' / 'x.jpg')
    mask = np.zeros((16, 32), np.uint8)
    mask[:, 16:] = 2
    mask[0, 0] = 255 if bad_value is None else bad_value
    Image.fromarray(mask).save(root / 'val' / 'masks' / 'x.png')


def test_segmentation_folder_reads_masks_with_the_ignore_index(tmp_path):
    _write_segfolder(tmp_path)
    source = SegmentationFolderSource(str(tmp_path), 'val', 64)
    assert source.classes == ['road', 'car', 'sky']
    mask = source[0]['mask']  # 32×16 → 64×32, padded below with the ignore label
    assert mask.shape == (64, 64)
    assert (mask[32:] == IGNORE_INDEX).all() and (mask[:32, 32:] == 2).all() and (mask[2:32, :32] == 0).all()
    assert (mask[:2, :2] == IGNORE_INDEX).all()  # the 255 pixel, doubled by the resize


def test_segmentation_folder_rejects_unknown_mask_values(tmp_path):
    _write_segfolder(tmp_path, bad_value=7)
    with pytest.raises(DataFailure, match='value 7 is neither a class id'):
        SegmentationFolderSource(str(tmp_path), 'val', 64)[0]
