"""Dense models: the ViT simple feature pyramid and the CNN pyramid (strides, channels), the heads, the export round
trip through the run's own loaders, and the distiller's checks of teacher and methods."""
import pytest
import timm
import torch

from vitkd.export import export_model, load_student
from vitkd.config import Config
from vitkd.dense.distiller import DenseDistiller
from vitkd.dense.models import DenseDetector, DenseSegmenter
from vitkd.distiller import LossEntry
from vitkd.errors import UsageError
from vitkd.losses._dense import create_dense_loss
from vitkd.models import create_teacher

VIT = dict(patch_size=8, depth=1, embed_dim=48, num_heads=3)
DATA_CONFIG = dict(input_size=(1, 64, 64), mean=(0.3,), std=(0.4,), crop_pct=1.0, interpolation='bilinear')


def _segmenter(**kwargs):
    torch.manual_seed(0)
    args = dict(backbone='deit_ti_distilled', num_classes=5, in_chans=1, img_size=64, strides=[2, 4, 8, 16],
                backbone_kwargs=VIT)
    return timm.create_model('vitkd_dense_segmenter', **{**args, **kwargs})


def test_vit_pyramid_spans_a_quarter_to_twice_the_patch_stride():
    model = _segmenter(pyramid_channels=32)
    pyramid = model.forward_pyramid(torch.randn(2, 1, 64, 64))
    assert {k: tuple(v.shape) for k, v in pyramid.items()} == {
        's2': (2, 32, 32, 32), 's4': (2, 32, 16, 16), 's8': (2, 32, 8, 8), 's16': (2, 32, 4, 4)}
    assert model.pyramid.out_channels == 32
    assert model.forward_head(pyramid).shape == (2, 5, 32, 32)  # logits at the finest stride
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 5, 64, 64)  # upsampled to the input
    with pytest.raises(UsageError, match='a ViT pyramid makes strides 2, 4, 8, 16'):
        _segmenter(strides=[8, 32])
    with pytest.raises(UsageError, match='distinct increasing'):
        _segmenter(strides=[16, 8])


def test_the_pyramid_map_is_the_vits_final_normed_patch_grid():
    """The stride-p level is Conv1×1 → LN → Conv3×3 → LN of the last block's normed tokens laid out as a map."""
    model = _segmenter(strides=[8]).eval()
    x = torch.randn(1, 1, 64, 64)
    vit = model.pyramid.vit
    tokens = vit.forward_features(x)[:, vit.num_prefix_tokens:]  # [1, 64, 48] after the final norm
    grid = tokens.transpose(1, 2).reshape(1, 48, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model.forward_pyramid(x)['s8'], model.pyramid.pyramid.levels['s8'](grid), atol=1e-6)


def test_cnn_pyramid_takes_the_stages_at_the_strides():
    torch.manual_seed(0)
    model = timm.create_model('vitkd_dense_detector', backbone='test_resnet', num_classes=3, in_chans=1, img_size=64,
                              strides=[4, 8, 16], pyramid_channels=32)
    pyramid = model.forward_pyramid(torch.randn(2, 1, 64, 64))
    assert [tuple(v.shape[1:]) for v in pyramid.values()] == [(32, 16, 16), (32, 8, 8), (32, 4, 4)]
    with pytest.raises(UsageError, match='FCOS.s head normalises in 32 groups'):
        timm.create_model('vitkd_dense_detector', backbone='test_resnet', num_classes=3, strides=[4],
                          pyramid_channels=48)
    with pytest.raises(UsageError, match=r'strides \[2, 4, 8, 16, 32\], not \[64\]'):
        timm.create_model('vitkd_dense_detector', backbone='test_resnet', num_classes=3, in_chans=1, img_size=64,
                          strides=[64])


def test_detector_losses_and_detections():
    torch.manual_seed(0)
    model = timm.create_model('vitkd_dense_detector', backbone='deit_ti_distilled', num_classes=3, in_chans=1,
                              img_size=64, strides=[4, 8, 16], backbone_kwargs=VIT)
    images = torch.randn(2, 1, 64, 64)
    targets = [{'boxes': torch.tensor([[4., 4., 30., 30.]]), 'labels': torch.tensor([2])},
               {'boxes': torch.zeros(0, 4), 'labels': torch.zeros(0, dtype=torch.int64)}]  # an image without objects
    pyramid = model.forward_pyramid(images)
    losses = model.task_loss(model.forward_head(pyramid), pyramid, images, targets)
    assert set(losses) == {'classification', 'bbox_regression', 'bbox_ctrness'}
    sum(losses.values()).backward()
    assert model.pyramid.vit.patch_embed.proj.weight.grad.abs().sum() > 0  # the loss reaches the ViT
    model.eval()
    detections = model(images)
    assert len(detections) == 2 and set(detections[0]) == {'boxes', 'scores', 'labels'}
    assert (detections[0]['labels'] < 3).all()


