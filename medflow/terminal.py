"""What ``medflow run`` shows on a terminal: the pipeline's log lines scrolling above one progress bar
for the work under way (ingest, preprocessing, epochs) with its counts, rate and time left.

The pipeline runs in a child process (``medflow.cli._supervise``); it records its stage and counts in a
small JSON file (``medflow.runs.note_work``), which this display reads a few times a second. Off a
terminal (Prefect's logs, CI, a pipe) nothing here is used: the child's output passes through as it is,
with one line per stage and per epoch.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn
from rich.text import Text

REFRESH_S = 0.25


class WorkColumn(ProgressColumn):
    """``40/120 series · 3.1 series/s · about 0:00:26 left``; nothing for a stage without counts."""

    def render(self, task) -> Text:
        if task.total is None:
            return Text("")
        unit = task.fields.get("unit", "")
        parts = [f"{task.completed:.0f}/{task.total:.0f} {unit}"]
        speed = task.finished_speed or task.speed
        if speed:
            parts.append(f"{speed:.1f} {unit}/s" if speed >= 1 else f"{1 / speed:.1f} s per {unit.rstrip('s') or 'item'}")
        if task.time_remaining is not None and not task.finished:
            minutes, seconds = divmod(int(task.time_remaining), 60)
            parts.append(f"about {minutes}:{seconds:02d} left")
        return Text(" · ".join(parts), style="progress.data.speed")


def read_work(progress_file: Path, field: str = "work") -> tuple[str | None, dict | None]:
    """The stage and the counts of the work under way (``field="last_work"``: of the work the last stage ended
    with), as the child last recorded them."""
    try:
        known = json.loads(progress_file.read_text())
    except (OSError, ValueError):
        return None, None
    work = known.get(field)
    try:
        work = json.loads(work) if work else None
    except ValueError:
        work = None
    return known.get("stage"), work


def _pump(stream, console: Console, keep) -> None:
    """Print the child's lines above the bar, as they come."""
    for line in iter(stream.readline, ""):
        line = line.rstrip("\n")
        if keep(line):
            console.print(Text.from_ansi(line), soft_wrap=True, highlight=False, markup=False)


def run_with_display(cmd: list[str], env: dict, progress_file: Path, console: Console, keep=lambda line: True) -> int:
    """Run ``cmd`` with its output printed through ``console`` below a live progress bar; return its exit
    status (negative: the signal that killed it). ``keep(line)`` drops lines it returns False for."""
    env = {**env, "COLUMNS": str(console.width)}  # the child's own rich output wraps at the terminal's width
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                            errors="replace")
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), WorkColumn())
    with Progress(*columns, console=console, transient=True, refresh_per_second=8) as progress:
        pumps = [threading.Thread(target=_pump, args=(stream, progress.console, keep), daemon=True)
                 for stream in (proc.stdout, proc.stderr)]
        for pump in pumps:
            pump.start()
        bar = progress.add_task("starting", total=None, unit="")
        shown = None

        def show(description: str, total, unit: str):
            """A fresh bar for a new piece of work (its rate and time left start over)."""
            nonlocal bar, shown
            progress.remove_task(bar)
            bar = progress.add_task(description, total=total, unit=unit)
            shown = description

        try:
            while proc.poll() is None:
                stage, work = read_work(progress_file)
                if work and work.get("label"):
                    if work["label"] != shown:
                        show(work["label"], work.get("total"), work.get("unit", ""))
                    progress.update(bar, completed=int(work.get("done", 0)))
                elif stage and shown != f"stage {stage}":
                    _, last = read_work(progress_file, "last_work")
                    if last and last.get("label") == shown:  # the counts it ended with, if the poll missed them
                        progress.update(bar, completed=int(last.get("done", 0)))
                        progress.refresh()
                    show(f"stage {stage}", None, "")
                time.sleep(REFRESH_S)
        except KeyboardInterrupt:  # the child got the same interrupt from the terminal
            proc.wait()
        for pump in pumps:
            pump.join(timeout=5)
    return proc.returncode
