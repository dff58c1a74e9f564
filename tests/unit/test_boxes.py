"""2D boxes: COCO AP against hand computations, matching, the operating threshold, the baseline, and boxes in
(a CSV, an SR's 2D regions) landing on their image's pixels exactly, through ingest."""

from __future__ import annotations

import csv

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from medflow.boxes import at_threshold, baseline_boxes, coco_ap, match, operating_threshold
from medflow.kinds.detection2d import map_boxes, pixel_box
from storage.ingest import IngestOptions
from storage.marks import read_boxes_csv, write_sr
from tests.helpers import ingest_serial, quarantine

A, B = [0.0, 0.0, 9.0, 9.0], [20.0, 20.0, 29.0, 29.0]


def test_ap50_equals_the_hand_computed_101_point_interpolation():
    # sorted by score: hit (0.9), false positive (0.8), hit (0.7): precision 1 up to recall 0.5, then 2/3
    images = [{"truth": [A], "detections": [{"box": A, "score": 0.9}, {"box": [50, 50, 59, 59], "score": 0.8}]},
              {"truth": [B], "detections": [{"box": B, "score": 0.7}]}]
    hand = (51 * 1.0 + 50 * 2 / 3) / 101  # recall points 0.00..0.50 at 1, 0.51..1.00 at 2/3
    out = coco_ap(images)
    assert out["ap50"] == pytest.approx(hand, abs=1e-12)
    assert out["n_boxes"] == 2 and out["n_images"] == 2
    # the false positive ranked last instead: precision 1 over all recall
    images[0]["detections"][1]["score"] = 0.1
    assert coco_ap(images)["ap50"] == pytest.approx(1.0)


def test_ap50_95_counts_the_iou_thresholds_a_box_passes():
    # IoU 0.62: a hit at 0.50, 0.55 and 0.60, a miss from 0.65 on: 3 of the 10 thresholds
    truth = [0.0, 0.0, 10.0, 10.0]
    shifted = [0.0, 0.0, 10.0, 6.2]
    out = coco_ap([{"truth": [truth], "detections": [{"box": shifted, "score": 0.5}]}])
    assert out["ap50"] == pytest.approx(1.0)
    assert out["ap75"] == pytest.approx(0.0)
    assert out["ap50_95"] == pytest.approx(0.3)


def test_detections_on_an_image_without_lesions_are_false_positives():
    lesion = {"truth": [A], "detections": [{"box": A, "score": 0.5}]}
    empty = {"truth": [], "detections": [{"box": B, "score": 0.9}]}
    assert coco_ap([lesion])["ap50"] == pytest.approx(1.0)
    # the better-scored false positive comes first: precision 1/2 at the only recall point reached
    assert coco_ap([lesion, empty])["ap50"] == pytest.approx(0.5)
    assert np.isnan(coco_ap([empty])["ap50"])  # no lesion at all: AP is undefined, not 0


def test_matching_takes_each_box_once_and_the_operating_point_counts_it():
    images = [{"truth": [A], "detections": [{"box": A, "score": 0.9}, {"box": A, "score": 0.8},
                                            {"box": B, "score": 0.3}]}]
    hits, scores = match(images[0]["detections"], images[0]["truth"])
    assert hits.tolist() == [0, -1, -1] and scores.tolist() == [0.9, 0.8, 0.3]
    assert operating_threshold(images) == 0.9  # the duplicate and the miss only lower F1
    point = at_threshold(images, 0.8)
    assert (point["hits"], point["precision"], point["recall"], point["fp_per_image"]) == (1, 0.5, 1.0, 1.0)


def test_the_baseline_finds_a_bright_blob_of_the_training_size():
    image = np.zeros((64, 64), np.float32)
    yy, xx = np.mgrid[0:64, 0:64]
    image += np.exp(-((yy - 40) ** 2 + (xx - 22) ** 2) / (2 * 4.0**2))
    best = baseline_boxes(image, (12.0, 10.0))[0]
    assert best["box"] == [34.0, 17.0, 46.0, 27.0]  # centred on the blob, 12 x 10


def test_boxes_through_resize_and_pad_and_back_are_exact():
    trace = [("resize", {}, (1, 240, 256), (1, 120, 128)), ("crop_pad", {}, (1, 120, 128), (1, 128, 128))]
    boxes = [[9.5, 19.5, 29.5, 39.5], [-0.5, -0.5, 239.5, 255.5]]
    model = map_boxes(boxes, trace, forward=True)
    assert model[1] == [3.5, -0.5, 123.5, 127.5]  # the whole image: inside the 4-pixel pad above and below
    assert np.allclose(map_boxes(model, trace, forward=False), boxes)
    assert pixel_box(boxes[1]) == [0.0, 0.0, 256.0, 240.0]


def _dx(folder, i: int) -> pydicom.Dataset:
    from medflow.synth_xray import _dicom

    rng = np.random.default_rng(i)
    pixels = rng.integers(0, 4000, size=(40, 50)).astype(np.uint16)
    ds = _dicom(rng, pixels, bits=12, monochrome1=False, modality="DX", spacing=0.5, i=i, seed=7, canaries=[])
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / f"{i}.dcm", enforce_file_format=True)
    return ds


