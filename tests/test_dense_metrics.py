"""Dense metrics: mIoU against a hand computation; COCO box and mask AP on cases with a known answer."""
import pytest
import torch

from vitkd.dense.metrics import coco_box_ap, coco_mask_ap, confusion_matrix, encode_masks, iou_from_confusion

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


def _square(rows: slice, cols: slice, size: int = 32) -> torch.Tensor:
    m = torch.zeros(size, size, dtype=torch.uint8)
    m[rows, cols] = 1
    return m


def test_mask_ap_scores_by_mask_iou_not_box_iou():
    """One object, one detection with the exact box but a mask covering 72 of the object's 100 pixels (IoU 0.72):
    matched at the IoU thresholds .50 … .70 (5 of 10), so mask AP = 50, AP50 = 100, AP75 = 0; box AP stays 100."""
    gt = [{'boxes': torch.tensor([[0., 0., 10., 10.]]), 'labels': torch.tensor([0]),
           'masks': _square(slice(0, 10), slice(0, 10))[None]}]
    det = [{'boxes': torch.tensor([[0., 0., 10., 10.]]), 'labels': torch.tensor([0]), 'scores': torch.tensor([0.9]),
            'masks': _square(slice(0, 8), slice(0, 9))[None, None].float() * 0.8}]  # [d, 1, H, W] probabilities
    assert coco_mask_ap(gt, det, ['a']) == pytest.approx({'mask_mAP': 50.0, 'mask_AP50': 100.0, 'mask_AP75': 0.0})
    assert coco_box_ap(gt, det, ['a'])['mAP'] == pytest.approx(100.0)
    assert encode_masks(det[0]['masks'])[0] == encode_masks(_square(slice(0, 8), slice(0, 9))[None])[0]


def test_evaluate_dense_reports_mask_ap_for_a_model_that_predicts_masks(tmp_path):
    """The validation targets keep the COCO masks; a detector whose output has ``masks`` gets segm AP beside box AP
    (here it returns the ground truth, with one mask cut in half)."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from tests.test_dense_data import _write_coco
    from vitkd.dense.data import CocoDetectionSource, DenseDataset, collate_dense
    from vitkd.dense.models import DenseDetector
    from vitkd.dense.run import evaluate_dense
    _write_coco(tmp_path, 'val', masks=True)
    data = DenseDataset(CocoDetectionSource(str(tmp_path), 'val', 64), 'detect', (0.5,) * 3, (0.5,) * 3,
                        instance_masks=True)
    targets = [data[i][1] for i in range(len(data))]
    model = DenseDetector('test_resnet', 2, img_size=64, strides=(4, 8, 16), pyramid_channels=32)
    answers = [dict(t, scores=torch.ones(len(t['labels']))) for t in targets]
    answers[1]['masks'] = answers[1]['masks'].clone()
    answers[1]['masks'][0, :, :answers[1]['masks'].shape[-1] // 2] = 0
    calls = iter(answers)
    model.forward = lambda images: [next(calls)]
    metrics = evaluate_dense(model, DataLoader(data, 1, collate_fn=collate_dense), Accelerator(cpu=True),
                             ['person', 'dog'])
    assert metrics['mAP'] == pytest.approx(100.0)
    assert 0 < metrics['mask_mAP'] < 100.0
    model.forward = lambda images: [{k: v for k, v in a.items() if k != 'masks'} for a in answers[:len(images)]]
    assert 'mask_mAP' not in evaluate_dense(model, DataLoader(data, 2, collate_fn=collate_dense),
                                            Accelerator(cpu=True), ['person', 'dog'])
