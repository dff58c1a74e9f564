"""Preprocessing benchmark (``make bench``): medflow against MONAI, scipy and PyTorch on the same CT.

The job is the CT demo's geometry step on a full-size scan: resample a 200×512×512 int16
CT at spacing (2.5, 0.7, 0.7) mm to 1 mm (linear), then window it to [0, 1]
(centre −600 HU, width 1500). Each tool runs in its own process, which imports only what the
tool needs and loads the same volume; the process's peak RSS is the tool's memory:

- ``medflow``: ``medflow.preprocessing.apply_steps`` with ``resample`` + ``window``, as a
  preprocessing worker runs them;
- ``monai``: MONAI's ``Spacing(pixdim=1, mode="bilinear")`` + ``ScaleIntensityRange(clip=True)``
  on a ``MetaTensor`` carrying the spacing in its affine (the usual MONAI recipe);
- ``scipy``: ``scipy.ndimage.zoom(order=1)`` + the same window in numpy (medflow's path
  before its separable resample);
- ``torch``: ``torch.nn.functional.interpolate(mode="trilinear")`` + ``clamp``: a reference
  near what the CPU can do, not a preprocessing library.

Tools run interleaved, ``--repeat`` times each (medians shown). It prints volumes/s, input
Mvoxels/s, CPU seconds, peak RSS (the whole process's, and how far the job took it above the
process with its imports done and the volume loaded), and medflow's ratios against MONAI: the goal is ≥ 3.0× MONAI's throughput at
≤ 1/3 of its peak RSS. It also checks that medflow's output equals the scipy path's.
Absolute figures drift between machines and runs; compare within one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_name  # bench/ is this script's first path entry

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (200, 512, 512)
SPACING = (2.5, 0.7, 0.7)
TARGET = (1.0, 1.0, 1.0)
CENTER, WIDTH = -600.0, 1500.0
TOOLS = ("medflow", "monai", "scipy", "torch")


def make_volume(path: Path) -> None:
    """A CT-like int16 volume: air outside, soft tissue, lungs, bone, noise (HU)."""
    import numpy as np
    from scipy import ndimage

    rng = np.random.default_rng(0)
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    body = ((y - 256) / 200.0) ** 2 + ((x - 256) / 240.0) ** 2 < 1
    lungs = (((y - 240) / 120.0) ** 2 + ((abs(x - 256) - 100) / 70.0) ** 2 < 1) & (z > 20) & (z < 180)
    vol = np.full(SHAPE, -1000, dtype=np.int16)
    vol[np.broadcast_to(body, SHAPE)] = 40
    vol[np.broadcast_to(lungs, SHAPE)] = -850
    vol += ndimage.gaussian_filter(rng.normal(0, 60, size=SHAPE[1:]).astype(np.float32), 2).astype(np.int16)[None]
    vol += rng.normal(0, 15, size=SHAPE).astype(np.int16)
    np.save(path, vol)


def worker(tool: str, volume: str) -> dict:
    """One tool, in this process: the job once, timed, with the process's peak memory."""
    import numpy as np

    if tool == "medflow":
        sys.path.insert(0, str(ROOT))
        from medflow.preprocessing import apply_steps

        steps = [("resample", {"spacing": list(TARGET)}), ("window", {"center": CENTER, "width": WIDTH})]

        def job(vol):
            return apply_steps(vol, SPACING, steps)[0]
    elif tool == "scipy":
        from scipy import ndimage

        def job(vol):
            shape = np.maximum(1, np.round(np.multiply(vol.shape, np.divide(SPACING, TARGET))))
            out = ndimage.zoom(vol.astype(np.float32), shape / vol.shape, order=1, mode="nearest", grid_mode=True)
            lo = CENTER - WIDTH / 2
            return (np.clip(out, lo, lo + WIDTH) - lo) / np.float32(WIDTH)
    elif tool == "monai":
        import torch
        from monai.data import MetaTensor
        from monai.transforms import Compose, ScaleIntensityRange, Spacing

        lo = CENTER - WIDTH / 2
        transform = Compose([Spacing(pixdim=TARGET, mode="bilinear"),
                             ScaleIntensityRange(a_min=lo, a_max=lo + WIDTH, b_min=0.0, b_max=1.0, clip=True)])

        def job(vol):
            image = MetaTensor(torch.from_numpy(vol[None]), affine=torch.diag(torch.tensor([*SPACING, 1.0])))
            return transform(image)[0].numpy()
    elif tool == "torch":
        import torch

        def job(vol):
            shape = tuple(int(s) for s in np.maximum(1, np.round(np.multiply(vol.shape, np.divide(SPACING, TARGET)))))
            t = torch.from_numpy(vol).float()[None, None]
            out = torch.nn.functional.interpolate(t, size=shape, mode="trilinear", align_corners=False)
            lo = CENTER - WIDTH / 2
            return ((out.clamp_(lo, lo + WIDTH) - lo) / WIDTH)[0, 0].numpy()
    else:
        raise ValueError(f"Received tool {tool!r}; expected one of {TOOLS}.")
    _reset_peak()  # a forked child starts with its parent's high-water mark
    vol = np.load(volume)
    before = _status("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    out = job(vol)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = _status("VmHWM")
    np.save(Path(volume).with_name(f"out-{tool}.npy"), out)
    return {"tool": tool, "wall_s": wall, "cpu_s": cpu, "peak_rss": peak, "base_rss": before,
            "voxels": int(vol.size), "shape": list(out.shape)}


def _reset_peak() -> None:
    """Reset this process's peak RSS (Linux: ``clear_refs`` 5) to its present RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def _status(field: str) -> int:
    """A memory figure of this process from ``/proc/self/status``, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each tool (median reported)")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--worker", nargs=2, metavar=("TOOL", "VOLUME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    import numpy as np

    tools = args.tools.split(",")
    with tempfile.TemporaryDirectory(prefix="medflow-prep-bench-") as tmp:
        volume = Path(tmp) / "ct.npy"
        make_volume(volume)
        runs: dict[str, list[dict]] = {t: [] for t in tools}
        for _ in range(args.repeat):
            for tool in tools:  # interleaved, so that drift hits every tool alike
                out = subprocess.run([sys.executable, __file__, "--worker", tool, str(volume)],
                                     capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(f"{tool} failed:\n{out.stderr[-2000:]}")
                runs[tool].append(json.loads(out.stdout.strip().splitlines()[-1]))
        agree = {}
        if "medflow" in tools and "scipy" in tools:
            a, b = np.load(Path(tmp) / "out-medflow.npy"), np.load(Path(tmp) / "out-scipy.npy")
            agree["medflow vs scipy"] = float(np.abs(a - b).max()) if a.shape == b.shape else f"shapes {a.shape} {b.shape}"
    med = {t: {k: statistics.median(r[k] for r in runs[t]) for k in ("wall_s", "cpu_s", "peak_rss", "base_rss")}
           for t in tools}
    vox = runs[tools[0]][0]["voxels"]
    print(f"\nPreprocessing: resample {SHAPE[0]}×{SHAPE[1]}×{SHAPE[2]} int16 at {SPACING} mm to 1 mm + window "
          f"(median of {args.repeat}; CPU: {cpu_name()})")
    print(f"{'tool':8} {'volumes/s':>9} {'Mvox/s':>8} {'wall s':>7} {'CPU s':>6} {'peak RSS':>9} {'above base':>10}  output")
    for t in tools:
        m = med[t]
        print(f"{t:8} {1 / m['wall_s']:9.2f} {vox / m['wall_s'] / 1e6:8.1f} {m['wall_s']:7.2f} {m['cpu_s']:6.2f} "
              f"{m['peak_rss'] / 2**20:7.0f} MB {(m['peak_rss'] - m['base_rss']) / 2**20:7.0f} MB  "
              f"{tuple(runs[t][0]['shape'])}")
    if "medflow" in med and "monai" in med:
        mf, mo = med["medflow"], med["monai"]
        print(f"medflow / MONAI: {mo['wall_s'] / mf['wall_s']:.2f}x the throughput (goal ≥ 3.0), "
              f"{mf['peak_rss'] / mo['peak_rss']:.2f} of the peak RSS (goal ≤ 0.33), "
              f"{(mf['peak_rss'] - mf['base_rss']) / (mo['peak_rss'] - mo['base_rss']):.2f} above base")
    for name, diff in agree.items():
        print(f"{name}: largest difference {diff} (outputs in [0, 1])")


if __name__ == "__main__":
    main()
