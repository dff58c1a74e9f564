"""DICOM waveforms (ECG): physical values, lead names and rate; quarantine; the signal steps."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest

from medflow.signals import bandpass, baseline, crop_pad_signal, heart_rate, normalize_leads, notch, \
    resample_signal, select_leads
from medflow.synth_ecg import ecg_trace, synthesize_ecg, write_ecg_dicom
from storage.waveform import LEADS, read_waveform
from tests.helpers import ingest_serial, quarantine_reasons

RATE = 500.0
SPACING = (1.0, 1000.0 / RATE, 1.0)


def _write(path, trace_mv, **kw):
    write_ecg_dicom(path, trace_mv, rate=RATE, patient="P1", study_uid="1.2.3.1", series_uid="1.2.3.2",
                    sop_uid=kw.pop("sop", "1.2.3.3"), **kw)


def test_a_waveform_reads_back_in_physical_units_with_its_leads_and_rate(tmp_path):
    rng = np.random.default_rng(0)
    stored = rng.integers(-2000, 2000, size=(1000, 12))
    _write(tmp_path / "ecg.dcm", np.zeros((1000, 12)))
    ds = pydicom.dcmread(tmp_path / "ecg.dcm")
    group = ds.WaveformSequence[0]
    group.WaveformData = stored.astype("<i2").tobytes()
    sensitivity, correction, offset = 2.5, 0.8, 40.0  # µV per unit, correction factor, baseline in µV
    for ch in group.ChannelDefinitionSequence:
        ch.ChannelSensitivity, ch.ChannelSensitivityCorrectionFactor, ch.ChannelBaseline = \
            f"{sensitivity}", f"{correction}", f"{offset}"
    ds.save_as(tmp_path / "ecg.dcm")
    wave = read_waveform(pydicom.dcmread(tmp_path / "ecg.dcm"))
    expected_mv = (stored * sensitivity * correction + offset) / 1000.0
    np.testing.assert_allclose(wave.signal, expected_mv, rtol=1e-5, atol=1e-6)
    assert wave.leads == LEADS and wave.rate == RATE and wave.group == "RHYTHM"

    out = ingest_serial(tmp_path, tmp_path.parent / f"{tmp_path.name}-store.zarr")
    (key, entry), = out["store"].catalog().items()
    assert key.startswith("w") and entry["kind"] == "waveform" and entry["shape"] == [1, 1000, 12]
    assert entry["sampling_rate"] == RATE and entry["leads"] == list(LEADS) and entry["units"] == "mV"
    assert entry["spacing"] == [1.0, 2.0, 1.0]  # y: ms per sample
    np.testing.assert_allclose(out["store"].read_image(key)[0], expected_mv, rtol=1e-5, atol=1e-6)


def test_pydicoms_own_ecg_ingests(tmp_path, pydicom_test_files):
    (tmp_path / "src").mkdir()
    shutil.copy(pydicom_test_files / "waveform_ecg.dcm", tmp_path / "src")
    ds = pydicom.dcmread(tmp_path / "src" / "waveform_ecg.dcm")
    out = ingest_serial(tmp_path / "src", tmp_path / "store.zarr")
    assert quarantine_reasons(out) == {}
    (key, entry), = out["store"].catalog().items()
    assert entry["group"] == "RHYTHM" and entry["sampling_rate"] == 1000.0 and entry["shape"] == [1, 10000, 12]
    assert entry["leads"] == list(LEADS)
    np.testing.assert_allclose(out["store"].read_image(key)[0], ds.waveform_array(0) / 1000.0, rtol=1e-5)


def test_a_waveform_with_an_unknown_unit_is_quarantined(tmp_path):
    _write(tmp_path / "src" / "ecg.dcm", np.zeros((500, 12)))
    ds = pydicom.dcmread(tmp_path / "src" / "ecg.dcm")
    ds.WaveformSequence[0].ChannelDefinitionSequence[3].ChannelSensitivityUnitsSequence[0].CodeValue = "mmHg"
    ds.save_as(tmp_path / "src" / "ecg.dcm")
    out = ingest_serial(tmp_path / "src", tmp_path / "store.zarr")
    assert out["store"].catalog() == {}
    assert quarantine_reasons(out)["ecg.dcm"].startswith("waveform channel 4 has unknown units 'mmHg'")


def _signal(*components, seconds=10.0):
    t = np.arange(int(RATE * seconds)) / RATE
    x = sum(a * np.sin(2 * np.pi * f * t) for a, f in components)
    return np.repeat(x[None, :, None], 2, axis=2).astype(np.float32), t


def test_filters_keep_the_pass_band_and_remove_mains_and_wander():
    clean, _ = _signal((1.0, 10.0))
    inner = slice(500, -500)  # away from the ends, where any filter settles
    out, sp = bandpass(clean, SPACING, low=0.5, high=40.0)
    assert sp == SPACING and np.abs(out - clean)[:, inner].max() < 0.02
    hummed, _ = _signal((1.0, 10.0), (0.5, 50.0), (0.5, 60.0))
    out, _ = notch(hummed, SPACING, freq=[50.0, 60.0])
    assert np.abs(out - clean)[:, inner].max() < 0.05  # both mains frequencies gone, 10 Hz kept
    spectrum = np.abs(np.fft.rfft(out[0, inner, 0]))
    freqs = np.fft.rfftfreq(len(spectrum) * 2 - 2, 1 / RATE)
    at = lambda f: spectrum[np.argmin(np.abs(freqs - f))]  # noqa: E731
    assert at(50.0) < 0.01 * at(10.0) and at(60.0) < 0.01 * at(10.0)
    wandering, _ = _signal((1.0, 10.0), (2.0, 0.15))
    out, _ = baseline(wandering, SPACING, cutoff=0.5)
    assert np.abs(out - clean)[:, 1500:-1500].max() < 0.05  # a 0.5 Hz high-pass settles over seconds
    assert np.abs(wandering - clean)[:, 1500:-1500].max() > 1.0


def test_resample_crop_select_and_normalize():
    x, _ = _signal((1.0, 5.0), seconds=8.0)
    out, sp = resample_signal(x, SPACING, rate=100.0)
    assert out.shape == (1, 800, 2) and sp == (1.0, 10.0, 1.0)
    np.testing.assert_allclose(out[0, 100:-100, 0], x[0, ::5][100:-100, 0], atol=0.02)
    padded, _ = crop_pad_signal(out, sp, seconds=10.0)
    assert padded.shape == (1, 1000, 2) and np.all(padded[0, :100] == 0)
    cropped, _ = crop_pad_signal(out, sp, seconds=5.0)
    np.testing.assert_array_equal(cropped, out[:, 150:650])
    three = np.stack([np.full(10, v, np.float32) for v in (1, 2, 3)], axis=1)[None]
    kept, _ = select_leads(three, SPACING, leads=["V1", "I"], available=["I", "II", "V1"])
    assert kept[0, 0].tolist() == [3.0, 1.0]
    with pytest.raises(ValueError, match=r"leads \['aVF'\] are not in the waveform"):
        select_leads(three, SPACING, leads=["aVF"], available=["I", "II", "V1"])
    z, _ = normalize_leads(x, SPACING)
    np.testing.assert_allclose(z.mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=1), 1, atol=1e-3)


def test_the_synthetic_cohort_has_its_classes_and_heart_rates_overlap(tmp_path):
    cohort = synthesize_ecg(tmp_path, n=12, seed=1)
    assert cohort.classes == {"normal": 4, "afib": 4, "bbb": 4}
    files = sorted(cohort.dicom_dir.rglob("*.dcm"))
    assert len(files) == 12 and pydicom.dcmread(files[0]).SOPClassUID == "1.2.840.10008.5.1.4.1.1.9.1.1"
    rng = np.random.default_rng(3)
    rates = {k: [heart_rate(ecg_trace(k, rng, mains=50.0)[:, 1], RATE) for _ in range(30)]
             for k in ("normal", "afib", "bbb")}
    for k, r in rates.items():  # one number does not separate the rhythms: their heart rates overlap
        assert 50 < np.median(r) < 115, (k, np.median(r))
    assert max(rates["normal"]) > min(rates["afib"]) and max(rates["bbb"]) > min(rates["normal"])


def test_a_signal_spec_refuses_image_steps_and_image_augmentation():
    import yaml

    from medflow.cli import ECG_DEMO_SPEC
    from medflow.errors import SpecError
    from medflow.spec import parse_spec

    good = yaml.safe_load(ECG_DEMO_SPEC.format(seed=0, epochs=1))
    assert parse_spec(good, check_paths=False).model.task == "signal"
    bad = yaml.safe_load(ECG_DEMO_SPEC.format(seed=0, epochs=1))
    bad["preprocess"] = [{"window": {"center": 0, "width": 2}}, *bad["preprocess"][:-1]]
    bad["augment"] = {"flip": ["x"]}
    with pytest.raises(SpecError) as info:
        parse_spec(bad, check_paths=False)
    text = "\n".join(info.value.problems)
    assert "window are image steps" in text and "augment: flip, shift" in text
    assert "end with crop_pad_signal" in text
    wrong_model = yaml.safe_load(ECG_DEMO_SPEC.format(seed=0, epochs=1))
    wrong_model["model"]["arch"] = "cnn3d"
    with pytest.raises(SpecError, match="cnn3d' is a classification model; for signal use one of: cnn_gru, gru, lstm"):
        parse_spec(wrong_model, check_paths=False)


@pytest.mark.parametrize("arch, params", [("gru", {"units": [16]}), ("lstm", {"units": [16, 8], "bidirectional": True}),
                                          ("cnn_gru", {"filters": [8, 8], "units": 8})])
def test_signal_models_read_samples_by_leads(arch, params):
    from models import get, info

    assert info(arch).task == "signal" and info(arch).ndim == 1
    model = get(arch)((200, 4, 1), n_classes=3, **params)
    x = np.random.default_rng(0).normal(size=(2, 200, 4, 1)).astype(np.float32)
    out = np.asarray(model(x, training=False))
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)  # softmax over the three classes
    assert model.get_layer("sequence").output.shape[1:] == (200, 4)  # time along the sequence axis


def test_a_damaged_waveform_file_is_quarantined_and_the_ingest_goes_on(tmp_path):
    _write(tmp_path / "src" / "good.dcm", np.zeros((500, 12)))
    _write(tmp_path / "src" / "cut.dcm", np.zeros((500, 12)), sop="1.2.3.9")
    data = (tmp_path / "src" / "cut.dcm").read_bytes()
    (tmp_path / "src" / "cut.dcm").write_bytes(data[: len(data) - 4000])  # the samples cut short
    out = ingest_serial(tmp_path / "src", tmp_path / "store.zarr")
    assert len(out["store"].catalog()) == 1
    why = quarantine_reasons(out)
    assert set(why) == {"cut.dcm"} and "src" not in why["cut.dcm"]
