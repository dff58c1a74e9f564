"""What the benchmarks share."""

from __future__ import annotations

from medflow.hardware import cpu_name  # noqa: F401  (one CPU description for medflow doctor, runs and benches)
