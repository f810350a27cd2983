"""Dense ND (``--distill nd`` with ``--task detect|segment``): the pooled embeddings, the loss and the teacher's
class centres against loops written independently (NumPy, float64): cells averaged by hand, the paper's per-RoI
formula 1 − ⟨s, c/‖c‖⟩ / max(‖s‖, ‖t‖) summed and divided by the count, centres as per-class means."""
from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import vitkd  # noqa: F401  (registers the losses)
from vitkd.losses import Batch
from vitkd.dense.models import IGNORE_INDEX
from vitkd.losses import RunContext
from vitkd.losses._dense import DenseFeatures, create_dense_loss
from vitkd.losses.nd import box_embeddings, region_embeddings

G = torch.Generator().manual_seed(0)


def _cells_mean(level: np.ndarray, b: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """Mean of the cells [y0, y1) × [x0, x1) of image b, one by one."""
    cells = [level[b, :, y, x] for y in range(y0, y1) for x in range(x0, x1)]
    return sum(cells) / len(cells)


def test_box_embedding_of_a_box_on_whole_cells_is_the_mean_of_those_cells():
    level = torch.randn(2, 3, 4, 4, generator=G, dtype=torch.float64)
    stride = 8
    boxes = [torch.tensor([[0., 0., 16., 8.], [8., 8., 32., 32.]], dtype=torch.float64),
             torch.tensor([[24., 0., 32., 24.]], dtype=torch.float64)]
    got = box_embeddings(level, boxes, stride).numpy()
    lv = level.numpy()
    expected = [_cells_mean(lv, 0, 0, 0, 2, 1), _cells_mean(lv, 0, 1, 1, 4, 4), _cells_mean(lv, 1, 3, 0, 4, 3)]
    np.testing.assert_allclose(got, np.stack(expected), rtol=1e-12, atol=1e-14)


def test_region_embeddings_weight_each_cell_by_its_share_of_the_class():
    level = torch.randn(2, 3, 2, 2, generator=G, dtype=torch.float64)
    masks = torch.zeros(2, 4, 4, dtype=torch.int64)
    masks[0, :2, :3] = 2                 # class 2: all of cell (0, 0), half of cell (0, 1)
    masks[0, 3, 3] = IGNORE_INDEX        # unlabelled: no class gets it
    masks[1] = 1
    emb, labels, present = region_embeddings(level, masks, num_classes=3, ignore_index=IGNORE_INDEX)
    assert labels.tolist() == [0, 1, 2] * 2 and not emb[~present].any()  # every (image, class); absent ones zero
    emb, labels = emb[present], labels[present]
    lv, m = level.numpy(), masks.numpy()
    expected, expected_labels = [], []
    for b in range(2):
        for k in range(3):
            w = np.array([[(m[b, 2 * y:2 * y + 2, 2 * x:2 * x + 2] == k).mean() for x in range(2)] for y in range(2)])
            if w.sum() > 0:
                expected.append(sum(w[y, x] * lv[b, :, y, x] for y in range(2) for x in range(2)) / w.sum())
                expected_labels.append(k)
    assert labels.tolist() == expected_labels == [0, 2, 1]
    np.testing.assert_allclose(emb.numpy(), np.stack(expected), rtol=1e-12)


def _nd_by_hand(s: np.ndarray, t: np.ndarray, centers: np.ndarray, labels) -> float:
    total = 0.0
    for sv, tv, y in zip(s, t, labels):  # the official per-RoI loop
        e_c = centers[y] / np.linalg.norm(centers[y])
        total += 1 - sv @ e_c / max(np.linalg.norm(sv), np.linalg.norm(tv))
    return total / len(labels)


def _pyramid(channels: int, batch: int = 2) -> 'OrderedDict[str, torch.Tensor]':
    return OrderedDict((f's{s}', torch.randn(batch, channels, 32 // s, 32 // s, generator=G, dtype=torch.float64))
                       for s in (4, 8))


def _prepared(student, teacher, data, num_classes):
    loss = create_dense_loss('nd')
    loss.setup(student, teacher, None)
    loss.double()  # float64 adapters and centres
    model = SimpleNamespace(forward_pyramid=lambda x: _pyramid_of(x, teacher),
                            parameters=lambda: iter([torch.zeros(1)]))
    run = RunContext(cfg=SimpleNamespace(batch_size=3), teacher=SimpleNamespace(model=model, prepare_input=lambda x: x),
                     spec=SimpleNamespace(num_classes=num_classes), train_data=data)
    loss.prepare_for_run(run)
    return loss


def _pyramid_of(images: torch.Tensor, like: DenseFeatures) -> 'OrderedDict[str, torch.Tensor]':
    """A deterministic 'teacher': each level is the image's mean value times a fixed random map."""
    return OrderedDict((k, images.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1) * v[:1].expand(len(images), -1, -1, -1))
                       for k, v in like.pyramid.items())


@pytest.mark.parametrize('task', ['detect', 'segment'])
def test_dense_nd_matches_the_per_region_formula_and_its_centres_the_class_means(task):
    student, teacher = DenseFeatures(_pyramid(5)), DenseFeatures(_pyramid(4))
    num_classes = 3
    images = torch.rand(5, 1, 32, 32, generator=G, dtype=torch.float64)
    if task == 'detect':
        targets = [{'boxes': torch.tensor([[0., 0., 16., 16.], [8., 8., 32., 24.]][:1 + i % 2], dtype=torch.float64),
                    'labels': torch.tensor([i % 3, (i + 1) % 3][:1 + i % 2])} for i in range(5)]
    else:
        targets = torch.randint(0, num_classes, (5, 32, 32), generator=G)
        targets[:, :4] = IGNORE_INDEX
    data = [(images[i], targets[i], i) for i in range(5)]
    loss = _prepared(student, teacher, data, num_classes)

    # the centres: per level, the class mean of the teacher's pooled embeddings over the 5 samples
    for k, stride in (('s4', 4), ('s8', 8)):
        level = _pyramid_of(images, teacher)[k]
        emb, labels = _pooled(level, targets, stride, num_classes, task)
        for c in range(num_classes):
            np.testing.assert_allclose(loss.centers(k)[c].numpy(), emb[labels == c].mean(axis=0), rtol=1e-10)

    # the loss on a batch of the first 2 samples, through the adapters (student width 5, teacher 4)
    batch = Batch(images=images[:2], targets=targets[:2])
    teacher_batch = DenseFeatures(OrderedDict((k, v[:2]) for k, v in teacher.pyramid.items()))
    got = loss(student, teacher_batch, batch)['nd'].item()
    expected = []
    for k, stride in (('s4', 4), ('s8', 8)):
        s, labels = _pooled(student.pyramid[k], targets[:2], stride, num_classes, task)
        t, _ = _pooled(teacher_batch.pyramid[k], targets[:2], stride, num_classes, task)
        weight, bias = (p.detach().numpy() for p in loss.adapters[k].parameters())
        expected.append(_nd_by_hand(s @ weight.T + bias, t, loss.centers(k).numpy(), labels))
    assert got == pytest.approx(np.mean(expected), rel=1e-12)


def _pooled(level: torch.Tensor, targets, stride: int, num_classes: int, task: str):
    """Per-region embeddings by hand: the mean of the whole cells inside each (cell-aligned) box, or each class's
    pixel-weighted cells."""
    lv = level.numpy()
    out, labels = [], []
    if task == 'detect':
        for b, t in enumerate(targets):
            for (x0, y0, x1, y1), y in zip(t['boxes'].tolist(), t['labels'].tolist()):
                out.append(_cells_mean(lv, b, *(int(v) // stride for v in (x0, y0, x1, y1))))
                labels.append(y)
    else:
        m = targets.numpy()
        h = lv.shape[-1]
        for b in range(len(m)):
            for c in range(num_classes):
                w = np.array([[(m[b, stride * y:stride * (y + 1), stride * x:stride * (x + 1)] == c).mean()
                               for x in range(h)] for y in range(h)])
                if w.sum() > 0:
                    out.append((lv[b] * w).sum(axis=(1, 2)) / w.sum())
                    labels.append(c)
    return np.stack(out), np.array(labels)


def test_dense_nd_without_centres_is_one_line_error():
    from vitkd.errors import UsageError
    student, teacher = DenseFeatures(_pyramid(4)), DenseFeatures(_pyramid(4))
    loss = create_dense_loss('nd')
    loss.setup(student, teacher, None)
    assert not loss.adapters  # same widths: the identity, as in the paper's detectors
    with pytest.raises(UsageError, match='class centres'):
        loss(student, teacher, Batch(images=torch.zeros(2, 1, 32, 32), targets=torch.zeros(2, 32, 32)))
