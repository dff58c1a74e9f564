"""DICOM waveforms (12-lead, general and ambulatory ECG): channels in physical units, rate, lead names.

A waveform object holds one or more multiplex groups (e.g. a 10 s RHYTHM group and a MEDIAN
BEAT group), each with its own channels and sampling frequency. Groups are never combined:
the RHYTHM group is stored if there is one, else the first group. pydicom's
``waveform_array`` applies each channel's sensitivity, correction factor and baseline; the
units come from ChannelSensitivityUnitsSequence (UCUM) and everything is stored in millivolts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from storage.errors import InvalidSeriesError

WAVEFORM_SEQUENCE = 0x54000100
# UCUM voltage units and their factor to millivolts
TO_MILLIVOLT = {"uV": 1e-3, "mV": 1.0, "V": 1e3, "nV": 1e-6}
# SCP-ECG lead codes (MDC and SCPECG code meanings vary): names as clinicians write them
LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
SCPECG_CODES = {f"5.6.3-9-{i}": name for i, name in zip(
    (1, 2, 61, 62, 63, 64, 3, 4, 5, 6, 7, 8), LEADS)}


@dataclass(frozen=True)
class Waveform:
    """One multiplex group in physical units: ``signal`` (samples, channels) in mV."""

    signal: np.ndarray
    rate: float
    leads: tuple[str, ...]
    group: str


def is_waveform(ds) -> bool:
    """A dataset with a WaveformSequence (and no pixel data of its own)."""
    return WAVEFORM_SEQUENCE in ds or "WaveformSequence" in ds


def lead_name(channel) -> str:
    """The channel's lead, from its ChannelSourceSequence code ("Lead II" -> "II")."""
    source = channel.get("ChannelSourceSequence")
    if not source:
        return ""
    code = source[0]
    value, meaning = str(code.get("CodeValue", "")), str(code.get("CodeMeaning", ""))
    if value in SCPECG_CODES:
        return SCPECG_CODES[value]
    name = meaning.replace("Lead", "").split("(")[0].strip()
    return name or value


def read_waveform(ds) -> Waveform:
    """The group to store, in millivolts.

    Raises:
        InvalidSeriesError: no waveform, a unit that is not a voltage UCUM knows, no sampling
            frequency, or sample values that are not finite.
    """
    groups = list(ds.get("WaveformSequence", []) or [])
    if not groups:
        raise InvalidSeriesError("no waveform (WaveformSequence is empty)")
    labels = [str(g.get("MultiplexGroupLabel", "")).strip().upper() for g in groups]
    index = labels.index("RHYTHM") if "RHYTHM" in labels else 0
    group = groups[index]
    rate = float(group.get("SamplingFrequency", 0) or 0)
    if not np.isfinite(rate) or rate <= 0 or rate > 1e6:
        raise InvalidSeriesError(f"waveform group {labels[index] or index} has an impossible SamplingFrequency "
                                 f"{group.get('SamplingFrequency')!r}")
    channels = list(group.get("ChannelDefinitionSequence", []) or [])
    factors = []
    for i, channel in enumerate(channels):
        units = channel.get("ChannelSensitivityUnitsSequence")
        unit = str(units[0].get("CodeValue", "")) if units else ""
        if unit not in TO_MILLIVOLT:
            raise InvalidSeriesError(f"waveform channel {i + 1} has unknown units {unit or '(none)'!r}; "
                                     f"expected one of {', '.join(TO_MILLIVOLT)} (UCUM)")
        factors.append(TO_MILLIVOLT[unit])
    try:
        values = np.asarray(ds.waveform_array(index), dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - pydicom raises several types on damaged waveform data
        raise InvalidSeriesError(f"waveform data cannot be read: {type(exc).__name__}: {exc}") from exc
    if values.ndim != 2 or values.shape[1] != len(channels) or values.shape[0] < 2:
        raise InvalidSeriesError(f"waveform data of shape {values.shape} does not match {len(channels)} channels")
    signal = (values * np.asarray(factors)[None, :]).astype(np.float32)
    if not np.isfinite(signal).all():
        raise InvalidSeriesError("waveform holds values that are not finite")
    leads = tuple(lead_name(c) or f"ch{i + 1}" for i, c in enumerate(channels))
    return Waveform(signal=signal, rate=rate, leads=leads, group=labels[index] or str(index))


__all__ = ["LEADS", "Waveform", "is_waveform", "lead_name", "read_waveform"]
