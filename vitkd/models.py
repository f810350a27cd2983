"""Students and teachers.

Students are timm models. Besides every timm architecture (timm's ``deit_*_distilled_patch16_224`` with a learned
distillation token among them), vitkd registers the VkD student in timm's registry:

* ``deit_ti_distilled`` / ``deit_s_distilled`` / ``deit_b_distilled`` — "VkD: Improving Knowledge Distillation using
  Orthogonal Projections", Miles, Elezi, Deng, CVPR 2024 (https://github.com/roymiles/VkD, ``models/deit.py``):
  a DeiT with the CiVT convolutional stem instead of the linear patch embedding, and a distillation token that is
  the mean of the patch embeddings (no ``dist_token`` parameter), drop-path 0 by default.

After ``import vitkd`` they build with plain ``timm.create_model('deit_s_distilled')`` and round-trip through timm's
``save_for_hf`` / ``local-dir:`` / ``hf-hub:`` loaders like any timm model. Small CPU variants are the same
architectures with timm kwargs (``img_size=28, patch_size=4, depth=4, embed_dim=96, num_heads=3``).

Teachers are any timm model (name, ``name.tag``, ``hf-hub:org/name``, a ``save_for_hf`` folder, or a
``.safetensors`` file with an architecture), wrapped in :class:`Teacher`: frozen, always in eval mode, outside
the trained module, re-normalising the student's input to its own mean/std.
"""
from __future__ import annotations

from .errors import HubError, UsageError, server_failure
from .files import check_safetensors, pickle_damage, pickle_refusal, read_model_config
import difflib
from functools import partial
import logging
import os
from pathlib import Path
import pickle
from typing import Any, Optional
import warnings

import timm
import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models import generate_default_cfgs, register_model
from timm.models._builder import build_model_with_cfg
from timm.models.deit import VisionTransformerDistilled, checkpoint_filter_fn

__all__ = ['create_student', 'create_teacher', 'Teacher', 'ConvStemPatchEmbed', 'VkDDistilledViT',
           'student_head_logits', 'has_dist_head', 'resolve_teacher_name', 'ModelSpecError', 'set_fused_attention']

_logger = logging.getLogger(__name__)

# DeiT, VkD and ND trained with the DeiT teacher; timm's default tag for the bare name is a stronger, different model.
TEACHER_ALIASES = {'regnety_160': 'regnety_160.deit_in1k'}


class ModelSpecError(UsageError):
    """A student/teacher name, file or option that cannot be used (message is the one-line user error)."""


