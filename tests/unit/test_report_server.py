"""The read-only report server: run reports over HTTP on loopback, nothing else."""

from __future__ import annotations

import socket

import httpx
import pytest

from medflow import report_server


@pytest.fixture
def served(tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = report_server.start(port)
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