@pytest.mark.parametrize('task', ['segment', 'detect'])
def test_export_round_trip_through_the_run_loaders(tmp_path, task):
    """The run's export (timm's save_for_hf) rebuilds the whole dense model through load_student and
    create_teacher, with identical outputs."""
    if task == 'segment':
        model = _segmenter().eval()
    else:
        torch.manual_seed(0)
        model = timm.create_model('vitkd_dense_detector', backbone='test_resnet', num_classes=3, in_chans=1,
                                  img_size=64, strides=[4, 8, 16]).eval()
    export_model(model, tmp_path / 'export', DATA_CONFIG, ['a', 'b', 'c', 'd', 'e'][:model.num_classes])
    loaded, pretrained_cfg, _ = load_student(str(tmp_path / 'export'), Config())
    teacher = create_teacher(str(tmp_path / 'export'), model.num_classes)
    assert type(loaded) is type(model) and type(teacher.model) is type(model)
    assert tuple(pretrained_cfg['mean']) == (0.3,) and tuple(pretrained_cfg['input_size']) == (1, 64, 64)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        expected, got, via_teacher = model(x), loaded.eval()(x), teacher.model(x.contiguous())
    if task == 'segment':
        assert torch.equal(expected, got) and torch.allclose(expected, via_teacher, atol=1e-5)
    else:
        assert all(torch.equal(a[k], b[k]) for a, b in zip(expected, got) for k in a)


def test_distiller_checks_teacher_task_and_methods():
    student = _segmenter(strides=[4, 8, 16])
    torch.manual_seed(1)
    detector_teacher = create_teacher('vitkd_dense_detector', 5, pretrained=False, backbone='test_resnet', in_chans=1,
                                      img_size=64, strides=[4, 8, 16])
    with pytest.raises(UsageError, match='a teacher of the same task'):
        DenseDistiller(student, detector_teacher, [LossEntry(create_dense_loss('vkd'))], (1, 64, 64))
    detector = timm.create_model('vitkd_dense_detector', backbone='test_resnet', num_classes=5, in_chans=1,
                                 img_size=64, strides=[4, 8, 16])
    with pytest.raises(UsageError, match="'kd' compares per-pixel class distributions: --task segment only"):
        DenseDistiller(detector, detector_teacher, [LossEntry(create_dense_loss('kd'))], (1, 64, 64))
    with pytest.raises(UsageError, match="'fitnet' needs a teacher"):
        DenseDistiller(student, None, [LossEntry(create_dense_loss('fitnet'))], (1, 64, 64))


def test_distiller_step_trains_student_and_projectors_not_the_teacher():
    student = _segmenter(strides=[4, 8, 16])
    torch.manual_seed(1)
    teacher = create_teacher('vitkd_dense_segmenter', 5, pretrained=False, backbone='test_resnet', in_chans=1,
                             img_size=64, strides=[8, 16])
    entries = [LossEntry(create_dense_loss('vkd')), LossEntry(create_dense_loss('kd'), 0.5),
               LossEntry(create_dense_loss('dist'))]
    distiller = DenseDistiller(student, teacher, entries, (1, 64, 64))
    assert list(distiller.losses['vkd'].projectors) == ['s8', 's16']  # the teacher has no stride-4 level
    from vitkd.losses import Batch
    batch = Batch(images=torch.randn(2, 1, 64, 64), targets=torch.randint(0, 5, (2, 64, 64)))
    out = distiller(batch)
    assert set(out['terms']) == {'task.ce', 'vkd.repr', 'kd.kl', 'dist.inter', 'dist.intra'}
    expected = (out['terms']['task.ce'] + out['terms']['vkd.repr'] + 0.5 * out['terms']['kd.kl']
                + out['terms']['dist.inter'] + out['terms']['dist.intra'])
    assert out['loss'].item() == pytest.approx(expected.item(), rel=1e-6)
    out['loss'].backward()
    assert all(p.grad is None for p in teacher.model.parameters())
    assert all(p.grad is not None for p in distiller.losses.parameters())
    assert 'student.pyramid.vit.pos_embed' in distiller.no_weight_decay()
    assert any('.parametrizations.' in n for n in distiller.no_weight_decay())
