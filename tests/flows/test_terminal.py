"""`medflow run` on a terminal, as a user sees it: the log lines scroll above one progress bar with counts
for ingest, preprocessing and the epochs, and no native start-up banner of TensorFlow."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tests.conftest import server_env

pytestmark = pytest.mark.slow
MEDFLOW = Path(sys.executable).parent / "medflow"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _run_on_a_terminal(cmd: list[str], env: dict, cwd: Path, timeout: float = 600) -> tuple[int, str]:
    """Run ``cmd`` with a pseudo-terminal of 150 columns as its stdin, stdout and stderr; its exit status and
    everything it wrote, with the escape sequences removed and carriage returns as new lines."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 150, 0, 0))
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child side is closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    code = proc.wait(timeout=60)
    text = b"".join(chunks).decode(errors="replace")
    return code, ANSI.sub("", text).replace("\r", "\n")


def test_run_on_a_terminal_shows_a_progress_bar_per_stage_and_no_banner(prefect_server, quick_spec, tmp_path):
    work = tmp_path / "quick"
    shutil.copytree(quick_spec.parent, work, ignore=shutil.ignore_patterns("runs", "store.zarr", "identifying"))
    env = {k: v for k, v in server_env(f"{prefect_server}/api", tmp_path / "home").items() if k != "COLUMNS"}
    code, out = _run_on_a_terminal([str(MEDFLOW), "run", str(work / quick_spec.name)], {**env, "TERM": "xterm"}, work)
    assert code == 0, out[-3000:]
    bars = [line for line in out.splitlines() if "━" in line]
    for label, unit in (("ingest", "series"), ("preprocess", "series"), ("train", "epochs")):
        counted = [b for b in bars if b.startswith(label + " ") and re.search(rf"\d+/\d+ {unit}", b)]
        assert counted, f"no {label} bar with {unit} counts in {len(bars)} bar lines"
    assert any("1/1 epochs" in b for b in bars)  # quick_spec's one epoch, done
    assert "absl::InitializeLog" not in out and "oneDNN custom operations" not in out
    test_line = re.search(r"^Test: AUC.*$", out, re.M)
    assert test_line and "baseline AUC" in test_line.group(0)  # one line at the terminal's 150 columns, not 80
    assert "Report:" in out
