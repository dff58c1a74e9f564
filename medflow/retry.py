"""Which failures are worth a retry."""

from __future__ import annotations

import errno

from medflow.errors import SpecError
from storage.errors import IngestError, InvalidSeriesError, SourceError, StoreLockedError

PERMANENT = (SpecError, IngestError, InvalidSeriesError, SourceError, StoreLockedError, ValueError, TypeError,
             KeyError, NotImplementedError, MemoryError, FileNotFoundError, PermissionError, NotADirectoryError,
             IsADirectoryError)
TRANSIENT = (OSError, TimeoutError, ConnectionError)
# OS errors that describe a path or its content, not a passing fault: the same call fails the same way
PERMANENT_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.ELOOP,
                              errno.ENAMETOOLONG, errno.EINVAL, errno.EROFS})


def is_transient(exc: BaseException) -> bool:
    """True for I/O and connection faults; False for bad specs, bad data, bad paths and programming errors.

    >>> is_transient(ConnectionResetError()), is_transient(InvalidSeriesError("gap")), is_transient(FileNotFoundError())
    (True, False, False)
    >>> import errno; is_transient(OSError(errno.ELOOP, "Too many levels of symbolic links"))
    False
    """
    if isinstance(exc, PERMANENT):
        return False
    if isinstance(exc, OSError) and exc.errno in PERMANENT_ERRNOS:
        return False
    return isinstance(exc, TRANSIENT)


def retry_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only transient errors."""
    try:
        state.result()
    except Exception as exc:  # the state's exception, re-raised
        return is_transient(exc)
    return False
