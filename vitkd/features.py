"""Feature taps: what a loss can ask for, and one :func:`extract` that computes it in a single forward.

A loss declares a :class:`TapSpec` for the student and one for the teacher; the distiller merges the specs of all
active losses and runs each network once. Everything comes from timm's ``forward_intermediates`` (+
``forward_head``), so a ViT and a CNN answer the same questions:

========================  =====================================================  ==================================
tap                       ViT (DeiT, VkD student)                                CNN (RegNet, ResNet, …)
========================  =====================================================  ==================================
``logits``                z_cls [B, K] (+ z_dist [B, K] for distilled models)    [B, K]
``pooled``                ``forward_head(pre_logits=True)`` [B, D]              global pool [B, C]
``tokens``                cls/dist [B, D], patch tokens [B, N, D] after the      ``forward_features`` map
                          final norm (also as a grid ``final_map``)              [B, C, H, W]
``blocks=(i, …)``         block i output (un-normed) as a grid [B, D, h, w],     feature i of
                          its prefix tokens in ``block_prefix[i]`` [B, P, D]     ``forward_intermediates`` (stem,
                                                                                 stages) [B, C_i, H_i, W_i]
``modules=('a.b', …)``    output of any named submodule (forward hook);          same
                          ``'a.b:input'`` = its input (pre-hook; pre-ReLU maps)
========================  =====================================================  ==================================

Models without ``forward_intermediates`` fall back to forward hooks on the modules named by their timm
``feature_info`` (or by ``modules``).
"""
from __future__ import annotations

from .errors import UsageError
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from .models import student_head_logits

__all__ = ['TapSpec', 'Features', 'extract', 'num_taps', 'TapError']


class TapError(UsageError):
    """A tap that the model cannot provide (message is the one-line user error)."""


@dataclass(frozen=True)
class TapSpec:
    """What a loss needs from one network. Logits are always computed for the student."""
    logits: bool = False
    pooled: bool = False
    tokens: bool = False
    blocks: tuple[int, ...] = ()
    modules: tuple[str, ...] = ()

    def merge(self, other: 'TapSpec') -> 'TapSpec':
        return TapSpec(self.logits or other.logits, self.pooled or other.pooled, self.tokens or other.tokens,
                       tuple(sorted(set(self.blocks) | set(other.blocks))),
                       tuple(sorted(set(self.modules) | set(other.modules))))

    @property
    def empty(self) -> bool:
        return self == TapSpec()


@dataclass
class Features:
    """The taps of one forward pass. Absent taps are None / empty.

    ``blocks`` is keyed by the non-negative index; :meth:`block` also accepts negative indices.
    """
    logits: Optional[torch.Tensor] = None         # [B, K] class head (the only head of a non-distilled model)
    logits_dist: Optional[torch.Tensor] = None    # [B, K] distillation head
    pooled: Optional[torch.Tensor] = None         # [B, D] pre-logits
    cls_token: Optional[torch.Tensor] = None      # [B, D] after the final norm
    dist_token: Optional[torch.Tensor] = None     # [B, D] after the final norm
    patch_tokens: Optional[torch.Tensor] = None   # [B, N, D] after the final norm
    final_map: Optional[torch.Tensor] = None      # [B, C, H, W] CNN forward_features / ViT patch tokens as a grid
    blocks: dict[int, torch.Tensor] = field(default_factory=dict)        # i -> [B, C_i, H_i, W_i]
    block_prefix: dict[int, torch.Tensor] = field(default_factory=dict)  # i -> [B, P, D] (ViT prefix tokens)
    modules: dict[str, torch.Tensor] = field(default_factory=dict)       # name -> module output
    num_blocks: int = 0

    def block(self, index: int) -> torch.Tensor:
        """Intermediate ``index`` (negative counts from the end)."""
        key = index % self.num_blocks if self.num_blocks else index
        if key not in self.blocks:
            raise TapError(f'block {index} was not tapped (tapped: {sorted(self.blocks)})')
        return self.blocks[key]

    @property
    def head_logits(self) -> Optional[torch.Tensor]:
        """The logits a plain model would output: mean of both heads for a distilled model."""
        if self.logits is None or self.logits_dist is None:
            return self.logits
        return (self.logits + self.logits_dist) / 2

    def apply(self, fn) -> 'Features':
        """A copy with ``fn`` applied to every tensor (e.g. ``lambda t: t.float()``)."""
        def conv(v):
            if isinstance(v, torch.Tensor):
                return fn(v)
            if isinstance(v, dict):
                return {k: conv(x) for k, x in v.items()}
            return v
        return Features(**{f.name: conv(getattr(self, f.name)) for f in dataclasses.fields(self)})


def _is_vit(model: nn.Module) -> bool:
    return hasattr(model, 'blocks') and hasattr(model, 'num_prefix_tokens') and hasattr(model, 'patch_embed')


