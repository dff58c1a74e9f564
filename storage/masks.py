"""Segmentation masks onto their series' voxel grid: DICOM SEG (highdicom) and NIfTI (nibabel).

A mask is located in patient space by its own affine (LPS, mm) and mapped onto the stored
volume's grid with nearest-neighbour sampling (scipy.ndimage.affine_transform, order 0), so
labels are never interpolated: every output value is a label of the input or 0. A mask on the
same grid as its series (the usual case: a SEG made from the series' own slices) maps
exactly, voxel for voxel. A mask that cannot be placed (another frame of reference, or
foreground outside the series) raises ``MaskError`` with the reason; ingest quarantines it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from scipy import ndimage

from storage.errors import IngestError

logger = logging.getLogger(__name__)

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
# Placing a mask may lose at most this fraction of its foreground (partial overlap at the edge of a field of view).
MAX_LOST_FOREGROUND = 0.05


class MaskError(IngestError):
    """A mask that cannot be placed on its series."""


def series_affine(spacing, origin, direction) -> np.ndarray:
    """4x4 affine from array indices ``(i0, i1, i2)`` of a stored (Z, Y, X) volume to LPS mm.

    >>> series_affine([2.0, 1.0, 1.0], [0, 0, 10], [[0, 0, 1], [0, 1, 0], [1, 0, 0]])[:3, 3].tolist()
    [0.0, 0.0, 10.0]
    """
    direction = np.asarray(direction, dtype=float)
    affine = np.eye(4)
    affine[:3, :3] = direction.T * np.asarray(spacing, dtype=float)[None, :]
    affine[:3, 3] = np.asarray(origin, dtype=float)
    return affine


def read_seg(path: str | Path) -> tuple[np.ndarray, np.ndarray, str | None]:
    """A DICOM SEG as ``(label array, affine to LPS, FrameOfReferenceUID)``; segment numbers are the labels."""
    import highdicom as hd

    try:
        seg = hd.seg.segread(path)
        volume = seg.get_volume(combine_segments=True, relabel=False)
    except Exception as exc:  # highdicom raises many types on SEGs it cannot place in 3D
        raise MaskError(f"DICOM SEG cannot be read as a volume: {type(exc).__name__}: {exc}") from exc
    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise MaskError(f"DICOM SEG gives a volume of {array.ndim} dimensions, expected 3")
    return array, np.asarray(volume.affine, dtype=float), volume.frame_of_reference_uid


def read_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI label image as ``(label array, affine to LPS)``; nibabel's RAS affine is flipped to LPS."""
    import stat

    import nibabel as nib

    from medflow.access import is_inside

    if not is_inside(path):  # under medflow serve: a mask table may not name files outside the allowed folders
        raise MaskError("NIfTI mask outside the folders allowed for runs started through the API (medflow serve "
                        "--allow)")
    try:
        if not stat.S_ISREG(Path(path).stat().st_mode):
            raise MaskError("NIfTI mask is not a regular file")
        img = nib.load(str(path))
        array = np.asanyarray(img.dataobj)
    except FileNotFoundError:
        raise MaskError(f"NIfTI mask not found: {path}") from None
    except MaskError:
        raise
    except Exception as exc:
        raise MaskError(f"NIfTI mask cannot be read: {type(exc).__name__}: {exc}") from exc
    array = np.squeeze(array)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise MaskError(f"NIfTI mask has shape {array.shape}, expected a 3-D label image")
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise MaskError("NIfTI mask holds non-integer values; expected a label image (0 = background)")
    ras_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    return array.astype(np.int64), ras_to_lps @ np.asarray(img.affine, dtype=float)


def map_onto(mask: np.ndarray, mask_affine: np.ndarray, shape, affine: np.ndarray) -> np.ndarray:
    """Nearest-neighbour resampling of a label array onto the grid ``(shape, affine)``.

    Output values are labels of ``mask`` or 0; a mask on the same grid (up to axis order,
    flips and whole-voxel offsets) is copied exactly.
    """
    index_map = np.linalg.inv(mask_affine) @ affine  # target indices -> mask indices
    near = np.round(index_map)
    index_map = np.where(np.abs(index_map - near) < 1e-3, near, index_map)  # exact grid matches stay exact
    labels = np.asarray(mask)
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    out = ndimage.affine_transform(labels.astype(np.int32), index_map[:3, :3], offset=index_map[:3, 3],
                                   output_shape=tuple(int(s) for s in shape), order=0, mode="constant", cval=0)
    return out.astype(dtype)


def place_mask(mask: np.ndarray, mask_affine: np.ndarray, shape, affine: np.ndarray) -> np.ndarray:
    """``map_onto`` with checks: labels must be non-negative, and the foreground must land in the volume.

    Raises:
        MaskError: negative labels, or more than 5% of the foreground (in mm³) outside the series.
    """
    if mask.min(initial=0) < 0:
        raise MaskError(f"mask holds negative labels (min {mask.min()}); expected 0 for background and labels > 0")
    out = map_onto(mask, mask_affine, shape, affine)
    fg_in = float(np.count_nonzero(mask)) * abs(np.linalg.det(mask_affine[:3, :3]))
    fg_out = float(np.count_nonzero(out)) * abs(np.linalg.det(affine[:3, :3]))
    if fg_in > 0 and fg_out < (1 - MAX_LOST_FOREGROUND) * fg_in:
        raise MaskError(f"mask does not fit its series: {fg_out:.0f} of {fg_in:.0f} mm³ of foreground fall inside "
                        "the series volume (another grid, field of view or patient position?)")
    return out


def load_mask(kind: str, paths: list[str], *, source: str, shape, spacing, origin, direction,
              frame_of_reference: str | None) -> tuple[np.ndarray, dict]:
    """The mask of one stored volume from its SEG objects or NIfTI file, and facts for the catalog.

    Several SEG objects for one series are merged (a later one's labels win where they overlap).

    Raises:
        MaskError: the reason the mask cannot be used.
    """
    affine = series_affine(spacing, origin, direction)
    out = np.zeros(tuple(shape), dtype=np.uint8)
    for path in paths:
        if kind == "seg":
            labels, mask_affine, mask_for = read_seg(Path(source) / path)
            if frame_of_reference and mask_for and mask_for != frame_of_reference:
                raise MaskError("DICOM SEG is in another frame of reference than its series")
        else:
            labels, mask_affine = read_nifti(path)
        placed = place_mask(labels, mask_affine, shape, affine)
        if placed.dtype != out.dtype:
            out = out.astype(placed.dtype)
        out = np.where(placed > 0, placed, out)
    values = [int(v) for v in np.unique(out) if v]
    return out, {"source": kind, "labels": values, "foreground_voxels": int(np.count_nonzero(out)),
                 "foreground_ml": float(np.count_nonzero(out) * abs(np.linalg.det(affine[:3, :3])) / 1000.0)}
