"""Training checkpoints: atomic saves, keep-last-k and best, exact resume, and the save when a signal stops a run.

A run dir holds::

    checkpoints/step_00001250/      one complete training state (the newest ``--keep-last`` are kept)
        model.safetensors           the distiller, unwrapped: ``student.*`` + every trainable distillation part
        optimizer.bin               optimizer state (accelerate; loaded with ``weights_only=True``)
        random_states_<rank>.pkl    Python/NumPy/torch RNG states of each process (accelerate)
        ema.safetensors             the EMA student (with ``--model-ema``)
        student/                    the student alone in timm's format (what ``--eval-student`` loads)
        trainer_state.json          epoch, step, batches done in the epoch, scheduler, best metrics, options
    checkpoints/best/               a copy (hard links) of the checkpoint with the best validation avg top-1
    student/, student_ema/          the final student in timm's format (config.json + model.safetensors)

The student exports (``student/``) are written and read back by :mod:`vitkd.export`; when to stop is decided by
:mod:`vitkd.stopping`.

A checkpoint is written under ``<name>.tmp`` and renamed when complete, so a kill while saving leaves at most a
``.tmp`` folder that :func:`find_checkpoints` ignores (and the next save removes). Nothing is unpickled with
``weights_only=False``: scheduler, counters and EMA are stored as JSON / safetensors by vitkd itself (accelerate's
custom-object checkpoints would unpickle them without that guard).

Exact resume: the data order and every sample's augmentation are functions of (seed, epoch, index)
(:class:`vitkd.data.EpochSampler`), the global RNG states come back from accelerate, and a mid-epoch resume skips
the batches already trained (``skip_first_batches``). On CPU with a fixed seed a resumed run ends with weights
bit-identical to an uninterrupted one (``tests/test_checkpoint.py``).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pickle
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from accelerate.checkpointing import save_accelerator_state
from accelerate.utils import OPTIMIZER_NAME, SAFE_WEIGHTS_NAME, SCALER_NAME, save

from .async_save import BackgroundWriter, host_copy, host_module
from .config import Config, ConfigError, typed_text
from .data import train_set_fingerprint
from .export import (CheckpointError, export_model, folded_student, load_state_dict_strict, read_pickle_weights,
                     read_safetensors)
from .files import atomic_dir, replace_dir
from .layout import CHECKPOINTS, MODEL_FILE, STATE_FILE, STUDENT_DIR
from .stopping import StopControl

__all__ = ['Checkpointer', 'find_checkpoints', 'latest_checkpoint', 'prune_checkpoints', 'checkpoint_problem',
           'resolve_resume', 'check_same_run', 'check_same_data']

_logger = logging.getLogger(__name__)

EMA_FILE = 'ema.safetensors'
BEST = 'best'
_NAME = re.compile(r'^step_(\d{8,})$')
FORMAT = 1

# Options that do not change the trained weights: a resume may change them without a warning.
_RUN_ONLY_OPTIONS = {'resume', 'overwrite', 'output_dir', 'time_limit', 'max_steps', 'epochs', 'log_every',
                     'eval_every', 'save_every_steps', 'keep_last', 'push_to_hub', 'hub_model_id', 'hub_private',
                     'num_workers', 'eval_teacher', 'eval_student', 'student_ckpt', 'compile_teacher', 'compile_student',
                     'ddp_find_unused', 'log_with'}


# Options that say which run a checkpoint belongs to (the flag that sets each): resuming with another value would
# continue a different run from this one's weights, so it is refused. The training set and the class count are
# compared by what the data holds (``trainer_state.json``'s ``data``), not by the path it is read from.
_RUN_IDENTITY = {'distill': '--distill', 'teacher': '--teacher', 'teacher_arch': '--teacher-arch',
                 'teacher_kwargs': '--teacher-kwargs', 'student': '--student', 'student_kwargs': '--student-kwargs',
                 'dataset': '--dataset'}

# Budget options a resume may raise to train further: the run goes on and says so.
_BUDGET_OPTIONS = {'epochs': '--epochs', 'max_steps': '--max-steps', 'time_limit': '--time-limit'}


# ---- folders ------------------------------------------------------------------------------------------------------

def checkpoint_name(step: int) -> str:
    return f'step_{step:08d}'


def find_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete training checkpoints of a run, oldest first: ``checkpoints/step_N`` folders with a state file.

    ``.tmp`` folders (a save in progress or killed), ``best`` and anything else are ignored.
    """
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _NAME.match(path.name)
        if m and path.is_dir() and (path / STATE_FILE).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint of a run (None when there is none)."""
    found = find_checkpoints(out_dir)
    return found[-1][1] if found else None


def prune_checkpoints(out_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints and any stale ``.tmp``/``.old`` folder.

    A checkpoint is first renamed to ``<name>.old`` (atomic), then deleted: a kill while deleting never leaves a
    half-deleted folder that still has its state file (which :func:`find_checkpoints` would take as complete). A
    ``best`` folder lost to a kill between the two renames of its update is restored first (:func:`_recover_best`).

    Returns:
        The deleted folders.
    """
    root = Path(out_dir) / CHECKPOINTS
    found = find_checkpoints(out_dir)
    doomed = [path for _, path in found[:max(0, len(found) - keep_last)]]
    if root.is_dir():
        _recover_best(root)
        doomed += [p for p in root.iterdir() if p.is_dir() and p.suffix in ('.tmp', '.old')]
    for path in doomed:
        target = path
        if path.suffix not in ('.tmp', '.old'):
            target = path.with_name(path.name + '.old')
            shutil.rmtree(target, ignore_errors=True)
            os.replace(path, target)
        shutil.rmtree(target, ignore_errors=True)
    return doomed


