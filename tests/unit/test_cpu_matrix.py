"""The CPU matrix: TensorFlow's kernels differ by the instruction sets a CPU has (oneDNN dispatches
AVX2, AVX-512, AMX paths), and a fault may live in one path only (issue 24: an AVX-512 kernel of the
eager Conv2D filter gradient). The tests marked ``tensorflow`` run in this session on the CPU's own
path; here they run again, in a fresh process, under each ``ONEDNN_MAX_CPU_ISA`` cap below it
(``medflow.hardware.isa_caps``: the two highest of AVX, AVX2, AVX512_CORE)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medflow.hardware import isa_caps, onednn_isa

ROOT = Path(__file__).resolve().parents[2]
CAPS = isa_caps()


def test_this_cpu_has_a_path_below_its_own():
    """Every x86 CPU TensorFlow supports has AVX, so at least one cap lies below its own level."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"oneDNN's ISA caps are x86 levels; this is {platform.machine()}")
    assert onednn_isa() is not None, "no oneDNN instruction-set level found in /proc/cpuinfo"
    assert CAPS, f"no ONEDNN_MAX_CPU_ISA value below {onednn_isa()}"


@pytest.mark.slow
@pytest.mark.parametrize("cap", CAPS)
def test_tensorflow_tests_pass_under_the_isa_cap(cap, tmp_path):
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": cap}
    doctor = subprocess.run([sys.executable, "-m", "medflow.cli", "doctor", "--json"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert doctor.returncode == 0, doctor.stderr[-2000:]
    facts = json.loads(doctor.stdout)
    assert facts["onednn_max_cpu_isa"] == cap and facts["onednn"] is True

    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m",
                           "tensorflow and not gpu", "--basetemp", str(tmp_path / "t"), "tests/unit"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, f"ONEDNN_MAX_CPU_ISA={cap}: exit {proc.returncode}\n{tail}"
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail
