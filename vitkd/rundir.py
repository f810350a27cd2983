"""The run dir: its name, its guards (writable before the build, one run at a time, a finished run left alone) and
its creation.

* :func:`name_output_dir` names it when ``--output-dir`` is not given (after the checkpoint of ``--resume``, else
  after the student, the methods and the time; :func:`eval_output_dir` for ``--eval-student``);
  :func:`check_output_dir` refuses an unusable one before anything is built, :func:`prepare_output_dir` creates and
  locks it (``--overwrite`` moves a previous run's outputs, :data:`RUN_OUTPUTS`, aside).

* :func:`check_writable` probes the dir (or its nearest existing parent) with a temporary file that it removes at
  once, so a read-only file system, a missing permission or a path under a file is refused before anything is built;
  an existing run dir is left byte-identical.
* :class:`RunLock`: ``<run>/.vitkd.lock`` holds the PID, the host and the PID's start time of the run writing the dir.
  A second run on the same dir is refused, told which PID on which host holds it; a lock whose process is gone (a
  SIGKILL, a crash, the PID since reused by another program) is taken over. It is created with ``O_EXCL`` (two runs
  racing for a free dir cannot both win) and removed when the command ends (:func:`release_all`, called by
  ``main.main``).
* :func:`finished_state`: a run whose summary is written and whose newest checkpoint reached ``--epochs`` (or
  ``--max-steps``) is finished: ``--resume auto`` on it says so and changes nothing.
"""
from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Optional

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from .checkpoint import resolve_resume
from .config import Config, ConfigError
from .errors import RunDirError, VitkdError
from .layout import CHECKPOINTS, RUN_MARKER, STATE_FILE, STUDENT_DIR
from .validate import distill_spec

__all__ = ['LOCK_FILE', 'RUN_OUTPUTS', 'RunFinished', 'RunLock', 'check_writable', 'check_unlocked', 'finished_state',
           'release_all', 'name_output_dir', 'eval_output_dir', 'check_output_dir', 'prepare_output_dir']

LOCK_FILE = '.vitkd.lock'
_held: list['RunLock'] = []


class RunFinished(VitkdError):
    """``--resume auto`` on a run that already finished: nothing to do (exit 0; the message says so)."""

    exit_code = 0


def _start_time(pid: int) -> Optional[str]:
    """The kernel's start time of ``pid`` (field 22 of /proc/<pid>/stat), which tells a reused PID apart."""
    try:
        stat = Path(f'/proc/{pid}/stat').read_text()
    except OSError:
        return None
    return stat.rsplit(')', 1)[1].split()[19]


