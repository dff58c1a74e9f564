"""Confinement under `medflow serve` where paths are opened, not only where the spec is loaded."""

from __future__ import annotations

import os

import pytest

from medflow.access import AccessRefused, check_allowed
from storage.dicom import list_source
from storage.images import list_class_folders
from storage.masks import MaskError, read_nifti
from storage.store import Store


@pytest.fixture
def confined(tmp_path, monkeypatch):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    monkeypatch.setenv("MEDFLOW_ALLOWED_ROOTS", str(allowed))
    monkeypatch.setenv("MEDFLOW_ALLOWED_URLS", "dicomweb://pacs:8042/dicom-web s3://ours/medflow")
    return allowed, outside


def test_paths_and_urls_are_checked_where_they_are_opened(confined):
    allowed, outside = confined
    with pytest.raises(AccessRefused, match="data.store"):
        Store(f"file://{outside}/s.zarr")
    with pytest.raises(AccessRefused, match="data.store"):
        Store(allowed / ".." / "outside" / "s.zarr")
    assert Store(allowed / "s.zarr").root == (allowed / "s.zarr").resolve()
    for url in ("dicomweb://pacs:8042/dicom-web/studies", "s3://ours/medflow/store.zarr"):
        check_allowed(url, "data.source")
    for url in ("dicomweb://pacs:8042/dicom-web-other", "dicomweb://127.0.0.1:8042/dicom-web", "s3://ours/other",
                "s3://ours/medflow/../x", "ftp://pacs/dicom-web", "http://pacs:8042/dicom-web"):
        with pytest.raises(AccessRefused):
            check_allowed(url, "data.source")
    assert not (outside / "s.zarr").exists()


def test_links_out_of_the_allowed_folders_are_quarantined_not_followed(confined):
    allowed, outside = confined
    (outside / "secret.dcm").write_bytes(b"x")
    (outside / "series").mkdir()
    (allowed / "src" / "cls").mkdir(parents=True)
    (allowed / "src" / "inside.dcm").write_bytes(b"y")
    os.symlink(outside / "secret.dcm", allowed / "src" / "file-link.dcm")
    os.symlink(outside / "series", allowed / "src" / "folder-link")
    os.symlink(allowed / "src" / "inside.dcm", allowed / "src" / "inside-link.dcm")  # a link inside: fine
    problems = []
    listed = [p for p, _, _ in list_source(allowed / "src", problems)]
    assert listed == ["inside-link.dcm", "inside.dcm"]
    assert {p for p, _ in problems} == {"file-link.dcm", "folder-link"}
    # the same in an image folder, and a FIFO there is skipped before anything opens it
    os.symlink(outside / "secret.dcm", allowed / "src" / "cls" / "x.png")
    os.mkfifo(allowed / "src" / "cls" / "pipe.png")
    items, rows = list_class_folders(allowed / "src")
    why = {r["path"]: r["reason"] for r in rows}
    assert items == [] and why["cls/x.png"].startswith("symbolic link to outside")
    assert why["cls/pipe.png"] == "not a regular file (FIFO)"


def test_a_mask_table_cannot_name_a_file_outside(confined):
    allowed, outside = confined
    (outside / "m.nii.gz").write_bytes(b"not read")
    with pytest.raises(MaskError, match="outside the folders allowed"):
        read_nifti(outside / "m.nii.gz")


def test_a_scratch_folder_of_this_process_is_allowed_only_while_it_lasts(confined):
    from medflow.access import scratch_dir

    with scratch_dir("medflow-test-") as scratch:
        check_allowed(scratch, "scratch")
        assert Store(scratch).root is not None  # predict's scratch store
    with pytest.raises(AccessRefused):
        check_allowed(scratch, "scratch")
