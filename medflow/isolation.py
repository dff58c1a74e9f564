"""Run a function in a child Python process, so that a native crash there cannot take down the caller.

A segmentation fault or an abort in a native library (TensorFlow's oneDNN kernels, a codec) is
not a Python exception: it ends the whole process, with the Prefect flow run, the evaluation
and everything it had not written yet. Work that a run can do without (explanations of a few
test cases) runs through ``run_isolated``: the function runs in a fresh interpreter
(``python -m medflow.isolation``), its arguments and result travel as pickle files, and a
death by a signal comes back as ``ChildCrashed`` naming the signal and, from the child's
``faulthandler`` dump, the Python function that was running (for TensorFlow, the op wrapper,
e.g. ``conv2d_backprop_filter``). No Prefect here.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# A test hook: ``MEDFLOW_FAULT_IN_CHILD=<module:function>=<SIGNAL>`` makes the child running that
# function kill itself with that signal before calling it (e.g. ``models.explain:grad_cam_cases=SIGSEGV``).
FAULT_ENV = "MEDFLOW_FAULT_IN_CHILD"
LOG_ENV = "MEDFLOW_CHILD_LOG_LEVEL"


class ChildCrashed(RuntimeError):
    """The child process died by a signal (a native crash) or exited without a result."""

    def __init__(self, target: str, *, signal_name: str | None, exitcode: int, where: str | None):
        self.target, self.signal_name, self.exitcode, self.where = target, signal_name, exitcode, where
        how = f"died of {signal_name}" if signal_name else f"exited with status {exitcode} and no result"
        at = f" in {where}" if where else ""
        super().__init__(f"{target} {how}{at} (a native crash: the child process ended, the caller did not)")

    def as_dict(self) -> dict:
        return {"signal": self.signal_name, "exitcode": self.exitcode, "where": self.where, "message": str(self)}


class ChildFailed(RuntimeError):
    """The function raised a Python exception in the child; the message carries its type and text."""

    def __init__(self, target: str, exc_type: str, message: str):
        self.target, self.exc_type = target, exc_type
        super().__init__(f"{target} raised {exc_type}: {message}")


def signal_name(returncode: int) -> str | None:
    """The name of the signal a child died of, from its (negative) return code.

    >>> signal_name(-11), signal_name(-6), signal_name(1)
    ('SIGSEGV', 'SIGABRT', None)
    """
    if returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line \d+ in (?P<func>\S+)')


def crash_site(dump: str) -> str | None:
    """The innermost Python frame of the crashing thread in a ``faulthandler`` dump, as
    ``function (file name)``.

    >>> crash_site('Fatal Python error: Segmentation fault\\n\\nCurrent thread 0x1 (most recent call first):\\n'
    ...            '  File "/x/tensorflow/python/ops/gen_nn_ops.py", line 1200 in conv2d_backprop_filter\\n'
    ...            '  File "/x/nn_grad.py", line 30 in _Conv2DGrad\\n')
    'conv2d_backprop_filter (gen_nn_ops.py)'
    """
    lines = dump.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Current thread")), None)
    for line in lines[start + 1 if start is not None else 0:]:
        m = _FRAME.search(line)
        if m:
            return f"{m['func']} ({Path(m['file']).name})"
    return None


def run_isolated(target: str, kwargs: dict[str, Any], *, env: dict[str, str] | None = None,
                 timeout: float | None = None, stream: bool = False) -> Any:
    """Call ``target`` (``"package.module:function"``) with ``kwargs`` in a child process; return its result.

    ``env`` is added to the child's environment (read before anything there imports TensorFlow).
    Arguments and result must pickle; pass arrays of a few cases, not a cohort. With ``stream``,
    the child logs at INFO to this process's stderr as it goes (long work: a training), instead
    of its output being kept for the log of a failure.

    Raises:
        ChildCrashed: the child died by a signal, timed out, or ended without a result.
        ChildFailed: the function raised; the child's traceback went to this process's log.
    """
    if ":" not in target:
        raise ValueError(f"Received target={target!r}, expected 'package.module:function'.")
    with tempfile.TemporaryDirectory(prefix="medflow-child-") as tmp:
        tmp = Path(tmp)
        (tmp / "args.pkl").write_bytes(pickle.dumps(kwargs, protocol=pickle.HIGHEST_PROTOCOL))
        child_env = {**os.environ, **(env or {}), **({LOG_ENV: "INFO"} if stream else {})}
        output_to = None if stream else subprocess.PIPE
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "medflow.isolation", target, str(tmp)], env=child_env,
                                  stdin=subprocess.DEVNULL, stdout=output_to,
                                  stderr=None if stream else subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ChildCrashed(target, signal_name="timeout", exitcode=-9, where=f"after {timeout:.0f} s") from None
        output = proc.stdout.decode(errors="replace") if proc.stdout else ""
        dump = (tmp / "fault.txt").read_text(errors="replace") if (tmp / "fault.txt").exists() else ""
        logger.debug("%s: child exited %d after %.1f s", target, proc.returncode, time.perf_counter() - t0)
        if proc.returncode < 0 or not (tmp / "result.pkl").exists():
            if output.strip():
                logger.debug("child output:\n%s", output[-4000:])
            raise ChildCrashed(target, signal_name=signal_name(proc.returncode), exitcode=proc.returncode,
                               where=crash_site(dump))
        status, payload = pickle.loads((tmp / "result.pkl").read_bytes())
    if status == "error":
        exc_type, message, trace = payload
        logger.debug("%s failed in the child:\n%s", target, trace)
        raise ChildFailed(target, exc_type, message)
    return payload


def _child(target: str, folder: Path) -> int:
    """The child's side: call the function, write ``(status, payload)`` beside the arguments."""
    import faulthandler
    import traceback

    if os.environ.get(LOG_ENV):
        logging.basicConfig(level=os.environ[LOG_ENV], format="%(asctime)s | %(levelname)-7s | child %(process)d | "
                            "%(name)s - %(message)s", datefmt="%H:%M:%S")
    fault = (folder / "fault.txt").open("w")
    faulthandler.enable(file=fault, all_threads=True)
    kwargs = pickle.loads((folder / "args.pkl").read_bytes())
    module, func = target.split(":")
    try:
        fn = getattr(importlib.import_module(module), func)
        hook = os.environ.get(FAULT_ENV, "")
        if hook.rpartition("=")[0] == target:
            signal.raise_signal(getattr(signal, hook.rpartition("=")[2]))
        result = ("ok", fn(**kwargs))
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller
        result = ("error", (type(exc).__name__, str(exc), traceback.format_exc()))
    tmp = folder / "result.pkl.tmp"
    tmp.write_bytes(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    os.replace(tmp, folder / "result.pkl")
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], Path(sys.argv[2])))
