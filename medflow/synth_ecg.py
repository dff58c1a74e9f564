"""A synthetic 12-lead ECG cohort written as DICOM 12-lead ECG waveform objects.

Three rhythm classes that need the trace's shape in time to tell apart, not one number:

- ``normal``: sinus rhythm, a P wave before every narrow QRS, regular RR with a little
  heart-rate variability;
- ``afib``: atrial fibrillation, irregularly irregular RR, no P waves, fibrillatory f-waves
  on the baseline;
- ``bbb``: right bundle branch block, sinus rhythm with a wide QRS (an R' in V1-V2, a slurred
  S in I, V5, V6).

Heart rates overlap between the classes (so mean heart rate is a weak baseline), flutter-like AF,
premature beats, flat inferior P waves, wide normal QRS and incomplete blocks make the textbook
numbers of one lead overlap too (``ecg_trace``), and every trace gets baseline wander, mains hum
(50 or 60 Hz), muscle noise and a per-patient amplitude.
Beats are sums of Gaussians per lead (a McSharry-style template); 10 s at 500 Hz.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from storage.waveform import LEADS, SCPECG_CODES

ECG_STORAGE = "1.2.840.10008.5.1.4.1.1.9.1.1"  # 12-lead ECG Waveform Storage
CLASSES = ("normal", "afib", "bbb")
RATE = 500.0
SECONDS = 10.0
SENSITIVITY_UV = 1.25  # µV per stored unit, as pydicom's own sample

# per lead: amplitude (mV) of P, Q, R, S, T in a normal beat
_WAVES = np.array([
    # P     Q      R     S      T
    [0.10, -0.05, 0.60, -0.10, 0.20],   # I
    [0.15, -0.05, 1.00, -0.15, 0.30],   # II
    [0.05, -0.03, 0.40, -0.10, 0.10],   # III
    [-0.12, 0.05, -0.70, 0.10, -0.25],  # aVR
    [0.05, -0.03, 0.30, -0.05, 0.10],   # aVL
    [0.10, -0.04, 0.70, -0.12, 0.20],   # aVF
    [0.08, 0.00, 0.25, -0.90, -0.10],   # V1
    [0.08, 0.00, 0.45, -1.20, 0.40],    # V2
    [0.08, -0.02, 0.80, -0.80, 0.50],   # V3
    [0.08, -0.05, 1.20, -0.40, 0.50],   # V4
    [0.08, -0.06, 1.10, -0.20, 0.40],   # V5
    [0.08, -0.06, 0.90, -0.10, 0.30],   # V6
])
_TIMES = np.array([-0.17, -0.03, 0.0, 0.035, 0.26])  # s from the R peak
_WIDTHS = np.array([0.022, 0.010, 0.011, 0.012, 0.045])


@dataclass
class ECGCohort:
    root: Path
    dicom_dir: Path
    labels_csv: Path
    n: int
    classes: dict[str, int] = field(default_factory=dict)


def _uid(seed: int, *parts) -> str:
    digest = hashlib.sha256(f"{seed}:{':'.join(map(str, parts))}".encode()).hexdigest()
    return "2.25." + str(int(digest[:30], 16))


def beat_times(kind: str, rng: np.random.Generator, seconds: float = SECONDS, *, regular: bool = False,
               ectopics: int = 0) -> tuple[np.ndarray, float]:
    """R-peak times (s) and the mean heart rate of one trace: irregularly irregular for ``afib`` unless
    ``regular`` (flutter with a fixed conduction ratio), else sinus with ``ectopics`` premature beats."""
    if kind == "afib" and not regular:
        hr = rng.uniform(62, 115)
        rr = 60.0 / hr * rng.lognormal(0.0, 0.2, size=64)  # irregularly irregular
    else:
        hr = rng.uniform(60, 110) if kind == "afib" else rng.uniform(52, 102)
        rr = 60.0 / hr * (1 + 0.03 * np.sin(np.arange(64) * rng.uniform(0.2, 0.5)) + rng.normal(0, 0.012, 64))
        for i in rng.choice(np.arange(2, 9), size=ectopics, replace=False):
            early = rng.uniform(0.55, 0.75)  # a premature beat, then a compensatory pause
            rr[i], rr[i + 1] = rr[i] * early, rr[i + 1] * (2 - early)
    times = rng.uniform(0.15, 0.6) + np.concatenate([[0.0], np.cumsum(rr)])
    return times[times < seconds - 0.3], hr


def ecg_trace(kind: str, rng: np.random.Generator, *, rate: float = RATE, seconds: float = SECONDS,
              mains: float | None = None) -> np.ndarray:
    """One 12-lead trace (samples, 12) in mV.

    What makes the classes hard for a few textbook numbers of one lead (RR irregularity, QRS width and
    P-wave energy of lead II), while the twelve traces still tell them apart: half the ``afib`` traces are
    flutter-like (a regular ventricular response with sawtooth flutter waves, so RR is regular and the
    P-wave window is not empty); 40% of ``normal`` traces have one or two premature beats (irregular RR),
    a third a P wave too small to see in lead II (present in the other leads) and a quarter a
    non-specific QRS widening without R'; half the ``bbb`` traces are incomplete blocks (a QRS only a
    little wider, the R' in V1-V2 smaller).
    """
    n = int(rate * seconds)
    t = np.arange(n) / rate
    waves = _WAVES * rng.uniform(0.7, 1.3) * rng.uniform(0.85, 1.15, size=(12, 1))
    widths = _WIDTHS.copy()
    extra = []  # (time offset, width, per-lead amplitude)
    flutter = kind == "afib" and rng.random() < 0.5
    ectopics = int(rng.choice([1, 2])) if kind == "normal" and rng.random() < 0.4 else 0
    if kind == "afib":
        waves[:, 0] = 0.0  # no P waves
    if kind == "normal" and rng.random() < 0.33:
        waves[[1, 2, 5], 0] *= 0.15  # P waves all but flat in the inferior leads, seen in the others
    if kind == "normal" and rng.random() < 0.25:
        widths[1:4] *= rng.uniform(1.4, 1.9)  # a non-specific intraventricular delay: wide, without R'
    if kind == "bbb":  # right bundle branch block: a wide QRS, R' in V1-V2, slurred S in I, V5, V6
        incomplete = rng.random() < 0.5
        widths[1:4] *= rng.uniform(1.4, 1.7) if incomplete else rng.uniform(2.0, 2.6)
        r_prime = np.zeros(12)
        r_prime[[6, 7]] = rng.uniform(0.3, 0.5, 2) if incomplete else rng.uniform(0.5, 0.9, 2)
        slurred = np.zeros(12)
        slurred[[0, 10, 11]] = -rng.uniform(0.25, 0.4, 3)
        extra = [(0.075, 0.02, r_prime), (0.07, 0.03, slurred)]
    out = np.zeros((n, 12))
    r_times, _ = beat_times(kind, rng, seconds, regular=flutter, ectopics=ectopics)
    for r in r_times:
        for w in range(5):
            out += np.exp(-0.5 * ((t[:, None] - r - _TIMES[w]) / widths[w]) ** 2) * waves[:, w][None, :]
        for offset, width, amp in extra:
            out += np.exp(-0.5 * ((t[:, None] - r - offset) / width) ** 2) * amp[None, :]
    if flutter:  # sawtooth flutter waves near 300/min, strongest in II, III, aVF and V1
        f = rng.uniform(4.5, 5.5)
        phase = (f * t + rng.uniform(0, 1)) % 1.0
        saw = rng.uniform(0.08, 0.16) * (2 * np.abs(2 * phase - 1) - 1)
        out += saw[:, None] * np.array([0.3, 1, 0.9, -0.6, 0.2, 0.9, 0.8, 0.5, 0.3, 0.2, 0.2, 0.2])[None, :]
    elif kind == "afib":  # fibrillatory waves, strongest in V1 and the inferior leads
        f = rng.uniform(5, 8)
        fib = 0.05 * np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) + 0.03 * np.sin(2 * np.pi * 1.7 * f * t)
        out += fib[:, None] * np.array([0.4, 1, 0.8, -0.6, 0.3, 0.9, 1.2, 0.8, 0.5, 0.4, 0.3, 0.3])[None, :]
    # noise: baseline wander, mains hum, muscle noise
    wander = rng.uniform(0.05, 0.3) * np.sin(2 * np.pi * rng.uniform(0.1, 0.45) * t[:, None] + rng.uniform(0, 6, 12))
    hum = rng.uniform(0.01, 0.06) * np.sin(2 * np.pi * (mains or rng.choice([50.0, 60.0])) * t)[:, None]
    muscle = rng.normal(0, rng.uniform(0.01, 0.04), size=(n, 12))
    return out + wander + hum + muscle


def write_ecg_dicom(path: Path, trace_mv: np.ndarray, *, rate: float, patient: str, study_uid: str,
                    series_uid: str, sop_uid: str, units: str = "uV") -> None:
    """Write a (samples, 12) trace in mV as a 12-lead ECG waveform object (int16 samples)."""
    scale = {"uV": 1000.0, "mV": 1.0}.get(units, 1000.0)
    stored = np.round(trace_mv * scale / SENSITIVITY_UV).clip(-32768, 32767).astype("<i2")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ECG_STORAGE, sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ECG_STORAGE, sop_uid
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient, f"SYNTH^{patient}", "", ""
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20250101", "120000", "", "1"
    ds.ReferringPhysicianName, ds.Modality, ds.Manufacturer = "", "ECG", "MEDFLOW-SYNTH"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    group = Dataset()
    group.MultiplexGroupTimeOffset = "0"
    group.WaveformOriginality = "ORIGINAL"
    group.NumberOfWaveformChannels = 12
    group.NumberOfWaveformSamples = stored.shape[0]
    group.SamplingFrequency = f"{rate:g}"
    group.MultiplexGroupLabel = "RHYTHM"
    codes = {name: code for code, name in SCPECG_CODES.items()}
    channels = []
    for lead in LEADS:
        ch = Dataset()
        source = Dataset()
        source.CodeValue, source.CodingSchemeDesignator = codes[lead], "SCPECG"
        source.CodingSchemeVersion, source.CodeMeaning = "1.3", f"Lead {lead}"
        ch.ChannelSourceSequence = Sequence([source])
        ch.ChannelSensitivity = f"{SENSITIVITY_UV:g}"
        unit = Dataset()
        unit.CodeValue, unit.CodingSchemeDesignator = units, "UCUM"
        unit.CodingSchemeVersion, unit.CodeMeaning = "1.4", {"uV": "microvolt", "mV": "millivolt"}.get(units, units)
        ch.ChannelSensitivityUnitsSequence = Sequence([unit])
        ch.ChannelSensitivityCorrectionFactor = "1"
        ch.ChannelBaseline = "0"
        ch.ChannelSampleSkew = "0"
        ch.WaveformBitsStored = 16
        channels.append(ch)
    group.ChannelDefinitionSequence = Sequence(channels)
    group.WaveformBitsAllocated = 16
    group.WaveformSampleInterpretation = "SS"
    group.WaveformData = stored.tobytes()
    ds.WaveformSequence = Sequence([group])
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def synthesize_ecg(out: str | Path, *, n: int = 300, seed: int = 0, rate: float = RATE,
                   classes: tuple[str, ...] = CLASSES, progress=None) -> ECGCohort:
    """``n`` ECGs, classes in turn, one patient each: ``out/dicom/<patient>/ecg.dcm`` and ``out/labels.csv``
    (StudyInstanceUID, rhythm)."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        kind = classes[i % len(classes)]
        patient = f"E{seed:02d}{i:05d}"
        study = _uid(seed, i, "study")
        write_ecg_dicom(out / "dicom" / patient / "ecg.dcm", ecg_trace(kind, rng, rate=rate), rate=rate,
                        patient=patient, study_uid=study, series_uid=_uid(seed, i, "series"),
                        sop_uid=_uid(seed, i, "sop"))
        rows.append({"StudyInstanceUID": study, "rhythm": kind})
        if progress:
            progress(i + 1, n)
    labels = out / "labels.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    counts = pd.Series([r["rhythm"] for r in rows]).value_counts().to_dict()
    return ECGCohort(root=out, dicom_dir=out / "dicom", labels_csv=labels, n=n, classes=counts)


__all__ = ["CLASSES", "ECGCohort", "ecg_trace", "synthesize_ecg", "write_ecg_dicom"]
