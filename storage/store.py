"""The medflow store: a Zarr v3 hierarchy in a local folder or at any fsspec URL.

Layout::

    store.zarr/
      zarr.json                      root group
      series/<series_key>/image      volume (Z, Y, X); CT as int16 HU; 16-slice chunks (lz4)
      series/<series_key>/mask       optional label volume on the same grid (uint8; 0 = background)
      prep/<prep_key>/<series_key>   model-ready float32 arrays (and <series_key>.mask: its labels)
      catalog/<series_key>.json      one entry per complete series (written last)
      quarantine.json                one row per file that could not be used, with the reason
      .medflow/secret                per-store HMAC secret (mode 0600); never copied elsewhere
      .medflow/scan_index.json.gz    pseudonymous header-scan cache (incremental ingest)

A series is visible only once its catalog entry exists. In a local folder its data are
written under ``.tmp/`` and renamed into place before the catalog entry is written. At a URL
(``s3://``, ``gs://``, ``memory://``, ...), where there is no rename, the data are written in
place first and the catalog entry last, in one PUT; a series without a catalog entry is
absent. Either way a crash never leaves half a series visible.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import zarr
from filelock import FileLock, Timeout
from zarr.codecs import BloscCodec

from storage.deid import Pseudonymizer
from storage.errors import SeriesNotFoundError, StoreError, StoreLockedError
from storage.files import write_bytes_atomic

logger = logging.getLogger(__name__)

# writer locks this process holds (path -> depth): a pipeline's stages nest inside its lock
_HELD: dict[str, int] = {}

# lz4 with byte shuffle. On a 200x512x512 int16 CT (make bench): zstd-3 compresses to 2.3x at
# about 420 MB/s; lz4 with bit-shuffle to 2.1x at 1.4 GB/s, reading back at 3.3 GB/s; lz4 with
# byte shuffle to 1.9x at 3.2 GB/s, reading back at 11 GB/s. Ingest writes every slice once
# (byte shuffle took the bench's ingest phase from a median 1.65 s to 1.49 s), and reads
# happen on every preprocessing run and slice-wise epoch.
IMAGE_CODEC = {"cname": "lz4", "clevel": 5, "shuffle": "shuffle"}
# Images are stored in chunks of 16 slices, one file (or object) each: 8 MiB of 512x512 int16
# before compression, a good object size for S3. On a 200x512x512 CT (make bench's volumes,
# CPU seconds, median of 6) this writes in 0.106 s and reads whole in 0.11 s; 4-slice chunks in
# 64-slice shards (the layout before) took 0.125 s and 0.215 s, one-slice chunks 0.17 s to
# write. A single slice reads in about 6 ms (2 ms before). The pipeline reads series whole
# (preprocessing, evaluation); models read the prepared arrays.
CHUNK_SLICES = 16
PREP_CODEC = {"cname": "lz4", "clevel": 5, "shuffle": "shuffle"}


@dataclass(frozen=True)
class VolumeRef:
    """A reference to an array in a store: what tasks pass around instead of arrays."""

    store: str
    path: str

    def open(self) -> zarr.Array:
        return zarr.open_array(store=f"{self.store}/{self.path}", mode="r")

    def read(self) -> np.ndarray:
        return self.open()[...]


def content_key(image: np.ndarray) -> str:
    """A key of a stored array's values that does not depend on the store's secret: the same
    image ingested into any store gets the same key, so it can order patients reproducibly
    (``medflow.splitting``). It hashes the shape, the type and a regular sample of the voxels
    (every 4th slice, every 8th row and column): enough to tell real images apart, and
    microseconds where hashing every voxel would add a tenth of the ingest time.

    >>> a = np.arange(4 * 16 * 16, dtype=np.int16).reshape(4, 16, 16)
    >>> content_key(a) == content_key(a.copy()), content_key(a) == content_key(a + 1)
    (True, False)
    """
    sample = np.ascontiguousarray(image[::4, ::8, ::8])
    h = hashlib.blake2b(digest_size=10)
    h.update(f"{image.shape}|{image.dtype.str}|".encode())
    h.update(sample.tobytes())
    return h.hexdigest()


def _json(data: Any) -> bytes:
    return json.dumps(data, indent=1, sort_keys=True, default=_json_default).encode()


def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, _json(data))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class Store:
    """A medflow store at a local folder (created on first use).

    Args:
        root: folder of the store, e.g. ``work/store.zarr``.
    """

    def __init__(self, root: str | Path, *, create: bool = True):
        from medflow.access import check_allowed

        root = str(root)
        check_allowed(root, "data.store")  # under medflow serve: where the store is opened, not only in the spec
        self.remote = "://" in root and not root.startswith("file://")
        if self.remote:
            self.fs, _ = fsspec.core.url_to_fs(root)
            self.url = root.rstrip("/")
            self.root = None
        else:
            self.root = Path(root.removeprefix("file://")).expanduser().resolve()
            self.url = str(self.root)
        if not self._exists("zarr.json"):
            if not create:
                raise StoreError(f"no medflow store at {self.url!r}; run an ingest first")
            if not self.remote:
                self.root.mkdir(parents=True, exist_ok=True)
            zarr.open_group(store=self.url, mode="a", zarr_format=3, attributes={"medflow_store": 1})
        if not self.remote:
            for sub in ("series", "prep", "catalog", ".tmp", ".medflow"):
                (self.root / sub).mkdir(exist_ok=True)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    @property
    def process_local(self) -> bool:
        """True for ``memory://``: only threads of this process see it (no worker processes)."""
        return self.url.startswith("memory://")

    # -------------------------------------------------------------- raw files
    def _exists(self, rel: str) -> bool:
        return self.fs.exists(f"{self.url}/{rel}") if self.remote else (self.root / rel).exists()

    def _read(self, rel: str) -> bytes | None:
        try:
            return self.fs.cat(f"{self.url}/{rel}") if self.remote else (self.root / rel).read_bytes()
        except FileNotFoundError:
            return None

    def _write(self, rel: str, data: bytes) -> None:
        """Whole-file write: a rename in a folder, a single PUT at a URL."""
        if self.remote:
            self.fs.pipe(f"{self.url}/{rel}", data)
            return
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data)

    def _remove(self, rel: str) -> None:
        if self.remote:
            if self.fs.exists(f"{self.url}/{rel}"):
                self.fs.rm(f"{self.url}/{rel}", recursive=True)
        elif (self.root / rel).is_dir():
            shutil.rmtree(self.root / rel, ignore_errors=True)
        else:
            (self.root / rel).unlink(missing_ok=True)

    def _names(self, folder: str, suffix: str) -> list[str]:
        if self.remote:
            found = self.fs.glob(f"{self.url}/{folder}/*{suffix}")
            return sorted(Path(p).name for p in found)
        return sorted(p.name for p in (self.root / folder).glob(f"*{suffix}"))

    # -------------------------------------------------------------------- lock
    @contextmanager
    def writer_lock(self, *, purpose: str = "write") -> Iterator[None]:
        """Hold the store's single-writer lock, or raise StoreLockedError at once.

        One writer per store: a pipeline takes this lock from ingest to the end of preprocessing
        (its stages take it again, which in the same process just nests), a stage run on its
        own for its whole stage. Taking it clears what killed writers left under ``.tmp/``.
        Series writes are atomic on their own, but a scan index, a quarantine table and a
        plan computed by one run would be overwritten by another; refusing the second writer
        with a clear message is simpler and safer than merging. The lock is an OS file lock,
        so a killed process releases it.
        """
        if self.remote:  # object stores have no locks: per-series writes are safe, see the module doc
            yield
            return
        lock_path = str((self.root / ".medflow" / "writer.lock").resolve())
        if _HELD.get(lock_path):  # this process holds it already (a pipeline around its stages)
            _HELD[lock_path] += 1
            try:
                yield
            finally:
                _HELD[lock_path] -= 1
            return
        lock = self._acquire(lock_path)
        holder = self.root / ".medflow" / "writer.json"
        _HELD[lock_path] = 1
        try:
            _write_json_atomic(holder, {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
                                        "since": time.strftime("%Y-%m-%d %H:%M:%S")})
            self._clear_leftovers()
            yield
        finally:
            _HELD.pop(lock_path, None)
            holder.unlink(missing_ok=True)
            lock.release()

    def _acquire(self, lock_path: str) -> FileLock:
        lock = FileLock(lock_path, thread_local=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            holder = self.root / ".medflow" / "writer.json"
            info = json.loads(holder.read_text()) if holder.exists() else {}
            raise StoreLockedError(
                f"store {str(self.root)!r} is being written by another run "
                f"(pid {info.get('pid', '?')} on {info.get('host', '?')}, {info.get('purpose', '?')}, "
                f"since {info.get('since', '?')}); wait for it to finish, or point data.store elsewhere"
            ) from None
        return lock

    def check_writable(self) -> None:
        """Raise StoreLockedError if another process holds the writer lock; takes nothing, changes nothing
        (``medflow validate`` must not write to the store it checks)."""
        if self.remote:
            return
        lock_path = str((self.root / ".medflow" / "writer.lock").resolve())
        if not _HELD.get(lock_path):
            self._acquire(lock_path).release()

    def _clear_leftovers(self) -> None:
        """Remove what killed writers left under ``.tmp/`` (half-written series, swapped-out old ones).
        Called holding the writer lock, so no live writer is using them."""
        tmp = self.root / ".tmp"
        if not tmp.is_dir():
            return
        removed = 0
        for entry in tmp.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
        if removed:
            logger.info("store: removed %d leftover(s) of an interrupted write", removed)

    # ------------------------------------------------------------------ secret
    @property
    def secret(self) -> bytes:
        if self.remote:
            data = self._read(".medflow/secret")
            if data is None:
                self._write(".medflow/secret", secrets.token_bytes(32))
                data = self._read(".medflow/secret")
            if len(data) < 16:
                raise StoreError(f"store secret of {self.url!r} is damaged ({len(data)} bytes)")
            return data
        path = self.root / ".medflow" / "secret"
        if not path.exists():
            # written whole, then linked into place: a kill never leaves a short secret, and of two
            # processes creating it at once, the first link wins and both read the same bytes
            tmp = path.with_name(f".secret.{uuid.uuid4().hex}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(32))
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        data = path.read_bytes()
        if len(data) < 16:
            raise StoreError(f"store secret {str(path)!r} is damaged ({len(data)} bytes)")
        return data

    def pseudonymizer(self) -> Pseudonymizer:
        if getattr(self, "_pseudo", None) is None:
            self._pseudo = Pseudonymizer(self.secret)
        return self._pseudo

    def path_key(self, relpath: str) -> str:
        """The keyed pseudonym the store knows a source file by: file and folder names carry UIDs and
        patient names, so the store never holds them (``storage.ingest.with_paths`` maps back)."""
        return "f" + self.pseudonymizer().key(relpath, kind="path")[:19]

    # ------------------------------------------------------------------ series
    def _tmp_dir(self) -> Path:
        path = self.root / ".tmp" / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def _swap_into_place(self, tmp: Path, final: Path) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        trash = None
        if final.exists():
            trash = self.root / ".tmp" / f"old-{uuid.uuid4().hex}"
            os.rename(final, trash)
        os.rename(tmp, final)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)

    def write_series(self, key: str, image: np.ndarray, entry: dict, *, mask: np.ndarray | None = None) -> VolumeRef:
        """Write a volume (and its mask) and its catalog entry; the series becomes visible whole or not at all.

        Args:
            key: the series' pseudonymous key.
            image: ndarray of shape (Z, Y, X).
            entry: catalog entry (geometry and non-identifying facts).
            mask: optional label volume of the same shape (``series/<key>/mask``).
        """
        if image.ndim != 3:
            raise ValueError(f"Received an image of shape {image.shape}, expected (Z, Y, X).")
        if mask is not None and mask.shape != image.shape:
            raise ValueError(f"Received a mask of shape {mask.shape} for an image of shape {image.shape}.")
        self.drop_catalog_entry(key)
        if self.remote:
            self._remove(f"series/{key}")
            self._write_series_group(f"{self.url}/series/{key}", key, image, entry, mask)
        else:
            tmp = self._tmp_dir()
            try:
                self._write_series_group(str(tmp), key, image, entry, mask)
                self._swap_into_place(tmp, self.root / "series" / key)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        self._write(f"catalog/{key}.json", _json({**entry, "series_key": key, "content": content_key(image)}))
        return VolumeRef(self.url, f"series/{key}/image")

    def _write_series_group(self, where: str, key: str, image: np.ndarray, entry: dict,
                            mask: np.ndarray | None = None) -> None:
        group = zarr.open_group(store=where, mode="w", zarr_format=3)
        geometry = {"spacing": entry["spacing"], "origin": entry["origin"], "direction": entry["direction"]}
        depth = min(CHUNK_SLICES, image.shape[0])
        for name, data in (("image", image), ("mask", mask)):
            if data is None:
                continue
            arr = group.create_array(
                name,
                shape=data.shape,
                chunks=(depth, *data.shape[1:]),
                dtype=data.dtype,
                compressors=[BloscCodec(**IMAGE_CODEC)],
                fill_value=0,
            )
            arr[...] = data
            arr.attrs.update(geometry)
        group.attrs.update({"series_key": key, "modality": entry.get("modality")})

    def drop_catalog_entry(self, key: str) -> None:
        self._remove(f"catalog/{key}.json")

    def withdraw_series(self, key: str) -> list[str]:
        """Remove a series and the parts it was split into (``<key>g*``, ``<key>d*``); returns their keys.

        Catalog entries go first, so nothing stale stays visible while the data are removed.
        """
        keys = [name[: -len(".json")] for name in self._names("catalog", ".json")]
        gone = [k for k in keys if k == key or (k.startswith(key) and k[len(key):len(key) + 1] in ("g", "d"))]
        for k in gone:
            self.drop_catalog_entry(k)
        for k in gone:
            self._remove(f"series/{k}")
        return gone

    def catalog(self) -> dict[str, dict]:
        """Complete series by key."""
        out = {}
        for name in self._names("catalog", ".json"):
            data = self._read(f"catalog/{name}")
            if data is not None and not name.startswith("."):
                entry = json.loads(data)
                out[entry["series_key"]] = entry
        return out

    def catalog_entry(self, key: str) -> dict:
        data = self._read(f"catalog/{key}.json")
        if data is None:
            raise SeriesNotFoundError(f"no complete series {key!r} in {self}")
        return json.loads(data)

    def image_ref(self, key: str) -> VolumeRef:
        if not self._exists(f"catalog/{key}.json"):
            raise SeriesNotFoundError(f"no complete series {key!r} in {self}")
        return VolumeRef(self.url, f"series/{key}/image")

    def read_image(self, key: str) -> np.ndarray:
        return self.image_ref(key).read()

    def read_mask(self, key: str) -> np.ndarray | None:
        """The series' label volume, or None when it has no mask."""
        if "mask" not in self.catalog_entry(key):
            return None
        return VolumeRef(self.url, f"series/{key}/mask").read()

    # -------------------------------------------------------------- quarantine
    def quarantine(self) -> list[dict]:
        """The quarantine table: one row per file, ``{"file": path key, "reason", "stage", ...}``."""
        data = self._read("quarantine.json")
        return json.loads(data) if data is not None else []

    def write_quarantine(self, rows: list[dict]) -> None:
        """Replace the quarantine table. Rows name their file by ``path`` (relative to the source: turned
        into its path key here) or by ``file`` (a key already); one row per file, the first one given."""
        out: dict[str, dict] = {}
        for row in rows:
            row = dict(row)
            path = row.pop("path", None)
            if path is not None:
                row["file"] = self.path_key(path)
            out.setdefault(row["file"], row)
        self._write("quarantine.json", _json(sorted(out.values(), key=lambda r: (r["file"], r.get("reason", "")))))

    # -------------------------------------------------------------- scan index
    def scan_index(self) -> dict[str, dict]:
        """What the last scan read of each file, by path key (``path_key``)."""
        data = self._read(".medflow/scan_index.json.gz")
        return json.loads(gzip.decompress(data)) if data is not None else {}

    def write_scan_index(self, index: dict[str, dict]) -> None:
        self._write(".medflow/scan_index.json.gz", gzip.compress(json.dumps(index).encode(), compresslevel=3))

    # -------------------------------------------------------------------- prep
    def prep_ref(self, prep_key: str, series_key: str) -> VolumeRef:
        return VolumeRef(self.url, f"prep/{prep_key}/{series_key}")

    def prep_attrs(self, prep_key: str, series_key: str) -> dict | None:
        """Attributes of a prepared array, or None when it is absent."""
        data = self._read(f"prep/{prep_key}/{series_key}/zarr.json")
        return json.loads(data).get("attributes", {}) if data is not None else None

    def write_prep(self, prep_key: str, series_key: str, array: np.ndarray, attrs: dict) -> VolumeRef:
        """Write a model-ready array whole (one chunk: it is always read whole)."""
        rel = f"prep/{prep_key}/{series_key}"

        def write(where: str) -> None:
            arr = zarr.create_array(store=where, shape=array.shape, chunks=array.shape, dtype=array.dtype,
                                    compressors=[BloscCodec(**PREP_CODEC)], zarr_format=3, attributes=attrs,
                                    overwrite=True)
            arr[...] = array

        if self.remote:  # zarr.json holds the source digest and is written last: a partial array is stale
            self._remove(rel)
            write(f"{self.url}/{rel}")
        else:
            tmp = self._tmp_dir()
            try:
                write(str(tmp))
                self._swap_into_place(tmp, self.root / "prep" / prep_key / series_key)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return self.prep_ref(prep_key, series_key)

    def read_prep(self, prep_key: str, series_key: str) -> np.ndarray:
        return self.prep_ref(prep_key, series_key).read()

    def read_prep_mask(self, prep_key: str, series_key: str) -> np.ndarray | None:
        """The prepared mask of a series (``prep/<prep_key>/<series_key>.mask``), or None without one."""
        attrs = self.prep_attrs(prep_key, series_key) or {}
        return self.read_prep(prep_key, f"{series_key}.mask") if attrs.get("mask") else None
