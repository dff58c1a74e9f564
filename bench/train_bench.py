"""Training benchmark (``make bench``): images/s of the demo's model on the demo's shapes, in one run.

Each configuration trains in its own process (TensorFlow reads its oneDNN switch once, at
import), on the same random arrays, after one warm-up epoch:

- ``project``: medflow's configuration (oneDNN on, as ``medflow`` sets it), fed from a real
  Zarr store through the training dataset (``models.training.make_dataset``), no augmentation;
- ``project+augment``: the same with the demo's augmentation (flip, shift, intensity jitter);
- ``onednn-off``: the store-fed configuration with ``TF_ENABLE_ONEDNN_OPTS=0``, the default
  TensorFlow picks on CPUs without AVX-512-class features;
- ``in-memory``: the same model fed from numpy arrays by ``model.fit`` (the input-pipeline limit);
- ``mixed``: ``project`` with ``train.mixed_precision: true`` (bfloat16 on a CPU that has it,
  float16 on a GPU; float32, the same as ``project``, elsewhere);
- ``xla``: ``project`` with ``train.jit_compile: true``.

It prints the device, images/s and the ratios project/in-memory (the issue's goal: ≥ 0.9),
project/onednn-off, mixed/project and xla/project. Models: ``cnn3d`` at 48×80×80 (the CT demo) and ``resnet2d`` at 224×224.
Absolute figures drift between machines and runs; compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_name  # bench/ is this script's first path entry

ROOT = Path(__file__).resolve().parents[1]
# resnet2d's 256 images make 16 steps an epoch: with fewer, an epoch is a handful of sub-second
# steps and the machine's noise decides the ratio.
CASES = {
    "cnn3d": {"shape": (48, 80, 80), "n": 60, "batch": 8, "params": {"filters": [8, 16, 32, 64]}},
    "resnet2d": {"shape": (1, 224, 224), "n": 256, "batch": 16, "params": {"filters": [16, 32, 64, 128], "blocks": 1}},
}
AUGMENT = {"flip": ["x"], "shift": 3, "rotate_deg": 0.0, "zoom": 0.0, "intensity_jitter": 0.05, "contrast": 0.0}


def worker(arch: str, mode: str, epochs: int, store_root: str) -> dict:
    """One configuration, in this process: images/s over ``epochs`` after a warm-up epoch."""
    sys.path.insert(0, str(ROOT))
    import numpy as np

    import medflow  # noqa: F401  (TensorFlow options, as every medflow process)
    from medflow.kinds.classification import input_shape
    from models import get
    from models.training import _keras, accelerator, make_dataset, precision_policy, tensorflow_onednn_enabled
    from storage.store import Store

    keras = _keras()
    case = CASES[arch]
    shape = input_shape(arch, case["shape"])
    store = Store(store_root)
    keys = [f"s{i:04d}" for i in range(case["n"])]
    labels = np.arange(case["n"]) % 2
    device = accelerator()
    policy = precision_policy(mode == "mixed", gpu="GPU" in device)
    keras.mixed_precision.set_global_policy(policy)
    model = get(arch)(shape, n_classes=2, **case["params"])
    model.compile(optimizer="adam", loss="binary_crossentropy", jit_compile=mode == "xla")
    if mode == "in-memory":
        x = np.stack([store.read_prep("bench", k) for k in keys]).reshape((case["n"], *shape)).astype(np.float32)
        y = labels.astype(np.float32)[:, None]

        def fit(n):
            model.fit(x, y, batch_size=case["batch"], epochs=n, shuffle=True, verbose=0)
    else:
        data = make_dataset(lambda k: store.read_prep("bench", k), keys, labels, batch_size=case["batch"],
                            input_shape=shape, augment=AUGMENT if mode == "project+augment" else None, shuffle=True)

        def fit(n):
            model.fit(data, epochs=n, verbose=0)
    fit(1)  # warm-up: graph tracing, the dataset's cache
    t0, c0 = time.perf_counter(), time.process_time()
    fit(epochs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"arch": arch, "mode": mode, "images_per_s": epochs * case["n"] / wall, "wall_s": wall,
            "cpu_s_per_epoch": cpu / epochs, "onednn": tensorflow_onednn_enabled(), "device": device,
            "policy": policy}


def make_store(root: Path) -> None:
    """Random model-ready arrays for each model, in a real store per model (``<root>/<arch>``)."""
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from storage.store import Store

    rng = np.random.default_rng(0)
    for arch, case in CASES.items():
        sub = Store(root / arch)
        for i in range(case["n"]):
            sub.write_prep("bench", f"s{i:04d}", rng.random(case["shape"], dtype=np.float32), {"source_digest": "bench"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--models", default="cnn3d,resnet2d")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each configuration, interleaved (median reported)")
    parser.add_argument("--worker", nargs=4, metavar=("ARCH", "MODE", "EPOCHS", "STORE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        arch, mode, epochs, store = args.worker
        print(json.dumps(worker(arch, mode, int(epochs), store)))
        return
    modes = ("project", "project+augment", "onednn-off", "in-memory", "mixed", "xla")
    with tempfile.TemporaryDirectory(prefix="medflow-train-bench-") as tmp:
        make_store(Path(tmp))
        rows = []
        for arch in args.models.split(","):
            results: dict[str, list[dict]] = {m: [] for m in modes}
            for _ in range(args.repeat):
                for mode in modes:  # interleaved, so that drift hits every configuration alike
                    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
                    env["TF_ENABLE_ONEDNN_OPTS"] = "0" if mode == "onednn-off" else "1"
                    out = subprocess.run([sys.executable, __file__, "--worker", arch, mode, str(args.epochs),
                                          str(Path(tmp) / arch)], env=env, capture_output=True, text=True, check=True)
                    results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            med = {m: statistics.median(r["images_per_s"] for r in results[m]) for m in modes}
            for m in modes:
                rows.append((arch, m, med[m], statistics.median(r["cpu_s_per_epoch"] for r in results[m]),
                             results[m][0]["onednn"]))
            rows.append((arch, "ratios", med["project"] / med["in-memory"], med["project"] / med["onednn-off"],
                         (med["mixed"] / med["project"], med["xla"] / med["project"], results["mixed"][0]["policy"])))
            device = results["project"][0]["device"]
    print(f"\nTraining throughput ({args.epochs} epochs after a warm-up, median of {args.repeat}; CPU: {cpu_name()}; "
          f"device: {device})")
    print(f"{'model':10} {'configuration':18} {'images/s':>9} {'CPU s/epoch':>12}  oneDNN")
    for arch, mode, a, b, onednn in rows:
        if mode == "ratios":
            print(f"{arch:10} {'store / in-memory':18} {a:9.2f}   (goal ≥ 0.9)")
            print(f"{arch:10} {'store / oneDNN off':18} {b:9.2f}")
            print(f"{arch:10} {'mixed / store':18} {onednn[0]:9.2f}   ({onednn[2]})")
            print(f"{arch:10} {'xla / store':18} {onednn[1]:9.2f}")
        else:
            print(f"{arch:10} {mode:18} {a:9.1f} {b:12.1f}  {onednn}")


if __name__ == "__main__":
    main()
