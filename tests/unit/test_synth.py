"""The synthetic cohort: deterministic, real DICOM, with PHI canaries and broken files."""

from __future__ import annotations

import csv

import numpy as np
import pydicom

from medflow.synth import synthesize


def test_same_seed_same_files(tmp_path):
    a = synthesize(tmp_path / "a", patients=3, seed=5, matrix=32, broken=False)
    b = synthesize(tmp_path / "b", patients=3, seed=5, matrix=32, broken=False)
    files_a = sorted(p.relative_to(a.dicom_dir) for p in a.dicom_dir.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b.dicom_dir) for p in b.dicom_dir.rglob("*") if p.is_file())
    assert files_a == files_b
    assert (a.dicom_dir / files_a[0]).read_bytes() == (b.dicom_dir / files_a[0]).read_bytes()


def test_headers_are_realistic_and_carry_canaries(small_cohort):
    paths = [p for p in small_cohort.dicom_dir.rglob("*") if p.is_file() and p.parent.name != "misc"]
    ds = pydicom.dcmread(paths[0])
    assert ds.Modality == "CT" and ds.RescaleIntercept in (-1024, -1000)
    assert "ZQXCANARY" in str(ds.PatientName) and "ZQXCANARY" in ds.InstitutionName
    assert ds.pixel_array.shape == (32, 32)
    with small_cohort.labels_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == small_cohort.n_patients
    assert sum(int(r["nodule"]) for r in rows) == small_cohort.n_positive == len(small_cohort.nodules)


def _lungs(seed: int, *, hard: bool, nodule: bool = False):
    import numpy as np

    from medflow import synth

    rng = np.random.default_rng(seed)
    geo = synth._patient_geometry(rng, 96)
    anatomy = synth._hard_anatomy(rng, geo["body"]) if hard else None
    found = synth._hard_nodule(rng, geo["body"], (5.0, 10.0), anatomy["vessels"]) if nodule else None
    kw = dict(shape=(geo["nz"], 96, 96), spacing=(geo["dz"], geo["ps"], geo["ps"]), origin=geo["origin"],
              body=geo["body"], noise=0.0)
    plain = synth.phantom(rng, nodule=None, anatomy=None, **kw)
    lung = plain == -860.0
    vol = synth.phantom(rng, nodule=found, anatomy=anatomy, **kw)
    return vol, lung, anatomy, found


def test_hard_anatomy_puts_vessels_and_granulomas_in_every_lung_not_only_positives():
    import numpy as np

    with_calcified = 0
    for seed in range(4):
        vol, lung, anatomy, _ = _lungs(seed, hard=True)
        assert len(anatomy["vessels"]) >= 8  # trees from both hila
        assert (vol[lung] > -400).sum() > 30  # vessels: bright voxels in the lungs of a patient without a nodule
        if any(g["calcified"] for g in anatomy["granulomas"]):
            with_calcified += 1
            assert vol[lung].max() > 150  # brighter than any nodule: the maximum no longer marks a nodule
    assert with_calcified >= 1
    plain, lung2, _, _ = _lungs(1, hard=False)
    assert np.all(plain[lung2] == -860.0)


def test_hard_nodules_include_ground_glass_and_juxtapleural_ones():
    kinds = {_lungs(seed, hard=True, nodule=True)[3]["kind"] for seed in range(40)}
    assert {"solid", "ground-glass", "juxtapleural", "juxtavascular"} <= kinds
    ggn = next(n for seed in range(40) if (n := _lungs(seed, hard=True, nodule=True)[3])["kind"] == "ground-glass")
    assert -500 <= ggn["hu"] <= -350  # low contrast against lung at about -860 HU


def test_mimics_are_long_soft_tissue_tubes_and_leave_the_rest_of_the_cohort_alone():
    from medflow.synth import _hard_anatomy, _patient_geometry

    plain = _hard_anatomy(np.random.default_rng(3), _patient_geometry(np.random.default_rng(3), 128)["body"])
    rng = np.random.default_rng(3)
    body = _patient_geometry(np.random.default_rng(3), 128)["body"]
    with_mimics = _hard_anatomy(rng, body, mimics=True)
    assert plain["mimics"] == []
    assert with_mimics["vessels"] == plain["vessels"] and with_mimics["granulomas"] == plain["granulomas"]
    tubes = [_hard_anatomy(np.random.default_rng(s), body, mimics=True)["mimics"] for s in range(20)]
    tubes = [t for ts in tubes for t in ts]
    assert 20 < len(tubes) < 80  # Poisson 2.5 per patient
    for t in tubes:
        length = np.linalg.norm(np.subtract(t["p1"], t["p0"]))
        assert 25 <= length <= 45 and 3.0 <= t["r0"] <= 4.5 and 10 <= t["hu"] <= 60
