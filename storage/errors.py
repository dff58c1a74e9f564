"""Errors of the storage layer (DICOM reading, the Zarr store)."""


class StorageError(Exception):
    """Base class of storage errors."""


class IngestError(StorageError):
    """A DICOM file or series cannot be ingested."""


class InvalidSeriesError(IngestError, ValueError):
    """A series is unusable as it stands (geometry, too few slices, ...). Retrying cannot help."""


class UnreadableFileError(IngestError, OSError):
    """A file cannot be read or decoded as DICOM."""


class StoreError(StorageError):
    """The Zarr store is missing, inconsistent or cannot be written."""


class SeriesNotFoundError(StoreError, KeyError):
    """No complete series with this key is in the store."""


class StoreLockedError(StoreError, RuntimeError):
    """Another run is writing to the store. Retrying at once cannot help."""


class SourceError(StorageError, ValueError):
    """The source as a whole is unusable (missing, not a folder). Stops the ingest; retrying cannot help."""


# pydicom's advice to its own users, not to ours
_PYDICOM_ADVICE = (" Use force=True to force reading.", " or use force=True to force reading")


def reason_for(exc: BaseException) -> str:
    """A quarantine reason for what one file or one series raised: one line, no traceback.

    This module decides, in one place, which failures belong to a file or a series (they
    become quarantine rows and the run goes on) and which to the run (``belongs_to_run``).

    >>> reason_for(NotImplementedError("Unknown Value Representation 'TI'"))
    "NotImplementedError: Unknown Value Representation 'TI'"
    >>> reason_for(InvalidSeriesError("3 slice(s) < ingest.min_slices=8"))
    '3 slice(s) < ingest.min_slices=8'
    """
    if isinstance(exc, IngestError):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    for advice in _PYDICOM_ADVICE:
        text = text.replace(advice, "")
    return " ".join(text.split())[:500]


def belongs_to_run(exc: BaseException) -> bool:
    """True for failures of the run's environment rather than of one input: the store cannot be
    written (StoreError, an OSError outside reading a source file), the process is stopping.
    These stop the ingest (and are retried when transient); everything else is the file's or
    the series' fault and becomes a quarantine row."""
    if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit
        return True
    if isinstance(exc, IngestError):  # reading or decoding one source file
        return False
    return isinstance(exc, (StoreError, OSError))
