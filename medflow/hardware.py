"""What this machine computes on: the CPU and its instruction sets, oneDNN, GPUs, the Keras backend.

A model's numbers hold for one CPU kind at most: TensorFlow picks its CPU kernels (oneDNN's AVX2,
AVX-512, AMX paths) by the instruction sets a CPU has, so the same spec, seed and data give other
floating-point results, and on some CPUs hit other bugs, elsewhere. ``describe`` is what
``medflow doctor`` prints and every run records in ``training.json`` and ``provenance.json``.
``isa_caps`` lists the ``ONEDNN_MAX_CPU_ISA`` values this CPU can run below its own, which is how
the test suite runs TensorFlow's other CPU paths on one machine. No Prefect here.
"""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# oneDNN's CPU instruction-set levels, lowest first, each with the /proc/cpuinfo flags it needs
# (oneDNN's own dispatch: src/cpu/x64/cpu_isa_traits.hpp).
ONEDNN_ISAS: tuple[tuple[str, frozenset[str]], ...] = (
    ("SSE41", frozenset({"sse4_1"})),
    ("AVX", frozenset({"avx"})),
    ("AVX2", frozenset({"avx2"})),
    ("AVX2_VNNI", frozenset({"avx2", "avx_vnni"})),
    ("AVX512_CORE", frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})),
    ("AVX512_CORE_VNNI", frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"})),
    ("AVX512_CORE_BF16", frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16"})),
    ("AVX512_CORE_FP16", frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
                                    "avx512_fp16"})),
    ("AVX512_CORE_AMX", frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
                                   "amx_tile", "amx_int8", "amx_bf16"})),
)
# The caps the test suite runs TensorFlow under (the two highest below a CPU's own): the AVX path
# (pre-2013 CPUs), the AVX2 one (most AMD and older Intel servers, laptops) and the plain AVX-512 one
# (Skylake-X and later).
MATRIX_CAPS = ("AVX", "AVX2", "AVX512_CORE")


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_model() -> str:
    """The CPU's model name (``platform.processor()`` where /proc/cpuinfo has none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_name() -> str:
    """The CPU's model name and core count, printed beside every figure (a figure holds on its machine only)."""
    return f"{cpu_model()}, {os.cpu_count()} cores"


def onednn_isa(flags: frozenset[str] | None = None) -> str | None:
    """The highest oneDNN instruction-set level the CPU supports (None: not an x86 CPU oneDNN knows).

    >>> onednn_isa(frozenset({"sse4_1", "avx", "avx2"}))
    'AVX2'
    >>> onednn_isa(frozenset({"sse4_1", "avx", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}))
    'AVX512_CORE_VNNI'
    """
    flags = cpu_flags() if flags is None else flags
    best = None
    for name, needs in ONEDNN_ISAS:
        if needs <= flags:
            best = name
    return best


def isa_caps(flags: frozenset[str] | None = None) -> list[str]:
    """The ``ONEDNN_MAX_CPU_ISA`` values of ``MATRIX_CAPS`` below this CPU's own level, the two highest:
    the other CPU paths it can run (a cap lowers what oneDNN uses, never raises it).

    >>> isa_caps(frozenset({"sse4_1", "avx", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
    ...                     "avx512_bf16"}))
    ['AVX2', 'AVX512_CORE']
    >>> isa_caps(frozenset({"sse4_1", "avx", "avx2"}))
    ['AVX']
    """
    own = onednn_isa(flags)
    if own is None:
        return []
    order = [name for name, _ in ONEDNN_ISAS]
    return [cap for cap in MATRIX_CAPS if order.index(cap) < order.index(own)][-2:]


def has_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512_BF16 or AMX), where mixed precision can pay.

    >>> has_bf16(frozenset({"avx2"})), has_bf16(frozenset({"avx512_bf16"}))
    (False, True)
    """
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def onednn_enabled() -> bool:
    """Whether TensorFlow in this process runs its oneDNN CPU kernels (decided when it was imported)."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def describe(*, import_backend: bool = True) -> dict:
    """This process's compute: CPU, ISA, packages, backend, oneDNN, GPUs. With ``import_backend``
    (default) it imports Keras and its backend to ask them; without, it reports packages only."""
    flags = cpu_flags()
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "isa": onednn_isa(flags),
        "bf16": has_bf16(flags),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "tf_enable_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
        "python": platform.python_version(),
        "packages": {p: _version(p) for p in ("tensorflow", "tensorflow-cpu", "keras", "jax", "torch")
                     if _version(p)},
        "backend": os.environ.get("KERAS_BACKEND", "tensorflow"),
    }
    if not import_backend:
        return info
    import keras

    info["backend"] = keras.backend.backend()
    info["gpus"] = []
    if info["backend"] == "tensorflow":
        import tensorflow as tf

        info["onednn"] = onednn_enabled()
        for gpu in tf.config.list_physical_devices("GPU"):
            details = tf.config.experimental.get_device_details(gpu)
            info["gpus"].append(f"{gpu.name}: {details.get('device_name', 'GPU')} "
                                f"(compute capability {details.get('compute_capability')})")
        info["logical_devices"] = [d.name for d in tf.config.list_logical_devices()]
    elif info["backend"] == "torch":
        import torch

        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    elif info["backend"] == "jax":
        import jax

        info["gpus"] = [str(d) for d in jax.devices() if d.platform != "cpu"]
    return info


def summary_lines(info: dict) -> list[str]:
    """``describe``'s facts as lines for people (``medflow doctor``)."""
    isa = info.get("isa") or "unknown"
    cap = info.get("onednn_max_cpu_isa")
    lines = [
        f"CPU       {info['cpu']} ({info['cores']} cores, {info['machine']})",
        f"ISA       oneDNN level {isa}{', bfloat16' if info.get('bf16') else ''}"
        + (f"; capped by ONEDNN_MAX_CPU_ISA={cap}" if cap else ""),
        f"Python    {info['python']}",
        "Packages  " + ", ".join(f"{k} {v}" for k, v in info["packages"].items()),
        f"Backend   keras on {info['backend']}",
    ]
    if "onednn" in info:
        lines.append(f"oneDNN    {'on' if info['onednn'] else 'off'} (TF_ENABLE_ONEDNN_OPTS="
                     f"{info.get('tf_enable_onednn_opts')})")
    if "gpus" in info:
        lines.append("GPUs      " + ("; ".join(info["gpus"]) if info["gpus"] else "none (training runs on the CPU)"))
    if info.get("logical_devices"):
        lines.append("Devices   " + ", ".join(info["logical_devices"]))
    caps = isa_caps()
    lines.append("ISA caps  " + (", ".join(caps) + " (ONEDNN_MAX_CPU_ISA values below this CPU's own: the "
                                 "test suite's CPU matrix)" if caps else "none below this CPU's own"))
    return lines
