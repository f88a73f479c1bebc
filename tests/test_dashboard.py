"""The dashboard in a real headless browser: Playwright (sync API) driving Debian's chromium, never a
downloaded browser. A running job's progress moves without a reload, a failed job shows its error, the
cost chart draws a bar per day and model, and without http_token there are no buttons.

Skipped, with the reason, only where chromium is not installed; CI installs it (.ci/run) and sets
BATCHD_REQUIRE_BROWSER=1, which turns the skip into a failure.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from batchd.testing import Workspace
from webtools import base_url, request, wait_until

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HAVE_CHROMIUM = Path(CHROMIUM).exists()
if not HAVE_CHROMIUM and os.environ.get("BATCHD_REQUIRE_BROWSER"):
    raise RuntimeError(f"BATCHD_REQUIRE_BROWSER is set but there is no chromium at {CHROMIUM}")
pytestmark = pytest.mark.skipif(not HAVE_CHROMIUM, reason="Debian's chromium is not installed (apt-get install "
                                                         "chromium); the browser tests need it, CI installs it")

JOB_SECONDS = 5.0
REQUESTS = 40


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    workspace = Workspace.create(tmp_path_factory.mktemp("dashboard"), job_seconds=JOB_SECONDS,
                                 http="127.0.0.1:0", faults=["job-failed@batchd-broken-*"])
    process = workspace.start("run")
    try:
        url = base_url(process)
        wait_until(lambda: request(url + "/readyz").status == 200, what="readyz")
        workspace.drop_manifest("broken.toml", {"task": "translate", "texts": ["fails"], "languages": ["French"]})
        yield workspace, url
    finally:
        process.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                              args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser):
    opened = browser.new_page()
    yield opened
    opened.close()


def test_a_running_jobs_progress_moves_without_a_reload(site, page):
    workspace, url = site
    page.goto(url + "/")
    page.evaluate("window.notReloaded = true")
    workspace.drop_manifest("long.toml", {"task": "translate", "texts": [f"sentence {i}" for i in range(REQUESTS)],
                                          "languages": ["Spanish"]})
    row = page.locator('tr.job:has(a:text-is("long"))')
    row.wait_for(timeout=30_000)
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = row.locator("td.requests").inner_text()
        done, total = (int(part) for part in text.split("/"))
        if not seen or seen[-1] != done:
            seen.append(done)
        if done == total == REQUESTS and "succeeded" in row.locator("td.state").inner_text():
            break
        time.sleep(0.1)
    assert seen[-1] == REQUESTS, seen
    assert any(0 < done < REQUESTS for done in seen), f"no progress in between: {seen}"
    assert seen == sorted(seen)
    assert page.evaluate("window.notReloaded") is True
    bar = row.locator(".bar > span").get_attribute("style")
    assert "width:100%" in bar.replace(" ", "")


def test_a_failed_jobs_error_is_shown_on_the_dashboard_and_its_page(site, page):
    workspace, url = site
    workspace.wait_for_delivery("broken", timeout=60)
    # The folder is published a moment before the job's 'done' commits, and the page shows what is committed.
    wait_until(lambda: any(job["name"] == "broken" and job["state"] == "done"
                           for job in request(url + "/api/jobs").json()["jobs"]), what="broken done")
    page.goto(url + "/")
    row = page.locator('tr.job:has(a:text-is("broken"))')
    assert row.locator("td.state").inner_text() == "failed"
    error = row.locator("td.error").inner_text()
    assert error.strip(), "no error shown"
    row.locator('a:text-is("broken")').click()
    page.wait_for_url("**/jobs/*")
    assert page.locator("p.error").inner_text().strip() == error.strip()
    assert page.locator("#chunks tbody tr").count() == 1
    assert "failed" in page.locator("#events").inner_text()
    summary = page.locator('#files a:text-is("summary.json")')
    assert summary.count() == 1
    answer = request(url + summary.get_attribute("href"))
    assert answer.status == 200 and answer.json()["state"] == "failed"


def test_the_cost_chart_draws_a_bar_per_day_and_model(site, page):
    workspace, url = site
    # The progress test's job, when it ran first (as in file order); else a job of this test's own.
    if any(job["name"] == "long" for job in request(url + "/api/jobs").json()["jobs"]):
        workspace.wait_for_delivery("long", timeout=60)
    else:
        workspace.drop_manifest("priced.toml", {"task": "translate", "texts": ["a price"], "languages": ["Dutch"]})
        workspace.wait_for_delivery("priced", timeout=60)
    page.goto(url + "/")
    bars = page.locator("#cost-svg rect.cost-bar")
    bars.first.wait_for(timeout=10_000)
    assert bars.count() >= 1
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert bars.first.get_attribute("data-day") == today
    assert bars.first.get_attribute("data-model") == "gemini-2.5-flash"
    assert float(bars.first.get_attribute("data-amount")) > 0
    assert float(bars.first.get_attribute("height")) > 0
    assert "gemini-2.5-flash" in page.locator("#cost-svg text.legend").all_text_contents()


def test_without_a_token_the_dashboard_has_no_buttons(site, page):
    workspace, url = site
    page.goto(url + "/")
    page.locator("tr.job").first.wait_for()
    assert page.locator("button[data-verb]").count() == 0
    assert page.locator("#token").count() == 0
    job_link = page.locator("tr.job a").first.get_attribute("href")
    page.goto(url + job_link)
    assert page.locator("button[data-verb]").count() == 0
    assert request(url + "/api/jobs/long/cancel", method="POST", headers={"Authorization": "Bearer x"}).status == 403
