"""Dense models: a timm backbone as a feature pyramid, under a detection or a semantic segmentation head.

Backbones:

* a ViT (any timm ``VisionTransformer``, vitkd's VkD students included): the final-normed patch tokens of the last
  block as one map at the patch stride p, turned into maps at strides p/4, p/2, p, 2p by deconvolutions and a
  max-pool — the *simple feature pyramid* of ViTDet (Li, Mao, Girshick, He, "Exploring Plain Vision Transformer
  Backbones for Object Detection", ECCV 2022): a plain, single-scale ViT needs no multi-scale body;
* a CNN (any timm model with ``features_only``): its stage maps at the requested strides, merged top-down by
  torchvision's ``FeaturePyramidNetwork``.

Either way the backbone returns an ordered dict ``{'s4': [B, C, H/4, W/4], 's8': …}`` and has ``out_channels``, the
interface torchvision's detectors expect.

Heads:

* detection: torchvision's FCOS (Tian, Shen, Chen, He, ICCV 2019) — its point anchors, its focal / GIoU / centerness
  losses and its NMS — called through its parts so that one pass gives both the pyramid (for the distillation losses)
  and the head outputs. Labels are 0..K−1 (FCOS's sigmoid classifier has no background column to reserve);
* segmentation: a light semantic FPN head (the semantic branch of Kirillov, Girshick, He, Dollár, "Panoptic Feature
  Pyramid Networks", CVPR 2019, with one conv per level): every level → conv 3×3 → upsampled to the finest level →
  summed → 1×1 classifier. Its logits stay at the finest stride (what the per-pixel distillation losses compare);
  the task loss and the predictions upsample them to the input size.

Both models are registered in timm (``vitkd_dense_detector``, ``vitkd_dense_segmenter``): timm records their
constructor arguments, so ``save_for_hf`` exports the whole dense model (config.json + model.safetensors) and
``timm.create_model('local-dir:<folder>', pretrained=True)`` rebuilds and loads it: the run's export, its evaluation
and the teacher loader are those of classification.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FeaturePyramidNetwork

from ..distributed import get_world_size, global_count_mean
from ..errors import UsageError

__all__ = ['SimpleFeaturePyramid', 'ViTPyramid', 'CNNPyramid', 'build_pyramid', 'SemanticFPNHead', 'DenseSegmenter',
           'DenseDetector', 'GlobalFCOSHead', 'DENSE_ARCHITECTURES', 'level_name', 'IGNORE_INDEX']

IGNORE_INDEX = 255  # the label of pixels a segmentation loss and metric skip (ADE20K / Cityscapes convention)
VIT_SCALES = (4.0, 2.0, 1.0, 0.5)  # ViTDet's pyramid: map scale relative to the patch grid


class DenseModelError(UsageError):
    """A dense model that cannot be built from the given backbone and strides (one-line user error)."""


def level_name(stride: int) -> str:
    """The pyramid key of a level: ``'s8'`` for stride 8."""
    return f's{stride}'


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: one [B, D, h, w] map at the patch stride p → maps at the requested strides.

    Scale 4 (stride p/4): two 2×2 stride-2 deconvolutions (LayerNorm + GELU between); scale 2: one deconvolution;
    scale 1: the map itself; scale ½: 2×2 max-pool. Each level then gets a 1×1 and a 3×3 convolution to
    ``out_channels``, each followed by a channel LayerNorm (ViTDet's choice: the ViT has no batch statistics either).

    Args:
        in_channels: D, the ViT width.
        patch_size: p, the stride of the input map.
        strides: output strides, each p·{¼, ½, 1, 2}.
        out_channels: C of every output level.
    """

    def __init__(self, in_channels: int, patch_size: int, strides: Sequence[int], out_channels: int):
        super().__init__()
        self.strides, self.out_channels = tuple(strides), out_channels
        self.levels = nn.ModuleDict()
        d = in_channels
        for stride in self.strides:
            scale = patch_size / stride
            if scale == 4.0:
                resample = nn.Sequential(nn.ConvTranspose2d(d, d // 2, 2, stride=2), LayerNorm2d(d // 2), nn.GELU(),
                                         nn.ConvTranspose2d(d // 2, d // 4, 2, stride=2))
                width = d // 4
            elif scale == 2.0:
                resample, width = nn.ConvTranspose2d(d, d // 2, 2, stride=2), d // 2
            elif scale == 1.0:
                resample, width = nn.Identity(), d
            elif scale == 0.5:
                resample, width = nn.MaxPool2d(2, 2), d
            else:
                raise DenseModelError(f'pyramid stride {stride} with patch size {patch_size}: a ViT pyramid makes '
                                      f'strides {", ".join(str(int(patch_size / s)) for s in VIT_SCALES)} '
                                      '(patch size ×¼, ×½, ×1, ×2; --pyramid-strides)')
            self.levels[level_name(stride)] = nn.Sequential(
                resample, nn.Conv2d(width, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> 'OrderedDict[str, torch.Tensor]':
        return OrderedDict((name, level(x)) for name, level in self.levels.items())  # name → [B, C, H/s, W/s]


class ViTPyramid(nn.Module):
    """A timm ViT's last-block patch tokens (after its final norm) as a map, through a :class:`SimpleFeaturePyramid`.

    Args:
        name: timm ViT name (``deit_ti_distilled``, ``vit_tiny_patch16_224``, …).
        strides: pyramid strides.
        out_channels: C of every level.
        vit_kwargs: timm kwargs of the ViT (img_size, patch_size, depth, embed_dim, in_chans, …).
    """

    def __init__(self, name: str, strides: Sequence[int], out_channels: int, vit_kwargs: dict):
        super().__init__()
        self.vit = timm.create_model(name, pretrained=False, num_classes=0, **vit_kwargs)
        self.patch_size = int(self.vit.patch_embed.patch_size[0])
        self.pyramid = SimpleFeaturePyramid(self.vit.embed_dim, self.patch_size, strides, out_channels)
        self.out_channels = out_channels

    def no_weight_decay(self) -> set[str]:
        return {f'vit.{n}' for n in self.vit.no_weight_decay()}

    def forward(self, x: torch.Tensor) -> 'OrderedDict[str, torch.Tensor]':
        last = len(self.vit.blocks) - 1
        grid = self.vit.forward_intermediates(x, indices=[last], norm=True, output_fmt='NCHW',
                                              intermediates_only=True)[0]  # [B, D, H/p, W/p]
        return self.pyramid(grid)


class CNNPyramid(nn.Module):
    """A timm CNN's stage maps at the requested strides, merged by torchvision's ``FeaturePyramidNetwork``.

    Args:
        name: timm model name with ``features_only`` support (``test_resnet``, ``resnet18``, ``regnety_002``, …).
        strides: pyramid strides; each must be the reduction of one of the CNN's stages.
        out_channels: C of every level.
        cnn_kwargs: timm kwargs (``in_chans``, …).
    """

    def __init__(self, name: str, strides: Sequence[int], out_channels: int, cnn_kwargs: dict):
        super().__init__()
        probe = timm.create_model(name, pretrained=False, features_only=True, **cnn_kwargs)
        reductions = list(probe.feature_info.reduction())
        missing = [s for s in strides if s not in reductions]
        if missing:
            raise DenseModelError(f'{name} has stages at strides {reductions}, not {missing}; choose pyramid strides '
                                  'among those')
        indices = [reductions.index(s) for s in strides]
        self.cnn = timm.create_model(name, pretrained=False, features_only=True, out_indices=indices, **cnn_kwargs)
        self.names = [level_name(s) for s in strides]
        self.fpn = FeaturePyramidNetwork(list(self.cnn.feature_info.channels()), out_channels)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> 'OrderedDict[str, torch.Tensor]':
        stages = self.cnn(x)  # list of [B, C_i, H/s_i, W/s_i]
        return self.fpn(OrderedDict(zip(self.names, stages)))


def build_pyramid(backbone: str, strides: Sequence[int], out_channels: int, backbone_kwargs: dict,
                  img_size: int) -> nn.Module:
    """:class:`ViTPyramid` (built at ``img_size`` unless its kwargs say otherwise) for a timm model with patch
    embeddings, else :class:`CNNPyramid`."""
    if not timm.is_model(backbone):
        raise DenseModelError(f'unknown backbone {backbone!r} (a timm model name; see timm.list_models())')
    probe = timm.create_model(backbone, pretrained=False, num_classes=0, **backbone_kwargs)
    is_vit = hasattr(probe, 'patch_embed') and hasattr(probe, 'forward_intermediates')
    del probe
    if is_vit:
        return ViTPyramid(backbone, strides, out_channels, {'img_size': img_size, **backbone_kwargs})
    return CNNPyramid(backbone, strides, out_channels, backbone_kwargs)


class SemanticFPNHead(nn.Module):
    """Every level → conv 3×3 + GroupNorm + ReLU → bilinear upsampling to the finest level → sum → 1×1 classifier.

    Args:
        in_channels: C of the pyramid levels.
        channels: width of the head.
        num_classes: K (background is a class of its own where the data has one).
        num_levels: number of pyramid levels.
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_levels: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
                                                   nn.GroupNorm(_groups(channels), channels), nn.ReLU(inplace=True))
                                     for _ in range(num_levels))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, pyramid: 'OrderedDict[str, torch.Tensor]') -> torch.Tensor:
        levels = list(pyramid.values())
        size = levels[0].shape[-2:]  # the finest level comes first
        fused = sum(F.interpolate(conv(x), size=size, mode='bilinear', align_corners=False) if x.shape[-2:] != size
                    else conv(x) for conv, x in zip(self.lateral, levels))  # [B, channels, h, w]
        return self.classifier(fused)  # [B, K, h, w]


def _groups(channels: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


def _check_strides(strides: Sequence[int]) -> tuple[int, ...]:
    strides = tuple(int(s) for s in strides)
    if not strides or list(strides) != sorted(set(strides)):
        raise DenseModelError(f'pyramid strides {list(strides)}: give distinct increasing strides (e.g. 4 8 16 32)')
    return strides


class DenseModel(nn.Module):
    """What the detector and the segmenter share: the pyramid, the timm attributes an export needs.

    Args:
        backbone: timm name of the backbone (a ViT or a CNN).
        num_classes: K.
        in_chans: image channels.
        img_size: the (square) input side the model is trained at, or timm's recorded (H, W).
        strides: pyramid strides, finest first.
        pyramid_channels: C of every level.
        backbone_kwargs: timm kwargs of the backbone (``in_chans`` and, for a ViT, ``img_size`` are added).
    """

    def __init__(self, backbone: str, num_classes: int, in_chans: int = 3, img_size: Union[int, Sequence[int]] = 224,
                 strides: Sequence[int] = (4, 8, 16, 32), pyramid_channels: int = 64,
                 backbone_kwargs: Optional[dict] = None):
        super().__init__()
        self.strides = _check_strides(strides)
        img_size = int(img_size[-1]) if isinstance(img_size, (list, tuple)) else int(img_size)  # timm records (H, W)
        kwargs = dict(backbone_kwargs or {}, in_chans=in_chans)
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img_size
        self.num_features = pyramid_channels
        self.backbone_name = backbone
        self.pyramid = build_pyramid(backbone, self.strides, pyramid_channels, kwargs, img_size)

    @property
    def is_vit(self) -> bool:
        return isinstance(self.pyramid, ViTPyramid)

    def no_weight_decay(self) -> set[str]:
        """The ViT's position embedding and tokens (timm's optimizer factory also skips norms and biases)."""
        return {f'pyramid.{n}' for n in getattr(self.pyramid, 'no_weight_decay', lambda: set())()}

    def forward_pyramid(self, images: torch.Tensor) -> 'OrderedDict[str, torch.Tensor]':
        """``{'s4': [B, C, H/4, W/4], …}``, finest first."""
        return self.pyramid(images)


class DenseSegmenter(DenseModel):
    """Semantic segmentation: pyramid → :class:`SemanticFPNHead`. ``forward(images)`` → logits [B, K, H, W].

    Args (beyond :class:`DenseModel`'s):
        head_channels: width of the semantic head.
        ignore_index: the label of pixels the task loss skips.
    """

    def __init__(self, backbone: str, num_classes: int, head_channels: int = 64, ignore_index: int = IGNORE_INDEX,
                 **kwargs):
        super().__init__(backbone, num_classes, **kwargs)
        self.ignore_index = ignore_index
        self.head = SemanticFPNHead(self.num_features, head_channels, num_classes, len(self.strides))

    def forward_head(self, pyramid: 'OrderedDict[str, torch.Tensor]') -> torch.Tensor:
        """Logits [B, K, H/s₀, W/s₀] at the finest stride s₀."""
        return self.head(pyramid)

    @staticmethod
    def upsample(logits: torch.Tensor, size) -> torch.Tensor:
        """[B, K, h, w] → [B, K, H, W] bilinear."""
        return F.interpolate(logits, size=tuple(size), mode='bilinear', align_corners=False)

    def task_loss(self, logits: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pixel cross-entropy at the input resolution, averaged over the labelled pixels of the global batch
        (every process's: :func:`vitkd.distributed.global_count_mean`; padding and scale jitter leave each process
        a different count).

        Args:
            logits: [B, K, h, w] from :meth:`forward_head`.
            masks: [B, H, W] int64 labels, :attr:`ignore_index` where unlabelled.

        Returns:
            ``{'ce': scalar}`` (0 for a batch without labelled pixels; the count stays on the device).
        """
        full = self.upsample(logits, masks.shape[-2:])  # [B, K, H, W]
        full = full if full.dtype in (torch.float32, torch.float64) else full.float()
        total = F.cross_entropy(full, masks, ignore_index=self.ignore_index, reduction='sum')
        return {'ce': global_count_mean(total, (masks != self.ignore_index).sum())}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.forward_head(self.forward_pyramid(images)), images.shape[-2:])


class DenseDetector(DenseModel):
    """Detection: pyramid → torchvision FCOS head. ``forward(images)`` → FCOS detections (list of dicts).

    Args (beyond :class:`DenseModel`'s):
        head_convs: conv layers of each FCOS tower (torchvision's default is 4).
        score_thresh, nms_thresh, detections_per_img: FCOS's post-processing.
    """

    def __init__(self, backbone: str, num_classes: int, head_convs: int = 2, score_thresh: float = 0.05,
                 nms_thresh: float = 0.6, detections_per_img: int = 100, **kwargs):
        super().__init__(backbone, num_classes, **kwargs)
        channels, levels = self.num_features, len(self.strides)
        if channels % 32:
            raise DenseModelError(f'--pyramid-channels {channels}: FCOS\'s head normalises in 32 groups; use a '
                                  'multiple of 32 for detection')
        anchors = AnchorGenerator(sizes=tuple((s,) for s in self.strides), aspect_ratios=((1.0,),) * levels)
        head = GlobalFCOSHead(channels, 1, num_classes, num_convs=head_convs)
        # FCOS holds the pyramid as its backbone; its own resize/normalise transform is not used (the images arrive
        # normalised at the model's input size), so it is given the identity settings.
        self.fcos = FCOS(_PyramidRef(channels), num_classes, min_size=self.img_size, max_size=self.img_size,
                         image_mean=[0.0] * self.in_chans, image_std=[1.0] * self.in_chans, anchor_generator=anchors,
                         head=head, score_thresh=score_thresh, nms_thresh=nms_thresh,
                         detections_per_img=detections_per_img)

    def forward_head(self, pyramid: 'OrderedDict[str, torch.Tensor]') -> dict[str, torch.Tensor]:
        """FCOS head outputs: ``cls_logits`` [B, A, K], ``bbox_regression`` [B, A, 4], ``bbox_ctrness`` [B, A, 1]
        over the A points of every level."""
        return self.fcos.head(list(pyramid.values()))

    def _anchors(self, images: torch.Tensor, pyramid) -> tuple[list[torch.Tensor], list[int]]:
        levels = list(pyramid.values())
        image_list = ImageList(images, [tuple(images.shape[-2:])] * images.shape[0])
        return self.fcos.anchor_generator(image_list, levels), [x.shape[2] * x.shape[3] for x in levels]

    def task_loss(self, head_outputs: dict, pyramid, images: torch.Tensor, targets: list[dict]) -> dict:
        """FCOS's losses: ``classification`` (sigmoid focal), ``bbox_regression`` (GIoU), ``bbox_ctrness`` (BCE),
        each summed and divided by the foreground points of the global batch (:class:`GlobalFCOSHead`).

        Args:
            head_outputs: from :meth:`forward_head`.
            pyramid: from :meth:`forward_pyramid` (the point locations).
            images: [B, C, H, W] the input (its size).
            targets: per image ``{'boxes': [n, 4] xyxy pixels, 'labels': [n] int64 in 0..K−1}``.
        """
        anchors, per_level = self._anchors(images, pyramid)
        return self.fcos.compute_loss(targets, head_outputs, anchors, per_level)

    def predict(self, head_outputs: dict, pyramid, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Per image ``{'boxes': [d, 4], 'scores': [d], 'labels': [d]}`` after score threshold, top-k and NMS."""
        anchors, per_level = self._anchors(images, pyramid)
        split = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(a.split(per_level)) for a in anchors]
        return self.fcos.postprocess_detections(split, split_anchors, [tuple(images.shape[-2:])] * images.shape[0])

    def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        pyramid = self.forward_pyramid(images)
        return self.predict(self.forward_head(pyramid), pyramid, images)


class GlobalFCOSHead(FCOSHead):
    """torchvision's FCOS head (same layers and state dict) whose three losses are normalised by the foreground
    points of the global batch instead of the process's own: on N processes at batch B the gradient is that of one
    process at batch N·B (:func:`vitkd.distributed.global_count_mean`; torchvision's sums are undone by the local
    count it divided by)."""

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs) -> dict[str, torch.Tensor]:
        losses = super().compute_loss(targets, head_outputs, anchors, matched_idxs)  # each Σ / max(1, n_local)
        if get_world_size() == 1:
            return losses  # the local count is the global one: torchvision's values, bit for bit
        foreground = sum((m >= 0).sum() for m in matched_idxs)
        local = foreground.clamp(min=1)
        return {k: global_count_mean(v * local, foreground) for k, v in losses.items()}


class _PyramidRef(nn.Module):
    """FCOS's constructor wants a backbone with ``out_channels``; the pyramid itself lives in :class:`DenseModel`
    (one owner, so the state dict holds its weights once)."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = out_channels


def _dense_cfg() -> dict:
    # first_conv None: exported weights already have the model's input channels (timm must not adapt them)
    return dict(url='', num_classes=10, input_size=(3, 224, 224), pool_size=None, crop_pct=1.0,
                interpolation='bilinear', fixed_input_size=True, mean=(0.485, 0.456, 0.406),
                std=(0.229, 0.224, 0.225), first_conv=None, classifier=None, license='apache-2.0')


# timm's register_model reads this module-level table for the models' pretrained configs.
default_cfgs = generate_default_cfgs({'vitkd_dense_detector': _dense_cfg(), 'vitkd_dense_segmenter': _dense_cfg()})


@register_model
def vitkd_dense_detector(pretrained: bool = False, **kwargs) -> DenseDetector:
    """A timm backbone as a feature pyramid under torchvision's FCOS head (``pretrained``: the whole model's weights
    from its pretrained config: a local folder or a Hub repo)."""
    return build_model_with_cfg(DenseDetector, 'vitkd_dense_detector', pretrained, pretrained_strict=True, **kwargs)


@register_model
def vitkd_dense_segmenter(pretrained: bool = False, **kwargs) -> DenseSegmenter:
    """A timm backbone as a feature pyramid under a semantic FPN head (``pretrained`` as for the detector)."""
    return build_model_with_cfg(DenseSegmenter, 'vitkd_dense_segmenter', pretrained, pretrained_strict=True,
                                **kwargs)


DENSE_ARCHITECTURES = {'detect': 'vitkd_dense_detector', 'segment': 'vitkd_dense_segmenter'}
