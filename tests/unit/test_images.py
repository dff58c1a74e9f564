"""Image-folder sources: listing, reading, quarantine reasons, content keys."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from storage.images import ingest_images, list_class_folders, list_csv, read_image, resolve_duplicates
from storage.store import Store


def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "Jane Doe 1961 export"  # a folder named after a patient: must not reach the store
    for i in range(3):
        _png(root / "NORMAL" / f"DOE^JANE_{i}.png", rng.integers(0, 255, (20, 24), dtype=np.uint8))
        _png(root / "PNEUMONIA" / f"person{i}_bacteria.jpeg", rng.integers(0, 255, (20, 24), dtype=np.uint8))
    (root / "PNEUMONIA" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # unreadable
    (root / "NORMAL" / "notes.txt").write_text("not an image")
    (root / "EFFUSION").mkdir()  # empty class folder
    _png(root / "loose.png", np.zeros((8, 8), np.uint8))  # not in a class folder
    return root


def test_class_folders_ingest_the_rest_and_quarantine_with_reasons(folder, tmp_path):
    items, quarantine = list_class_folders(folder)
    assert sorted({i.label for i in items}) == ["NORMAL", "PNEUMONIA"]
    reasons = {r["path"]: r["reason"] for r in quarantine}
    assert reasons == {"EFFUSION/": "empty class folder (no image)",
                       "NORMAL/notes.txt": reasons["NORMAL/notes.txt"],
                       "loose.png": reasons["loose.png"]}
    assert reasons["NORMAL/notes.txt"].startswith("not an image file")
    assert reasons["loose.png"].startswith("not in a class folder")

    store_root = tmp_path / "store.zarr"
    result = ingest_images(str(store_root), str(folder), items)
    assert result["ingested"] == 6
    assert [(r["path"], r["reason"].split(":")[0]) for r in result["quarantine"]] == [
        ("PNEUMONIA/broken.png", "unreadable image")]
    catalog = Store(store_root).catalog()
    assert sorted(e["label"] for e in catalog.values()) == ["NORMAL"] * 3 + ["PNEUMONIA"] * 3
    stored = " ".join(str(p) for p in store_root.rglob("*")) + repr(catalog)
    for leak in ("DOE", "JANE", "Jane", "person0", "export"):
        assert leak not in stored
    image = Store(store_root).read_image(next(iter(catalog)))
    assert image.shape == (1, 20, 24) and image.dtype == np.uint8

    again = ingest_images(str(store_root), str(folder), items)  # unchanged content: nothing rewritten
    assert again["ingested"] == 0 and again["unchanged"] == 6


def test_the_same_image_in_two_classes_is_withdrawn_and_quarantined(tmp_path):
    array = np.arange(64, dtype=np.uint8).reshape(8, 8)
    _png(tmp_path / "src" / "a" / "x.png", array)
    _png(tmp_path / "src" / "b" / "y.png", array)
    _png(tmp_path / "src" / "b" / "z.png", array.T.copy())
    _png(tmp_path / "src" / "b" / "z2.png", array.T.copy())
    items, _ = list_class_folders(tmp_path / "src")
    result = ingest_images(str(tmp_path / "store"), str(tmp_path / "src"), items)
    withdraw, rows = resolve_duplicates([result])
    assert len(withdraw) == 1
    assert {r["path"]: r["reason"] for r in rows} == {
        "a/x.png": "the same image is in 2 classes (a, b)", "b/y.png": "the same image is in 2 classes (a, b)",
        "b/z2.png": "duplicate of another image in the same class (stored once)"}


def test_read_image_modes(tmp_path):
    gray16 = (np.arange(100, dtype=np.uint16).reshape(10, 10) * 600)
    assert read_image(_png(tmp_path / "g16.png", gray16))[0].dtype == np.uint16
    rgb_gray = np.repeat(np.arange(100, dtype=np.uint8).reshape(10, 10, 1), 3, axis=2)
    assert np.array_equal(read_image(_png(tmp_path / "rgbgray.png", rgb_gray))[0], rgb_gray[..., 0])
    colour = rgb_gray.copy()
    colour[..., 0] = 255
    with pytest.raises(ValueError, match="colour image"):
        read_image(_png(tmp_path / "colour.png", colour))
    assert read_image(tmp_path / "colour.png", color="grayscale")[0].shape == (10, 10)


def test_images_listed_in_a_csv(tmp_path):
    _png(tmp_path / "imgs" / "one.png", np.zeros((8, 8), np.uint8))
    table = tmp_path / "labels.csv"
    table.write_text("file,finding\none.png,effusion\nmissing.png,normal\none.png,\n")
    items, quarantine = list_csv(tmp_path / "imgs", table, path_column="file", label_column="finding")
    assert [(i.relpath, i.label) for i in items] == [("one.png", "effusion")]
    assert sorted(r["reason"] for r in quarantine) == ["listed in the labels CSV but not found",
                                                       "no label in the labels CSV"]
