"""Preprocessing ops on volumes: pure functions of ``(image, spacing)``.

Each op takes ``image: ndarray of shape (Z, Y, X)`` and its ``spacing`` in mm and returns a
new ``(image, spacing)``; options are keyword-only. ``apply_steps`` runs a spec's list.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable

import numpy as np
from scipy import ndimage
from skimage.transform import resize as sk_resize

from medflow.resampling import linear_zoom
from medflow.signals import SIGNAL_OPS

logger = logging.getLogger(__name__)

Spacing = tuple[float, float, float]


def resample(image: np.ndarray, spacing: Spacing, *, target: Spacing, order: int = 1) -> tuple[np.ndarray, Spacing]:
    """Resample to ``target`` spacing (mm) with a spline of ``order``.

    Linear (``order=1``, the default) runs separably on threads (``medflow.resampling``);
    other orders use ``scipy.ndimage.zoom``, whose result the linear path equals up to float32
    rounding. Both return float32.

    >>> img, sp = resample(np.zeros((10, 20, 20)), (2.0, 1.0, 1.0), target=(4.0, 2.0, 2.0))
    >>> img.shape, sp
    ((5, 10, 10), (4.0, 2.0, 2.0))
    """
    factors = np.asarray(spacing, dtype=float) / np.asarray(target, dtype=float)
    new_shape = np.maximum(1, np.round(np.asarray(image.shape) * factors)).astype(int)
    if order == 1:
        out = linear_zoom(image, tuple(int(n) for n in new_shape))
        return out, tuple(float(s * image.shape[i] / out.shape[i]) for i, s in enumerate(spacing))
    zoom = new_shape / np.asarray(image.shape)
    out = ndimage.zoom(image.astype(np.float32, copy=False), zoom, order=order, mode="nearest", grid_mode=True)
    actual = tuple(float(s * image.shape[i] / out.shape[i]) for i, s in enumerate(spacing))
    return out, actual


def window(image: np.ndarray, spacing: Spacing, *, center: float, width: float) -> tuple[np.ndarray, Spacing]:
    """Clip to the window ``center ± width/2`` and scale to [0, 1] (float32).

    >>> window(np.array([[[-2000.0, -600.0, 1000.0]]]), (1, 1, 1), center=-600, width=1500)[0].ravel().tolist()
    [0.0, 0.5, 1.0]
    """
    lo = center - width / 2.0
    out = image.astype(np.float32)  # one copy; the rest runs in place on it
    np.clip(out, lo, lo + width, out=out)
    out -= np.float32(lo)
    out /= np.float32(width)
    return out, spacing


def zscore(image: np.ndarray, spacing: Spacing, *, eps: float = 1e-6) -> tuple[np.ndarray, Spacing]:
    """Zero mean, unit variance over the whole volume (float32)."""
    img = image.astype(np.float32)
    return (img - img.mean()) / max(float(img.std()), eps), spacing


def clip(image: np.ndarray, spacing: Spacing, *, min: float, max: float) -> tuple[np.ndarray, Spacing]:  # noqa: A002
    """Clip intensities to [min, max]."""
    return np.clip(image, min, max), spacing


def resize(image: np.ndarray, spacing: Spacing, *, shape: tuple[int, int, int], order: int = 1) -> tuple[np.ndarray, Spacing]:
    """Resize to ``shape`` (scikit-image, anti-aliased when shrinking); spacing follows.

    >>> resize(np.ones((4, 8, 8)), (1.0, 1.0, 1.0), shape=(2, 4, 4))[1]
    (2.0, 2.0, 2.0)
    """
    shrink = any(s < i for s, i in zip(shape, image.shape))
    out = sk_resize(
        image.astype(np.float32, copy=False), tuple(shape), order=order, mode="edge",
        anti_aliasing=shrink and order > 0, preserve_range=True,
    ).astype(np.float32)
    new_spacing = tuple(float(s * i / o) for s, i, o in zip(spacing, image.shape, shape))
    return out, new_spacing


def crop_pad(
    image: np.ndarray, spacing: Spacing, *, shape: tuple[int, int, int], value: float | None = None
) -> tuple[np.ndarray, Spacing]:
    """Centre-crop or pad to ``shape``; pads with ``value`` (default: the image minimum).

    >>> crop_pad(np.ones((2, 5, 3)), (1, 1, 1), shape=(4, 3, 3), value=0)[0].sum()
    np.float64(18.0)
    """
    fill = float(image.min()) if value is None else value
    out = np.full(shape, fill, dtype=image.dtype)
    src, dst = [], []
    for n_in, n_out in zip(image.shape, shape):
        if n_in >= n_out:
            a = (n_in - n_out) // 2
            src.append(slice(a, a + n_out))
            dst.append(slice(0, n_out))
        else:
            a = (n_out - n_in) // 2
            src.append(slice(0, n_in))
            dst.append(slice(a, a + n_in))
    out[tuple(dst)] = image[tuple(src)]
    return out, spacing


def fit_size(size: tuple[int, int], shape: tuple[int, int]) -> tuple[int, int]:
    """The largest (h, w) inside ``shape`` with the aspect ratio of ``size``.

    >>> fit_size((200, 100), (150, 150))
    (150, 75)
    """
    scale = min(shape[0] / size[0], shape[1] / size[1])
    return max(1, int(round(size[0] * scale))), max(1, int(round(size[1] * scale)))


def resize2d(image: np.ndarray, spacing: Spacing, *, shape: tuple[int, int], aspect: str = "pad", order: int = 1
             ) -> tuple[np.ndarray, Spacing]:
    """Resize every slice to ``shape`` (H, W): ``stretch`` scales each axis; ``pad`` scales to fit,
    keeping the aspect ratio, and pads the rest (centred) with the image minimum.

    >>> img, sp = resize2d(np.ones((1, 200, 100)), (1.0, 0.5, 0.5), shape=(150, 150))
    >>> img.shape, sp, float(img[0, 75, 0]), float(img[0, 75, 40])
    ((1, 150, 150), (1.0, 0.6666666666666666, 0.6666666666666666), 1.0, 1.0)
    """
    inner = tuple(shape) if aspect == "stretch" else fit_size(image.shape[1:], tuple(shape))
    out, sp = resize(image, spacing, shape=(image.shape[0], *inner), order=order)
    if inner != tuple(shape):
        out, sp = crop_pad(out, sp, shape=(image.shape[0], *shape), value=float(image.min()))
    return out, sp


def rescale(image: np.ndarray, spacing: Spacing, *, scale: float | None = None, offset: float = 0.0
            ) -> tuple[np.ndarray, Spacing]:
    """``image * scale + offset`` (float32); with ``scale=None``, min-max to [0, 1] first.

    >>> rescale(np.array([[[0, 255]]]), (1, 1, 1), scale=1 / 255)[0].ravel().tolist()
    [0.0, 1.0]
    >>> rescale(np.array([[[100, 300]]]), (1, 1, 1))[0].ravel().tolist()
    [0.0, 1.0]
    """
    img = image.astype(np.float32)
    if scale is None:
        lo, hi = float(img.min()), float(img.max())
        img = (img - lo) / np.float32(hi - lo if hi > lo else 1.0)
        scale = 1.0
    return img * np.float32(scale) + np.float32(offset), spacing


def equalize(image: np.ndarray, spacing: Spacing, *, method: str = "clahe", clip_limit: float = 0.01,
             kernel_size: int | None = None) -> tuple[np.ndarray, Spacing]:
    """Histogram equalisation of every slice (scikit-image), output in [0, 1] (float32).

    ``clahe``: contrast-limited adaptive equalisation (``equalize_adapthist``); ``histogram``:
    global (``equalize_hist``). Each slice is min-max scaled to [0, 1] first.
    """
    from skimage import exposure

    out = np.empty(image.shape, np.float32)
    for z, sl in enumerate(np.asarray(image, dtype=np.float32)):
        unit, _ = rescale(sl[None], spacing)
        if method == "clahe":
            out[z] = exposure.equalize_adapthist(unit[0], clip_limit=clip_limit, kernel_size=kernel_size)
        else:
            out[z] = exposure.equalize_hist(unit[0])
    return out, spacing


def slice_index(depth: int, index: int | None) -> int:
    """The slice ``axial_slice`` takes: ``index`` (negative counts from the end), or the middle one.

    >>> slice_index(9, None), slice_index(9, -1), slice_index(9, 2)
    (4, 8, 2)
    """
    if index is None:
        return depth // 2
    if not -depth <= index < depth:
        raise ValueError(f"Received axial_slice index={index} for a volume of {depth} slice(s).")
    return index % depth


def axial_slice(image: np.ndarray, spacing: Spacing, *, index: int | None = None) -> tuple[np.ndarray, Spacing]:
    """One axial slice of a volume as a one-slice volume (1, Y, X): the input of a 2D model.

    >>> axial_slice(np.arange(27).reshape(3, 3, 3), (2.0, 1.0, 1.0))[0].shape
    (1, 3, 3)
    """
    z = slice_index(image.shape[0], index)
    return image[z:z + 1], spacing


OPS: dict[str, Callable] = {
    "resample": lambda img, sp, spacing, order=1: resample(img, sp, target=tuple(spacing), order=order),
    "window": window,
    "zscore": zscore,
    "clip": clip,
    "resize": resize,
    "crop_pad": crop_pad,
    "resize2d": resize2d,
    "rescale": rescale,
    "equalize": equalize,
    "axial_slice": axial_slice,
}


def apply_steps(image: np.ndarray, spacing: Spacing, steps: list[tuple[str, dict]], *,
                leads: list[str] | None = None) -> tuple[np.ndarray, Spacing]:
    """Run ``[(name, kwargs), ...]`` in order; returns float32. ``leads``: a waveform's lead names
    (the catalog's ``leads``), for ``select_leads``."""
    img, sp = image, tuple(float(s) for s in spacing)
    for name, kwargs in steps:
        try:
            op = OPS[name]
        except KeyError:
            raise ValueError(f"Received an unknown preprocessing step {name!r}; expected one of {sorted(OPS)}.") from None
        if name == "select_leads":
            kwargs = {**kwargs, "available": leads}
            leads = list(kwargs["leads"])
        img, sp = op(img, sp, **kwargs)
    return np.ascontiguousarray(img, dtype=np.float32), sp


# Steps that move voxels (the rest change intensities only and leave a mask as it is).
GEOMETRIC = ("resample", "resize", "crop_pad", "resize2d", "axial_slice")


def _label_step(name: str, mask: np.ndarray, spacing: Spacing, kwargs: dict) -> tuple[np.ndarray, Spacing]:
    """The geometric step ``name`` on a label volume: nearest neighbour, background padding."""
    if name == "resample":
        return resample(mask, spacing, target=tuple(kwargs["spacing"]), order=0)
    if name == "resize":
        return resize(mask, spacing, shape=tuple(kwargs["shape"]), order=0)
    if name == "crop_pad":
        return crop_pad(mask, spacing, shape=tuple(kwargs["shape"]), value=0)
    if name == "axial_slice":
        return axial_slice(mask, spacing, **kwargs)
    if name == "resize2d":
        inner = tuple(kwargs["shape"]) if kwargs.get("aspect") == "stretch" else fit_size(mask.shape[1:],
                                                                                           tuple(kwargs["shape"]))
        out, sp = resize(mask, spacing, shape=(mask.shape[0], *inner), order=0)
        return crop_pad(out, sp, shape=(mask.shape[0], *kwargs["shape"]), value=0)
    return mask, spacing


def apply_steps_with_mask(image: np.ndarray, mask: np.ndarray, spacing: Spacing, steps: list[tuple[str, dict]]
                          ) -> tuple[np.ndarray, np.ndarray, Spacing]:
    """The steps on an image and its label volume together.

    Geometric steps move the mask with nearest-neighbour sampling (never interpolated labels:
    every output value is one of the input's); intensity steps leave it unchanged.

    >>> img, m, sp = apply_steps_with_mask(np.zeros((4, 6, 6)), np.eye(6)[None].repeat(4, 0), (2.0, 1.0, 1.0),
    ...                                    [("resample", {"spacing": (1.0, 1.5, 1.5)})])
    >>> img.shape == m.shape, sorted(np.unique(m).tolist())
    (True, [0, 1])
    """
    out, sp = apply_steps(image, spacing, steps)
    labels, lsp = np.asarray(mask), tuple(float(s) for s in spacing)
    for name, kwargs in steps:
        if name in GEOMETRIC:
            labels, lsp = _label_step(name, labels, lsp, kwargs)
    dtype = np.uint8 if int(np.max(labels, initial=0)) < 256 else np.uint16
    return out, np.ascontiguousarray(labels).astype(dtype), sp


def shape_trace(shape, spacing: Spacing, steps: list[tuple[str, dict]]) -> list[tuple[str, dict, tuple, tuple]]:
    """``(name, kwargs, shape before, shape after)`` of each geometric step, computed from shapes alone."""
    trace = []
    shape, sp = tuple(int(s) for s in shape), tuple(float(s) for s in spacing)
    for name, kwargs in steps:
        if name not in GEOMETRIC:
            continue
        if name == "resize2d":  # a resize to the fitted size, then a centred pad
            inner = tuple(kwargs["shape"]) if kwargs.get("aspect") == "stretch" else fit_size(shape[1:],
                                                                                              tuple(kwargs["shape"]))
            resized = (shape[0], *inner)
            trace.append(("resize", {"shape": resized}, shape, resized))
            sp = tuple(float(s * i / o) for s, i, o in zip(sp, shape, resized))
            shape = resized
            name, kwargs = "crop_pad", {"shape": (shape[0], *kwargs["shape"])}
        if name == "resample":
            factors = np.asarray(sp) / np.asarray(kwargs["spacing"], dtype=float)
            new = tuple(int(v) for v in np.maximum(1, np.round(np.asarray(shape) * factors)))
            sp = tuple(float(s * shape[i] / new[i]) for i, s in enumerate(sp))
        elif name == "resize":
            new = tuple(int(v) for v in kwargs["shape"])
            sp = tuple(float(s * i / o) for s, i, o in zip(sp, shape, new))
        elif name == "axial_slice":
            new = (1, *shape[1:])
        else:
            new = tuple(int(v) for v in kwargs["shape"])
        trace.append((name, kwargs, shape, new))
        shape = new
    return trace


def _uncrop_pad(array: np.ndarray, shape: tuple) -> np.ndarray:
    """The exact inverse placement of ``crop_pad`` from ``shape`` to ``array.shape`` (cropped parts get 0)."""
    out = np.zeros(shape, dtype=array.dtype)
    src, dst = [], []
    for n_in, n_out in zip(shape, array.shape):
        if n_in >= n_out:  # forward cropped [a, a + n_out): put it back there
            a = (n_in - n_out) // 2
            dst.append(slice(a, a + n_out))
            src.append(slice(0, n_out))
        else:  # forward padded: the data sit at [a, a + n_in)
            a = (n_out - n_in) // 2
            dst.append(slice(0, n_in))
            src.append(slice(a, a + n_in))
    out[tuple(dst)] = array[tuple(src)]
    return out


def invert_geometry(prob: np.ndarray, trace: list[tuple[str, dict, tuple, tuple]]) -> np.ndarray:
    """Map a model-grid map (probabilities) back onto the original grid of ``shape_trace``.

    Resampling and resizing are undone with linear interpolation of the probabilities (then
    thresholded by the caller); crop/pad is undone exactly.
    """
    out = np.asarray(prob, dtype=np.float32)
    for name, _kwargs, before, after in reversed(trace):
        if out.shape != tuple(after):
            raise ValueError(f"Received a map of shape {out.shape}, expected {tuple(after)} after step {name!r}.")
        if name == "crop_pad":
            out = _uncrop_pad(out, tuple(before))
        elif name == "axial_slice":  # the slice goes back to its place; the others were not predicted
            full = np.zeros(tuple(before), dtype=out.dtype)
            z = slice_index(before[0], _kwargs.get("index"))
            full[z:z + 1] = out
            out = full
        else:
            out = sk_resize(out, tuple(before), order=1, mode="edge", anti_aliasing=False,
                            preserve_range=True).astype(np.float32)
    return out


def steps_key(steps: list[tuple[str, dict]]) -> str:
    """A short stable key of a list of steps (the folder under ``prep/``)."""
    blob = json.dumps(steps, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def preprocess_series(store_root: str, series_key: str, steps: list[tuple[str, dict]], prep_key: str) -> dict:
    """Read a series from the store, apply the steps and write the result (Dask worker entry point)."""
    from storage.store import Store

    store = Store(store_root)
    entry = store.catalog_entry(series_key)
    image = store.read_image(series_key)
    attrs = {"source_digest": entry["digest"], "steps": steps}
    mask = store.read_mask(series_key)
    if mask is not None:  # written first: the image's attributes commit both
        out, prep_mask, spacing = apply_steps_with_mask(image, mask, entry["spacing"], steps)
        store.write_prep(prep_key, f"{series_key}.mask", prep_mask, {"source_digest": entry["digest"]})
        attrs["mask"] = True
    else:
        out, spacing = apply_steps(image, entry["spacing"], steps, leads=entry.get("leads"))
    store.write_prep(prep_key, series_key, out, {**attrs, "spacing": list(spacing)})
    return {"series_key": series_key, "shape": list(out.shape)}


def lung_mask(image: np.ndarray, spacing: Spacing, *, threshold: float = -400.0, fill: float = -1000.0,
              dilate_mm: float = 0.0) -> tuple[np.ndarray, Spacing]:
    """Keep the lung fields of a CT volume in HU; set everything else to ``fill``.

    The classic lung-CAD recipe: voxels below ``threshold`` HU that are not connected to the
    volume's border (the air around the body) form the lungs; holes are filled slice by slice
    so that nodules and vessels inside the lungs are kept; the mask can be dilated.

    Args:
        image: CT volume in HU, shape (Z, Y, X).
        threshold: HU below which a voxel counts as air or lung.
        fill: value outside the mask.
        dilate_mm: dilation of the mask in mm (0: none).
    """
    air = image < threshold
    labels, n = ndimage.label(air)
    border = np.unique(np.concatenate([labels[:, 0, :].ravel(), labels[:, -1, :].ravel(),
                                       labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]))
    lungs = air & ~np.isin(labels, border[border > 0])
    if lungs.any():
        # drop specks: keep components of at least 1% of the largest one
        lab, n = ndimage.label(lungs)
        sizes = ndimage.sum(lungs, lab, index=np.arange(1, n + 1))
        keep = np.flatnonzero(sizes >= 0.01 * sizes.max()) + 1
        lungs = np.isin(lab, keep)
    mask = np.stack([ndimage.binary_fill_holes(s) for s in lungs])
    if dilate_mm > 0:
        radius = np.maximum(1, np.round(dilate_mm / np.asarray(spacing, dtype=float))).astype(int)
        structure = np.ones(tuple(2 * r + 1 for r in radius), dtype=bool)
        mask = ndimage.binary_dilation(mask, structure=structure)
    return np.where(mask, image, np.asarray(fill, dtype=image.dtype)).astype(image.dtype, copy=False), spacing


OPS["lung_mask"] = lung_mask
OPS.update(SIGNAL_OPS)  # waveform steps (medflow.signals)
