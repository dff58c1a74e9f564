"""Preprocessing steps for waveforms (ECG), with scipy.signal.

A waveform is stored as a (1, samples, leads) array whose y spacing is the sampling interval
in milliseconds (``storage.waveform``), so these steps run on Dask and are cached like image
steps. Filters are zero-phase (forward and backward), so they do not shift the waves in time.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
from scipy import signal as sps

Spacing = tuple[float, float, float]


def rate_of(spacing: Spacing) -> float:
    """Sampling rate (Hz) from the y spacing (ms per sample).

    >>> rate_of((1.0, 2.0, 1.0))
    500.0
    """
    return 1000.0 / float(spacing[1])


def _check(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[0] != 1:
        raise ValueError(f"signal steps take a waveform stored as (1, samples, leads); received {image.shape}")


def resample_signal(image: np.ndarray, spacing: Spacing, *, rate: float) -> tuple[np.ndarray, Spacing]:
    """Resample to ``rate`` Hz with a polyphase filter (anti-aliased)."""
    _check(image)
    ratio = Fraction(rate / rate_of(spacing)).limit_denominator(1000)
    out = sps.resample_poly(image[0].astype(np.float64), ratio.numerator, ratio.denominator, axis=0)
    return out[None].astype(np.float32), (spacing[0], 1000.0 / rate, spacing[2])


def bandpass(image: np.ndarray, spacing: Spacing, *, low: float | None = 0.5, high: float | None = 40.0,
             order: int = 4) -> tuple[np.ndarray, Spacing]:
    """Butterworth band-pass (``low`` or ``high`` None: high- or low-pass only), zero phase."""
    _check(image)
    nyquist = rate_of(spacing) / 2
    if high is not None and high >= nyquist:
        high = None  # nothing above Nyquist to remove
    if low is None and high is None:
        return image.astype(np.float32), spacing
    if low is None:
        sos = sps.butter(order, high, btype="lowpass", fs=2 * nyquist, output="sos")
    elif high is None:
        sos = sps.butter(order, low, btype="highpass", fs=2 * nyquist, output="sos")
    else:
        sos = sps.butter(order, [low, high], btype="bandpass", fs=2 * nyquist, output="sos")
    return sps.sosfiltfilt(sos, image.astype(np.float64), axis=1).astype(np.float32), spacing


def notch(image: np.ndarray, spacing: Spacing, *, freq: list[float] | float = (50.0, 60.0),
          quality: float = 30.0) -> tuple[np.ndarray, Spacing]:
    """Remove mains hum at ``freq`` Hz (one or several, e.g. 50 and 60), zero phase."""
    _check(image)
    out = image.astype(np.float64)
    fs = rate_of(spacing)
    for f in np.atleast_1d(freq):
        if f < fs / 2:
            b, a = sps.iirnotch(float(f), quality, fs=fs)
            out = sps.filtfilt(b, a, out, axis=1)
    return out.astype(np.float32), spacing


def baseline(image: np.ndarray, spacing: Spacing, *, cutoff: float = 0.5) -> tuple[np.ndarray, Spacing]:
    """Remove baseline wander (breathing, electrode motion): a zero-phase high-pass at ``cutoff`` Hz."""
    return bandpass(image, spacing, low=cutoff, high=None, order=2)


def normalize_leads(image: np.ndarray, spacing: Spacing, *, eps: float = 1e-6) -> tuple[np.ndarray, Spacing]:
    """Zero mean and unit variance per lead, over time."""
    _check(image)
    x = image.astype(np.float32)
    return (x - x.mean(axis=1, keepdims=True)) / (x.std(axis=1, keepdims=True) + eps), spacing


def crop_pad_signal(image: np.ndarray, spacing: Spacing, *, seconds: float) -> tuple[np.ndarray, Spacing]:
    """A fixed length of ``seconds``: centred crop, or zero padding at both ends."""
    _check(image)
    n = int(round(seconds * rate_of(spacing)))
    have = image.shape[1]
    if have >= n:
        start = (have - n) // 2
        return image[:, start:start + n].astype(np.float32), spacing
    before = (n - have) // 2
    out = np.zeros((1, n, image.shape[2]), np.float32)
    out[:, before:before + have] = image
    return out, spacing


def select_leads(image: np.ndarray, spacing: Spacing, *, leads: list[str], available: list[str] | None = None
                 ) -> tuple[np.ndarray, Spacing]:
    """Keep ``leads`` in that order (names as stored in the catalog: I, II, ..., V6)."""
    _check(image)
    if available is None:
        raise ValueError("select_leads needs the waveform's lead names")
    missing = [lead for lead in leads if lead not in available]
    if missing:
        raise ValueError(f"leads {missing} are not in the waveform (it has {available})")
    return image[:, :, [available.index(lead) for lead in leads]].astype(np.float32), spacing


SIGNAL_OPS = {
    "resample_signal": resample_signal,
    "bandpass": bandpass,
    "notch": notch,
    "baseline": baseline,
    "normalize_leads": normalize_leads,
    "crop_pad_signal": crop_pad_signal,
    "select_leads": select_leads,
}
SIGNAL_STEPS = tuple(SIGNAL_OPS)


def r_peaks(trace: np.ndarray, rate: float, *, prominence: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The lead centred on its median and turned R-up, and its R peaks: above half the 99.5th percentile, at
    least 250 ms apart, and (when ``prominence`` is given) at least that fraction of the 99.5th percentile of
    the absolute signal above their surroundings."""
    x = np.asarray(trace, dtype=np.float64)
    x = x - np.median(x)
    x = x if abs(x.max()) >= abs(x.min()) else -x  # R peaks up
    extra = {"prominence": prominence * np.percentile(np.abs(x), 99.5)} if prominence is not None else {}
    peaks, _ = sps.find_peaks(x, height=0.5 * np.percentile(x, 99.5), distance=max(1, int(0.25 * rate)), **extra)
    return x, peaks


def heart_rate(trace: np.ndarray, rate: float) -> float:
    """Mean heart rate (beats per minute) from R peaks of one lead (the baseline's one feature).

    >>> t = np.arange(5000) / 500.0
    >>> round(heart_rate(np.exp(-0.5 * ((t[:, None] % 1.0 - 0.5) / 0.01) ** 2)[:, 0], 500.0))
    60
    """
    _, peaks = r_peaks(trace, rate)
    if len(peaks) < 2:
        return 0.0
    return float(60.0 * rate / np.median(np.diff(peaks)))


__all__ = ["SIGNAL_OPS", "SIGNAL_STEPS", "heart_rate", "r_peaks", "rate_of"]