def test_boxes_from_a_csv_and_from_an_sr_land_on_the_same_pixels(tmp_path):
    first = _dx(tmp_path / "src", 1)
    _dx(tmp_path / "src", 2)  # an image without a row
    table = tmp_path / "boxes.csv"
    with table.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["SOPInstanceUID", "x0", "y0", "x1", "y1"])
        w.writerow([first.SOPInstanceUID, 10, 4, 30, 20])  # x0, y0, x1, y1 in pixel edges
        w.writerow([first.SOPInstanceUID, 40, 30, 56, 48])  # reaches past the right and bottom edges: clipped
        w.writerow(["1.2.3.4.5.6.7", 1, 1, 5, 5])  # an image that is not in the source
    assert read_boxes_csv(table)[0][first.SOPInstanceUID][0]["box"] == [3.5, 9.5, 19.5, 29.5]
    out = ingest_serial(tmp_path / "src", tmp_path / "csv.zarr", IngestOptions(marks="csv", marks_table=str(table)))
    catalog = out["store"].catalog()
    key = out["store"].pseudonymizer().key(first.SOPInstanceUID, kind="sop")
    (entry,) = [e for k, e in catalog.items() if k == "i" + key[:15]]
    assert [m["box"] for m in entry["marks"]] == [[3.5, 9.5, 19.5, 29.5], [29.5, 39.5, 39.5, 49.5]]
    (other,) = [e for k, e in catalog.items() if k != "i" + key[:15]]
    assert other["marks"] == []  # an image without a row has no lesion
    lost = [r for r in quarantine(out) if r.get("stage") == "ingest-marks"]
    assert len(lost) == 1 and lost[0]["reason"].startswith("marks table line 4: the box references an image")

    # the same first box as an SR polyline on the image: the same stored box
    (tmp_path / "src2").mkdir()
    src = pydicom.dcmread(next((tmp_path / "src").glob("1.dcm")))
    src.save_as(tmp_path / "src2" / "1.dcm")
    write_sr([src], [{"box_px": [10, 4, 30, 20], "score": 0.9}], tmp_path / "src2" / "marks.dcm",
             series_uid=generate_uid(), sop_uid=generate_uid())
    out_sr = ingest_serial(tmp_path / "src2", tmp_path / "sr.zarr", IngestOptions(marks="sr"))
    (entry_sr,) = out_sr["store"].catalog().values()
    assert [m["box"] for m in entry_sr["marks"]] == [[3.5, 9.5, 19.5, 29.5]]


def test_a_boxes_table_names_every_bad_line_and_keeps_the_good_ones(tmp_path):
    table = tmp_path / "boxes.csv"
    table.write_text("SOPInstanceUID,x0,y0,x1,y1\n1.2.3,5,5,10,10\n1.2.3,10,5,4,10\n1.2.3,nan,1,2,3\n"
                     "1.2.3,a,1,2,3\n1.2.3,1,1,3,3\n")
    boxes, problems = read_boxes_csv(table)
    assert [m["line"] for m in boxes["1.2.3"]] == [2, 6]
    assert [line for line, _ in problems] == [3, 4, 5]
    assert "x1 > x0" in problems[0][1] and "x1 > x0" in problems[1][1] and "numbers" in problems[2][1]
    table.write_text("SOPInstanceUID,x0,y0,x1\n1.2.3,5,5,10\n")
    with pytest.raises(ValueError, match=r"no column\(s\) \['y1'\]"):
        read_boxes_csv(table)


def test_bad_box_rows_are_all_quarantined_and_the_ingest_goes_on(tmp_path):
    from tests.helpers import quarantine
    first = _dx(tmp_path / "src", 1)
    table = tmp_path / "boxes.csv"
    table.write_text(f"SOPInstanceUID,x0,y0,x1,y1\n{first.SOPInstanceUID},10,4,30,20\n{first.SOPInstanceUID},nan,1,2,3\n"
                     f"{first.SOPInstanceUID},5,5,1,1\n1.2.3.4.5.6.7,1,1,5,5\n1.2.3.4.5.6.8,1,1,5,5\n")
    out = ingest_serial(tmp_path / "src", tmp_path / "csv.zarr", IngestOptions(marks="csv", marks_table=str(table)))
    rows = {r["path"]: r["reason"] for r in quarantine(out) if str(r["path"]).startswith("marks table")}
    assert sorted(rows) == ["marks table#3", "marks table#4", "marks table#5", "marks table#6"]  # one row each
    key = out["store"].pseudonymizer().key(first.SOPInstanceUID, kind="sop")
    assert len(out["store"].catalog()["i" + key[:15]]["marks"]) == 1  # the good box is stored


def test_a_bootstrap_resample_scores_as_the_same_images_evaluated_afresh():
    from medflow.boxes import _accumulate, _evaluate

    rng = np.random.default_rng(3)
    images = []
    for _ in range(12):
        truth = [[r, c, r + 12, c + 16] for r, c in rng.uniform(0, 80, (int(rng.integers(0, 3)), 2))]
        near = [{"box": [b[0] + rng.normal(0, 2), b[1] + rng.normal(0, 2), b[2], b[3]], "score": float(rng.random())}
                for b in truth]
        noise = [{"box": [r, c, r + 12, c + 16], "score": float(rng.random())} for r, c in rng.uniform(0, 80, (4, 2))]
        images.append({"truth": truth, "detections": near + noise})
    picks = [0, 0, 3, 5, 5, 5, 7, 11, 2]
    again = coco_ap([images[i] for i in picks])
    reused = _accumulate(_evaluate(images), picks)
    for name in ("ap50", "ap75", "ap50_95"):
        assert reused[name] == pytest.approx(again[name], abs=1e-12)
    assert 0.0 < again["ap50"] < 1.0  # neither trivial case
