"""Preprocessing ops on small arrays."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.preprocessing import apply_steps, crop_pad, resample, resize, steps_key, window, zscore


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_resample_halves_shape_and_keeps_a_ramp(dtype):
    img = np.broadcast_to(np.arange(20, dtype=dtype)[None, None, :], (10, 12, 20)).copy()
    out, sp = resample(img, (2.0, 1.0, 0.5), target=(2.0, 2.0, 1.0))
    assert out.shape == (10, 6, 10) and out.dtype == np.float32
    assert sp == pytest.approx((2.0, 2.0, 1.0))
    assert np.all(np.diff(out[5, 3]) > 0)  # still monotonic along x
    assert out.min() >= 0 and out.max() <= 19


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
