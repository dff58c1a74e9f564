"""Separable linear resampling of volumes, in float32, on threads.

Linear interpolation on a grid is separable: trilinear resampling is three 1D passes, one
per axis, and each pass is a two-tap gather and a weighted sum. Numpy releases the GIL for
both, so the passes run on blocks of the volume in a thread pool. The axes that shrink go
first, so the later passes work on the smaller array. The result equals
``scipy.ndimage.zoom(image, zoom, order=1, mode="nearest", grid_mode=True)`` (the
coordinate convention of the store's geometry) up to float32 rounding.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# Blocks this size keep a pass's gathered taps in the CPU's caches, and leave several
# blocks per thread so the threads finish together.
_BLOCK_BYTES = 4 << 20


def taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The two source indices and their weights for each of ``n_out`` output samples.

    Output sample ``j`` sits at source coordinate ``(j + 0.5) * n_in / n_out - 0.5`` (pixel
    centres aligned at the edges, as ``grid_mode=True``), clamped to the first and last
    sample (``mode="nearest"``).

    >>> i0, i1, w0, w1 = taps(2, 4)
    >>> i0.tolist(), i1.tolist(), w1.tolist()
    ([0, 0, 0, 1], [1, 1, 1, 1], [0.0, 0.25, 0.75, 0.0])
    """
    c = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    i0 = np.floor(c).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = c - i0
    return i0, i1, (1.0 - w1).astype(np.float32), w1.astype(np.float32)


def default_threads() -> int:
    """The threads one resampling may use: a Dask worker's own share of the cores (the
    cluster already divides them between workers), else the cores this process may run on."""
    try:
        from distributed import get_worker

        return max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):  # not in a worker
        pass
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _blocks(n: int, row_bytes: int, threads: int) -> list[slice]:
    per = max(1, min(_BLOCK_BYTES // max(row_bytes, 1), -(-n // (4 * threads))))
    return [slice(i, min(i + per, n)) for i in range(0, n, per)]


def _pass(x: np.ndarray, axis: int, n_out: int, pool: ThreadPoolExecutor | None, threads: int) -> np.ndarray:
    """One 1D linear pass of ``x`` along ``axis`` to ``n_out`` samples (float32 out)."""
    i0, i1, w0, w1 = taps(x.shape[axis], n_out)
    shape = list(x.shape)
    shape[axis] = n_out
    out = np.empty(shape, dtype=np.float32)
    bshape = [1] * x.ndim
    bshape[axis] = n_out
    w0, w1 = w0.reshape(bshape), w1.reshape(bshape)
    if axis == 0:
        # Blocks of output slices: each gathers whole, contiguous source slices.
        along, row_bytes = 0, 3 * out[0].nbytes

        def block(sl: slice) -> None:
            np.multiply(x.take(i0[sl], axis=0), w0[sl], out=out[sl])
            out[sl] += x.take(i1[sl], axis=0) * w1[sl]
    else:
        # Blocks of source slices: each block's pass is independent of the others.
        along, row_bytes = 0, out[0].nbytes + x[0].nbytes

        def block(sl: slice) -> None:
            src, dst = x[sl], out[sl]
            np.multiply(src.take(i0, axis=axis), w0, out=dst)
            dst += src.take(i1, axis=axis) * w1

    blocks = _blocks(out.shape[along], row_bytes, threads)
    if pool is None or len(blocks) == 1:
        for sl in blocks:
            block(sl)
    else:
        list(pool.map(block, blocks))
    return out


def linear_zoom(image: np.ndarray, shape: tuple[int, ...], *, threads: int | None = None) -> np.ndarray:
    """Linear resampling of ``image`` to ``shape`` (float32), one axis at a time.

    >>> linear_zoom(np.array([[[0.0, 4.0]]]), (1, 1, 4)).ravel().tolist()
    [0.0, 1.0, 3.0, 4.0]
    """
    if len(shape) != image.ndim:
        raise ValueError(f"Received shape {tuple(shape)} for a {image.ndim}-D image; expected {image.ndim} sizes.")
    threads = default_threads() if threads is None else max(1, int(threads))
    order = sorted(range(image.ndim), key=lambda a: shape[a] / image.shape[a])
    out = image
    with ThreadPoolExecutor(threads) if threads > 1 else nullcontext() as pool:
        for axis in order:
            if shape[axis] != out.shape[axis]:
                out = _pass(out, axis, int(shape[axis]), pool, threads)
    return out if out is not image else image.astype(np.float32)

