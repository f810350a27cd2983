"""The run dir's guards: writable before the build, one run at a time (a lock), a finished run left alone.

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
import socket
import tempfile
from pathlib import Path
from typing import Optional

from .errors import RunDirError, VitkdError

__all__ = ['LOCK_FILE', 'RunFinished', 'RunLock', 'check_writable', 'check_unlocked', 'finished_state', 'release_all']

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
        import time
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
        state = json.loads((Path(checkpoint) / 'trainer_state.json').read_text())['state']
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(summary, dict) or summary.get('steps') != state.get('step'):
        return None
    done = state.get('epoch', 0) >= epochs and state.get('batches_done', 0) == 0
    return summary if done or (max_steps is not None and state.get('step', 0) >= max_steps) else None
