"""The Prefect UI as the monitoring surface, checked in a real browser (Debian's chromium + Playwright)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import server_env

pytestmark = [pytest.mark.browser, pytest.mark.slow]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
STAGES = ("ingest", "preprocess", "train", "evaluate", "report")


def test_ui_shows_run_subflows_and_artifacts(prefect_server, quick_spec, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is needed for browser tests: apt-get install -y chromium (.ci/run does this)")
    from playwright.sync_api import sync_playwright

    api = f"{prefect_server}/api"
    run = subprocess.run([str(Path(sys.executable).parent / "medflow"), "run", str(quick_spec)],
                         env=server_env(api, tmp_path / "client-home"), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
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
        browser.close()
    for name in ("flow-run.png", "artifacts.png", "metrics.png"):
        assert (tmp_path / name).stat().st_size > 10_000