def _recover_best(root: Path) -> None:
    """``checkpoints/best`` missing (killed between the renames of :func:`vitkd.files.replace_dir`): take the
    finished new copy (``best.tmp`` with its metrics.json, written last) or else the previous one (``best.old``)."""
    best = root / BEST
    if best.exists():
        return
    for candidate in (root / f'{BEST}.tmp', root / f'{BEST}.old'):
        if (candidate / 'metrics.json').is_file() and (candidate / STATE_FILE).is_file():
            os.replace(candidate, best)
            return


def _copy_tree_linked(src: Path, dst: Path) -> None:
    """Copy a folder with hard links where possible (checkpoint files are never modified in place)."""
    def link_or_copy(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    shutil.copytree(src, dst, copy_function=link_or_copy)


def _save_safetensors(state: dict, path: Path) -> None:
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path), metadata={'format': 'pt'})


# ---- resume -------------------------------------------------------------------------------------------------------

def checkpoint_problem(ckpt: Path) -> Optional[str]:
    """Why ``ckpt`` cannot be resumed from, judged from its files without loading them (None: it looks complete).

    Checks what a kill, a full disk or a damaged copy leaves behind: the trainer state (valid JSON with the counters),
    the headers of the safetensors files, the optimizer state's zip container and the RNG-state files.
    """
    ckpt = Path(ckpt)
    try:
        trainer = json.loads((ckpt / STATE_FILE).read_text())
        state = trainer['state']
        if not all(isinstance(state.get(k), int) for k in ('epoch', 'step')):
            raise ValueError('no epoch/step counters')
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f'{ckpt / STATE_FILE} is unreadable ({getattr(e, "strerror", None) or e})'
    from safetensors import SafetensorError, safe_open
    weights = [ckpt / MODEL_FILE, ckpt / STUDENT_DIR / MODEL_FILE]
    weights += [ckpt / EMA_FILE] if trainer.get('has_ema') else []
    for path in weights:
        try:
            with safe_open(str(path), framework='pt') as f:
                f.keys()
        except (SafetensorError, OSError) as e:
            return f'{path} is missing, empty or truncated ({str(e).splitlines()[0] if str(e) else type(e).__name__})'
    import zipfile
    if not zipfile.is_zipfile(ckpt / 'optimizer.bin'):
        return f'{ckpt / "optimizer.bin"} is missing or truncated'
    for rank in range(int(trainer.get('world_size') or 1)):
        rng = ckpt / f'random_states_{rank}.pkl'
        if not rng.is_file() or rng.stat().st_size == 0:
            return f'{rng} is missing or empty'
    return None


