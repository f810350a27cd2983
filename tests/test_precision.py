"""Losses compute in at least fp32 and never cast down: float64 inputs give float64 terms equal to the fp32 path.

Every registered method is run twice on the same batch, once with the student, teacher and loss in fp32 and once
with all of them (and the images) in float64, on the loss directly (the distiller's own fp32 hand-off is not what is
tested here). Each term must come out float64 and agree with the fp32 value to fp32 rounding. Methods whose test
files hold an independent float64 reference (DKD, DIST, KD) also check the float64 path against it to ~1e-12 there.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import vitkd
from vitkd.distiller import Distiller, LossEntry
from vitkd.features import Features, extract
from vitkd.losses import LOSS_REGISTRY, RunInfo, create_loss
from vitkd.losses.base import Batch
from vitkd.losses.functional import at_least_fp32

NUM_CLASSES = 10
STUDENT = dict(img_size=32, patch_size=4, depth=2, embed_dim=48, num_heads=2)
EPOCH = {'ft': 31.5}  # past FT's paraphraser stage, so its student term is computed


def test_at_least_fp32_promotes_narrow_floats_and_keeps_wide_ones():
    for dtype in (torch.float16, torch.bfloat16):
        assert at_least_fp32(torch.ones(2, dtype=dtype)).dtype == torch.float32
    for dtype in (torch.float32, torch.float64):
        t = torch.ones(2, dtype=dtype)
        assert at_least_fp32(t) is t  # no copy, no cast


def _loss_terms(distiller: Distiller, loss, x: torch.Tensor, seed: int, epoch: float) -> dict[str, torch.Tensor]:
    """The loss's terms on ``x``, with the features handed over in the models' own dtype (no distiller cast)."""
    teacher = distiller.teacher

    def teacher_forward(images):
        return extract(teacher.model, teacher.prepare_input(images), distiller.teacher_spec, 'teacher',
                       only_requested=True).apply(lambda t: t.contiguous())

    labels = torch.arange(x.shape[0]) % NUM_CLASSES
    targets = F.one_hot(labels, NUM_CLASSES).to(x.dtype)
    if loss.needs_input_grad:
        x = x.detach().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout masks, negatives and attack classes in both precisions
    student = distiller.student_features(x)
    with torch.no_grad():
        teacher_feats = teacher_forward(x) if loss.needs_teacher else Features()
    batch = Batch(images=x, targets=targets, labels=labels, labels_b=labels.flip(0), lam=0.7,
                  index=torch.arange(x.shape[0]), progress=epoch, step=0,
                  student_forward=distiller.student_features, teacher_forward=teacher_forward)
    return loss(student, teacher_feats, batch)


@pytest.mark.parametrize('name', sorted(LOSS_REGISTRY))
def test_float64_inputs_give_float64_terms_equal_to_the_fp32_path(name):
    torch.manual_seed(0)
    student = vitkd.create_student('deit_ti_distilled', NUM_CLASSES, **STUDENT)
    teacher = vitkd.create_teacher('resnet18', NUM_CLASSES, pretrained=False)
    info = RunInfo(num_classes=NUM_CLASSES, num_samples=64, epochs=4, steps_per_epoch=4, input_size=(3, 32, 32),
                   student_name='deit_ti_distilled', student_kwargs=STUDENT)
    loss = create_loss(name)
    distiller = Distiller(student, teacher, [LossEntry(loss)], info)
    if hasattr(loss, 'set_centers'):  # ND: random but valid class centres instead of a pass over data
        width = distiller.teacher_features(torch.zeros(2, 3, 32, 32)).pooled.shape[-1]
        loss.set_centers(torch.randn(NUM_CLASSES, width) + 0.5)
    distiller.train()
    wide = copy.deepcopy(distiller).double()
    wide.teacher.double()  # not a submodule of the distiller
    x = torch.randn(8, 3, 32, 32)
    epoch = EPOCH.get(name, 1.5)
    terms32 = _loss_terms(distiller, distiller.losses[name], x, seed=1, epoch=epoch)
    terms64 = _loss_terms(wide, wide.losses[name], x.double(), seed=1, epoch=epoch)
    assert (bool(terms32) or name == 'none') and terms32.keys() == terms64.keys()  # 'none' adds no term
    for term, value in terms64.items():
        assert value.dtype == torch.float64, f'{name}.{term} came out {value.dtype}'
        assert terms32[term].dtype == torch.float32, f'{name}.{term} came out {terms32[term].dtype}'
        ref = value.item()
        assert terms32[term].item() == pytest.approx(ref, rel=2e-4, abs=1e-5 * max(1.0, abs(ref))), f'{name}.{term}'
