"""Dense data: scenes of Fashion-MNIST items (the embedded default), COCO detection files, segmentation folders;
augmentation that moves boxes and masks with the image; the batches of a dense run.

Every source gives raw samples at the model's square input size S: an image [C, S, S] float in [0, 1], boxes
[n, 4] (x1, y1, x2, y2 in pixels), labels [n] int64 in 0..K−1 and a mask [S, S] int64 (class per pixel,
:data:`~vitkd.dense.models.IGNORE_INDEX` where unlabelled). A :class:`DenseDataset` then augments (training),
normalises and hands the loader ``(image, target, index)``, the target being ``{'boxes', 'labels'}`` (detection) or
the mask (segmentation).

Determinism: the embedded scenes are a function of their index alone, and the training augmentation of a sample is
drawn from the per-sample seed of :class:`vitkd.data.EpochSampler` (a ``numpy`` generator, no global state): a run
resumed mid-epoch, or sharded over N processes, sees the same samples with the same augmentations.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from ..data import FASHION_MNIST_CLASSES, DataError, _fashion_mnist
from ..errors import DataFailure
from .models import IGNORE_INDEX

__all__ = ['FashionScenes', 'CocoDetectionSource', 'SegmentationFolderSource', 'DenseAugment', 'DenseDataset',
           'collate_dense', 'letterbox', 'segmentation_classes', 'SCENE_COUNTS']

SCENE_COUNTS = {'train': 6000, 'val': 500}  # embedded scenes per split (built from the 60k / 10k items)
ITEM_THRESHOLD = 32  # an item's pixel (0..255) belongs to its mask from this grey level on
BACKGROUND = 'background'


def _boxes_of(labels: Sequence[int], boxes: Sequence[Sequence[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(boxes, dtype=torch.get_default_dtype()).reshape(-1, 4),
            torch.tensor(labels, dtype=torch.int64).reshape(-1))


class FashionScenes(Dataset):
    """Scenes of 1–``max_objects`` Fashion-MNIST items pasted on a black S×S canvas, known exactly.

    Scene i is drawn from ``numpy.random.default_rng((salt, i))``: which items, their sizes (``size_range`` pixels,
    square) and places (an item overlapping an earlier one by more than IoU 0.3 is placed again, up to 20 tries, then
    left out). Boxes are the tight boxes of each item's pixels (grey level ≥ 32) on the canvas, amodal (an item keeps
    its whole box where a later one covers part of it); the mask gives each pixel the class of the last item covering
    it, as 1 + its Fashion-MNIST class (0 = background). Detection classes are the 10 Fashion-MNIST ones (0..9),
    segmentation classes background + those 10.

    Args:
        split: ``train`` (items of the 60k training images) or ``val`` (the 10k test images).
        size: S.
        data_path: a folder with the Fashion-MNIST IDX files (default: Debian's copy).
        num_scenes: scenes in the split (default :data:`SCENE_COUNTS`).
    """

    def __init__(self, split: str, size: int = 64, data_path: Optional[str] = None, num_scenes: Optional[int] = None,
                 max_objects: int = 3, size_range: tuple[int, int] = (18, 34)):
        items = _fashion_mnist(data_path, split == 'train')
        self.items, self.item_labels = items.images, np.asarray(items.targets)
        self.size, self.max_objects, self.size_range = size, max_objects, size_range
        if size < size_range[1]:
            raise DataError(f'--input-size {size}: the embedded scenes need at least {size_range[1]} px (items are '
                            f'{size_range[0]}–{size_range[1]} px)')
        self.salt = 0 if split == 'train' else 1
        self.num_scenes = num_scenes or SCENE_COUNTS[split]
        self.classes = list(FASHION_MNIST_CLASSES)
        self.channels = 1

    def __len__(self) -> int:
        return self.num_scenes

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng((self.salt, int(index)))
        s = self.size
        canvas = np.zeros((s, s), dtype=np.uint8)
        mask = np.zeros((s, s), dtype=np.int64)
        boxes, labels = [], []
        for _ in range(int(rng.integers(1, self.max_objects + 1))):
            item = int(rng.integers(len(self.items)))
            side = int(rng.integers(self.size_range[0], self.size_range[1] + 1))
            pixels = np.asarray(Image.fromarray(self.items[item]).resize((side, side), Image.BILINEAR))
            ys, xs = np.nonzero(pixels >= ITEM_THRESHOLD)
            if len(ys) == 0:
                continue
            for _ in range(20):
                x0, y0 = int(rng.integers(0, s - side + 1)), int(rng.integers(0, s - side + 1))
                box = [x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1]
                if all(_iou(box, other) <= 0.3 for other in boxes):
                    break
            else:
                continue
            window = canvas[y0:y0 + side, x0:x0 + side]
            np.maximum(window, pixels, out=window)
            mask[y0:y0 + side, x0:x0 + side][pixels >= ITEM_THRESHOLD] = 1 + int(self.item_labels[item])
            boxes.append([float(v) for v in box])
            labels.append(int(self.item_labels[item]))
        image = _unit_scale(canvas).unsqueeze(0)  # [1, S, S]
        box_tensor, label_tensor = _boxes_of(labels, boxes)
        return dict(image=image, boxes=box_tensor, labels=label_tensor, mask=torch.from_numpy(mask))


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def letterbox(image: torch.Tensor, size: int, mask: Optional[torch.Tensor] = None,
              boxes: Optional[torch.Tensor] = None):
    """Resize the longer side to ``size`` (aspect kept; bilinear image, nearest mask), pad right/bottom to a square.

    Args:
        image: [C, H, W] float.
        size: S.
        mask: [H, W] int64 or None; padded with the ignore index.
        boxes: [n, 4] xyxy or None; scaled with the image.

    Returns:
        (image [C, S, S] zero-padded, mask [S, S] or None, boxes [n, 4] or None).
    """
    _, h, w = image.shape
    nh, nw = _letterboxed_size(h, w, size)
    out = image.new_zeros((image.shape[0], size, size))
    out[:, :nh, :nw] = F.interpolate(image[None], size=(nh, nw), mode='bilinear', align_corners=False)[0]
    out_mask = None
    if mask is not None:
        out_mask = torch.full((size, size), IGNORE_INDEX, dtype=torch.int64)
        out_mask[:nh, :nw] = F.interpolate(mask[None, None].float(), size=(nh, nw), mode='nearest')[0, 0].long()
    out_boxes = None
    if boxes is not None:
        out_boxes = boxes * torch.tensor([nw / w, nh / h, nw / w, nh / h])
    return out, out_mask, out_boxes


def _letterboxed_size(h: int, w: int, size: int) -> tuple[int, int]:
    scale = size / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def letterbox_instances(instances: torch.Tensor, size: int) -> torch.Tensor:
    """Binary instance masks [n, H, W] uint8 letterboxed as :func:`letterbox` does their image (nearest, zero
    padding right and bottom) → [n, S, S]."""
    n, h, w = instances.shape
    nh, nw = _letterboxed_size(h, w, size)
    out = instances.new_zeros((n, size, size))
    if n:
        out[:, :nh, :nw] = F.interpolate(instances[None].float(), size=(nh, nw), mode='nearest')[0].to(out.dtype)
    return out


def _read_image(path: Path, channels: int) -> torch.Tensor:
    try:
        with Image.open(path) as img:
            img = img.convert('L' if channels == 1 else 'RGB')
            array = np.asarray(img, dtype=np.uint8)
    except (OSError, SyntaxError) as e:
        raise DataFailure(f'unreadable image {path} ({e})') from None
    tensor = _unit_scale(array.copy())
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)


def _unit_scale(array: np.ndarray) -> torch.Tensor:
    """uint8 pixels → [0, 1] in torch's default float dtype, as torchvision's ``ToTensor`` (a float64 run, such as
    the tests that compare process counts, gets float64 images)."""
    return torch.from_numpy(array).to(torch.get_default_dtype()).div(255)


class CocoDetectionSource(Dataset):
    """A COCO-format detection set: ``<root>/annotations/instances_<split>.json`` and the images under
    ``<root>/<split>/`` (each image's ``file_name`` relative to it), read with pycocotools.

    Categories become contiguous labels 0..K−1 in the order of their ids (names kept for the metrics). Crowd
    annotations (``iscrowd`` 1) and boxes without area are left out. Images are letterboxed to S (boxes scaled alike).
    Every image of the file is a sample, with or without objects. When every kept annotation has a ``segmentation``
    (polygons or RLE), each sample also has its instance masks (``instances`` [n, S, S] uint8, decoded by
    pycocotools' ``annToMask`` and letterboxed with the image): the validation set's masks give mask AP for a model
    that predicts masks (:func:`vitkd.dense.metrics.coco_mask_ap`).
    """

    def __init__(self, root: str, split: str, size: int, channels: int = 3):
        from pycocotools.coco import COCO
        ann_file = Path(root) / 'annotations' / f'instances_{split}.json'
        if not ann_file.is_file():
            raise DataError(f'--data-path {root}: no {ann_file} (a COCO data set needs '
                            'annotations/instances_train.json and instances_val.json, images under train/ and val/)')
        try:
            self.coco = _quiet_coco(COCO, ann_file)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(f'{ann_file} is not a COCO annotation file ({type(e).__name__}: {e})') from None
        self.image_dir, self.size, self.channels = Path(root) / split, size, channels
        self.image_ids = sorted(self.coco.getImgIds())
        self.category_ids = sorted(self.coco.getCatIds())
        self.label_of = {c: i for i, c in enumerate(self.category_ids)}
        self.classes = [self.coco.loadCats(c)[0]['name'] for c in self.category_ids]
        if not self.image_ids or not self.category_ids:
            raise DataError(f'{ann_file} has {len(self.image_ids)} images and {len(self.category_ids)} categories; '
                            'both must be > 0')
        kept = self.coco.loadAnns(self.coco.getAnnIds(iscrowd=False))
        with_masks = sum(bool(a.get('segmentation')) for a in kept)
        if 0 < with_masks < len(kept):
            raise DataError(f'{ann_file}: {with_masks} of {len(kept)} non-crowd annotations have a segmentation; '
                            'give every one a polygon or RLE, or none')
        self.has_masks = with_masks > 0

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict:
        info = self.coco.loadImgs(self.image_ids[index])[0]
        image = _read_image(self.image_dir / info['file_name'], self.channels)
        boxes, labels, instances = [], [], []
        for ann in self.coco.loadAnns(self.coco.getAnnIds(imgIds=info['id'], iscrowd=False)):
            x, y, w, h = ann['bbox']
            if w > 0 and h > 0:
                boxes.append([x, y, x + w, y + h])
                labels.append(self.label_of[ann['category_id']])
                if self.has_masks:
                    instances.append(self.coco.annToMask(ann))  # [height, width] uint8
        box_tensor, label_tensor = _boxes_of(labels, boxes)
        height, width = image.shape[-2:]
        image, _, box_tensor = letterbox(image, self.size, boxes=box_tensor)
        sample = dict(image=image, boxes=box_tensor, labels=label_tensor, mask=None)
        if self.has_masks:
            stacked = (torch.from_numpy(np.stack(instances)) if instances
                       else torch.zeros(0, height, width, dtype=torch.uint8))
            sample['instances'] = letterbox_instances(stacked, self.size)
        return sample


def _quiet_coco(coco_cls, ann_file: Path):
    """pycocotools' COCO prints progress lines while it indexes; a run's output keeps only its own."""
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        return coco_cls(str(ann_file))


IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')


class SegmentationFolderSource(Dataset):
    """A semantic segmentation folder (ADE20K / Cityscapes-like): ``<root>/<split>/images/<name>.<ext>`` with
    ``<root>/<split>/masks/<name>.png`` (one grey level = one class id, ``ignore_index`` = unlabelled) and
    ``<root>/classes.txt`` (one class name per line, line k = id k). Images and masks are letterboxed to S (the
    padding labelled ``ignore_index``); a mask value that is neither a class id nor ``ignore_index`` is an error.
    """

    def __init__(self, root: str, split: str, size: int, channels: int = 3, ignore_index: int = IGNORE_INDEX):
        root_path = Path(root)
        classes_file = root_path / 'classes.txt'
        if not classes_file.is_file():
            raise DataError(f'--data-path {root}: no classes.txt (a segmentation folder needs classes.txt, '
                            '<split>/images/ and <split>/masks/)')
        self.classes = [line.strip() for line in classes_file.read_text().splitlines() if line.strip()]
        image_dir, mask_dir = root_path / split / 'images', root_path / split / 'masks'
        if not image_dir.is_dir() or not mask_dir.is_dir():
            raise DataError(f'--data-path {root}: {split}/images/ and {split}/masks/ must both exist')
        self.images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        missing = [p.name for p in self.images if not (mask_dir / f'{p.stem}.png').is_file()]
        if missing or not self.images:
            raise DataError(f'{image_dir}: {len(self.images)} images, {len(missing)} without a mask in {mask_dir} '
                            f'(e.g. {", ".join(missing[:3])}); every image needs <name>.png there')
        self.mask_dir, self.size, self.channels, self.ignore_index = mask_dir, size, channels, ignore_index

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        path = self.images[index]
        image = _read_image(path, self.channels)
        mask_path = self.mask_dir / f'{path.stem}.png'
        mask = (_read_image(mask_path, 1)[0] * 255).round().long()  # [H, W] class ids
        bad = (mask >= len(self.classes)) & (mask != self.ignore_index)
        if bad.any():
            raise DataFailure(f'{mask_path}: value {int(mask[bad][0])} is neither a class id (0..'
                              f'{len(self.classes) - 1}, classes.txt) nor the ignore index {self.ignore_index}')
        if mask.shape != image.shape[-2:]:
            raise DataFailure(f'{mask_path} is {tuple(mask.shape)}, its image {tuple(image.shape[-2:])}')
        mask[mask == self.ignore_index] = IGNORE_INDEX
        image, mask, _ = letterbox(image, self.size, mask=mask)
        return dict(image=image, boxes=None, labels=None, mask=mask)


class DenseAugment:
    """Horizontal flip and scale jitter that move the boxes, the mask and the instance masks with the image.

    Scale jitter: the sample is resized by s ~ U(``scale_range``) (bilinear image, nearest mask, boxes ×s), then cut
    (s > 1) or padded (s < 1) back to S at a random offset: padding is black with the ignore label, boxes are shifted,
    clipped to the canvas and dropped when less than 2 px wide or high.

    Args:
        hflip: probability of a horizontal flip.
        scale_range: (low, high) of s; (1, 1) = no scale jitter.
    """

    def __init__(self, hflip: float = 0.5, scale_range: Sequence[float] = (1.0, 1.0)):
        self.hflip, self.scale_range = float(hflip), (float(scale_range[0]), float(scale_range[1]))

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        image, boxes, labels, mask = sample['image'], sample['boxes'], sample['labels'], sample['mask']
        instances = sample.get('instances')  # [n, S, S] uint8 or None
        size = image.shape[-1]
        if rng.random() < self.hflip:
            image = image.flip(-1)
            mask = mask.flip(-1) if mask is not None else None
            instances = instances.flip(-1) if instances is not None else None
            if boxes is not None:
                boxes = torch.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], dim=1)
        low, high = self.scale_range
        scale = float(rng.uniform(low, high)) if high > low else low
        if scale != 1.0:
            scaled = max(1, round(size * scale))
            image = F.interpolate(image[None], size=(scaled, scaled), mode='bilinear', align_corners=False)[0]
            if mask is not None:
                mask = F.interpolate(mask[None, None].float(), size=(scaled, scaled), mode='nearest')[0, 0].long()
            if instances is not None and len(instances):
                instances = F.interpolate(instances[None].float(), size=(scaled, scaled),
                                          mode='nearest')[0].to(torch.uint8)
            factor = scaled / size
            # offset of the S×S window in the scaled image (cut) or of the scaled image on the canvas (pad)
            offset_x, offset_y = (int(rng.integers(0, abs(scaled - size) + 1)) for _ in range(2))
            if scaled >= size:
                image = image[:, offset_y:offset_y + size, offset_x:offset_x + size]
                mask = mask[offset_y:offset_y + size, offset_x:offset_x + size] if mask is not None else None
                if instances is not None and len(instances):
                    instances = instances[:, offset_y:offset_y + size, offset_x:offset_x + size]
                shift = (-offset_x, -offset_y)
            else:
                canvas = image.new_zeros((image.shape[0], size, size))
                canvas[:, offset_y:offset_y + scaled, offset_x:offset_x + scaled] = image
                image = canvas
                if mask is not None:
                    padded = torch.full((size, size), IGNORE_INDEX, dtype=torch.int64)
                    padded[offset_y:offset_y + scaled, offset_x:offset_x + scaled] = mask
                    mask = padded
                if instances is not None and len(instances):
                    canvas = instances.new_zeros((len(instances), size, size))
                    canvas[:, offset_y:offset_y + scaled, offset_x:offset_x + scaled] = instances
                    instances = canvas
                shift = (offset_x, offset_y)
            if boxes is not None:
                boxes = boxes * factor + torch.tensor([shift[0], shift[1], shift[0], shift[1]], dtype=boxes.dtype)
                boxes = boxes.clamp(0, size)
                keep = ((boxes[:, 2] - boxes[:, 0]) >= 2) & ((boxes[:, 3] - boxes[:, 1]) >= 2)
                boxes, labels = boxes[keep], labels[keep]
                instances = instances[keep] if instances is not None else None
        augmented = dict(image=image, boxes=boxes, labels=labels, mask=mask)
        if instances is not None:
            augmented['instances'] = instances
        return augmented


class DenseDataset(Dataset):
    """A dense source as the loader consumes it: ``(normalised image [C, S, S], target, index)``.

    Keys are indices, or ``(index, sample_seed)`` pairs from :class:`vitkd.data.EpochSampler`: then ``augment`` runs
    with ``numpy.random.default_rng(sample_seed)``.

    Args:
        source: a :class:`FashionScenes`, :class:`CocoDetectionSource` or :class:`SegmentationFolderSource`.
        task: ``detect`` (target ``{'boxes', 'labels'}``, plus ``'masks'`` [n, S, S] uint8 with
            ``instance_masks`` and a source that has them) or ``segment`` (target: the mask [S, S]).
        mean, std: per-channel normalisation.
        augment: a :class:`DenseAugment` (training) or None.
        instance_masks: keep a COCO source's instance masks in the targets (evaluation: mask AP; the FCOS head does
            not train on them, so training leaves them out).
    """

    def __init__(self, source: Dataset, task: str, mean: Sequence[float], std: Sequence[float],
                 augment: Optional[DenseAugment] = None, instance_masks: bool = False):
        self.source, self.task, self.augment, self.instance_masks = source, task, augment, instance_masks
        self.mean = torch.tensor(mean).view(-1, 1, 1)  # the default float dtype, as the images
        self.std = torch.tensor(std).view(-1, 1, 1)
        self.classes = source.classes

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        sample = self.source[index]
        if self.augment is not None and seed is not None:
            sample = self.augment(sample, np.random.default_rng(seed))
        image = (sample['image'] - self.mean) / self.std
        if self.task == 'detect':
            target = {'boxes': sample['boxes'], 'labels': sample['labels']}
            if self.instance_masks and 'instances' in sample:
                target['masks'] = sample['instances']
        else:
            target = sample['mask']
        return image, target, index


def collate_dense(batch: list) -> tuple[torch.Tensor, object, torch.Tensor]:
    """Stack images [B, C, S, S] and indices [B]; masks stacked [B, S, S], box targets kept as a list of dicts."""
    images, targets, indices = zip(*batch)
    stacked = torch.stack(targets) if isinstance(targets[0], torch.Tensor) else list(targets)
    return torch.stack(images), stacked, torch.tensor(indices, dtype=torch.int64)


def segmentation_classes(source: Dataset) -> list[str]:
    """The segmentation classes of a source: the scenes' masks count background as class 0."""
    return [BACKGROUND, *source.classes] if isinstance(source, FashionScenes) else list(source.classes)