def resolve_resume(cfg: Config, log=print) -> Optional[Path]:
    """The checkpoint ``--resume`` points at (None: start from scratch); fills ``cfg.output_dir`` from it if unset.

    ``auto`` = the newest complete checkpoint of ``--output-dir`` that passes :func:`checkpoint_problem` (newer ones
    that do not are skipped, saying which and why; none yet = start, so a preemptible job can always pass
    ``--resume auto``); a path = a checkpoint folder, or a run dir (its newest checkpoint), refused in one line when
    damaged.
    """
    if not cfg.resume:
        return None
    if cfg.resume == 'auto':
        if cfg.output_dir is None:
            raise ConfigError('--resume auto needs --output-dir (the run to continue)')
        found = find_checkpoints(Path(cfg.output_dir))
        skipped = []
        for _, ckpt in reversed(found):
            problem = checkpoint_problem(ckpt)
            if problem is None:
                if skipped:
                    log(f'--resume auto: skipped {"; ".join(skipped)}; resuming from {ckpt}')
                return ckpt
            skipped.append(f'{ckpt.name} ({problem})')
        if skipped:
            raise CheckpointError(f'--resume auto: no checkpoint of {cfg.output_dir} can be resumed: '
                                  f'{"; ".join(skipped)}; fix or move them aside, or start anew with --overwrite')
        log(f'--resume auto: no complete checkpoint in {cfg.output_dir}, starting from scratch')
        return None
    path = Path(cfg.resume)
    ckpt = path if (path / STATE_FILE).is_file() else latest_checkpoint(path)
    if ckpt is None:
        raise ConfigError(f'--resume {cfg.resume}: neither a checkpoint folder (with {STATE_FILE}) nor a run dir with '
                          'complete checkpoints')
    problem = checkpoint_problem(ckpt)
    if problem is not None:
        raise CheckpointError(f'--resume {cfg.resume}: cannot resume from {ckpt}: {problem}')
    if cfg.output_dir is None:
        cfg.output_dir = str(ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS else ckpt.parent)
    return ckpt


def _fresh_run_hint(ckpt: Path) -> str:
    run_dir = ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS else ckpt.parent
    return (f'to train with the new setting, start a fresh run: another --output-dir, or --overwrite without --resume '
            f'(it moves {run_dir}\'s outputs aside)')


def _same_value(old: Any, new: Any) -> bool:
    """Equal as stored in ``trainer_state.json``; two spellings of one existing path are the same teacher."""
    old, new = _jsonable(old), _jsonable(new)
    if old == new:
        return True
    if isinstance(old, str) and isinstance(new, str) and os.path.exists(old) and os.path.exists(new):
        return os.path.realpath(old) == os.path.realpath(new)
    return False


def check_same_run(cfg: Config, ckpt: Path) -> None:
    """Refuse to resume ``ckpt`` with another method, teacher, student or data set kind (see :func:`check_same_data`
    for the data itself).

    Raises:
        CheckpointError: one line naming the first setting that differs (old → new) and how to start a fresh run.
    """
    try:
        saved = json.loads((Path(ckpt) / STATE_FILE).read_text()).get('config') or {}
    except (OSError, ValueError, AttributeError):
        return  # checkpoint_problem has judged the file; a checkpoint without its options has nothing to compare
    for key, flag in _RUN_IDENTITY.items():
        if key in saved and hasattr(cfg, key) and not _same_value(saved[key], getattr(cfg, key)):
            raise CheckpointError(f'--resume: {ckpt} belongs to a run with {flag} {typed_text(saved[key])}, this command '
                                  f'has {flag} {typed_text(getattr(cfg, key))} ({typed_text(saved[key])} → '
                                  f'{typed_text(getattr(cfg, key))}); resume with the run\'s own setting, or '
                                  f'{_fresh_run_hint(Path(ckpt))}')