def _alive(pid: int, start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return start is None or _start_time(pid) in (None, start)


def check_writable(out: Path) -> None:
    """Refuse a run dir that cannot be created or written, before the build (nothing is left behind).

    Raises:
        RunDirError: a part of the path is a file, or the dir (or the parent it would be created in) is not writable.
    """
    out = Path(out)
    probe_dir = out
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise RunDirError(f'--output-dir {out}: {probe_dir} is a file, not a folder; choose another --output-dir')
    try:
        fd, name = tempfile.mkstemp(prefix='.vitkd-probe-', dir=probe_dir)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise RunDirError(f'--output-dir {out}: cannot write in {probe_dir} ({e.strerror or e}); choose a writable '
                          '--output-dir or fix its permissions') from None


def _read_lock(path: Path) -> Optional[dict]:
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable or half-written: treated as stale
    return info if isinstance(info, dict) else {}


def _holder(path: Path) -> Optional[dict]:
    """The live holder of a lock file (None: free, or stale)."""
    info = _read_lock(path)
    if not info or not isinstance(info.get('pid'), int):
        return None
    if info.get('host') != socket.gethostname():
        return info  # another machine's process: its liveness cannot be checked from here
    if info['pid'] == os.getpid() or not _alive(info['pid'], info.get('start')):
        return None
    return info


def _held_message(out: Path, info: dict) -> str:
    return (f'--output-dir {out} is in use by another vitkd run (PID {info["pid"]} on {info.get("host", "?")}, since '
            f'{info.get("since", "?")}); wait for it to end, choose another --output-dir, or, if that process is gone, '
            f'delete {out / LOCK_FILE}')


def check_unlocked(out: Path) -> None:
    """Refuse a run dir another live run holds (before the build; reads only)."""
    info = _holder(Path(out) / LOCK_FILE)
    if info is not None:
        raise RunDirError(_held_message(Path(out), info))


class RunLock:
    """The lock of one run dir, held by this process until :meth:`release`."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_FILE
        self.out = Path(out)

    def acquire(self) -> 'RunLock':
        """Create the lock file (exclusively); a stale one is replaced. Raises RunDirError when a live run holds it."""
        record = json.dumps(dict(pid=os.getpid(), host=socket.gethostname(), start=_start_time(os.getpid()),
                                 since=time.strftime('%Y-%m-%d %H:%M:%S'))) + '\n'
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                info = _holder(self.path)
                if info is not None:
                    raise RunDirError(_held_message(self.out, info)) from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, 'w') as f:
                f.write(record)
            _held.append(self)
            return self
        raise RunDirError(f'--output-dir {self.out}: could not take the lock {self.path} (another run is starting '
                          'on it at the same time?)')

    def release(self) -> None:
        """Remove the lock file if it is still this process's."""
        info = _read_lock(self.path)
        if info and info.get('pid') == os.getpid() and info.get('host') == socket.gethostname():
            self.path.unlink(missing_ok=True)
        if self in _held:
            _held.remove(self)


def release_all() -> None:
    """Release every lock this process holds (``main.main`` calls it when the command ends, however it ends)."""
    for lock in list(_held):
        lock.release()


def finished_state(out: Path, checkpoint: Optional[Path], epochs: int, max_steps: Optional[int]) -> Optional[dict]:
    """The summary of a finished run (None: not finished).

    Finished = ``summary.json`` was written for the step of ``checkpoint`` (the newest complete checkpoint), and that
    checkpoint reached ``epochs`` or ``max_steps``. A run stopped by ``--time-limit`` or a raised ``--epochs`` is not
    finished: ``--resume auto`` continues it.
    """
    if checkpoint is None:
        return None
    try:
        summary = json.loads((Path(out) / 'summary.json').read_text())
        state = json.loads((Path(checkpoint) / STATE_FILE).read_text())['state']
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(summary, dict) or summary.get('steps') != state.get('step'):
        return None
    done = state.get('epoch', 0) >= epochs and state.get('batches_done', 0) == 0
    return summary if done or (max_steps is not None and state.get('step', 0) >= max_steps) else None


def name_output_dir(cfg: Config) -> None:
    """Default run dir: the run of ``--resume <checkpoint or run dir>``, else output/<student>-<methods>-<time>."""
    if cfg.output_dir is None and cfg.eval_student:
        cfg.output_dir = str(eval_output_dir(cfg))
    if cfg.output_dir is None and cfg.resume not in (None, 'auto'):
        resolve_resume(cfg, log=lambda *_: None)  # fills output_dir with the checkpoint's run dir (or fails)
    if cfg.output_dir is None:
        methods = '+'.join(distill_spec(cfg).names)
        cfg.output_dir = str(Path('output') / f'{cfg.student.replace("/", "_")}-{methods}-{time.strftime("%Y%m%d-%H%M%S")}')


# What a run writes into its dir; ``--overwrite`` moves a previous run's copies aside (see prepare_output_dir).
RUN_OUTPUTS = (RUN_MARKER, CHECKPOINTS, STUDENT_DIR, 'student_ema', 'log.jsonl', 'epochs.csv', 'summary.json',
               'curves.png', 'hub.json', 'nonfinite_step*.json')


def _check_outside_data(out: Path, data_path: Optional[str]) -> None:
    """Refuse a run dir inside the data folder: its files would be read as data (an image folder takes a folder of
    checkpoints and plots for a class) and the data set would no longer be the one the run was given."""
    if not data_path or not Path(data_path).expanduser().is_dir():
        return
    data = Path(data_path).expanduser().resolve()
    if out.expanduser().resolve().is_relative_to(data):
        raise RunDirError(f'--output-dir {out} is inside --data-path {data_path}: the run\'s files would mix with the '
                          'data set; choose an --output-dir outside it')


def check_output_dir(cfg: Config, check_lock: bool = True) -> Path:
    """The run dir (named if unset); refuse one that already holds a run unless --resume or --overwrite, one that
    cannot be written (:func:`vitkd.rundir.check_writable`) and, with ``check_lock``, one another live run holds.

    Writes nothing: ``main`` calls it before building anything and creates the dir only once every check passed.
    """
    name_output_dir(cfg)
    out = Path(cfg.output_dir)
    _check_outside_data(out, cfg.data_path)
    check_writable(out)
    if (out / RUN_MARKER).exists() and not (cfg.resume or cfg.overwrite):
        raise ConfigError(f'--output-dir {out} already holds a run; pass --resume auto to continue it, --overwrite '
                          'to train into it anyway, or another --output-dir')
    if check_lock:
        check_unlocked(out)
    return out


def prepare_output_dir(cfg: Config, accelerator: Accelerator) -> Path:
    """Create and lock the run dir (after :func:`check_output_dir`'s refusal rules). Nothing is deleted.

    With ``--overwrite`` (and no ``--resume``) a previous run's outputs are moved into ``replaced-<time>/`` inside the
    dir first: its checkpoints must never be mistaken for this run's by ``--resume auto`` or pruned by its saves.
    A resumed run that already finished raises :class:`vitkd.rundir.RunFinished` (nothing is written). The main
    process decides and every process raises the same error, so a multi-process run ends with one exit code.
    """
    out = check_output_dir(cfg, check_lock=False)
    failure = None
    if accelerator.is_main_process:
        try:
            summary = finished_state(out, resolve_resume(cfg, log=lambda *_: None), cfg.epochs, cfg.max_steps) \
                if cfg.resume else None
            if summary is not None:
                raise RunFinished(f'{out} is a finished run ({summary.get("epochs_run")} epochs, {summary.get("steps")} '
                                  f'steps; {summary.get("stop_reason", "done")}): nothing to resume and nothing was '
                                  'changed; raise --epochs to train it further, or use another --output-dir')
            out.mkdir(parents=True, exist_ok=True)
            RunLock(out).acquire()
            if cfg.overwrite and not cfg.resume and (out / RUN_MARKER).exists():
                old = [p for pattern in RUN_OUTPUTS for p in sorted(out.glob(pattern))]
                aside = out / f'replaced-{time.strftime("%Y%m%d-%H%M%S")}'
                aside.mkdir()
                for path in old:
                    os.replace(path, aside / path.name)
                accelerator.print(f'--overwrite: the previous run\'s outputs in {out} were moved to {aside}')
        except (RunFinished, RunDirError) as e:
            failure = (type(e).__name__, str(e))
        except OSError as e:
            failure = ('RunDirError', f'--output-dir {out}: {e.strerror or e}')
    failure = broadcast_object_list([failure])[0]
    if failure is not None:
        raise {'RunFinished': RunFinished, 'RunDirError': RunDirError}[failure[0]](failure[1])
    return out


def eval_output_dir(cfg: Config) -> Path:
    """Default dir of ``--eval-student``, named after what it evaluates and on what: ``output/eval-<run>_student-
    <dataset>-<time>``, ``eval-<run>_step_00000468-…`` for a checkpoint, ``eval-org_name-…`` for ``hf-hub:org/name``
    (not after the training options, which an evaluation does not use)."""
    spec = str(cfg.student_ckpt or 'student')
    parts = spec[len('hf-hub:'):].split('/') if spec.startswith('hf-hub:') else Path(spec).resolve().parts
    named = [part for part in parts if part not in ('checkpoints', '/')][-2:]
    evaluated = '_'.join(re.sub(r'[^A-Za-z0-9.+-]+', '-', part) for part in named) or 'student'
    return Path('output') / f'eval-{evaluated}-{cfg.dataset}-{time.strftime("%Y%m%d-%H%M%S")}'
