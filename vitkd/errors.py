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
from typing import Optional

__all__ = ['VitkdError', 'UsageError', 'ConfigError', 'SaveError', 'HubError', 'DataFailure', 'RunDirError',
           'INTERNAL_ERROR', 'RESOURCE_ERROR', 'server_failure']

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


# Exception class names (of httpx, requests, urllib3 and the standard library, whichever a client library raises) by
# what happened on the wire. Matched by name along the cause chain: Hub clients wrap the transport's exception.
_TIMED_OUT = {'TimeoutException', 'Timeout', 'TimeoutError', 'ReadTimeout', 'ConnectTimeout', 'WriteTimeout',
              'PoolTimeout'}
_DROPPED = {'RemoteProtocolError', 'ConnectionResetError', 'ConnectionAbortedError', 'BrokenPipeError',
            'IncompleteRead', 'ChunkedEncodingError', 'ReadError', 'WriteError', 'ProtocolError'}
_UNREACHABLE = {'ConnectError', 'ConnectionRefusedError', 'gaierror', 'NewConnectionError'}


def server_failure(error: BaseException) -> Optional[str]:
    """What a server did wrong behind ``error``, in words for a user; None when the server answered a refusal (4xx)
    or no network call failed (an offline cache miss, a bad file).

    Walks the cause chain (a Hub client re-raises a cache miss or its own error from the transport's): an answer
    with a server status (``answered HTTP 500 Internal Server Error``: a server that answers is not unreachable), a
    timeout, a connection closed without an answer, or a server that cannot be reached at all.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        response = getattr(error, 'response', None)
        status = getattr(response, 'status_code', None)
        if isinstance(status, int):
            if status < 500 and status not in (408, 429):
                return None
            reason = getattr(response, 'reason_phrase', None) or getattr(response, 'reason', None) or ''
            return f'answered HTTP {status} {reason}'.strip()
        names = {cls.__name__ for cls in type(error).__mro__}
        if names & _TIMED_OUT:
            return 'did not answer in time (the request timed out)'
        if names & _DROPPED:
            return 'closed the connection without a complete answer'
        if names & _UNREACHABLE:
            return 'cannot be reached (connection refused, or no network)'
        error = error.__cause__ or error.__context__
    return None
