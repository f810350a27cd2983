"""``--finetune X``: a new run that starts its student from the weights of another one.

X is an exported student folder, a vitkd run dir or training checkpoint (their exported student), ``hf-hub:org/name``,
or a ``.safetensors``/``.pth``/``.bin`` file of a DeiT or timm model (then ``--student`` and ``--student-kwargs`` name
its architecture). A source with a ``config.json`` brings its architecture and model arguments: the new run's student
is that architecture, for the new data. Two things may differ from the source, as in DeiT's and timm's fine-tuning:

* the number of classes: the class and distillation heads (the model's ``pretrained_cfg['classifier']``) keep the new
  model's initialisation, and the run says so in one line;
* the input size: the absolute position embeddings are resampled to the new patch grid with timm's
  ``resample_abs_pos_embed`` (bicubic over the grid, the class/distillation token entries kept), as timm does for
  pretrained weights at another size and DeiT's ``main.py --finetune`` does by hand;
* the image channels (a grey Fashion-MNIST student fine-tuned on RGB images): the first convolution
  (``pretrained_cfg['first_conv']``) is adapted with timm's ``adapt_input_conv``, as timm loads pretrained weights
  for another ``in_chans`` (1 → 3 repeats the kernel over the channels and scales it by 1/3, so a grey image given
  as three equal channels gives the same output).

Everything else must match: a missing, unexpected or differently shaped tensor is a one-line error listing the keys
(exit 2). Only the student's weights are taken: optimizer, schedule and step start anew, and the teacher and methods
are the new run's own (``--teacher none --distill none`` fine-tunes without a teacher).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv

from .config import Config, ConfigError
from .data import DATASET_STATS
from .export import PICKLE_FILES, CheckpointError, load_state_dict_strict, load_student, read_student_state
from .layout import RUN_MARKER, STATE_FILE, STUDENT_DIR

__all__ = ['FinetuneSource', 'open_source', 'use_source_architecture', 'load_finetune_weights', 'head_names']

POS_EMBED = 'pos_embed'


@dataclass
class FinetuneSource:
    """The weights a fine-tuning run starts from."""
    spec: str                   # as given to --finetune
    state: dict                 # name -> tensor, the student's state dict
    architecture: Optional[str]  # the timm architecture from the source's config.json (None for a bare file)
    model_args: dict            # its model arguments (img_size, depth, …), num_classes excluded


def _config_json(spec: str) -> Path:
    """The config.json of an export folder, run dir, checkpoint or (already downloaded) ``hf-hub:`` source."""
    if spec.startswith('hf-hub:'):
        from huggingface_hub import hf_hub_download
        return Path(hf_hub_download(spec[len('hf-hub:'):], 'config.json'))  # cached by load_student's download
    path = Path(spec).expanduser()
    if (path / STATE_FILE).is_file() or (path / RUN_MARKER).is_file():
        path = path / STUDENT_DIR
    return path / 'config.json'


def open_source(spec: str, cfg: Config) -> FinetuneSource:
    """Read ``--finetune spec`` (see the module docstring); a missing or damaged source is a one-line error."""
    path = Path(spec).expanduser()
    if not spec.startswith('hf-hub:') and path.suffix in ('.safetensors', *PICKLE_FILES):
        if not path.is_file():
            raise CheckpointError(f'--finetune {spec}: no such file')
        return FinetuneSource(spec, read_student_state(path, '--finetune'), None, {})
    if not spec.startswith('hf-hub:') and not path.is_dir():
        raise CheckpointError(f'--finetune {spec!r}: expected an exported student folder, a run dir, a checkpoint '
                              'folder, hf-hub:org/name, or a .safetensors/.pth/.bin file (with --student)')
    if not spec.startswith('hf-hub:') and not _config_json(spec).is_file():
        raise CheckpointError(f'--finetune {spec}: no exported student (config.json + model.safetensors) in '
                              f'{_config_json(spec).parent}')
    model, _, _ = load_student(spec, cfg)  # strict load of the export: a damaged source fails here, in one line
    config = json.loads(_config_json(spec).read_text())
    args = {k: v for k, v in (config.get('model_args') or {}).items() if k != 'num_classes'}
    return FinetuneSource(spec, model.state_dict(), config['architecture'], args)


def use_source_architecture(cfg: Config, source: FinetuneSource, log: Callable[[str], None]) -> None:
    """Make the run's student the source's architecture (its model arguments; ``--input-size`` replaces its
    ``img_size``, the data's channels its ``in_chans``). A bare weights file keeps ``--student``/``--student-kwargs``.
    """
    if source.architecture is None:
        return
    args = dict(source.model_args)
    if cfg.input_size is not None:
        args.pop('img_size', None)  # the new run's input size (build_student sets it from --input-size)
    if 'in_chans' in args:  # the embedded data sets say their channels; image folders and Hub data are RGB
        args['in_chans'] = DATASET_STATS[cfg.dataset]['input_size'][0] if cfg.dataset in DATASET_STATS else 3
    cfg.student, cfg.student_kwargs = source.architecture, args
    shown = ', '.join(f'{k}={v}' for k, v in args.items())
    log(f'--finetune {source.spec}: student {source.architecture}' + (f' ({shown})' if shown else ''))


def head_names(model: nn.Module) -> tuple[str, ...]:
    """The classifier module names of a timm model (``pretrained_cfg['classifier']``: ``head``, or ``('head',
    'head_dist')`` for DeiT's distilled models)."""
    classifier = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier') or 'head'
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def _first_convs(model: nn.Module) -> tuple[str, ...]:
    """The input convolution names of a timm model (``pretrained_cfg['first_conv']``)."""
    first = (getattr(model, 'pretrained_cfg', None) or {}).get('first_conv') or ()
    return (first,) if isinstance(first, str) else tuple(first)


def load_finetune_weights(student: nn.Module, source: FinetuneSource, log: Callable[[str], None]) -> None:
    """Copy the source's weights into ``student`` (built for the new run), strictly but for the heads, the input
    convolution's channels and the position-embedding grid.

    Args:
        student: the new run's student (its heads sized for the new classes, its grid for the new input size).
        source: from :func:`open_source`.
        log: where the one-line notes go (re-initialised heads, resampled position embeddings).

    Raises:
        CheckpointError: any other tensor missing, unexpected or of another shape (exit 2; the keys are listed).
    """
    own = student.state_dict()
    state = dict(source.state)
    heads = [name for name in head_names(student) if f'{name}.weight' in own]
    resized = [name for name in heads if f'{name}.weight' in state and state[f'{name}.weight'].shape != own[
        f'{name}.weight'].shape]
    for name in resized:  # the new model's own initialisation of the heads of another width
        for key in [k for k in own if k.startswith(f'{name}.')]:
            state[key] = own[key]
    if resized:
        before = source.state[f'{resized[0]}.weight'].shape[0]
        log(f'--finetune: re-initialised {" and ".join(resized)} for {own[f"{resized[0]}.weight"].shape[0]} classes '
            f'(the source has {before})')
    for name in _first_convs(student):
        key = f'{name}.weight'
        if key in state and key in own and state[key].dim() == 4 and state[key].shape[1] != own[key].shape[1]:
            channels = state[key].shape[1]
            try:
                state[key] = adapt_input_conv(own[key].shape[1], state[key], base_chans=channels)
            except NotImplementedError:  # no rule for these channel counts: the strict check below lists the shape
                continue
            log(f'--finetune: adapted {name} from {channels} to {own[key].shape[1]} input channels (timm '
                'adapt_input_conv)')
    if POS_EMBED in state and POS_EMBED in own and state[POS_EMBED].shape != own[POS_EMBED].shape:
        state[POS_EMBED] = _resampled_pos_embed(student, state[POS_EMBED], source.spec)
        log(f'--finetune: position embeddings resampled from {tuple(source.state[POS_EMBED].shape)} to '
            f'{tuple(own[POS_EMBED].shape)} (timm resample_abs_pos_embed, bicubic) for the new input size')
    load_state_dict_strict(student, state, f'--finetune {source.spec}')


def _resampled_pos_embed(student: nn.Module, pos_embed: torch.Tensor, spec: str) -> torch.Tensor:
    """[1, P + h·w, D] → [1, P + H·W, D]: the patch entries resampled to the student's grid, the P token entries
    (class, distillation) kept; P = 0 for models that add no position embedding to their tokens."""
    grid = getattr(getattr(student, 'patch_embed', None), 'grid_size', None)
    if grid is None:
        raise ConfigError(f'--finetune {spec}: the position embeddings are {tuple(pos_embed.shape)} but the student '
                          f'{type(student).__name__} has no patch grid to resample them to')
    prefix = 0 if getattr(student, 'no_embed_class', False) else getattr(student, 'num_prefix_tokens', 1)
    return resample_abs_pos_embed(pos_embed, new_size=list(grid), num_prefix_tokens=prefix)
