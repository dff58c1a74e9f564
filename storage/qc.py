"""Geometry QC of a slice stack: measure, then quarantine, split or resample by policy.

Flags (numbers go to the catalog under ``qc``):

- ``mixed``: more than one orientation or image size under one SeriesInstanceUID;
- ``duplicates``: slices at the same position along the slice normal;
- ``missing_slices`` / ``spacing_deviation``: gaps, or otherwise non-uniform spacing;
- ``tilt_deg``: slice positions that do not advance along the slice normal (gantry tilt,
  sheared stacks).

Pure functions on positions and arrays; ``storage.ingest`` applies the policies.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from storage.dicom import slice_normal

DUPLICATE_MM = 1e-3


@dataclass(frozen=True)
class StackQC:
    """What was measured on one stack (one orientation, one image size)."""

    slices: int
    duplicates: int
    missing_slices: int
    spacing_deviation: float
    tilt_deg: float

    def as_dict(self) -> dict:
        return asdict(self)


def group_mixed(orientations, shapes) -> list[list[int]]:
    """Indices of slices grouped by (orientation, image size), largest group first.

    >>> group_mixed([(1, 0, 0, 0, 1, 0)] * 2 + [(1, 0, 0, 0, 0, -1)], [(4, 4)] * 3)
    [[0, 1], [2]]
    """
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (iop, shape) in enumerate(zip(orientations, shapes)):
        groups[(tuple(np.round(np.asarray(iop, dtype=float), 4)), tuple(shape))].append(i)
    return sorted(groups.values(), key=lambda g: (-len(g), g[0]))


def positions_along(positions, orientation) -> tuple[np.ndarray, np.ndarray]:
    """(position of each slice along the slice normal, the normal)."""
    normal = slice_normal(orientation)
    return np.asarray(positions, dtype=float).reshape(-1, 3) @ normal, normal


def measure(positions, orientation, *, tolerance: float = 0.1) -> StackQC:
    """Duplicates, missing slices, spacing deviation and tilt of a stack (any input order)."""
    pos = np.asarray(positions, dtype=float).reshape(-1, 3)
    along, normal = positions_along(pos, orientation)
    order = np.argsort(along, kind="stable")
    s = along[order]
    if len(s) < 2:
        return StackQC(len(s), 0, 0, 0.0, 0.0)
    gaps = np.diff(s)
    duplicates = int((gaps < DUPLICATE_MM).sum())
    real = gaps[gaps >= DUPLICATE_MM]
    if len(real) == 0:
        return StackQC(len(s), duplicates, 0, 0.0, 0.0)
    dz = float(np.median(real))
    deviation = float(np.abs(real - dz).max() / dz)
    missing = int(sum(max(0, round(g / dz) - 1) for g in real if g > (1 + tolerance) * dz))
    extent = pos[order][-1] - pos[order][0]
    lateral = extent - (extent @ normal) * normal
    tilt = float(np.degrees(np.arctan2(np.linalg.norm(lateral), abs(extent @ normal))))
    return StackQC(len(s), duplicates, missing, deviation, tilt)


def split_duplicates(positions, orientation, instance_numbers) -> list[list[int]]:
    """Split a stack with repeated positions into stacks where each position occurs once.

    Slices are taken in InstanceNumber order; each goes to the first stack that does not
    yet hold its position (e.g. two acquisitions stored under one series UID).
    """
    along, _ = positions_along(positions, orientation)
    stacks: list[list[int]] = []
    taken: list[list[float]] = []
    for i in sorted(range(len(along)), key=lambda k: (instance_numbers[k], k)):
        for stack, seen in zip(stacks, taken):
            if all(abs(along[i] - a) >= DUPLICATE_MM for a in seen):
                stack.append(i)
                seen.append(along[i])
                break
        else:
            stacks.append([i])
            taken.append([along[i]])
    return stacks


def resample_along_normal(volume: np.ndarray, along_sorted: np.ndarray, spacing: float) -> np.ndarray:
    """Linear resampling of (Z, Y, X) slices at sorted positions onto a uniform grid along Z.

    >>> v = np.array([0.0, 10.0, 30.0])[:, None, None] * np.ones((3, 1, 1))
    >>> resample_along_normal(v, np.array([0.0, 1.0, 3.0]), 1.0).ravel().tolist()
    [0.0, 10.0, 20.0, 30.0]
    """
    s = np.asarray(along_sorted, dtype=float)
    n = int(round((s[-1] - s[0]) / spacing)) + 1
    targets = s[0] + spacing * np.arange(n)
    upper = np.clip(np.searchsorted(s, targets, side="right"), 1, len(s) - 1)
    lower = upper - 1
    w = ((targets - s[lower]) / (s[upper] - s[lower])).clip(0, 1)[:, None, None]
    vol = volume.astype(np.float32, copy=False)
    return (1 - w) * vol[lower] + w * vol[upper]


def deshear(volume: np.ndarray, positions_sorted, orientation, pixel_spacing, *, fill: float) -> np.ndarray:
    """Shift each slice in-plane so that the stack runs along the slice normal (gantry-tilt correction).

    Args:
        volume: (Z, Y, X) slices sorted along the normal.
        positions_sorted: ImagePositionPatient of each slice, in the same order.
        orientation: ImageOrientationPatient (row cosines, column cosines).
        pixel_spacing: (row spacing, column spacing) in mm.
        fill: value for voxels shifted in from outside the image.
    """
    iop = np.asarray(orientation, dtype=float)
    row_dir, col_dir = iop[:3], iop[3:]
    pos = np.asarray(positions_sorted, dtype=float).reshape(-1, 3)
    out = np.empty(volume.shape, dtype=np.float32)
    for k in range(len(pos)):
        offset = pos[k] - pos[0]
        dx = offset @ row_dir / float(pixel_spacing[1])  # columns
        dy = offset @ col_dir / float(pixel_spacing[0])  # rows
        out[k] = ndimage.shift(volume[k].astype(np.float32), (dy, dx), order=1, mode="constant", cval=fill)
    return out
