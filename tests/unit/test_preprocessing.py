"""Preprocessing ops on small arrays."""

from __future__ import annotations

import numpy as np
import pytest

from medflow.preprocessing import apply_steps, crop_pad, resample, resize, steps_key, window, zscore


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_resample_halves_shape_and_keeps_a_ramp(dtype):
    img = np.broadcast_to(np.arange(20, dtype=dtype)[None, None, :], (10, 12, 20)).copy()
    out, sp = resample(img, (2.0, 1.0, 0.5), target=(2.0, 2.0, 1.0))
    assert out.shape == (10, 6, 10) and out.dtype == np.float32
    assert sp == pytest.approx((2.0, 2.0, 1.0))
    assert np.all(np.diff(out[5, 3]) > 0)  # still monotonic along x
    assert out.min() >= 0 and out.max() <= 19


@pytest.mark.parametrize(("shape", "target"), [
    ((20, 30, 40), (50, 21, 17)),  # up, down, down
    ((7, 9, 11), (3, 20, 11)),  # down, up, unchanged
    ((1, 64, 64), (1, 100, 30)),  # one slice
    ((5, 5, 5), (1, 9, 2)),  # an axis down to one sample
])
@pytest.mark.parametrize("threads", [1, 3])
def test_separable_linear_resample_equals_scipy_zoom(shape, target, threads):
    """The separable path is trilinear interpolation in scipy's convention (``grid_mode``, edges
    clamped): what ``resample`` computed with ``ndimage.zoom`` before, up to float32 rounding."""
    from scipy import ndimage

    from medflow.resampling import linear_zoom

    img = (np.random.default_rng(0).normal(size=shape) * 1000).astype(np.int16)
    ref = ndimage.zoom(img.astype(np.float32), np.divide(target, shape), order=1, mode="nearest", grid_mode=True)
    out = linear_zoom(img, target, threads=threads)
    assert out.shape == ref.shape and out.dtype == np.float32
    assert np.abs(out - ref).max() <= 1e-6 * np.abs(ref).max()


def test_resample_records_actual_spacing_when_not_divisible():
    out, sp = resample(np.zeros((7, 7, 7)), (1.0, 1.0, 1.0), target=(3.0, 3.0, 3.0))
    assert out.shape == (2, 2, 2)
    assert sp == pytest.approx((3.5, 3.5, 3.5))


def test_window_scales_and_clips():
    img = np.array([-2000, -1350, -600, 150, 3000], dtype=np.int16).reshape(1, 1, 5)
    out, _ = window(img, (1, 1, 1), center=-600, width=1500)
    np.testing.assert_allclose(out.ravel(), [0, 0, 0.5, 1, 1])


def test_zscore_has_zero_mean_unit_std():
    img = np.random.default_rng(0).normal(50, 7, size=(4, 8, 8))
    out, _ = zscore(img, (1, 1, 1))
    assert abs(out.mean()) < 1e-5 and out.std() == pytest.approx(1.0, abs=1e-5)


def test_zscore_of_constant_image_is_zero_not_nan():
    out, _ = zscore(np.full((2, 2, 2), 5.0), (1, 1, 1))
    assert np.all(out == 0)


def test_crop_pad_centres():
    img = np.arange(1, 4, dtype=np.float32).reshape(1, 1, 3)
    padded, _ = crop_pad(img, (1, 1, 1), shape=(1, 1, 5), value=0)
    assert padded.ravel().tolist() == [0, 1, 2, 3, 0]
    cropped, _ = crop_pad(np.arange(6.0).reshape(1, 1, 6), (1, 1, 1), shape=(1, 1, 2))
    assert cropped.ravel().tolist() == [2.0, 3.0]


def test_resize_updates_spacing():
    out, sp = resize(np.ones((4, 10, 10), np.float32), (2.0, 1.0, 1.0), shape=(2, 5, 20))
    assert out.shape == (2, 5, 20)
    assert sp == pytest.approx((4.0, 2.0, 0.5))


def test_apply_steps_in_order_and_key_depends_on_steps():
    img = np.full((8, 8, 8), -600, dtype=np.int16)
    steps = [("resample", {"spacing": [2, 2, 2], "order": 1}), ("window", {"center": -600, "width": 1500}),
             ("crop_pad", {"shape": [6, 6, 6], "value": 0.0})]
    out, sp = apply_steps(img, (1, 1, 1), steps)
    assert out.shape == (6, 6, 6) and out.dtype == np.float32
    assert out[3, 3, 3] == pytest.approx(0.5) and out[0, 0, 0] == 0.0
    assert steps_key(steps) == steps_key([tuple(s) for s in steps])
    assert steps_key(steps) != steps_key(steps[:2])


def test_unknown_step_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown preprocessing step 'blur'"):
        apply_steps(np.zeros((2, 2, 2)), (1, 1, 1), [("blur", {})])