def check_same_data(saved: dict, current: dict, ckpt: Path) -> None:
    """Refuse to resume ``ckpt`` on a training set or class count other than the one it was trained on.

    Args:
        saved: the checkpoint's ``data`` record (``samples``, ``sha256``, ``num_classes``); empty for older ones.
        current: the same record of this command's data.
    """
    if saved.get('num_classes') is not None and saved['num_classes'] != current.get('num_classes'):
        old, new = saved['num_classes'], current.get('num_classes')
        raise CheckpointError(f'--resume: {ckpt} was trained on {old} classes and the data now has {new} ({old} → '
                              f'{new}); resume on the run\'s own data, or {_fresh_run_hint(ckpt)}')
    if saved.get('sha256') and current.get('sha256') and saved['sha256'] != current['sha256']:
        added = current.get('samples', 0) - saved.get('samples', 0)
        what = (f'{abs(added)} image{"s" if abs(added) > 1 else ""} {"added" if added > 0 else "removed"}' if added else
                'the same number of images, other files')
        raise CheckpointError(f'--resume: the training set changed since {ckpt} was saved ({saved.get("samples")} → '
                              f'{current.get("samples")} images, {what}); resuming would train on other data than the '
                              f'run started with: restore the data set, or {_fresh_run_hint(ckpt)}')


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, 'tolist') else str(o)))


