"""Ingest benchmark: medflow against dcm2niix and a plain pydicom loop, in one run (``make bench``).

Generates a corpus of CT series as real DICOM files (uncompressed, shuffled names in one
folder; plus an RLE-compressed variant), warms the page cache, then times:

- ``cat`` of every file (the read floor),
- dcm2niix converting the same files (the speed to beat; once more writing gzipped NIfTI),
- a plain pydicom read-sort-stack loop (one process),
- medflow's ingest into compressed, de-identified Zarr (header scan + Dask workers),

and prints slices/s for each with the ratios medflow/dcm2niix and medflow/naive: the median
of ``--repeat`` runs of each tool, interleaved, with dirty pages flushed before each run. Then
preprocessing throughput (voxels/s) with one worker and with two. Absolute times drift
between machines and runs; compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medflow import settings  # noqa: E402

settings.configure(None)


def make_corpus(out: Path, *, series: int, slices: int, matrix: int, seed: int = 0, rle: bool = False) -> int:
    """Write ``series`` CT series of ``slices`` slices into one flat folder with shuffled names."""
    from pydicom.uid import RLELossless

    from medflow.synth import _base_dataset, _patient_geometry, _uid, _write_series, phantom

    marker = out / "corpus.json"
    wanted = {"series": series, "slices": slices, "matrix": matrix, "seed": seed, "rle": rle}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return series * slices
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    names = rng.permutation(series * slices)
    k = 0
    for i in range(series):
        geo = _patient_geometry(rng, matrix)
        geo.update(nz=slices, dz=1.0)
        geo["body"].update(lung_zc=geo["origin"][2] + slices / 2, lung_zh=slices * 0.45)
        vol = phantom(rng, shape=(slices, matrix, matrix), spacing=(1.0, geo["ps"], geo["ps"]),
                      origin=geo["origin"], body=geo["body"], nodule=None, noise=20.0)
        paths = [out / f"{names[k + j]:08x}" for j in range(slices)]
        k += slices
        _write_series(_base_dataset(seed, i, canary=True), vol, geo, series_uid=_uid(seed, "bench", i), seed=seed,
                      i=i, series_no=2, descending=bool(i % 2), slope=1.0, intercept=-1024.0, paths=paths,
                      description="BENCH")
        if rle:
            for path in paths:
                ds = pydicom.dcmread(path)
                ds.compress(RLELossless, encoding_plugin="pylibjpeg")
                ds.save_as(path)
        print(f"  corpus {out.name}: series {i + 1}/{series}", flush=True)
    marker.write_text(json.dumps(wanted))
    return series * slices


def files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != "corpus.json")


def run_cat(folder: Path) -> None:
    with open(os.devnull, "wb") as null:
        for path in files_of(folder):
            null.write(path.read_bytes())


def run_dcm2niix(folder: Path, out: Path, *, gzip: bool = False) -> None:
    """dcm2niix's default output (uncompressed NIfTI), or gzipped NIfTI (``-z y``)."""
    exe = shutil.which("dcm2niix") or str(Path(sys.executable).with_name("dcm2niix"))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    subprocess.run([exe, "-z", "y" if gzip else "n", "-o", str(out), str(folder)], check=True, capture_output=True)


def run_naive(folder: Path) -> None:
    """Read every file, group by series, sort by z, stack, apply the rescale: one process."""
    from pydicom.pixels import apply_rescale

    groups = defaultdict(list)
    for path in files_of(folder):
        ds = pydicom.dcmread(path)
        groups[ds.SeriesInstanceUID].append(ds)
    for datasets in groups.values():
        datasets.sort(key=lambda d: float(d.ImagePositionPatient[2]))
        np.stack([apply_rescale(d.pixel_array, d) for d in datasets]).astype(np.int16)


