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
