"""Dense metrics: mIoU against a hand computation; COCO box AP on cases with a known answer."""
import pytest
import torch

from vitkd.dense.metrics import coco_box_ap, confusion_matrix, iou_from_confusion

CLASSES = ['bg', 'a', 'b']


def test_miou_matches_a_hand_computation():
    labels = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    preds = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    # labelled pixels (label, prediction): (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) (1,2); the 255 pixel is skipped
    # class 0: TP 1, FP 1 (the 2 predicted 0), FN 1 (the 0 predicted 1)   -> 1/3
    # class 1: TP 2, FP 1 (the 0 predicted 1), FN 1 (the 1 predicted 2)   -> 2/4
    # class 2: TP 1, FP 1 (the 1 predicted 2), FN 1 (the 2 predicted 0)   -> 1/3
    confusion = confusion_matrix(preds, labels, 3, 255)
    assert int(confusion.sum()) == 7
    result = iou_from_confusion(confusion, CLASSES)
    assert result['iou'] == pytest.approx({'bg': 100 / 3, 'a': 50.0, 'b': 100 / 3})
    assert result['mIoU'] == pytest.approx((100 / 3 + 50 + 100 / 3) / 3)
    assert result['pixel_acc'] == pytest.approx(100 * 4 / 7)


def test_miou_skips_classes_absent_from_labels_and_predictions():
    labels = torch.tensor([0, 0, 1, 1])
    result = iou_from_confusion(confusion_matrix(labels.clone(), labels, 3, 255), CLASSES)
    assert result['iou']['b'] is None
    assert result['mIoU'] == pytest.approx(100.0)


def _gt():
    return [{'boxes': torch.tensor([[10., 10., 30., 30.], [40., 5., 60., 25.]]), 'labels': torch.tensor([0, 1])},
            {'boxes': torch.tensor([[0., 0., 20., 40.]]), 'labels': torch.tensor([1])}]


def test_perfect_detections_give_ap_100():
    dets = [dict(g, scores=torch.ones(len(g['labels']))) for g in _gt()]
    assert coco_box_ap(_gt(), dets, CLASSES[1:]) == pytest.approx({'mAP': 100.0, 'AP50': 100.0, 'AP75': 100.0})


def test_a_shifted_box_counts_only_at_thresholds_below_its_iou():
    """One 20×20 object, one detection shifted by 4 px along x: IoU = (16·20) / (2·20·20 − 16·20) = 2/3. COCO matches
    at IoU ≥ t for t in 0.50, 0.55, …, 0.95: four thresholds of ten (0.50 … 0.65) give precision 1 at recall 1, the
    other six give 0, so AP@[.5:.95] = 40, AP50 = 100, AP75 = 0."""
    gt = [{'boxes': torch.tensor([[10., 10., 30., 30.]]), 'labels': torch.tensor([0])}]
    det = [{'boxes': torch.tensor([[14., 10., 34., 30.]]), 'scores': torch.tensor([0.9]), 'labels': torch.tensor([0])}]
    inter = (30 - 14) * 20
    iou = inter / (2 * 20 * 20 - inter)
    thresholds = [0.5 + 0.05 * i for i in range(10)]
    matched = sum(iou >= t for t in thresholds)
    assert matched == 4
    assert coco_box_ap(gt, det, ['a']) == pytest.approx({'mAP': 100 * matched / 10, 'AP50': 100.0, 'AP75': 0.0})


def test_wrong_class_and_missing_detections():
    gt = _gt()
    wrong = [{'boxes': g['boxes'], 'scores': torch.ones(len(g['labels'])), 'labels': 1 - g['labels']} for g in gt]
    assert coco_box_ap(gt, wrong, CLASSES[1:])['mAP'] == 0.0
    empty = [{'boxes': torch.zeros(0, 4), 'scores': torch.zeros(0), 'labels': torch.zeros(0, dtype=torch.int64)}] * 2
    assert coco_box_ap(gt, empty, CLASSES[1:]) == {'mAP': 0.0, 'AP50': 0.0, 'AP75': 0.0}
