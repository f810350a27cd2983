"""The model files and folders of a run: checks of what it reads, before it is used (a ``.safetensors`` file whose
header is readable, a timm ``config.json`` that names an architecture; each problem is one
:class:`~vitkd.errors.ConfigError` line naming the file), and folders written so that a kill leaves no half-written
one in place (:func:`atomic_dir`, :func:`replace_dir`). At the bottom of the package (the models, the checkpoints,
the student exports and the Hub code all read or write such files)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from safetensors import SafetensorError, safe_open

from .errors import ConfigError

__all__ = ['check_safetensors', 'read_model_config', 'atomic_dir', 'replace_dir', 'pickle_refusal', 'pickle_damage']


def check_safetensors(path, what: str) -> None:
    """A ``.safetensors`` file whose header and size are consistent (zero-byte, truncated and corrupt files are a
    one-line error naming the file; the tensors are not read)."""
    try:
        with safe_open(str(path), framework='pt') as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f'{what} {path} is not a readable safetensors file ({detail}); it is empty, truncated or '
                          'corrupt: re-export or re-download it') from None


def read_model_config(path, what: str) -> dict:
    """A timm ``config.json`` (``save_for_hf``'s): a JSON object naming its architecture, with an integer
    ``num_classes`` and mappings for ``model_args``/``pretrained_cfg`` when present; else a one-line error."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f'{what}: cannot read {path} ({getattr(e, "strerror", None) or e})') from None
    except json.JSONDecodeError as e:
        raise ConfigError(f'{what}: {path} is not valid JSON ({e.msg} at line {e.lineno})') from None
    problems = []
    if not isinstance(config, dict):
        problems.append(f'a JSON object is expected, got {type(config).__name__}')
    else:
        if not isinstance(config.get('architecture'), str) or not config.get('architecture'):
            problems.append('"architecture" must name a timm model')
        n = config.get('num_classes')
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            problems.append(f'"num_classes" must be an integer >= 0, got {n!r}')
        for key in ('model_args', 'pretrained_cfg'):
            if config.get(key) is not None and not isinstance(config[key], dict):
                problems.append(f'"{key}" must be an object, got {type(config[key]).__name__}')
    if problems:
        raise ConfigError(f'{what}: {path} is not a timm model config: {"; ".join(problems)}')
    return config


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename a finished ``tmp`` folder to ``final``, replacing an existing one (each rename is atomic)."""
    old = final.with_name(final.name + '.old')
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Write a folder under ``<final>.tmp``; on success it replaces ``final``, on error it is removed."""
    tmp = final.with_name(final.name + '.tmp')
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def pickle_refusal(error: BaseException) -> str | None:
    """The line of torch's ``weights_only=True`` refusal naming the global a pickle asks for (a class, a function:
    what a malicious pickle uses to run code); None when the unpickler failed on something else."""
    return next((line.strip() for line in str(error).splitlines() if 'GLOBAL' in line), None)


def pickle_damage(error: BaseException) -> str:
    """One line saying why ``torch.load`` could not read a file that is not a PyTorch checkpoint, or a damaged one
    (random bytes, a truncated zip, an empty file): what the reader met, from its long message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, EOFError):
        return 'the file ends early'
    if isinstance(error, KeyError):  # torch's legacy reader looks its magic number up
        return 'not a PyTorch file'
    met = next((line for line in lines if line.startswith(('Unsupported operand', 'invalid load key'))), None)
    return met or (lines[0].split('. ')[0] if lines else type(error).__name__)
