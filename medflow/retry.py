"""Which failures are worth a retry."""

from __future__ import annotations

from medflow.errors import SpecError
from storage.errors import InvalidSeriesError, StoreLockedError

PERMANENT = (SpecError, InvalidSeriesError, StoreLockedError, ValueError, TypeError, KeyError, FileNotFoundError, PermissionError)
TRANSIENT = (OSError, TimeoutError, ConnectionError)


def is_transient(exc: BaseException) -> bool:
    """True for I/O and connection faults; False for bad specs, bad data and programming errors.

    >>> is_transient(ConnectionResetError()), is_transient(InvalidSeriesError("gap")), is_transient(FileNotFoundError())
    (True, False, False)
    """
    return isinstance(exc, TRANSIENT) and not isinstance(exc, PERMANENT)


def retry_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only transient errors."""
    try:
        state.result()
    except Exception as exc:  # the state's exception, re-raised
        return is_transient(exc)
    return False
