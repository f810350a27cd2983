"""The student on its own, in timm's format: written by a run and by each checkpoint, read back strictly.

:func:`export_model` writes a model as timm's ``save_for_hf`` does (``config.json`` + ``model.safetensors``, the
evaluation preprocessing and the class names recorded), atomically; :func:`export_student` writes a run's final
student (and its EMA copy). :func:`load_student` reads any of what a run leaves (an export, a checkpoint, a run dir,
``hf-hub:org/name``, a bare weights file) back into a timm model, every key and shape checked
(:func:`load_state_dict_strict`); pickles are read with ``weights_only=True`` only (:func:`read_pickle_weights`).
The training checkpoints themselves are :mod:`vitkd.checkpoint`'s.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from .config import Config, ConfigError
from .errors import HubError, server_failure
from .files import atomic_dir, pickle_damage, pickle_refusal, read_model_config
from .layout import MODEL_FILE, RUN_MARKER, STATE_FILE, STUDENT_DIR
from .models import create_student

if TYPE_CHECKING:
    from .run import Run

__all__ = ['CheckpointError', 'PICKLE_FILES', 'SOURCE_KEYS', 'read_pickle_weights', 'read_safetensors',
           'load_state_dict_strict', 'check_label_names', 'export_model', 'folded_student', 'export_student',
           'read_student_state', 'load_student']

_logger = logging.getLogger(__name__)


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used (one-line message)."""


PICKLE_FILES = ('.pth', '.pt', '.bin')


def read_pickle_weights(path: Path, what: str):
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never code.

    A file that needs anything else (a class, a function: what a malicious pickle uses to run code) is refused with a
    one-line :class:`CheckpointError`; nothing in it is executed.
    """
    from accelerate.utils import load  # torch.load(weights_only=True) + accelerate's numpy RNG-state allow-list
    try:
        return load(str(path), map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        refusal = pickle_refusal(e)
        if refusal:
            raise CheckpointError(f'{what} {path}: refused to unpickle it: it holds more than tensors ({refusal}) and '
                                  'vitkd only loads pickles with weights_only=True (code in a checkpoint never runs); '
                                  'convert a trusted file to safetensors') from None
        raise CheckpointError(f'{what} {path}: not a readable checkpoint ({pickle_damage(e)})') from None
    except (RuntimeError, EOFError, KeyError) as e:  # KeyError: torch's legacy reader on a bad magic number
        raise CheckpointError(f'{what} {path}: not a readable checkpoint ({pickle_damage(e)})') from None
    except OSError as e:
        raise CheckpointError(f'{what} {path}: unreadable ({e.strerror or e})') from None


# ---- state dicts --------------------------------------------------------------------------------------------------

def _key_list(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    more = f' … and {len(keys) - limit} more' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def load_state_dict_strict(model: nn.Module, state: dict, what: str) -> None:
    """``model.load_state_dict(state)`` with every key and shape checked first; a mismatch is a one-line error."""
    expected = model.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    shapes = [f'{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}' for k in sorted(set(state) & set(expected))
              if tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = [f'missing keys: {_key_list(missing)}' if missing else '',
                 f'unexpected keys: {_key_list(unexpected)}' if unexpected else '',
                 f'shape mismatch (checkpoint vs model): {_key_list(shapes, 6)}' if shapes else '']
        raise CheckpointError(f'{what} does not match {type(model).__name__}: ' + '; '.join(p for p in parts if p))
    model.load_state_dict(state, strict=True)


def read_safetensors(path: Path) -> dict:
    """The tensors of a ``.safetensors`` file; a missing, zero-byte, truncated or corrupt one is a one-line error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except (OSError, RuntimeError, ValueError, SafetensorError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f'cannot read {path}: {detail} (an empty, truncated or corrupt safetensors file?)') \
            from None


# ---- the student in timm's format ---------------------------------------------------------------------------------

# pretrained_cfg keys that describe the weights an architecture was first released with (their license, Hub repo,
# paper tag): an exported student's weights are the run's own, so these are not copied into its config.json.
SOURCE_KEYS = ('license', 'tag', 'hf_hub_id', 'hf_hub_filename', 'url', 'file', 'origin_url', 'source',
               'description', 'notes')