class ConvStemPatchEmbed(PatchEmbed):
    """CiVT/VkD convolutional stem used as a timm patch embedding.

    conv7x7 s2 (no bias) → BN → ReLU → 2 × [conv3x3 (no bias) → BN → ReLU] → conv k=s=patch/2 (with bias) → tokens.
    Input [B, C, H, W] → output [B, (H/patch)·(W/patch), D].
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, stem_width: int = 64, **kwargs):
        kwargs.pop('bias', None)
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, **kwargs)
        if self.patch_size[0] % 2 or self.patch_size[1] % 2:
            raise ModelSpecError(f'conv-stem patch_size must be even (stride-2 stem), got {patch_size}')
        def conv_bn_relu(cin, cout, k, s):
            return [nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        self.stem = nn.Sequential(*conv_bn_relu(in_chans, stem_width, 7, 2), *conv_bn_relu(stem_width, stem_width, 3, 1),
                                  *conv_bn_relu(stem_width, stem_width, 3, 1))
        half = (self.patch_size[0] // 2, self.patch_size[1] // 2)
        self.proj = nn.Conv2d(stem_width, embed_dim, kernel_size=half, stride=half, bias=True)
        for m in self.stem.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_in', nonlinearity='relu')
        nn.init.kaiming_normal_(self.proj.weight, mode='fan_in', nonlinearity='relu')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.stem(x))  # [B, D, H/p, W/p]
        return self.norm(x.flatten(2).transpose(1, 2))  # [B, N, D]


class VkDDistilledViT(VisionTransformerDistilled):
    """VkD student: conv-stem DeiT whose distillation token is the mean of the patch embeddings.

    Tokens are [cls, dist, patches] + pos_embed (1, N + 2, D); dist = mean_n(patch_embed(x)) taken before the
    position embedding. Train mode with distilled training returns (z_cls, z_dist); eval mode returns their mean.
    """

    def __init__(self, *args, stem_width: int = 64, **kwargs):
        """``stem_width``: channels of the conv stem (VkD: 64); other arguments are timm's VisionTransformer's."""
        kwargs.setdefault('embed_layer', partial(ConvStemPatchEmbed, stem_width=stem_width))
        super().__init__(*args, **kwargs)
        del self.dist_token  # the distillation token is data-dependent here
        self.distilled_training = True

    def init_weights(self, mode='', needs_reset=True):
        # the parent's init also draws dist_token, which this model does not have
        super(VisionTransformerDistilled, self).init_weights(mode=mode or self.weight_init_mode, needs_reset=needs_reset)

    def no_weight_decay(self):
        return {'pos_embed', 'cls_token'}

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        dist = x.mean(dim=1, keepdim=True)  # [B, 1, D]: mean of the patch embeddings, before pos_embed
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), dist, x), dim=1)
        return self.pos_drop(x + self.pos_embed)


def _vkd_cfg(**kwargs):
    return dict(url='', num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=0.875,
                interpolation='bicubic', fixed_input_size=True, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                first_conv='patch_embed.stem.0', classifier=('head', 'head_dist'), license='apache-2.0',
                paper_ids='arXiv:2403.06213', **kwargs)


# timm's register_model reads this module-level table for the models' pretrained configs.
default_cfgs = generate_default_cfgs({name: _vkd_cfg() for name in
                                      ('deit_ti_distilled', 'deit_s_distilled', 'deit_b_distilled')})


def _create_vkd(variant: str, pretrained: bool, **kwargs) -> VkDDistilledViT:
    model_args = dict(patch_size=16, mlp_ratio=4, qkv_bias=True, drop_path_rate=0.0)
    return build_model_with_cfg(VkDDistilledViT, variant, pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn, feature_cfg=dict(feature_cls='getter'),
                                **{**model_args, **kwargs})


@register_model
def deit_ti_distilled(pretrained: bool = False, **kwargs) -> VkDDistilledViT:
    """VkD DeiT-Ti student (D 192, 12 blocks, 3 heads, conv stem)."""
    return _create_vkd('deit_ti_distilled', pretrained, **{'embed_dim': 192, 'depth': 12, 'num_heads': 3, **kwargs})


@register_model
def deit_s_distilled(pretrained: bool = False, **kwargs) -> VkDDistilledViT:
    """VkD DeiT-S student (D 384, 12 blocks, 6 heads, conv stem)."""
    return _create_vkd('deit_s_distilled', pretrained, **{'embed_dim': 384, 'depth': 12, 'num_heads': 6, **kwargs})


@register_model
def deit_b_distilled(pretrained: bool = False, **kwargs) -> VkDDistilledViT:
    """VkD DeiT-B student (D 768, 12 blocks, 12 heads, conv stem)."""
    return _create_vkd('deit_b_distilled', pretrained, **{'embed_dim': 768, 'depth': 12, 'num_heads': 12, **kwargs})


def _unknown_model_error(name: str, role: str) -> ModelSpecError:
    """The error for a name timm does not know: timm's full names that extend it come first (``deit_tiny_distilled`` →
    ``deit_tiny_distilled_patch16_224``: a name cut short, not a typo), then the closest spellings."""
    base = name.split('.')[0]
    extended = timm.list_models(f'{base}*')[:3]
    close = extended + [m for m in difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
                        if m not in extended][:5 - len(extended)]
    hint = f'; did you mean: {", ".join(close)}' if close else '; see timm.list_models()'
    return ModelSpecError(f'unknown {role} model {name!r}{hint}')


def create_student(name: str, num_classes: int, pretrained: bool = False, **overrides: Any) -> nn.Module:
    """Build a student with ``timm.create_model``.

    Args:
        name: any timm model name (e.g. ``deit_s_distilled``, ``deit_tiny_distilled_patch16_224``, ``resnet18``).
        num_classes: classifier width K.
        pretrained: load the model's pretrained weights through timm (the Hub path).
        **overrides: timm kwargs (``img_size``, ``patch_size``, ``depth``, ``embed_dim``, ``in_chans``, …).

    Returns:
        The model; distilled ViTs are switched to distilled training (train mode returns (z_cls, z_dist)).
    """
    _check_hub_name(name, 'student')
    if not name.startswith(('hf-hub:', 'local-dir:')) and not timm.is_model(name.split('.')[0]):
        raise _unknown_model_error(name, 'student')
    model = _create_with(f'student {name!r}', name, overrides, '--student-kwargs', pretrained=pretrained,
                         num_classes=num_classes)
    if hasattr(model, 'set_distilled_training'):
        model.set_distilled_training(True)
    return model


def set_fused_attention(model: nn.Module, enabled: bool) -> int:
    """Switch timm's fused attention (``F.scaled_dot_product_attention``) on or off in every attention module.

    vitkd turns it off on CPU (:func:`vitkd.run.build_run`): PyTorch's CPU flash-attention backward is slow in bf16,
    where timm's explicit path (q·kᵀ, softmax, ·v) made the whole training step 1.5–2× faster on 2 CPU cores (embedded
    student, 51 tokens, batch 128: 305 → 152 ms; deit_tiny @224, batch 16: 658 → 433 ms), and in fp32 the explicit
    path is as fast or faster (2 threads: +3–9 % on the embedded student in 4 paired runs, +1 % on deit_tiny @224).
    GPUs keep the fused kernels. Returns the number of modules switched.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, 'fused_attn'):
            module.fused_attn = enabled
            count += 1
    return count