class Checkpointer:
    """Saves, prunes, keeps the best, resumes and handles preemption for one training run.

    Args:
        cfg: the run options (``save_every_steps``, ``keep_last``, ``seed``).
        run: the :class:`vitkd.run.Run` (prepared distiller, optimizer, scheduler, EMA, state, spec).
        out_dir: the run dir.
        accelerator: the run's accelerator.
        argv: the command-line arguments of the run (default ``sys.argv[1:]``), for the resume command.
    """

    def __init__(self, cfg: Config, run, out_dir: Path, accelerator, argv: Optional[list[str]] = None,
                 before_save: Optional[Callable[[Any], None]] = None, background: bool = False,
                 stop: Optional[StopControl] = None):
        """``before_save(train_state)`` runs before every save and may raise to prevent it (the non-finite guard:
        a step whose loss was NaN is never saved). ``background``: write the main process's files on a thread
        (see :meth:`save`). ``stop``: the run's :class:`vitkd.stopping.StopControl`, whose agreed signal stop
        :meth:`step_hook` saves for (default: one over ``run.state``)."""
        self.cfg, self.r, self.out_dir, self.acc = cfg, run, Path(out_dir), accelerator
        self.before_save = before_save
        self.argv = list(sys.argv[1:] if argv is None else argv)
        self.best: Optional[dict] = None
        self.last_saved: Optional[Path] = None
        self.resumed_from: Optional[Path] = None
        self.stop = stop if stop is not None else StopControl(accelerator, run.state)
        self.preempted = False  # a signal stopped the run mid-epoch and its checkpoint was saved by step_hook
        # what the training set is (size, file list hash, classes): a resume on other data is refused
        self.data_record = dict(train_set_fingerprint(run.train_loader.dataset), num_classes=run.spec.num_classes)
        self.writer = BackgroundWriter() if background else None
        self._pending: Optional[tuple[Path, Path, Optional[dict]]] = None  # (final, tmp, best) of a background save
        # accelerate saves a DDP model with 'module.' keys; store the unwrapped distiller instead (portable across
        # world sizes, and the student is readable as 'student.*'), and load it back strictly ourselves.
        accelerator.register_save_state_pre_hook(self._save_models_hook)
        accelerator.register_load_state_pre_hook(self._load_models_hook)

    # accelerate hooks
    def _save_models_hook(self, models, weights, output_dir) -> None:
        for i, model in enumerate(models):
            weights[i] = self.acc.unwrap_model(model).state_dict()

    def _load_models_hook(self, models, input_dir) -> None:
        if len(models) != 1:
            raise CheckpointError(f'expected one prepared model (the distiller), found {len(models)}')
        state = read_safetensors(Path(input_dir) / MODEL_FILE)
        load_state_dict_strict(self.acc.unwrap_model(models[0]), state, f'checkpoint {input_dir}')
        models.clear()  # loaded: accelerate must not load it again

    # saving
    def _trainer_state(self) -> dict:
        r = self.r
        return dict(format=FORMAT, state=r.state.state_dict(), scheduler=_jsonable(r.scheduler.state_dict()),
                    best=self.best, world_size=self.acc.num_processes, batches_per_epoch=len(r.train_loader),
                    global_batch=r.global_batch, has_ema=r.ema is not None, saved_at=time.strftime('%Y-%m-%d %H:%M:%S'),
                    data=self.data_record, config=_jsonable(dataclasses.asdict(self.cfg)))

    def save(self, metrics: Optional[dict] = None) -> Optional[Path]:
        """Save the full training state as ``checkpoints/step_<step>`` (atomically), prune, and update ``best``.

        ``metrics``: validation metrics computed just before (None when this save follows no evaluation).

        A write that fails with an ``OSError`` (a full disk, a quota) on any process removes the partial
        ``.tmp`` folder, says which previous checkpoint is intact (``--resume auto`` would take it) and returns None:
        training continues and the next save tries again. Every process takes the same decision.

        With ``background`` (:mod:`vitkd.async_save`) each process writes its RNG states here and the main process's
        files are written by a thread from a host copy taken here; :meth:`wait` (called by the next save and at the
        end of the run) settles that write with the same decisions and messages. Returns the checkpoint's path (where
        it will be, in the background case).
        """
        self.wait()
        acc, r = self.acc, self.r
        if self.before_save is not None:
            self.before_save(r.state)
        final = self.out_dir / CHECKPOINTS / checkpoint_name(r.state.step)
        tmp = final.with_name(final.name + '.tmp')
        key = r.best_metric
        improved = bool(metrics) and (self.best is None or metrics[key] > self.best[key])
        best = self.best
        if improved:
            epoch = r.state.epoch - 1 if r.state.batches_done == 0 else r.state.epoch  # the epoch just evaluated
            best = {**metrics, 'epoch': epoch, 'step': r.state.step}
        error: Optional[OSError] = None
        try:
            if acc.is_main_process:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
        except OSError as e:
            error = e
        failed = self._failed_anywhere(error)  # a collective: also the barrier before every process writes
        if not failed:
            try:
                if self.writer is None:
                    acc.save_state(str(tmp))  # distiller (via the hook), optimizer, RNG states of every process
                else:
                    save_accelerator_state(tmp, [], [], [], [], acc.process_index, acc.step,
                                           save_on_each_node=acc.project_configuration.save_on_each_node)  # RNG only
            except OSError as e:
                error = e
            failed = self._failed_anywhere(error)  # every process has written its RNG state before the rename
        if failed:
            return self._conclude(final, tmp, best, error, committed=False, failed=True)
        state = json.dumps(dict(self._trainer_state(), best=best), indent=1) + '\n'
        if self.writer is None:
            error, committed = self._write_main(tmp, final, best, improved, state) if acc.is_main_process else (None,
                                                                                                                False)
            return self._conclude(final, tmp, best, error, committed)
        if acc.is_main_process:
            accelerator_files = dict(model=host_copy(r.distiller_unwrapped.state_dict()),
                                     optimizer=host_copy(r.optimizer.state_dict()),
                                     scaler=host_copy(acc.scaler.state_dict()) if acc.scaler is not None else None)
            ema = host_copy(r.ema.state_dict()) if r.ema is not None else None
            self.writer.submit(functools.partial(self._write_main, tmp, final, best, improved, state, ema,
                                                 host_module(folded_student(r.distiller_unwrapped)),
                                                 accelerator_files))
        self._pending = (final, tmp, best)
        return final

    def _write_main(self, tmp: Path, final: Path, best: Optional[dict], improved: bool, state: str,
                    ema: Optional[dict] = None, student: Optional[nn.Module] = None,
                    accelerator_files: Optional[dict] = None) -> tuple[Optional[OSError], bool]:
        """The main process's part of a save, into ``tmp``: Accelerate's files when given (a background save; else
        ``save_state`` wrote them), the EMA, the student, the trainer state (last: it marks the folder complete), the
        commit, then ``best`` and the pruning. Returns (the ``OSError`` met, whether the checkpoint was committed)."""
        r = self.r
        committed = False
        try:
            if accelerator_files is not None:  # the files and formats of Accelerate's save_state
                on_each_node = self.acc.project_configuration.save_on_each_node
                save(accelerator_files['model'], tmp / SAFE_WEIGHTS_NAME, save_on_each_node=on_each_node,
                     safe_serialization=True)
                save(accelerator_files['optimizer'], tmp / f'{OPTIMIZER_NAME}.bin', save_on_each_node=on_each_node,
                     safe_serialization=False)
                if accelerator_files['scaler'] is not None:
                    torch.save(accelerator_files['scaler'], tmp / SCALER_NAME)
            if r.ema is not None:
                _save_safetensors(ema if ema is not None else r.ema.state_dict(), tmp / EMA_FILE)
            export_model(student if student is not None else folded_student(r.distiller_unwrapped), tmp / STUDENT_DIR,
                         r.data_config)
            (tmp / STATE_FILE).write_text(state)  # last: marks complete
            replace_dir(tmp, final)
            committed = True
            if improved:
                with atomic_dir(self.out_dir / CHECKPOINTS / BEST) as best_tmp:
                    best_tmp.rmdir()
                    _copy_tree_linked(final, best_tmp)
                    (best_tmp / 'metrics.json').write_text(json.dumps(best, indent=1) + '\n')
            prune_checkpoints(self.out_dir, self.cfg.keep_last)
        except OSError as e:
            return e, committed
        return None, committed

    def wait(self) -> Optional[Path]:
        """Settle the background save under way, if any (every process calls it at the same points: the outcome is
        agreed on). Returns the last checkpoint saved."""
        if self._pending is None:
            return self.last_saved
        final, tmp, best = self._pending
        self._pending = None
        result, raised = self.writer.wait()
        if raised is not None and not isinstance(raised, OSError):
            raise raised
        error, committed = result if result is not None else (raised, False)
        self._conclude(final, tmp, best, error, committed)
        return self.last_saved

    def _conclude(self, final: Path, tmp: Path, best: Optional[dict], error: Optional[OSError], committed: bool,
                  failed: bool = False) -> Optional[Path]:
        """Agree on a save's outcome, warn as needed, and record it (returns ``final``, or None when it failed)."""
        acc = self.acc
        failed = self._failed_anywhere(error if not committed else None) or failed
        if error is not None and committed:  # the checkpoint is complete; only the best copy or the pruning failed
            acc.print(f'warning: checkpoint {final} saved, but updating checkpoints/best or pruning failed '
                      f'({error.strerror or error})')
        if failed:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)  # frees what the partial write took
            previous = latest_checkpoint(self.out_dir)
            reason = (error.strerror or str(error)) if error is not None else 'a write failed on another process'
            acc.print(f'warning: could not save checkpoint {final.name} ({reason}); the previous checkpoint '
                      f'{previous or "(none yet)"} is intact and is what --resume auto would continue from; '
                      'training continues and the next save tries again')
            return None
        self.best = best
        self.last_saved = final
        return final

    def _failed_anywhere(self, error: Optional[BaseException]) -> bool:
        """Whether any process failed (a collective on N processes: every process must call it at the same point)."""
        flag = error is not None
        if self.acc.num_processes > 1:
            t = torch.tensor([1.0 if flag else 0.0], device=self.acc.device)
            flag = bool(self.acc.reduce(t, reduction='sum').item() > 0)
        return flag

    # resuming
    def resume(self, ckpt: Optional[Path]) -> Optional[dict]:
        """Restore everything from ``ckpt`` (None: nothing to do); returns its trainer state."""
        if ckpt is None:
            return None
        acc, r = self.acc, self.r
        ckpt = Path(ckpt)
        try:
            trainer = json.loads((ckpt / STATE_FILE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f'{ckpt} is not a complete checkpoint ({e})') from None
        mid_epoch = trainer['state'].get('batches_done', 0) > 0
        layout = (trainer['world_size'], trainer['batches_per_epoch'])
        if layout != (acc.num_processes, len(r.train_loader)):
            msg = (f'{ckpt} was saved with {layout[0]} processes × {layout[1]} batches per epoch, this run has '
                   f'{acc.num_processes} × {len(r.train_loader)}')
            if mid_epoch:
                raise CheckpointError(msg + '; a mid-epoch checkpoint needs the same layout (same number of processes '
                                      'and batch size)')
            _logger.warning('%s: resuming, but not bit-identically', msg)
        # after the build: a bad value in the command is reported as such first; before anything is written
        check_same_run(self.cfg, ckpt)
        check_same_data(trainer.get('data') or {}, self.data_record, ckpt)
        changed = {k: (v, getattr(self.cfg, k)) for k, v in trainer.get('config', {}).items()
                   if k not in _RUN_ONLY_OPTIONS and hasattr(self.cfg, k) and _jsonable(getattr(self.cfg, k)) != v}
        if changed:
            acc.print('warning: resuming with changed options (the result is no longer the same as an uninterrupted '
                      'run): ' + ', '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in sorted(changed.items())))
        if trainer.get('has_ema') != (r.ema is not None):
            raise CheckpointError(f'{ckpt} was saved {"with" if trainer.get("has_ema") else "without"} --model-ema; '
                                  'resume with the same setting')
        rng_file = ckpt / f'random_states_{acc.process_index}.pkl'
        if rng_file.is_file():  # accelerate would swallow a refused RNG pickle and resume with other random states
            read_pickle_weights(rng_file, 'checkpoint RNG state')
        try:
            acc.load_state(str(ckpt))  # distiller (strict, via the hook), optimizer (weights_only=True), RNG states
        except pickle.UnpicklingError:
            read_pickle_weights(ckpt / 'optimizer.bin', 'checkpoint optimizer state')  # raises the one-line error
            raise
        except (EOFError, RuntimeError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f'{ckpt} cannot be resumed ({first})') from None
        r.state.load_state_dict(trainer['state'])
        r.scheduler.load_state_dict(trainer['scheduler'])
        if r.ema is not None:
            load_state_dict_strict(r.ema, read_safetensors(ckpt / EMA_FILE), f'EMA weights {ckpt / EMA_FILE}')
        self.best = trainer.get('best')
        self.resumed_from = ckpt
        s = r.state
        saved_config = trainer.get('config', {})
        raised = [f'{flag} {typed_text(saved_config[key])} → {typed_text(getattr(self.cfg, key))}'
                  for key, flag in _BUDGET_OPTIONS.items()
                  if key in saved_config and not _same_value(saved_config[key], getattr(self.cfg, key))]
        acc.print(f'resumed from {ckpt}: epoch {s.epoch}, step {s.step}, batch {s.batches_done}/{len(r.train_loader)}'
                  + (f'; training goes on with {", ".join(raised)}' if raised else ''))
        return trainer

    # preemption
    def step_hook(self, last_batch: bool, collective: bool = True) -> bool:
        """After every optimizer step: periodic checkpoints, and the preemption stop. True = stop the epoch.

        ``collective``: whether every process is at a point where it may agree on signals (see
        :meth:`vitkd.stopping.StopControl.signal_received`). On the last batch of an epoch nothing is saved here: the
        end-of-epoch checkpoint follows.
        """
        if self.stop.signal_received(collective):
            if not last_batch:
                self.save()
                self.wait()  # the run stops here: its checkpoint is complete before the resume command is printed
                self.preempted = True
            return True
        every = self.cfg.save_every_steps
        if every and self.r.state.step % every == 0 and not last_batch:
            self.save()
        return False

    def preemption_message(self) -> str:
        """How the run stopped and the command that resumes it."""
        s = self.r.state
        cleaned, skip = [], False
        for a in self.argv:  # drop any previous --resume/--output-dir and their values
            if skip:
                skip = False
                continue
            if a in ('--resume', '--output-dir', '--output_dir'):
                skip = True
                continue
            if a.startswith(('--resume=', '--output-dir=', '--output_dir=')):
                continue
            cleaned.append(a)
        launcher = 'python' if self.acc.num_processes == 1 else 'accelerate launch <the same launch options>'
        program = ['main.py'] if Path(sys.argv[0]).name == 'main.py' else ['-m', 'vitkd']  # a checkout, or installed
        cmd = launcher + ' ' + shlex.join([*program, *cleaned, '--output-dir', str(self.out_dir), '--resume', 'auto'])
        where = f'epoch {s.epoch}, step {s.step} (batch {s.batches_done}/{len(self.r.train_loader)})'
        return f'stopped by {self.stop.signal_name()} at {where}; checkpoint {self.last_saved}\nresume with: {cmd}'
