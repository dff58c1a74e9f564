"""The Prefect UI as the monitoring surface, checked in a real browser (Debian's chromium + Playwright)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import socket
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import pytest

from medflow import report_server

from tests.conftest import server_env

pytestmark = [pytest.mark.browser, pytest.mark.slow]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
STAGES = ("ingest", "preprocess", "train", "evaluate", "report")


@contextmanager
def _same_page(page):
    yield SimpleNamespace(value=page)


def test_ui_shows_run_subflows_and_artifacts(prefect_server, quick_spec, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is needed for browser tests: apt-get install -y chromium (.ci/run does this)")
    from playwright.sync_api import sync_playwright

    api = f"{prefect_server}/api"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        reports_port = s.getsockname()[1]
    reports = report_server.start(reports_port, roots=[quick_spec.parent])  # what `medflow server` runs
    env = {**server_env(api, tmp_path / "client-home"), "MEDFLOW_REPORTS_URL": f"http://127.0.0.1:{reports_port}"}
    run = subprocess.run([str(Path(sys.executable).parent / "medflow"), "run", str(quick_spec)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"Report:http://127.0.0.1:{reports_port}/runs/" in "".join(run.stdout.split())  # the served URL
    assert "absl::InitializeLog" not in run.stderr and "oneDNN custom operations" not in run.stderr  # no banner
    flow_run = httpx.post(f"{api}/flow_runs/filter", timeout=10, json={
        "flows": {"name": {"any_": ["pipeline"]}}, "sort": "START_TIME_DESC", "limit": 1}).json()[0]
    assert flow_run["state_type"] == "COMPLETED"

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        # the runs list shows the run
        page.goto(f"{prefect_server}/runs")
        page.wait_for_selector(f"text={flow_run['name']}", timeout=60_000)
        page.get_by_text(flow_run["name"], exact=True).first.click()
        page.wait_for_url(f"**/flow-run/{flow_run['id']}", timeout=30_000)
        page.wait_for_selector("text=Completed", timeout=30_000)
        page.screenshot(path=str(tmp_path / "flow-run.png"))

        # every stage is a subflow run
        page.get_by_text("Subflow Runs", exact=True).first.click()
        page.wait_for_selector("text=5 Flow runs", timeout=30_000)
        body = page.inner_text("body")
        for stage in STAGES:
            assert f"\n{stage}\n" in body, f"subflow {stage} not listed"

        # the run's artifacts: report summary, metrics, cohort, quarantine, link to the report
        page.get_by_text("Artifacts", exact=True).first.click()
        page.wait_for_selector("text=quick-nodules-metrics", timeout=30_000)
        body = page.inner_text("body")
        for key in ("quick-nodules-report", "quick-nodules-metrics", "quick-nodules-cohort", "quick-nodules-quarantine"):
            assert key in body, key
        page.screenshot(path=str(tmp_path / "artifacts.png"), full_page=True)

        page.get_by_text("quick-nodules-metrics", exact=True).first.click()
        page.wait_for_selector("text=ROC AUC", timeout=30_000)
        assert "Specificity" in page.inner_text("body")
        page.screenshot(path=str(tmp_path / "metrics.png"))

        # one click on the run's page (its first tab, the logs) opens the report, served over HTTP, ROC plot visible
        page.goto(f"{prefect_server}/runs/flow-run/{flow_run['id']}")
        link = page.locator(f'a[href^="http://127.0.0.1:{reports_port}/runs/"]').first
        link.wait_for(timeout=30_000)
        with page.context.expect_page() if link.get_attribute("target") == "_blank" else _same_page(page) as opened:
            link.click()
        report = opened.value
        report.wait_for_load_state()
        roc = report.locator('img[alt="ROC curve"]')
        roc.wait_for(state="visible", timeout=30_000)
        assert report.evaluate("img => img.naturalWidth > 100 && img.complete", roc.element_handle())
        assert "Reliability diagram" in report.content()
        report.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        # the report-file artifact links to the same served report (not a file:// URL the browser refuses)
        artifact = httpx.post(f"{api}/artifacts/filter", timeout=10, json={
            "artifacts": {"key": {"any_": ["quick-nodules-report-file"]}}, "sort": "CREATED_DESC", "limit": 1}).json()[0]
        assert f"(http://127.0.0.1:{reports_port}/runs/" in artifact["data"]
        assert artifact["flow_run_id"] == flow_run["id"] and artifact["task_run_id"] is None  # the pipeline's own
        browser.close()
    reports.shutdown()
    for name in ("flow-run.png", "artifacts.png", "metrics.png", "report.png"):
        assert (tmp_path / name).stat().st_size > 10_000
