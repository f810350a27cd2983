"""Dense metrics: COCO box and mask AP (pycocotools) and mean IoU from a confusion matrix."""
from __future__ import annotations

import contextlib
import io
from typing import Sequence

import numpy as np
import torch

__all__ = ['confusion_matrix', 'iou_from_confusion', 'coco_box_ap', 'coco_mask_ap', 'encode_masks',
           'COCO_AP_NAMES']


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     ignore_index: int) -> torch.Tensor:
    """Counts [K, K] (row: true class, column: predicted) over the pixels whose label is not ``ignore_index``.

    Args:
        predictions: [...] predicted class per pixel.
        labels: [...] true class per pixel (``ignore_index`` = skip).
        num_classes: K.
        ignore_index: the label of unlabelled pixels.

    Returns:
        int64 [K, K] on the inputs' device (a ``bincount``: no host read).
    """
    valid = labels != ignore_index
    flat = torch.where(valid, labels * num_classes + predictions, torch.full_like(labels, num_classes * num_classes))
    counts = torch.bincount(flat.reshape(-1), minlength=num_classes * num_classes + 1)  # the last bin: skipped
    return counts[:num_classes * num_classes].reshape(num_classes, num_classes)


def iou_from_confusion(confusion: torch.Tensor, class_names: Sequence[str]) -> dict:
    """Per-class IoU = TP / (TP + FP + FN), its mean over the classes that occur (in the labels or the predictions),
    and pixel accuracy, in percent.

    Returns:
        ``{'mIoU', 'pixel_acc', 'iou': {name: IoU or None for a class absent from labels and predictions}}``.
    """
    c = confusion.double().cpu()
    tp = c.diag()
    union = c.sum(0) + c.sum(1) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.zeros_like(tp))
    per_class = {name: (100 * float(v) if p else None) for name, v, p in zip(class_names, iou, present)}
    return {'mIoU': 100 * float(iou[present].mean()) if present.any() else 0.0,
            'pixel_acc': 100 * float(tp.sum() / c.sum().clamp(min=1)), 'iou': per_class}


COCO_AP_NAMES = ('mAP', 'AP50', 'AP75')  # COCOeval.stats[0:3]: AP@[.5:.95], AP@.5, AP@.75 over all areas


def coco_box_ap(ground_truth: Sequence[dict], detections: Sequence[dict], class_names: Sequence[str]) -> dict:
    """COCO box AP of ``detections`` against ``ground_truth``, by pycocotools' COCOeval (100 detections per image).

    Args:
        ground_truth: per image ``{'boxes': [n, 4] xyxy, 'labels': [n]}`` (labels 0..K−1).
        detections: per image ``{'boxes': [d, 4] xyxy, 'scores': [d], 'labels': [d]}``, same order.
        class_names: the K class names.

    Returns:
        ``{'mAP', 'AP50', 'AP75'}`` in percent (0 when there is nothing to detect or nothing detected).
    """
    return _coco_ap(ground_truth, detections, class_names, 'bbox')


def coco_mask_ap(ground_truth: Sequence[dict], detections: Sequence[dict], class_names: Sequence[str]) -> dict:
    """COCO mask AP (COCOeval's ``segm``: the IoU of two instances is that of their masks, RLE-encoded here).

    Args:
        ground_truth: per image ``{'boxes', 'labels', 'masks'}``: masks as :func:`encode_masks` takes them.
        detections: per image ``{'boxes', 'scores', 'labels', 'masks'}``, the same.
        class_names: the K class names.

    Returns:
        ``{'mask_mAP', 'mask_AP50', 'mask_AP75'}`` in percent.
    """
    return {f'mask_{k}': v for k, v in _coco_ap(ground_truth, detections, class_names, 'segm').items()}


def encode_masks(masks) -> list[dict]:
    """Instance masks [n, H, W] or [n, 1, H, W] — binary, or probabilities thresholded at 0.5 (torchvision's Mask
    R-CNN output) — as n COCO RLEs (pycocotools' encoder wants Fortran order); a list of RLEs is returned as is."""
    from pycocotools import mask as mask_utils
    if isinstance(masks, list):
        return masks
    m = np.asarray(masks, dtype=np.float64)
    if m.size == 0:
        return []
    binary = (m.reshape(-1, *m.shape[-2:]) >= 0.5).astype(np.uint8)
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    for rle in rles:
        rle['counts'] = rle['counts'].decode('ascii')
    return rles


def _coco_ap(ground_truth: Sequence[dict], detections: Sequence[dict], class_names: Sequence[str],
             iou_type: str) -> dict:
    """pycocotools' COCOeval of ``iou_type`` ('bbox' or 'segm') over the images in order: stats[0:3] in percent."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    images, annotations, results = [], [], []
    segm = iou_type == 'segm'
    for image_id, (gt, det) in enumerate(zip(ground_truth, detections), start=1):
        images.append({'id': image_id})
        gt_boxes = np.asarray(gt['boxes'], dtype=np.float64).reshape(-1, 4)
        gt_masks = encode_masks(gt['masks']) if segm else [None] * len(gt_boxes)
        for box, label, mask in zip(gt_boxes, np.asarray(gt['labels']), gt_masks):
            w, h = box[2] - box[0], box[3] - box[1]
            annotation = {'id': len(annotations) + 1, 'image_id': image_id, 'category_id': int(label) + 1,
                          'bbox': [float(box[0]), float(box[1]), float(w), float(h)], 'area': float(w * h),
                          'iscrowd': 0}
            if segm:  # the area COCOeval sorts instances into small / medium / large by: the mask's
                annotation.update(segmentation=mask, area=float(mask_utils.area(mask)))
            annotations.append(annotation)
        det_boxes = np.asarray(det['boxes'], dtype=np.float64).reshape(-1, 4)
        det_masks = encode_masks(det['masks']) if segm else [None] * len(det_boxes)
        sizes = [m['size'] for m in (*gt_masks, *det_masks) if m]
        if sizes:  # segm matching decodes each RLE at its image's size
            images[-1].update(height=sizes[0][0], width=sizes[0][1])
        for box, score, label, mask in zip(det_boxes, np.asarray(det['scores']), np.asarray(det['labels']),
                                           det_masks):
            result = {'image_id': image_id, 'category_id': int(label) + 1, 'score': float(score)}
            if segm:
                result['segmentation'] = mask
            else:
                result['bbox'] = [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]
            results.append(result)
    if not annotations or not results:
        return {name: 0.0 for name in COCO_AP_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and the table
        coco_gt = COCO()
        coco_gt.dataset = {'images': images, 'annotations': annotations,
                           'categories': [{'id': k + 1, 'name': n} for k, n in enumerate(class_names)]}
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: 100 * max(0.0, float(v)) for name, v in zip(COCO_AP_NAMES, evaluator.stats[:3])}
