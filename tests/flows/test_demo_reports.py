"""The ECG demo as a user runs it (`medflow demo --task ecg`, default cohort of 450 ECGs), its report read in a
browser: a model that scores 1.000 gets no "learnt nothing" warning, intervals at a bound are intervals, the
classes are named, and the page fits 1280 px."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import assert_report_reads_well

pytestmark = [pytest.mark.slow, pytest.mark.browser]
MEDFLOW = Path(sys.executable).parent / "medflow"


def test_the_ecg_demo_report_warns_only_of_what_is_true(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    done = subprocess.run([str(MEDFLOW), "demo", "--task", "ecg", "--workdir", str(tmp_path / "demo")], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = next((tmp_path / "demo" / "runs").glob("*/report.html"))
    page = assert_report_reads_well(report, tmp_path / "ecg-report.png", classes=["normal", "afib", "bbb"])
    text = page["text"]
    assert "learnt nothing" not in text and "barely vary" not in text, text[:2000]
    assert "Quality control: geometry" not in page["headings"]  # no gantry tilt table for waveforms
    assert "absl::InitializeLog" not in done.stderr and "oneDNN custom operations" not in done.stderr