def num_taps(model: nn.Module) -> int:
    """How many intermediates ``blocks`` can index: ViT blocks, or the CNN's feature_info entries."""
    if _is_vit(model):
        return len(model.blocks)
    info = getattr(model, 'feature_info', None)
    return len(info) if info is not None else 0


def _resolve(indices: tuple[int, ...], n: int, what: str) -> list[int]:
    out = []
    for i in indices:
        if not -n <= i < n:
            raise TapError(f'{what} tap index {i} is out of range: the model has {n} taps (valid: {-n}..{n - 1})')
        out.append(i % n)
    return sorted(set(out))


INPUT_SUFFIX = ':input'


def _hook_outputs(model: nn.Module, names: list[str], store: dict) -> list:
    """Forward hooks storing each named module's output, or its first input for ``'name:input'`` taps.

    An input tap is taken by a forward pre-hook and cloned when the module works in place (timm's ResNet
    ``act2`` is ``ReLU(inplace=True)``), so e.g. ``'layer4.1.act2:input'`` is the pre-ReLU map.
    """
    modules = dict(model.named_modules())
    handles = []
    for name in names:
        module_name = name[:-len(INPUT_SUFFIX)] if name.endswith(INPUT_SUFFIX) else name
        if module_name not in modules:
            raise TapError(f'module tap {module_name!r} is not a submodule of {type(model).__name__}')
        module = modules[module_name]
        if name.endswith(INPUT_SUFFIX):
            def pre_hook(m, inp, name=name):
                store[name] = inp[0].clone() if getattr(m, 'inplace', False) else inp[0]
            handles.append(module.register_forward_pre_hook(pre_hook))
        else:
            def hook(_m, _inp, out, name=name):
                store[name] = out
            handles.append(module.register_forward_hook(hook))
    return handles


def extract(model: nn.Module, x: torch.Tensor, spec: TapSpec, what: str = 'model', only_requested: bool = False
            ) -> Features:
    """Run ``model`` once on ``x`` and return the taps of ``spec`` (plus logits).

    Args:
        model: a timm model (unwrapped, not DDP).
        x: input [B, C, H, W].
        spec: the union of what the losses need.
        what: 'student' / 'teacher', for error messages.
        only_requested: compute logits only when ``spec.logits`` asks for them, and when nothing needs the final
            features (no logits, pooled, tokens or module taps) stop the forward after the deepest tapped block
            (``forward_intermediates(stop_early=True, intermediates_only=True)``). The distiller uses it for the
            frozen teacher, whose unused tail would be wasted compute (e.g. FitNet on a middle stage).
    """
    n = num_taps(model)
    indices = _resolve(spec.blocks, n, what) if spec.blocks else []
    hooked: dict[str, torch.Tensor] = {}
    handles = _hook_outputs(model, list(spec.modules), hooked)
    vit = _is_vit(model)
    feats = Features(num_blocks=n)
    needs_final = not only_requested or spec.logits or spec.pooled or spec.tokens or bool(spec.modules)
    final = None
    try:
        if indices and hasattr(model, 'forward_intermediates'):
            kwargs = dict(return_prefix_tokens=True) if vit and model.num_prefix_tokens else {}
            if needs_final:
                final, inter = model.forward_intermediates(x, indices=indices, norm=False, output_fmt='NCHW',
                                                           **kwargs)
            else:  # only intermediate taps: the blocks after the deepest one never run
                inter = model.forward_intermediates(x, indices=indices, norm=False, output_fmt='NCHW', stop_early=True,
                                                    intermediates_only=True, **kwargs)
            for i, t in zip(indices, inter):
                if isinstance(t, tuple):
                    feats.blocks[i], feats.block_prefix[i] = t
                else:
                    feats.blocks[i] = t
        elif indices:  # hook fallback on the modules timm's feature_info names
            info = getattr(model, 'feature_info', None)
            if info is None:
                raise TapError(f'{what} {type(model).__name__} has neither forward_intermediates nor feature_info; '
                               'tap its modules by name instead')
            names = [info[i]['module'] for i in indices]
            store: dict[str, torch.Tensor] = {}
            handles += _hook_outputs(model, names, store)
            final = model.forward_features(x)
            feats.blocks = {i: store[name] for i, name in zip(indices, names)}
        else:
            final = model.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    feats.modules = hooked
    if final is None:
        return feats
    if spec.logits or not only_requested:
        feats.logits, feats.logits_dist = student_head_logits(model, final)
    if spec.pooled:
        feats.pooled = model.forward_head(final, pre_logits=True)
    if spec.tokens:
        if vit and final.ndim == 3:
            p = model.num_prefix_tokens
            feats.cls_token = final[:, 0] if p >= 1 else None
            feats.dist_token = final[:, 1] if p >= 2 else None
            feats.patch_tokens = final[:, p:]
            h, w = model.patch_embed.dynamic_feat_size(x.shape[-2:]) if hasattr(
                model.patch_embed, 'dynamic_feat_size') else model.patch_embed.grid_size
            feats.final_map = feats.patch_tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        else:
            feats.final_map = final
    return feats
