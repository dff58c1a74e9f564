"""What the benchmarks share."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name and core count, printed beside every figure (a figure holds on its machine only)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"