def run_medflow(folder: Path, store_root: Path, n_workers: int, address: str | None = None,
                start_method: str | None = None) -> dict:
    """Scan + plan + ingest on Dask, as the ingest flow does (without Prefect): one cluster for
    both, started for the run, or the existing scheduler at ``address`` (``run.dask.address``)."""
    from storage.ingest import IngestOptions, ingest_series, plan_series, scan_source
    from storage.store import Store
    from medflow.dask_runtime import dask_client, flow_cluster, map_on, run_all, total_threads

    shutil.rmtree(store_root, ignore_errors=True)
    store = Store(store_root)
    options = IngestOptions()
    t0 = time.perf_counter()
    dask = {"address": address, "n_workers": n_workers, "start_method": start_method}
    with flow_cluster(dask, store) as dask, dask_client(**dask) as client:
        t_cluster = time.perf_counter() - t0
        index = scan_source(str(folder), store, map_fn=map_on(client), n_chunks=4 * total_threads(client))
        t_scan = time.perf_counter() - t0 - t_cluster
        plan = plan_series(index, pseudo=store.pseudonymizer(), catalog={}, previous_quarantine=[], options=options)
        results = run_all(client, ingest_series, [(store.url, str(folder), p, options) for p in plan.todo])
    total = time.perf_counter() - t0
    assert all(r["status"] == "ingested" for r in results), results
    return {"total": total, "cluster": t_cluster, "scan": t_scan, "ingest": total - t_cluster - t_scan}


def run_preprocess(store_root: Path, n_workers: int) -> tuple[float, int]:
    from storage.store import Store
    from medflow.dask_runtime import dask_client, run_all
    from medflow.preprocessing import preprocess_series, steps_key

    store = Store(store_root)
    steps = [("resample", {"spacing": [2.0, 1.0, 1.0], "order": 1}), ("window", {"center": -600, "width": 1500})]
    key = steps_key(steps) + f"-w{n_workers}"
    voxels = sum(int(np.prod(e["shape"])) for e in store.catalog().values())
    with dask_client(n_workers=n_workers) as client:
        t0 = time.perf_counter()
        run_all(client, preprocess_series, [(store.url, k, steps, key) for k in store.catalog()])
        return time.perf_counter() - t0, voxels


def seconds(result) -> float:
    return result["total"] if isinstance(result, dict) else result


def measure(tools: dict, repeat: int) -> dict[str, list]:
    """Run every tool ``repeat`` times, round-robin, after flushing dirty pages (so one tool's
    write-back does not land on the next one's clock). Returns each tool's results: seconds,
    or ``run_medflow``'s dict of phases."""
    out = defaultdict(list)
    for _ in range(repeat):
        for tool, fn in tools.items():
            os.sync()
            t0 = time.perf_counter()
            result = fn()
            out[tool].append(result if isinstance(result, dict) else time.perf_counter() - t0)
    return dict(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "work" / "bench")
    parser.add_argument("--series", type=int, default=8)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each tool, interleaved; medians are shown")
    args = parser.parse_args()
    work = args.workdir
    tmp = Path(tempfile.mkdtemp(prefix="medflow-bench-", dir=work.parent if work.parent.exists() else None))
    print(f"corpus: {args.series} series x {args.slices} slices of {args.matrix}^2 (+ RLE variant of 2 series)")
    n = make_corpus(work / "uncompressed", series=args.series, slices=args.slices, matrix=args.matrix)
    n_rle = make_corpus(work / "rle", series=2, slices=args.slices, matrix=args.matrix, seed=1, rle=True)
    size = sum(p.stat().st_size for p in files_of(work / "uncompressed")) / 2**20
    corpora = (("uncompressed", work / "uncompressed", n), ("rle", work / "rle", n_rle))

    try:
        # local clusters fork their workers from a fork server, started once per process
        from medflow.dask_runtime import default_start_method, start_forkserver

        if default_start_method() == "forkserver":
            t0 = time.perf_counter()
            start_forkserver()
            ctx = multiprocessing.get_context("forkserver")
            probe = ctx.Process(target=int)  # returns once the server has imported medflow
            probe.start()
            probe.join()
            print(f"fork server started in {time.perf_counter() - t0:.2f} s (once per process; "
                  "every local cluster below forks its workers from it)")
        rows = []
        for name, folder, count in corpora:
            run_cat(folder)  # warm the page cache
            tools = {
                "cat": lambda: run_cat(folder),
                "dcm2niix": lambda: run_dcm2niix(folder, tmp / f"nii-{name}"),
                "naive": lambda: run_naive(folder),
                "medflow": lambda: run_medflow(folder, tmp / f"store-{name}.zarr", args.workers),
            }
            rows.append((name, count, measure(tools, args.repeat)))
        # medflow again, on workers that are already running (a standing cluster: run.dask.address)
        from medflow.dask_runtime import dask_client

        with dask_client(n_workers=args.workers) as standing:
            address = standing.scheduler.address
            run_medflow(work / "rle", tmp / "store-warmup.zarr", args.workers, address)  # workers import and warm up
            for name, folder, count in corpora:
                tools = {"medflow": lambda: run_medflow(folder, tmp / f"store-{name}-standing.zarr", args.workers,
                                                        address)}
                base = next(r for r in rows if r[0] == name)[2]
                rows.append((f"{name}*", count, {**base, **measure(tools, args.repeat)}))
        print(f"\nuncompressed corpus: {size:.0f} MiB, {n} slices; {args.workers} Dask workers; "
              f"median of {args.repeat} interleaved runs each\n")
        print(f"{'corpus':<14}{'cat':>12}{'dcm2niix':>12}{'naive':>12}{'medflow':>12}"
              f"{'medflow/dcm2niix':>19}{'medflow/naive':>15}")
        for name, count, runs in rows:
            rate = {tool: count / statistics.median(seconds(r) for r in results) for tool, results in runs.items()}
            print(f"{name:<14}" + "".join(f"{rate[t]:>9.0f} /s" for t in ("cat", "dcm2niix", "naive", "medflow"))
                  + f"{rate['medflow'] / rate['dcm2niix']:>18.2f}x{rate['medflow'] / rate['naive']:>14.2f}x")
        print("* medflow on an existing Dask cluster whose workers are already running (run.dask.address);"
              " the other columns repeat the row above")
        print("\nevery run, slices/s:")
        for name, count, runs in rows:
            for tool in ("dcm2niix", "medflow"):
                if name.endswith("*") and tool != "medflow":
                    continue
                print(f"  {name:<14}{tool:<10}" + ", ".join(f"{count / seconds(r):.0f}" for r in runs[tool]))
        print("\nmedflow's phases (median):")
        for name, count, runs in rows:
            parts = {k: statistics.median(r[k] for r in runs["medflow"]) for k in ("cluster", "scan", "ingest")}
            print(f"  {name:<14}cluster start or connect {parts['cluster']:.2f} s, header scan {parts['scan']:.2f} s, "
                  f"read+sort+compress+write {parts['ingest']:.2f} s")
        # dcm2niix writing compressed output too (once: it takes about 20 s)
        os.sync()
        t0 = time.perf_counter()
        run_dcm2niix(work / "uncompressed", tmp / "nii-gz", gzip=True)
        t_gz = time.perf_counter() - t0
        gz_bytes = sum(p.stat().st_size for p in (tmp / "nii-gz").glob("*.nii.gz")) / 2**20
        medflow_rate = n / statistics.median(r["total"] for r in rows[0][2]["medflow"])
        print(f"\ndcm2niix -z y (gzipped NIfTI, {gz_bytes:.0f} MiB; compressed output like medflow's store): "
              f"{n / t_gz:.0f} /s, one run; medflow/that {medflow_rate / (n / t_gz):.1f}x")
        store_bytes = sum(p.stat().st_size for p in (tmp / "store-uncompressed.zarr" / "series").rglob("*")
                          if p.is_file()) / 2**20
        print(f"store: {store_bytes:.0f} MiB for {size:.0f} MiB of DICOM ({size / store_bytes:.1f}x smaller)")

        print("\npreprocessing (resample to 2x1x1 mm + window), voxels/s:")
        t1, vox = run_preprocess(tmp / "store-uncompressed.zarr", 1)
        t2, _ = run_preprocess(tmp / "store-uncompressed.zarr", 2)
        print(f"  1 worker : {vox / t1 / 1e6:8.1f} Mvox/s ({t1:.1f} s)")
        print(f"  2 workers: {vox / t2 / 1e6:8.1f} Mvox/s ({t2:.1f} s)   speed-up {t1 / t2:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
