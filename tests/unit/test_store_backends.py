"""One suite over store backends: a folder, a file:// URL and fsspec's memory:// filesystem."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from storage.ingest import IngestOptions, ingest_series, plan_series, scan_source
from storage.store import Store

ENTRY = {"spacing": [2.0, 0.5, 0.5], "origin": [0, 0, 0], "direction": np.eye(3).tolist(), "digest": "d",
         "modality": "CT"}


@pytest.fixture(params=["folder", "file-url", "memory"])
def store_url(request, tmp_path):
    if request.param == "folder":
        return str(tmp_path / "store.zarr")
    if request.param == "file-url":
        return f"file://{tmp_path}/store.zarr"
    return f"memory://medflow-test-{uuid.uuid4().hex}/store.zarr"


def test_series_round_trip_and_catalog(store_url):
    store = Store(store_url)
    image = np.arange(2 * 4 * 6, dtype=np.int16).reshape(2, 4, 6)
    ref = store.write_series("sabc", image, ENTRY)
    np.testing.assert_array_equal(ref.read(), image)
    np.testing.assert_array_equal(Store(store_url).read_image("sabc"), image)  # a second handle sees it
    assert Store(store_url).catalog()["sabc"]["spacing"] == [2.0, 0.5, 0.5]
    store.write_series("sabc", image + 1, ENTRY)  # overwrite
    np.testing.assert_array_equal(store.read_image("sabc"), image + 1)


def test_secret_quarantine_scan_index_and_prep(store_url):
    store = Store(store_url)
    assert Store(store_url).secret == store.secret and len(store.secret) == 32
    store.write_quarantine([{"path": "b", "reason": "x"}, {"path": "a", "reason": "y"}, {"path": "a", "reason": "z"}])
    rows = Store(store_url).quarantine()  # one row per file, by path key: no file name in the store
    assert sorted((r["file"], r["reason"]) for r in rows) == sorted([(store.path_key("a"), "y"),
                                                                    (store.path_key("b"), "x")])
    assert "path" not in rows[0] and store.path_key("a") != store.path_key("b")
    store.write_scan_index({"f": {"size": 1}})
    assert Store(store_url).scan_index() == {"f": {"size": 1}}
    assert store.prep_attrs("p", "sabc") is None
    store.write_prep("p", "sabc", np.ones((2, 2, 2), np.float32), {"source_digest": "d"})
    assert store.prep_attrs("p", "sabc") == {"source_digest": "d"}
    assert store.read_prep("p", "sabc").sum() == 8


def test_missing_series_is_absent(store_url):
    from storage.errors import SeriesNotFoundError

    with pytest.raises(SeriesNotFoundError):
        Store(store_url).read_image("snope")


def test_ingest_into_each_backend(store_url, small_cohort):
    store = Store(store_url)
    options = IngestOptions(min_slices=8)
    index = scan_source(str(small_cohort.dicom_dir), store)
    plan = plan_series(index, pseudo=store.pseudonymizer(), catalog={}, previous_quarantine=[], options=options)
    results = [ingest_series(store_url, str(small_cohort.dicom_dir), p, options) for p in plan.todo]
    assert sum(r["status"] == "ingested" for r in results) == small_cohort.n_patients
    catalog = Store(store_url).catalog()
    assert len(catalog) == small_cohort.n_patients
    key = next(iter(catalog))
    assert Store(store_url).read_image(key).dtype == np.int16
