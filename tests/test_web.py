"""batchd's HTTP server (docs/web.md): /healthz, /readyz, /metrics (parsed by prometheus_client), the
dashboard's pages and files, the buttons' POSTs, and bad requests. One daemon (a real process, its
embedded emulator) serves the whole module."""

from __future__ import annotations

import socket

import pytest

from batchd.config import Settings, parse_address
from batchd.testing import Workspace
from webtools import base_url, metric, request, scrape, wait_until

TOKEN = "dashboard-token-8d1f0c"
SECRET = "whsec_c2VjcmV0LW5vdC10by1iZS1zaG93bi0xMjM0NTY3OA=="
JOB_SECONDS = 2.5


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    workspace = Workspace.create(tmp_path_factory.mktemp("web"), job_seconds=JOB_SECONDS, http="127.0.0.1:0",
                                 http_token=TOKEN, webhook_secret=SECRET)
    process = workspace.start("run")
    try:
        url = base_url(process)
        yield workspace, process, url
    finally:
        process.stop()


def _translate(workspace, name, n=3, **extra):
    workspace.drop_manifest(f"{name}.toml", {"task": "translate", "texts": [f"text {i}" for i in range(n)],
                                             "languages": ["French"], **extra})


def test_healthz_and_readyz_answer_once_the_daemon_is_ready(served):
    workspace, process, url = served
    wait_until(lambda: request(url + "/readyz").status == 200, what="readyz")
    ready = request(url + "/readyz")
    assert ready.json() == {"status": "ready"}
    health = request(url + "/healthz")
    assert health.status == 200 and health.json()["status"] == "ok"


def test_metrics_move_as_a_job_runs(served):
    workspace, process, url = served
    wait_until(lambda: request(url + "/readyz").status == 200, what="readyz")
    before = scrape(url)
    assert metric(before, "batchd_ready") == 1.0
    done_before = metric(before, "batchd_jobs_done", outcome="succeeded")
    creates_before = metric(before, "batchd_remote_calls_total", method="batches.create")
    _translate(workspace, "metered", n=4)
    running = wait_until(lambda: (s := scrape(url)) and metric(s, "batchd_running_remote_batches") >= 1 and s,
                         what="a running remote batch")
    assert metric(running, "batchd_jobs", state="submitted") >= 1
    assert metric(running, "batchd_requests", state="total") >= metric(before, "batchd_requests", state="total") + 4
    assert metric(running, "batchd_remote_calls_total", method="batches.create") == creates_before + 1
    assert metric(running, "batchd_cost", kind="estimate", currency="USD") > metric(
        before, "batchd_cost", kind="estimate", currency="USD")
    workspace.wait_for_delivery("metered")
    after = wait_until(lambda: (s := scrape(url)) and metric(s, "batchd_jobs_done", outcome="succeeded") > done_before
                       and s, what="the job counted as done")
    assert metric(after, "batchd_requests", state="done") == metric(after, "batchd_requests", state="total")
    assert metric(after, "batchd_tokens", kind="input") > metric(before, "batchd_tokens", kind="input")
    assert metric(after, "batchd_tokens", kind="output") > 0
    assert metric(after, "batchd_cost", kind="actual", currency="USD") > 0
    assert metric(after, "batchd_cost", kind="saving", currency="USD") > 0
    assert metric(after, "batchd_remote_calls_total", method="batches.list") >= 1
    assert metric(after, "batchd_running_remote_batches") == 0
    assert metric(after, "batchd_notification_backlog") >= 0
    assert ("batchd_queue_depth", (("queue", "submit"),)) in after
    assert metric(after, "batchd_poll_lag_seconds") >= 0


def test_bad_requests_get_bounded_errors_and_the_daemon_carries_on(served):
    workspace, process, url = served
    assert request(url + "/nowhere").status == 404
    assert request(url + "/metrics", method="POST", body=b"").status == 405
    big = request(url + "/webhooks/gemini", method="POST", body=b"x" * 200_000,
                  headers={"content-type": "application/json"})
    assert big.status == 413
    unsigned = request(url + "/webhooks/gemini", method="POST", body=b"{}")
    assert unsigned.status == 401 and "missing" in unsigned.json()["error"]
    assert request(url + "/jobs/" + "x" * 500).status == 404
    assert request(url + "/files/none/../../state/journal.db").status == 404
    assert request(url + "/api/jobs/x/cancel", method="POST").status == 401  # no token
    assert request(url + "/api/jobs/x/explode", method="POST",
                   headers={"Authorization": f"Bearer {TOKEN}"}).status == 404
    assert request(url + "/healthz").status == 200 and process.poll() is None