def check_label_names(label_names: Optional[list], teacher_labels) -> None:
    """The data's class names against the teacher's (timm's ``label_names``, a list or an {index: name} dict), when
    the teacher has them: a teacher whose class k is another class than the data's k would distil the wrong labels."""
    if not label_names or not teacher_labels:
        return
    theirs = [teacher_labels[i] for i in sorted(teacher_labels)] if isinstance(teacher_labels, dict) \
        else list(teacher_labels)
    if list(map(str, theirs)) != list(map(str, label_names)):
        diff = next((i for i, (a, b) in enumerate(zip(theirs, label_names)) if str(a) != str(b)), len(label_names))
        shown = (f'class {diff}: teacher {theirs[diff]!r}, data {label_names[diff]!r}'
                 if diff < min(len(theirs), len(label_names))
                 else f'{len(theirs)} teacher vs {len(label_names)} data classes')
        raise ConfigError(f'the teacher\'s class names differ from the data\'s ({shown}); use the data set the '
                          'teacher was trained on, or a teacher trained on this one')


def export_model(model: nn.Module, folder: Path, data_config: dict, label_names: Optional[list] = None) -> Path:
    """Write ``model`` with timm's ``save_for_hf`` (config.json + model.safetensors), atomically.

    ``data_config`` (input_size, mean, std, crop_pct, interpolation) is the preprocessing the model was trained and
    evaluated with; it is recorded in ``pretrained_cfg`` so ``timm.data.resolve_data_config`` reproduces it.
    ``label_names`` (the data's class names by index) go to config.json's ``label_names``, where timm and the Hub
    read them. The architecture's release metadata (:data:`SOURCE_KEYS`) is left out.
    """
    from timm.models import save_for_hf
    with atomic_dir(Path(folder)) as tmp:
        save_for_hf(model, tmp, safe_serialization=True, data_config=dict(data_config),
                    model_config={'label_names': list(label_names)} if label_names else None)
        config = json.loads((tmp / 'config.json').read_text())
        for key in SOURCE_KEYS:
            config.get('pretrained_cfg', {}).pop(key, None)
        (tmp / 'config.json').write_text(json.dumps(config, indent=2) + '\n')
    return Path(folder)


def folded_student(distiller: nn.Module, model: Optional[nn.Module] = None) -> nn.Module:
    """The student as exported: every loss folds away what it inserted into it (identity for most methods)."""
    if model is None:
        return distiller.export_student()
    for loss in distiller.losses.values():
        model = loss.export_student(model)
    return model


def _build_from_timm_config(config: dict, source: str) -> nn.Module:
    import timm
    arch = config.get('architecture')
    if not arch:
        raise CheckpointError(f'{source}: config.json has no "architecture"')
    if not timm.is_model(arch):
        raise CheckpointError(f'{source}: unknown architecture {arch!r} (a timm model, or vitkd\'s students)')
    kwargs = dict(config.get('model_args') or {})
    kwargs.setdefault('num_classes', config.get('num_classes'))
    pcfg = dict(config.get('pretrained_cfg') or {})
    return timm.create_model(arch, pretrained=False, pretrained_cfg_overlay=pcfg, **kwargs)


def _load_export_folder(folder: Path, source: str) -> tuple[nn.Module, dict]:
    config = read_model_config(folder / 'config.json', source)
    weights = folder / MODEL_FILE
    if not weights.is_file():
        raise CheckpointError(f'{source}: {weights} is missing')
    model = _build_from_timm_config(config, source)
    load_state_dict_strict(model, read_safetensors(weights), f'student weights {weights}')
    return model, dict(config.get('pretrained_cfg') or {})


def read_student_state(path: Path, what: str = '--student-ckpt') -> dict:
    """The student's tensors in a ``.safetensors`` file or a pickled ``.pth``/``.bin`` (read with
    ``weights_only=True``; DeiT's ``{'model': …}`` and ``{'state_dict': …}`` wrappers are opened, a DDP ``module.``
    prefix is dropped); a vitkd training checkpoint's ``student.`` part alone (the rest is training-only)."""
    if path.suffix == '.safetensors':
        state = read_safetensors(path)
    else:  # a pickle: tensors only (weights_only=True); {'model': …} / {'state_dict': …} wrappers are opened
        state = read_pickle_weights(path, what)
        while isinstance(state, dict) and len(state) and not any(torch.is_tensor(v) for v in state.values()):
            inner = next((state[k] for k in ('state_dict', 'model', 'module') if isinstance(state.get(k), dict)),
                         None)
            if inner is None:
                break
            state = inner
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise CheckpointError(f'{what} {path}: not a state dict of tensors')
        if state and all(k.startswith('module.') for k in state):  # saved from a DDP-wrapped model
            state = {k[len('module.'):]: v for k, v in state.items()}
    if any(k.startswith('student.') for k in state):
        skipped = sorted(k for k in state if not k.startswith('student.'))
        if skipped:
            _logger.info('skipping %d training-only tensors of %s: %s', len(skipped), path, _key_list(skipped, 5))
        state = {k[len('student.'):]: v for k, v in state.items() if k.startswith('student.')}
    return state


