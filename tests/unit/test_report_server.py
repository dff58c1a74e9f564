"""The read-only report server: run reports over HTTP on loopback, nothing else."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import httpx
import pytest

from medflow import report_server


@pytest.fixture
def served(tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = report_server.start(port, roots=[tmp_path / "runs"])
    base = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MEDFLOW_REPORTS_URL", base)
    run = tmp_path / "runs" / "20261202-000000-abc123-x"
    run.mkdir(parents=True)
    for name, text in (("run.json", "{}"), ("spec.yaml", "name: x"), ("report.html", "<h1>report</h1>"),
                       ("predictions.csv", "series_key,score\n")):
        (run / name).write_text(text)
    yield base, run
    server.shutdown()


def test_serves_a_run_report_and_links_to_it(served):
    base, run = served
    r = httpx.get(report_server.url_for(run / "report.html"))
    assert r.status_code == 200 and r.text == "<h1>report</h1>" and r.headers["content-type"].startswith("text/html")
    link, description = report_server.report_link(run / "report.html")
    assert link == f"{base}/runs{run / 'report.html'}" and "served" in description


def test_serves_nothing_but_run_reports_and_writes_nothing(served, tmp_path):
    base, run = served
    (tmp_path / "report.html").write_text("not in a run folder")
    for path in (run / "predictions.csv", tmp_path / "report.html", run, "/etc/passwd",
                 f"{run}/../{run.name}/../../report.html"):
        assert httpx.get(f"{base}/runs{path}").status_code == 404, path
    assert httpx.get(f"{base}/").status_code == 404
    assert httpx.post(report_server.url_for(run / "report.html"), content=b"x").status_code == 405
    assert (run / "report.html").read_text() == "<h1>report</h1>"


def test_links_to_the_file_when_no_server_answers(tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MEDFLOW_REPORTS_URL", f"http://127.0.0.1:{port}")
    link, description = report_server.report_link(tmp_path / "report.html")
    assert link == (tmp_path / "report.html").as_uri() and "medflow server" in description


SWAP = """
import os, sys
from pathlib import Path
run, secret = Path(sys.argv[1]), Path(sys.argv[2])
i = 0
while True:
    i += 1
    tmp = run / f".swap{i % 2}"
    if i % 2:
        tmp.symlink_to(secret)
    else:
        tmp.write_text("<h1>report</h1>")
    os.replace(tmp, run / "report.html")
"""


def test_a_symlink_swap_race_leaks_nothing_in_10000_requests(served, tmp_path):
    """A local user swaps report.html between a file and a link to a secret (os.replace in a loop);
    the server opens once, without following links, so the secret never comes back."""
    base, run = served
    secret = tmp_path / "api-auth"
    secret.write_text("medflow:SECRET-CREDENTIAL")
    secret.chmod(0o600)
    # the attacker: another process, swapping the report for a link to the secret as fast as it can
    swapper = subprocess.Popen([sys.executable, "-c", SWAP, str(run), str(secret)])
    url = report_server.url_for(run / "report.html")
    counts = {"leaks": 0, "served": 0, "answered": 0}
    errors = []

    def fetch(n):
        try:
            with httpx.Client(timeout=30, trust_env=False) as client:
                for _ in range(n):
                    r = client.get(url)
                    counts["leaks"] += b"SECRET" in r.content
                    counts["served"] += r.status_code == 200
                    counts["answered"] += 1
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(repr(exc))
    try:
        clients = [threading.Thread(target=fetch, args=(2500,)) for _ in range(4)]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
    finally:
        swapper.kill()
        swapper.wait()
    assert errors == [] and counts["answered"] == 10_000
    assert counts["leaks"] == 0
    assert counts["served"] > 0, counts  # the race was real: the report was there part of the time


def test_refuses_links_other_roots_other_users_and_odd_urls(served, tmp_path):
    base, run = served
    # a run folder outside the served roots
    other = tmp_path / "elsewhere" / "run"
    other.mkdir(parents=True)
    for name in ("run.json", "spec.yaml", "report.html"):
        (other / name).write_text("x")
    assert httpx.get(f"{base}/runs{other / 'report.html'}").status_code == 404
    # a linked folder below the root, even to a real run folder
    (tmp_path / "runs" / "link").symlink_to(run, target_is_directory=True)
    assert httpx.get(f"{base}/runs{tmp_path / 'runs' / 'link' / 'report.html'}").status_code == 404
    # a NUL, an invalid percent-encoding: answered, no traceback
    assert httpx.get(f"{base}/runs{run}/report.html%00").status_code == 404
    assert httpx.get(f"{base}/runs{run}/%ff%fe/report.html").status_code == 404
    # a run that belongs to another user
    assert report_server.read_servable(run / "report.html", [tmp_path / "runs"]) is not None
    assert report_server.read_servable(run / "report.html", [tmp_path / "runs"], owner=os.geteuid() + 1) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
def test_another_users_run_folder_is_not_served(served):
    base, run = served
    os.chown(run, 54321, 54321)
    assert httpx.get(report_server.url_for(run / "report.html")).status_code == 404
