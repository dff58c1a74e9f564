"""``train.distribute: multi_worker``: one model trained by several worker processes in lock-step.

TensorFlow's ``MultiWorkerMirroredStrategy`` all-reduces the gradients of every worker at every
step, so the workers hold the same weights throughout; each is told the cluster and its place in
it by ``TF_CONFIG``, which must be in its environment before TensorFlow starts. ``train_in_workers``
therefore starts each worker as a fresh process (``medflow.isolation.run_isolated``, whose child
reads ``TF_CONFIG`` from its environment) on loopback ports, runs the same training function in
each, and returns the chief's result. The chief (worker 0) writes the run folder; the others write
their checkpoints to folders of their own, as the strategy requires. No Prefect here.
"""

from __future__ import annotations

import json
import logging
import socket
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free on ``host`` now (held open together while they are chosen)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(workers: list[str], index: int) -> str:
    """The ``TF_CONFIG`` of worker ``index`` in a cluster of ``workers`` (``host:port`` each).

    >>> json.loads(tf_config(["127.0.0.1:1", "127.0.0.1:2"], 1))["task"]
    {'type': 'worker', 'index': 1}
    """
    return json.dumps({"cluster": {"worker": list(workers)}, "task": {"type": "worker", "index": index}})


def in_worker() -> bool:
    """Whether this process is a worker of a multi-worker cluster (``TF_CONFIG`` names its task)."""
    import os

    return bool(os.environ.get("TF_CONFIG"))


def train_in_workers(target: str, kwargs: dict[str, Any], *, workers: int, run_dir: str | Path,
                     timeout: float | None = None) -> dict:
    """Run ``target(**kwargs, run_dir=...)`` in ``workers`` processes that train together on loopback.

    ``kwargs`` must pickle (a loader as ``functools.partial`` of a store method, not a lambda). The
    chief trains into ``run_dir``; worker i into ``run_dir/workers/i`` (removed unless it failed).
    Returns the chief's result, with ``workers`` (their number) and ``worker_weights_equal`` (every
    worker ended with the chief's weights, compared by digest).

    Raises:
        medflow.isolation.ChildCrashed, medflow.isolation.ChildFailed: a worker died or raised.
    """
    from medflow.isolation import run_isolated

    if workers < 2:
        raise ValueError(f"Received workers={workers}, expected at least 2 for multi_worker training.")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    addresses = [f"127.0.0.1:{port}" for port in free_ports(workers)]
    scratch = Path(tempfile.mkdtemp(prefix="medflow-workers-", dir=run_dir))
    dirs = [run_dir] + [scratch / str(i) for i in range(1, workers)]
    logger.info("multi-worker training: %d workers on %s", workers, ", ".join(addresses))

    def one(index: int) -> dict:
        return run_isolated(target, {**kwargs, "run_dir": str(dirs[index])},
                            env={"TF_CONFIG": tf_config(addresses, index)}, timeout=timeout,
                            stream=index == 0)  # the chief's epochs show as it trains

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one, range(workers)))
    chief = results[0]
    digests = {r.get("weights_digest") for r in results}
    import shutil

    shutil.rmtree(scratch, ignore_errors=True)
    return {**chief, "workers": workers, "worker_weights_equal": len(digests) == 1 and None not in digests}


def patch_keras_reduction() -> None:
    """Mend Keras 3's reduction of per-step logs under ``MultiWorkerMirroredStrategy`` (this process only).

    Keras 3.15's TensorFlow trainer reduces each step's logs, scalars, with
    ``strategy.reduce("MEAN", v, axis=0)`` on a multi-worker strategy, which fails for a scalar
    ("Invalid reduction dimension 0 for input with 0 dimensions"). Scalars are reduced with
    ``axis=None`` here; everything else goes to Keras' own function. Called only in workers.
    """
    from keras.src.backend.tensorflow import trainer

    if getattr(trainer.reduce_per_replica, "_medflow", False):
        return
    original = trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(strategy):
            from keras.src import tree

            def scalar_or_keras(v):
                rank = v.shape.rank if hasattr(v, "shape") else None
                if rank == 0 or (trainer._is_per_replica_instance(v) and
                                 strategy.experimental_local_results(v)[0].shape.rank == 0):
                    return strategy.reduce("MEAN", v, axis=None)
                return original(v, strategy, reduction)

            return tree.map_structure(scalar_or_keras, values)
        return original(values, strategy, reduction)

    reduce_per_replica._medflow = True
    trainer.reduce_per_replica = reduce_per_replica


def weights_digest(model) -> str:
    """A digest of a model's weights (bit-exact), to tell whether workers ended equal."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()