def load_student(spec: str, cfg: Config, num_classes: Optional[int] = None) -> tuple[nn.Module, dict, str]:
    """Load a student for evaluation, strictly.

    Args:
        spec: an exported folder (config.json + model.safetensors), a training checkpoint folder (its ``student/``
            export), a run dir (its final ``student/``), ``hf-hub:org/name``, or a ``.safetensors`` file (then
            ``cfg.student`` / ``cfg.student_kwargs`` name the architecture; keys may carry the checkpoint's
            ``student.`` prefix, the other checkpoint parts are training-only and skipped).
        cfg: the run options (architecture for bare files).
        num_classes: classifier width for a bare ``.safetensors`` file.

    Returns:
        (model in eval mode, its pretrained_cfg — the data config when known — and a description of the source).
    """
    if spec.startswith('hf-hub:'):
        repo = spec[len('hf-hub:'):]
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
        try:
            files = [hf_hub_download(repo, name) for name in ('config.json', MODEL_FILE)]
        except Exception as e:  # noqa: BLE001 - a Hub that failed is said as such; a refusal or cache miss below
            failure = server_failure(e)
            if failure is not None:
                raise HubError(f'{spec}: downloading it failed: the Hub ({constants.ENDPOINT}) {failure}; rerun the '
                               'same command later') from None
            if not isinstance(e, (LocalEntryNotFoundError, HfHubHTTPError)):
                raise
            if isinstance(e, HfHubHTTPError):
                raise CheckpointError(f'{spec}: {str(e).splitlines()[0]}') from None
            offline = os.environ.get('HF_HUB_OFFLINE', '0').lower() not in ('0', '', 'false', 'no')
            why = 'HF_HUB_OFFLINE is set (offline mode)' if offline else 'the Hub cannot be reached (no network)'
            raise CheckpointError(f'{spec}: not in the local Hub cache and {why}; fix: run `hf download {repo}` once '
                                  'on a machine online with the same HF_HOME (or unset HF_HUB_OFFLINE), or pass the '
                                  'exported folder') from None
        model, pcfg = _load_export_folder(Path(files[0]).parent, spec)
        return model.eval(), pcfg, spec
    path = Path(spec).expanduser()
    if path.is_dir():
        folder = path
        if (path / STATE_FILE).is_file() or (path / RUN_MARKER).is_file():
            folder = path / STUDENT_DIR  # a training checkpoint or a run dir: their exported student
        if not (folder / 'config.json').is_file():
            raise CheckpointError(f'--student-ckpt {spec}: no exported student (config.json + model.safetensors) '
                                  f'in {folder}')
        model, pcfg = _load_export_folder(folder, spec)
        return model.eval(), pcfg, str(folder)
    if path.suffix == '.safetensors' or path.suffix in PICKLE_FILES:
        if not path.is_file():
            raise CheckpointError(f'--student-ckpt {spec}: no such file')
        state = read_student_state(path)
        model = create_student(cfg.student, num_classes or 1000, **cfg.student_kwargs)
        load_state_dict_strict(model, state, f'{path} (as --student {cfg.student})')
        return model.eval(), {}, f'{path} as {cfg.student}'
    raise CheckpointError(f'--student-ckpt {spec!r}: expected an exported folder, a checkpoint folder, a run dir, a '
                          '.safetensors (or .pth/.bin, read with weights_only=True) file, or hf-hub:org/name')


def export_student(r: 'Run', out_dir: Path, accelerator: Accelerator, metrics: dict) -> Path:
    """The student alone in timm's format (config.json + model.safetensors, the data's class names as
    ``label_names``), no distillation parts; the EMA student beside it (``student_ema/``) when EMA is on. Written
    atomically (``.tmp`` then renamed). The class names are checked against the teacher's when it records them."""
    export = out_dir / 'student'
    labels = [str(c) for c in r.spec.classes] if getattr(r.spec, 'classes', None) else None
    teacher_model = getattr(r.teacher, 'model', None)
    check_label_names(labels, getattr(teacher_model, 'pretrained_cfg', {}).get('label_names'))
    failure = None
    if accelerator.is_main_process:
        try:
            export_model(folded_student(r.distiller_unwrapped), export, r.data_config, labels)
            if r.ema is not None:
                export_model(folded_student(r.distiller_unwrapped, r.ema.module), out_dir / 'student_ema',
                             r.data_config, labels)
        except OSError as e:
            failure = (e.errno, e.strerror or str(e), e.filename)
    failure = broadcast_object_list([failure])[0]  # every process raises the main process's failure (one exit code)
    if failure is not None:
        raise OSError(*failure)
    return export