def test_steps_move_a_mask_with_its_image_and_never_invent_labels():
    from medflow.preprocessing import apply_steps_with_mask

    rng = np.random.default_rng(3)
    image = rng.normal(size=(20, 30, 34)).astype(np.float32) * 100
    mask = rng.choice(np.array([0, 2, 5], dtype=np.uint8), size=image.shape, p=[0.7, 0.2, 0.1])
    steps = [("resample", {"spacing": (1.7, 0.9, 1.3), "order": 1}), ("window", {"center": 0, "width": 400}),
             ("resize", {"shape": (16, 40, 28), "order": 1}), ("crop_pad", {"shape": (18, 36, 36), "value": None})]
    out, labels, _ = apply_steps_with_mask(image, mask, (2.0, 1.0, 1.0), steps)
    assert out.shape == labels.shape == (18, 36, 36)
    assert set(np.unique(labels)) <= {0, 2, 5} and labels.dtype == np.uint8
    assert 0.0 <= out.min() and out.max() <= 1.0  # the window acted on the image only


def test_a_box_stays_in_place_through_resample_and_crop():
    from medflow.preprocessing import apply_steps_with_mask

    image = np.zeros((10, 20, 20), np.float32)
    mask = np.zeros((10, 20, 20), np.uint8)
    mask[4:6, 8:12, 8:12] = 1
    image[mask > 0] = 1.0
    out, labels, sp = apply_steps_with_mask(image, mask, (2.0, 1.0, 1.0), [("resample", {"spacing": (1.0, 1.0, 1.0)}),
                                                                         ("crop_pad", {"shape": (20, 16, 16)})])
    assert sp == (1.0, 1.0, 1.0)
    assert labels.sum() == 4 * 4 * 4  # 2 slices of 2 mm became 4 of 1 mm
    np.testing.assert_array_equal(labels > 0, out > 0.5)


def test_invert_geometry_undoes_resample_resize_and_crop():
    from medflow.preprocessing import apply_steps_with_mask, invert_geometry, shape_trace

    mask = np.zeros((12, 40, 36), np.uint8)
    mask[3:9, 10:30, 6:22] = 1
    # finer grids, so that nothing is lost to coarser voxels on the way
    steps = [("resample", {"spacing": (1.0, 0.8, 0.9)}), ("resize", {"shape": (30, 60, 48)}),
             ("crop_pad", {"shape": (32, 56, 50)})]
    _, labels, _ = apply_steps_with_mask(mask.astype(np.float32), mask, (2.0, 1.0, 1.0), steps)
    trace = shape_trace(mask.shape, (2.0, 1.0, 1.0), steps)
    assert trace[-1][3] == labels.shape
    back = invert_geometry(labels.astype(np.float32), trace) >= 0.5
    assert back.shape == mask.shape
    dice = 2 * (back & (mask > 0)).sum() / (back.sum() + mask.sum())
    assert dice > 0.93  # non-integer zoom factors move a boundary by up to one voxel
    # crop/pad alone is undone exactly
    only_crop = [("crop_pad", {"shape": (9, 44, 30)})]
    _, cropped, _ = apply_steps_with_mask(mask.astype(np.float32), mask, (2.0, 1.0, 1.0), only_crop)
    back = invert_geometry(cropped.astype(np.float32), shape_trace(mask.shape, (2.0, 1.0, 1.0), only_crop))
    np.testing.assert_array_equal(back[1:10, :, 3:33], mask[1:10, :, 3:33])


def test_2d_steps_resize_with_padding_rescale_equalize_and_slice():
    from medflow.preprocessing import apply_steps_with_mask, axial_slice, equalize, resize2d, shape_trace

    rng = np.random.default_rng(0)
    image = rng.random((1, 60, 30)).astype(np.float32) * 1000
    out, spacing = resize2d(image, (1.0, 0.5, 0.5), shape=(40, 40))
    assert out.shape == (1, 40, 40) and spacing == pytest.approx((1.0, 0.75, 0.75))
    assert np.all(out[0, :, :10] == image.min())  # padded left and right, aspect kept
    stretched, _ = resize2d(image, (1.0, 0.5, 0.5), shape=(40, 40), aspect="stretch")
    assert stretched.min() > image.min() - 1e-3 and stretched[0, :, 0].std() > 0
    eq, _ = equalize(image, (1, 1, 1))
    assert 0.0 <= eq.min() and eq.max() <= 1.0 and eq.std() > 0.2
    vol = np.arange(5 * 4 * 4, dtype=np.float32).reshape(5, 4, 4)
    assert np.array_equal(axial_slice(vol, (1, 1, 1))[0], vol[2:3])
    mask = np.zeros((5, 4, 4), np.uint8)
    mask[2, 1, 1] = 1
    steps = [("axial_slice", {"index": None}), ("resize2d", {"shape": (8, 8), "aspect": "pad", "order": 1})]
    img2, mask2, _ = apply_steps_with_mask(vol, mask, (1.0, 1.0, 1.0), steps)
    assert img2.shape == mask2.shape == (1, 8, 8) and set(np.unique(mask2)) == {0, 1}
    trace = shape_trace((5, 4, 4), (1.0, 1.0, 1.0), steps)
    assert [t[3] for t in trace] == [(1, 4, 4), (1, 8, 8), (1, 8, 8)]
