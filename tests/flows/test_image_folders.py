"""Image folders as users have them, through the ingest flow: colour files under `ingest.color: grayscale`,
a decompression bomb, unreadable files named after a patient, EXIF orientation, alpha, multi-page TIFF;
and `medflow ingest` of a DICOM spec that has no labels yet."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from flows.ingest import ingest_flow
from medflow.errors import SpecError
from medflow.spec import load_spec
from storage.store import Store

PATIENT_FOLDER = "Doe John 1961-02-03 export"
PATIENT_FILE = "DOE^JOHN_0042"


def _image(seed: int, shape=(20, 32)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)


def _bomb_png(path: Path, width: int = 30000, height: int = 30000) -> None:
    """A valid 1x1 PNG whose header is rewritten to declare ``width`` x ``height`` pixels (CRC fixed)."""
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / PATIENT_FOLDER
    for label in ("NORMAL", "PNEUMONIA"):
        (root / label).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(_image(10 * i + len(label))).save(root / label / f"{PATIENT_FILE}_{label}_{i}.png")
    colour = np.stack([_image(1), _image(2), _image(3)], axis=-1)
    Image.fromarray(colour, "RGB").save(root / "NORMAL" / f"{PATIENT_FILE}_colour.png")
    rgba = np.dstack([_image(4), _image(4), _image(4), np.full((20, 32), 200, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "NORMAL" / f"{PATIENT_FILE}_alpha.png")
    upright = np.tile(np.arange(32, dtype=np.uint8) * 8, (20, 1))  # a ramp along x, 20 rows by 32 columns
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: a viewer rotates it 90 degrees clockwise
    Image.fromarray(upright).save(root / "PNEUMONIA" / f"{PATIENT_FILE}_rotated.jpg", quality=100, exif=exif.tobytes())
    Image.fromarray(_image(5)).save(root / "PNEUMONIA" / f"{PATIENT_FILE}_pages.tif", save_all=True,
                                    append_images=[Image.fromarray(_image(6))])
    _bomb_png(root / "PNEUMONIA" / f"{PATIENT_FILE}_bomb.png")
    (root / "NORMAL" / f"{PATIENT_FILE}_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    return root


def _spec(tmp_path: Path, source: Path, **data) -> Path:
    spec = {"name": "image-folders", "data": {"source": str(source), "format": "images",
                                              "store": str(tmp_path / "store.zarr"), **data},
            "ingest": {"color": "grayscale"},
            "preprocess": [{"resize2d": {"shape": [32, 32]}}],
            "model": {"task": "classification", "arch": "seed_cnn"},
            "run": {"dask": {"n_workers": 1, "threads_per_worker": 1}}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_image_folders_as_found_ingest_what_can_be_read_and_say_why_for_the_rest(folder, tmp_path, prefect_harness):
    result = ingest_flow(str(_spec(tmp_path, folder)))
    store = Store(tmp_path / "store.zarr")
    catalog = store.catalog()
    # 4 plain images, the colour one (converted: ingest.color reaches the workers), the RGBA one, the rotated JPEG
    assert result["ingested"] == len(catalog) == 7, result
    notes = sorted(n for e in catalog.values() for n in e.get("notes", []))
    assert notes == ["alpha channel dropped (mode RGBA)", "colour (RGB) converted to luminance",
                     "turned upright by its EXIF orientation 6"]
    (rotated,) = [e for e in catalog.values() if any("EXIF" in n for n in e.get("notes", []))]
    key = next(k for k, e in catalog.items() if e is rotated)
    stored = store.read_image(key)[0]
    assert stored.shape == (32, 20)  # upright: the 32-pixel ramp now runs down the rows
    expected = np.rot90(np.tile(np.arange(32, dtype=np.uint8) * 8, (20, 1)), k=-1)
    assert np.abs(stored.astype(int) - expected.astype(int)).mean() < 4  # JPEG at quality 100

    reasons = sorted(r["reason"] for r in store.quarantine())
    assert len(reasons) == 3, reasons
    assert any("multi-page image (2 pages)" in r for r in reasons)
    assert any("decompression bomb" in r or "larger than Pillow reads safely" in r for r in reasons)
    assert any(r.startswith("unreadable image") for r in reasons)

    # the image's plain SHA-256 is not kept (it would confirm that a given file is in the store)
    plain = {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.*")}
    assert not plain & {e["digest"] for e in catalog.values()}
    # no byte of a file or folder name, nor the source path, in any file of the store
    needles = [PATIENT_FOLDER.encode(), PATIENT_FILE.encode(), b"Doe John", str(folder).encode()]
    for path in (tmp_path / "store.zarr").rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            if path.suffix == ".gz":
                import gzip

                blob = gzip.decompress(blob)
            found = [n for n in needles if n in blob]
            assert not found, f"{path.relative_to(tmp_path)} holds {found}"


def test_ingest_of_a_dicom_spec_needs_no_labels(tmp_path, prefect_harness):
    from medflow.synth import synthesize

    cohort = synthesize(tmp_path / "cohort", patients=2, seed=11, matrix=32)
    spec = {"name": "no-labels-yet", "data": {"source": str(cohort.dicom_dir), "store": str(tmp_path / "s.zarr")},
            "preprocess": [{"crop_pad": {"shape": [8, 16, 16]}}], "model": {"task": "classification"},
            "run": {"dask": {"n_workers": 1, "threads_per_worker": 1}}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError, match="data.labels"):
        load_spec(path)  # a run needs them
    assert ingest_flow(str(path))["ingested"] == cohort.n_patients  # ingest does not


def _nifti_cohort(root: Path, n: int = 12) -> None:
    """``n`` NIfTI volumes per class (a bright ball or none, in noise), in class folders, with patient-like names."""
    import nibabel as nib

    rng = np.random.default_rng(5)
    zz, yy, xx = np.mgrid[:16, :16, :16]
    for label in ("none", "ball"):
        (root / label).mkdir(parents=True)
        for i in range(n):
            vol = rng.normal(0, 20, (16, 16, 16))
            if label == "ball":
                c = rng.integers(5, 11, 3)
                vol += 300 * (((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) <= 9)
            nib.save(nib.Nifti1Image(vol.astype(np.int16), np.diag([1.2, 1.2, 2.0, 1.0])),
                     root / label / f"{PATIENT_FILE}_{label}_{i}.nii.gz")


def test_a_pipeline_on_nifti_class_folders_and_predict_on_new_files(tmp_path, prefect_harness):
    from flows.pipeline import pipeline
    from flows.predict import predict_flow

    _nifti_cohort(tmp_path / PATIENT_FOLDER)
    spec = {"name": "nifti-classes",
            "data": {"source": str(tmp_path / PATIENT_FOLDER), "format": "nifti", "store": str(tmp_path / "s.zarr"),
                     "split": {"val": 0.25, "test": 0.25}},
            "preprocess": [{"zscore": {}}, {"crop_pad": {"shape": [16, 16, 16]}}],
            "model": {"task": "classification", "arch": "cnn3d", "params": {"filters": [4, 8]}},
            "train": {"epochs": 2, "batch_size": 4}, "evaluate": {"bootstrap": 20},
            "run": {"dask": {"n_workers": 1, "threads_per_worker": 1}}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = pipeline(str(path))
    assert result["ingest"]["ingested"] == 24
    run = Path(result["run_dir"])
    metrics = __import__("json").loads((run / "metrics.json").read_text())
    assert metrics["classes"] == ["ball", "none"] and 0 <= metrics["test"]["auc"] <= 1
    entry = next(iter(Store(tmp_path / "s.zarr").catalog().values()))
    assert entry["kind"] == "volume" and entry["spacing"] == pytest.approx([2.0, 1.2, 1.2])

    new = tmp_path / "new"
    new.mkdir()
    for f in sorted((tmp_path / PATIENT_FOLDER / "ball").glob("*.nii.gz"))[:2]:
        (new / f.name).write_bytes(f.read_bytes())
    (new / "notes.txt").write_text("not a volume")
    out = predict_flow(result["run_dir"], str(new), str(tmp_path / "out"))
    assert out["series"] == 2
    import pandas as pd

    rows = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert sorted(rows["file"]) == sorted(f.name for f in new.glob("*.nii.gz"))


def test_the_seed_program_on_its_train_val_test_folders_keeps_their_split(tmp_path, prefect_harness):
    import json

    from flows.pipeline import pipeline
    from medflow.synth_xray import synthesize_xray
    from medflow.tables import read_csv

    cohort = synthesize_xray(tmp_path / "xray-png", images=40, seed=4, fmt="png", classes=["normal", "pneumonia"],
                             split_folders=True)
    images = cohort.images_dir
    given = {p: p.relative_to(images).parts[0] for p in images.rglob("*.png")}
    leak = next(p for p, s in given.items() if s == "train")  # the same file in test too: a leak
    (images / "test" / leak.parent.name / "copy_of_a_train_image.png").write_bytes(leak.read_bytes())
    (images / "notes.txt").write_text("not a split folder")
    spec = yaml.safe_load((Path(__file__).parents[2] / "examples" / "xray_seed.yaml").read_text())
    spec["data"].update(source=str(images), store=str(tmp_path / "store.zarr"))
    spec["train"]["epochs"] = 1
    spec["evaluate"].update(bootstrap=20, baselines=[])
    spec["run"]["dask"]["n_workers"] = 1
    path = tmp_path / "xray_seed.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = pipeline(str(path))
    run = Path(result["run_dir"])
    store = Store(tmp_path / "store.zarr")
    pseudo, catalog = store.pseudonymizer(), store.catalog()
    by_digest = {e["digest"]: k for k, e in catalog.items()}
    folder_of = {by_digest[pseudo.digest([hashlib.sha256(p.read_bytes()).hexdigest()])]: s
                 for p, s in given.items() if p != leak}
    split = read_csv(run / "split.csv").set_index("series_key")["split"].to_dict()
    assert split == folder_of  # every image in the split of its folder; the leaked one in neither
    assert len(split) == len(given) - 1
    reasons = [r["reason"] for r in store.quarantine()]
    assert sum("in 2 splits (test, train): a leak" in r for r in reasons) == 2
    assert any("not a split folder" in r for r in reasons)
    note = json.loads((run / "split.json").read_text())
    assert note["source"] == "layout" and note["note"].startswith("from the layout's train/val/test folders")
    assert "The split: from the layout" in (run / "report.html").read_text()