def has_dist_head(model: nn.Module) -> bool:
    """True when the model has a distillation head (``head_dist``) fed by a distillation token."""
    return isinstance(getattr(model, 'head_dist', None), nn.Module) and getattr(model, 'num_prefix_tokens', 1) >= 2


def student_head_logits(model: nn.Module, final: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Class-head and distillation-head logits from a student's final features, whatever its mode.

    Args:
        final: ``forward_features`` output ([B, N, D] tokens for ViTs, [B, C, H, W] for CNNs).

    Returns:
        (z_cls [B, K], z_dist [B, K] or None when the model has no distillation head).
    """
    if has_dist_head(model):
        return model.head(model.head_drop(final[:, 0])), model.head_dist(model.head_drop(final[:, 1]))
    out = model.forward_head(final)
    return out, None


def resolve_teacher_name(name: str) -> str:
    """Map the bare DeiT teacher name to the weights DeiT/VkD/ND trained with (``regnety_160.deit_in1k``)."""
    return TEACHER_ALIASES.get(name, name)


class Teacher(nn.Module):
    """A frozen teacher: eval mode forever, no gradients, input re-normalised from the student's mean/std.

    It is deliberately kept out of the trained module (not a submodule of the distiller), so DDP never wraps it,
    the optimizer never sees it and student checkpoints never contain it.

    Convolutional teachers run in ``channels_last`` memory format (their weights are converted; a convolution with
    channels_last weights gives channels_last outputs, so the whole body follows; the distiller hands the losses
    contiguous NCHW copies of the taps). Measured on 2 CPU cores (oneDNN), teacher forward only: regnety_002 @224 74 →
    111 img/s fp32 and 132 → 224 img/s bf16, resnet18 @112 87 → 115 / 156 → 223; @28 px batch 128 neutral in fp32 and
    ~1.2× in bf16. On GPUs channels_last is the format tensor cores want under mixed precision. ViT teachers are left
    as they are (no convolutions past the stem). :meth:`compile` wraps the forward paths in ``torch.compile``.
    """

    def __init__(self, model: nn.Module, source: str, student_mean=None, student_std=None,
                 channels_last: Optional[bool] = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.source = source
        if channels_last is None:  # auto: convolutional teachers, not patch-embedding transformers (ViT, Swin, …)
            channels_last = not hasattr(model, 'patch_embed') and any(isinstance(m, nn.Conv2d) for m in model.modules())
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.compiled = False
        cfg = getattr(model, 'pretrained_cfg', {}) or {}
        self.mean, self.std = tuple(cfg.get('mean', (0.485, 0.456, 0.406))), tuple(cfg.get('std', (0.229, 0.224, 0.225)))
        self.set_student_normalization(student_mean or self.mean, student_std or self.std)
        self.train(False)

    def set_student_normalization(self, mean, std):
        """Make the teacher see x·std_s + mean_s normalised by its own mean/std (a per-channel affine map)."""
        mean_s, std_s = torch.tensor(mean), torch.tensor(std)  # the default dtype, as the teacher's own stats
        c = len(mean_s)
        if len(self.mean) != c:  # e.g. a 1-channel teacher whose config kept ImageNet's 3-channel stats
            _logger.warning('teacher normalisation has %d channels, the input %d: using the input\'s', len(self.mean), c)
            self.mean, self.std = tuple(mean), tuple(std)
        mean_t, std_t = torch.tensor(self.mean), torch.tensor(self.std)
        self.renormalize = not (torch.allclose(mean_s, mean_t) and torch.allclose(std_s, std_t))
        self.register_buffer('in_scale', (std_s / std_t).view(1, c, 1, 1), persistent=False)
        self.register_buffer('in_shift', ((mean_s - mean_t) / std_t).view(1, c, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> 'Teacher':
        return super().train(False)  # a generic .train() must never put the teacher's BN/dropout in train mode

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] student-normalised → teacher-normalised, in the teacher's dtype (see :meth:`cast`)."""
        x = x * self.in_scale + self.in_shift if self.renormalize else x
        return x.to(self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def cast(self, dtype: torch.dtype) -> 'Teacher':
        """Hold the frozen weights in ``dtype`` (bf16/fp16 under mixed precision).

        Autocast casts a weight to the compute dtype at every use and caches the cast only for weights that require
        gradients: a frozen fp32 teacher would be re-cast in every step. Cast once, its matmuls and convolutions
        read half the bytes; BatchNorm in eval mode is an affine map, which bf16 holds to ~3 significant digits, as
        autocast's bf16 convolutions already do for the activations. The input re-normalisation stays in fp32.
        """
        self.model.to(dtype)
        return self

    def compile(self, **compile_kwargs: Any) -> 'Teacher':
        """``torch.compile`` the model's forward paths that feature extraction calls.

        :func:`vitkd.features.extract` calls ``forward_intermediates`` / ``forward_features`` / ``forward_head``
        rather than ``forward`` (compiling the module would only compile ``forward``), so each of these bound methods is
        replaced on the instance by its compiled version. The first batches pay the compilation (tens of seconds on
        CPU; once per distinct input shape and tap set). A channels_last teacher goes back to NCHW first: inductor picks
        its own layouts, and from NCHW weights it builds the faster program (regnety_160, 224 px, batch 16, 2 CPU
        threads, inference: 10.5 img/s compiled from NCHW, 9.6 from channels_last, 7.1 / 6.2 eager).
        """
        if self.channels_last:
            self.model.to(memory_format=torch.contiguous_format)
            self.channels_last = False
        for name in ('forward_intermediates', 'forward_features', 'forward_head', 'forward'):
            method = getattr(self.model, name, None)
            if method is not None:
                setattr(self.model, name, torch.compile(method, **compile_kwargs))
        self.compiled = True
        return self

    @property
    def num_classes(self) -> int:
        return self.model.num_classes


def _read_local_config(folder: Path, what: str) -> dict:
    """The folder's timm ``config.json``, checked (:func:`vitkd.files.read_model_config`), and its safetensors
    weights' header when present: a bad file is a one-line error naming it, before timm reads anything."""
    if not (folder / 'config.json').is_file():
        raise ModelSpecError(f'{what}: {folder} is not a timm model folder (no config.json; expected what timm\'s '
                             'save_for_hf writes: config.json + model.safetensors)')
    config = read_model_config(folder / 'config.json', what)
    if (folder / 'model.safetensors').is_file():
        check_safetensors(folder / 'model.safetensors', f'{what}: weights')
    return config


def create_teacher(spec: str, num_classes: Optional[int] = None, arch: Optional[str] = None,
                   pretrained: bool = True, **kwargs: Any) -> Teacher:
    """Build a frozen teacher.

    Args:
        spec: a timm name with or without tag (``regnety_160`` = ``regnety_160.deit_in1k``), ``hf-hub:org/name``,
            a folder written by timm's ``save_for_hf`` (config.json + model.safetensors), or a ``.safetensors`` file
            (then ``arch`` names the timm architecture).
        num_classes: expected number of classes; a teacher head of another width is an error.
        arch: architecture for a bare ``.safetensors`` file.
        pretrained: load weights (False only for tests/benchmarks with random teachers).
        **kwargs: timm kwargs for the architecture.
    """
    path = Path(spec).expanduser()
    what = f'teacher {spec!r}'
    if spec.startswith('local-dir:') or path.is_dir():
        folder = Path(spec[len('local-dir:'):]) if spec.startswith('local-dir:') else path
        _read_local_config(folder, what)
        model = _create_with(what, f'local-dir:{folder.resolve()}', kwargs, '--teacher-kwargs', pretrained=pretrained)
        source = f'local-dir:{folder.resolve()}'
    elif spec.endswith(WEIGHT_FILES):
        if not path.is_file():
            raise ModelSpecError(f'teacher weights file {spec!r} does not exist')
        if not arch:
            raise ModelSpecError(f'teacher {spec!r} is a bare weights file: also pass --teacher-arch <timm model name>')
        if not timm.is_model(arch.split('.')[0]):
            raise _unknown_model_error(arch, 'teacher')
        if spec.endswith('.safetensors'):
            check_safetensors(path, f'{what}: weights')
        else:
            with path.open('rb') as f:
                head = f.read(4)
            if not head.startswith((b'PK\x03\x04', b'\x80')):  # torch.save's zip archive, or a legacy pickle
                raise ModelSpecError(f'{what}: not a readable checkpoint ('
                                     f'{"an empty file" if not head else "not a PyTorch file"})')
            _logger.warning('teacher %s is a pickle file: loading tensors only (weights_only=True); safetensors files '
                            'are preferred', spec)
        overlay = dict(file=str(path.resolve()), num_classes=num_classes or 1000)
        model = _create_with(f'{what} (as --teacher-arch {arch} with a {num_classes or 1000}-way head)', arch, kwargs,
                             '--teacher-kwargs', pretrained=True, pretrained_cfg_overlay=overlay,
                             num_classes=num_classes or 1000)
        source = f'{arch} from {path.resolve()}'
    elif spec.startswith(('/', './', '../', '~')) or os.sep in spec and not spec.startswith('hf-hub:'):
        raise ModelSpecError(f'teacher path {spec!r} does not exist (expected a save_for_hf folder or a '
                             f'{"/".join(WEIGHT_FILES)} file; Hub ids are written hf-hub:org/name)')
    elif spec.startswith('hf-hub:'):
        _check_hub_name(spec, 'teacher')
        model = _create_with(what, spec, kwargs, '--teacher-kwargs', pretrained=pretrained)
        source = spec
    else:
        name = resolve_teacher_name(spec)
        if not timm.is_model(name.split('.')[0]):
            raise _unknown_model_error(spec, 'teacher')
        model = _create_with(what, name, kwargs, '--teacher-kwargs', pretrained=pretrained,
                             **({'num_classes': num_classes} if not pretrained and num_classes else {}))
        tag = getattr(model, 'pretrained_cfg', {}).get('tag', '') if pretrained else ''
        source = f'{name.split(".")[0]}.{tag}' if tag else f'{name} (random weights)' if not pretrained else name
        if name != spec:
            _logger.info('teacher %r resolved to %r (the DeiT teacher)', spec, name)
    if num_classes is not None and model.num_classes != num_classes:
        raise ModelSpecError(f'teacher {spec!r} has a {model.num_classes}-way head but the data has {num_classes} '
                             f'classes; use a teacher trained on this data (or --num-classes {model.num_classes})')
    return Teacher(model, source)


WEIGHT_FILES = ('.safetensors', '.pth', '.pt', '.bin')  # pickles (.pth/.pt/.bin) are read with weights_only=True


def _hub_id(name: str) -> str:
    """The Hub repo behind a model name (``hf-hub:org/name``, or a timm name's pretrained tag), for messages."""
    if name.startswith('hf-hub:'):
        return name[len('hf-hub:'):].split('@')[0]
    try:
        return timm.models.get_pretrained_cfg(name).hf_hub_id or name
    except Exception:  # noqa: BLE001 - only for a hint in a message
        return name


def _check_hub_name(name: str, role: str) -> None:
    """``hf-hub:`` needs a repo id after it (``hf-hub:org/name``)."""
    if name.startswith('hf-hub:') and not name[len('hf-hub:'):].split('@')[0].strip('/'):
        raise ModelSpecError(f'{role} {name!r} names no Hub repo: write hf-hub:org/name')


def _create_with(what: str, name: str, options: dict, flag: str, **fixed: Any) -> nn.Module:
    """:func:`_timm_create` with the user's model kwargs ``options`` (from ``flag``, ``--input-size``, ``--drop-path``).

    The model's constructor checks those kwargs (a negative depth, heads that do not divide the width, a zero image
    size, a keyword it does not take): its failure is a one-line :class:`ModelSpecError` naming the kwargs and the
    constructor's message, and the warnings it gave on the way are dropped with it. Without user kwargs a failure
    is not the user's and propagates unchanged.
    """
    if not options:
        return _timm_create(what, name, **fixed)
    shown = ' '.join(f'{k}={v}' for k, v in options.items())
    with warnings.catch_warnings(record=True) as caught:
        try:
            model = _timm_create(what, name, **fixed, **options)
        except UsageError:
            raise
        except (TypeError, ValueError, AssertionError, RuntimeError, ArithmeticError, LookupError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelSpecError(f'{what} cannot be built with the kwargs {shown} ({flag}): {first}') from e
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    return model


def _timm_create(what: str, name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` whose loading failures are one-line :class:`ModelSpecError` messages.

    Offline cache misses say so and how to fix them; a pickle holding anything but tensors is refused (timm reads
    ``.pth``/``.bin`` with ``weights_only=True``: nothing in a checkpoint or a Hub repo is executed); weights that do
    not fit the architecture name the keys; a Hub config naming an architecture timm does not know is rejected.
    """
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
    try:
        return timm.create_model(name, **kwargs)
    except (LocalEntryNotFoundError, HfHubHTTPError) as e:
        _raise_if_server_failed(what, e)
        if not isinstance(e, LocalEntryNotFoundError):  # the Hub answered a refusal (404, 401, gated)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelSpecError(f'{what}: the Hub refused or has no such file ({first})') from None
        offline = os.environ.get('HF_HUB_OFFLINE', '0').lower() not in ('0', '', 'false', 'no')
        why = 'HF_HUB_OFFLINE is set (offline mode)' if offline else 'the Hub cannot be reached (no network)'
        raise ModelSpecError(f'{what}: the weights are not in the local Hub cache and {why}; fix: run '
                             f'`hf download {_hub_id(name)}` once on a machine online with the same HF_HOME (or unset '
                             'HF_HUB_OFFLINE), or pass a local save_for_hf folder or weights file') from None
    except EntryNotFoundError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelSpecError(f'{what}: the Hub refused or has no such file ({first})') from None
    except RuntimeError as e:
        text = str(e)
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        cause = e.__cause__
        if isinstance(cause, pickle.UnpicklingError) and not pickle_refusal(cause) or 'PytorchStreamReader' in text:
            raise ModelSpecError(f'{what}: not a readable checkpoint ({pickle_damage(cause or e)})') from None
        if 'weights_only' in text:
            raise ModelSpecError(f'{what}: refused to load a pickle that holds more than tensors (vitkd unpickles only '
                                 'with weights_only=True: code in a checkpoint never runs); convert a trusted file to '
                                 f'safetensors ({first})') from None
        if 'Error(s) in loading state_dict' in text:
            raise ModelSpecError(f'{what}: the weights do not fit the architecture ({_state_dict_mismatch(text)}); '
                                 'another architecture, or a head trained on another number of classes?') from None
        if 'Unknown model' in text:
            raise ModelSpecError(f'{what}: {first} (its config names an architecture timm does not know; vitkd never '
                                 'runs code from a checkpoint or a Hub repo)') from None
        if 'pretrained' in text.lower():
            raise ModelSpecError(f'{what}: {first}') from None
        raise
    except EOFError:  # torch.load of an empty or truncated pickle
        raise ModelSpecError(f'{what}: not a readable checkpoint (the file ends early)') from None
    except Exception as e:  # noqa: BLE001 - a transport error while downloading the weights (a timeout, a drop)
        _raise_if_server_failed(what, e)
        raise


def _raise_if_server_failed(what: str, error: BaseException) -> None:
    """A download that the Hub failed (5xx, timeout, dropped connection, unreachable) as a one-line
    :class:`HubError` (exit 4) saying what happened; a refusal or an offline cache miss is left to the caller."""
    from huggingface_hub import constants
    failure = server_failure(error)
    if failure is not None:
        raise HubError(f'{what}: downloading it failed: the Hub ({constants.ENDPOINT}) {failure}; nothing was written: '
                       'rerun the same command later (files already downloaded stay in the Hub cache)') from None


def _state_dict_mismatch(text: str) -> str:
    """A one-line digest of PyTorch's multi-line ``load_state_dict`` error."""
    import re
    parts = []
    missing = re.search(r'Missing key\(s\) in state_dict: (.*?)\.\s*$', text, re.M)
    unexpected = re.search(r'Unexpected key\(s\) in state_dict: (.*?)\.\s*$', text, re.M)
    shapes = re.findall(r'size mismatch for (\S+): copying a param with shape torch\.Size\((\[.*?\])\) from '
                        r'checkpoint, the shape in current model is torch\.Size\((\[.*?\])\)', text)
    for label, m in (('missing', missing), ('unexpected', unexpected)):
        if m:
            keys = re.findall(r'"([^"]+)"', m.group(1))
            parts.append(f'{len(keys)} {label} keys, e.g. {", ".join(keys[:3])}')
    if shapes:
        parts.append(f'{len(shapes)} shape mismatches, e.g. ' + ', '.join(f'{k} {a} in the file vs {b} in the model'
                                                                          for k, a, b in shapes[:2]))
    return '; '.join(parts) or text.strip().splitlines()[0]
