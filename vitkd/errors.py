"""The failures a user can cause or meet, each with the exit code ``main.py`` ends with.

``main.main`` is the one error boundary: it prints a :class:`VitkdError` as one line ``error: <message>`` and exits
with the class's :attr:`~VitkdError.exit_code` (a traceback only with ``--debug`` or ``VITKD_DEBUG=1``). The codes:

====  ==========================================================================================================
code  meaning
====  ==========================================================================================================
0     done
1     :class:`SaveError`: an output could not be written during the run (a full disk); the last checkpoint is intact
2     :class:`UsageError`: a bad option, name, path or combination; nothing was built or written
3     a non-finite loss under ``--nan-policy stop``
4     :class:`HubError`: the Hugging Face Hub refused or failed (push, download)
5     :class:`DataFailure`: training data that cannot be read while running (``--no-skip-corrupt``, a vanished file)
6     :class:`RunDirError` and any other ``OSError``: a file or the run dir cannot be read or written (permission,
      not writable, held by another run's lock)
7     out of memory (``RESOURCE_ERROR``)
70    an unexpected internal error (a bug: rerun with ``--debug`` and report the traceback)
128+N stopped by signal N (SIGTERM/SIGINT: a checkpoint was saved first)
====  ==========================================================================================================
"""

__all__ = ['VitkdError', 'UsageError', 'ConfigError', 'SaveError', 'HubError', 'DataFailure', 'RunDirError',
           'INTERNAL_ERROR', 'RESOURCE_ERROR']

INTERNAL_ERROR = 70  # BSD sysexits' EX_SOFTWARE
RESOURCE_ERROR = 7


class VitkdError(Exception):
    """A failure with a one-line message for the user and the exit code ``main.py`` ends with."""

    exit_code = 1


class UsageError(VitkdError, ValueError):
    """A bad name, path, option or combination given by the user; the message names it and what is accepted."""

    exit_code = 2


class ConfigError(UsageError):
    """A bad option value: the message names the option, the value and what is accepted."""


class SaveError(VitkdError, RuntimeError):
    """An output that could not be written (a full disk…); the message says what is intact and how to continue."""

    exit_code = 1


class HubError(VitkdError, RuntimeError):
    """The Hugging Face Hub refused or failed; the message says what to retry (the local files are untouched)."""

    exit_code = 4


class DataFailure(VitkdError, RuntimeError):
    """Training or validation data that cannot be read while the run goes on (the message names the file)."""

    exit_code = 5


class RunDirError(VitkdError, OSError):
    """The run dir cannot be used: not writable, or held by another running process (the message names it)."""

    exit_code = 6