def test_outbox_files_are_served_read_only_and_path_checked(served):
    workspace, process, url = served
    _translate(workspace, "filed", n=1)
    workspace.wait_for_delivery("filed")

    def done() -> dict | None:  # the folder is published a moment before its 'done' commits
        return next((j for j in request(url + "/api/jobs").json()["jobs"] if j["name"] == "filed" and j["state"] == "done"),
                    None)

    job = workspace.wait_for(done, 30, what="filed done")
    page = request(url + f"/jobs/{job['id']}")
    assert page.status == 200 and "summary.json" in page.text and "results.jsonl" in page.text
    summary = request(url + f"/files/{job['id']}/summary.json")
    assert summary.status == 200 and summary.json()["state"] == "succeeded"
    assert summary.headers["x-content-type-options"] == "nosniff"
    assert request(url + f"/files/{job['id']}/filed.toml").headers["content-type"].startswith("text/plain")
    for escape in ("../metered/summary.json", "../../config.toml", "..%2F..%2Fconfig.toml", "%2e%2e/%2e%2e/config.toml", "/etc/passwd"):
        assert request(url + f"/files/{job['id']}/{escape}").status == 404, escape
    (workspace.outbox / "filed" / "link.txt").symlink_to(workspace.config)
    assert request(url + f"/files/{job['id']}/link.txt").status == 404
    assert request(url + f"/files/{job['id']}/missing.json").status == 404


def test_buttons_post_with_the_token_through_the_cancel_path(served):
    workspace, process, url = served
    _translate(workspace, "stopme", n=2)
    wait_until(lambda: any(j["name"] == "stopme" and j["state"] == "submitted"
                           for j in request(url + "/api/jobs").json()["jobs"]), what="stopme submitted")
    page = request(url + "/").text
    assert '<button data-verb="cancel" data-job="stopme">' in page and 'id="token"' in page
    assert request(url + "/api/jobs/stopme/cancel", method="POST",
                   headers={"Authorization": "Bearer wrong"}).status == 401
    answer = request(url + "/api/jobs/stopme/cancel", method="POST", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status == 200 and "cancel requested for stopme" in answer.json()["message"]
    assert workspace.wait_for_delivery("stopme").state == "cancelled"
    bad = request(url + "/api/jobs/..%2Fx/approve", method="POST", headers={"Authorization": f"Bearer {TOKEN}"})
    assert bad.status in (400, 404)


def test_secrets_never_appear_in_pages_metrics_or_logs(served):
    workspace, process, url = served
    shown = [request(url + path).text for path in ("/", "/metrics", "/api/jobs", "/?part=jobs")]
    shown.append(process.output())
    for text in shown:
        assert TOKEN not in text and SECRET not in text


def test_http_addresses_default_to_loopback():
    assert parse_address("8765") == ("127.0.0.1", 8765)
    assert parse_address("0.0.0.0:80") == ("0.0.0.0", 80)
    assert parse_address("[::1]:9000") == ("::1", 9000)
    assert Settings(http="8765").http == "127.0.0.1:8765"
    assert Settings().http is None
    with pytest.raises(Exception):
        Settings(http="localhost:http")


@pytest.mark.slow
def test_run_http_flag_serves_on_loopback(tmp_path):
    workspace = Workspace.create(tmp_path)
    process = workspace.start("run", "--http", "0")
    try:
        url = base_url(process)
        assert url.startswith("http://127.0.0.1:")
        wait_until(lambda: request(url + "/readyz").status == 200, what="readyz")
    finally:
        assert process.stop() == 0


@pytest.mark.slow
def test_a_port_in_use_stops_the_start_with_a_clear_error(tmp_path):
    workspace = Workspace.create(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = workspace.batchd("run", "--http", f"127.0.0.1:{sock.getsockname()[1]}", timeout=60)
    assert busy.returncode != 0 and "cannot serve HTTP at 127.0.0.1:" in busy.stderr


def test_a_damaged_journal_page_is_a_503_naming_it_and_the_daemon_serves_on(tmp_path):
    """A damaged page only the dashboard reads (an old job's chunks, for its page): that page answers 503 with
    what is wrong and where to look, not "internal error", and the daemon goes on."""
    from batchd.journal import journal_path
    from test_recovery import damage_sqlite_pages

    workspace = Workspace.create(tmp_path, http="127.0.0.1:0")
    _translate(workspace, "old")
    assert workspace.batchd("run", "--once").returncode == 0
    job_id = workspace.delivered()["old"]["job"]
    damage_sqlite_pages(journal_path(workspace.state), "chunks")
    process = workspace.start("run")
    try:
        url = base_url(process)
        answer = request(f"{url}/jobs/{job_id}")
        assert answer.status == 503 and b"the journal is damaged" in answer.body, answer
        assert request(url + "/healthz").status == 200 and process.poll() is None
    finally:
        assert process.stop() == 0
