"""Gemini webhooks end to end (docs/web.md): the emulator sends them to the daemon's /webhooks/gemini, the daemon
verifies them (RS256 JWT for per-job webhooks, Standard Webhooks HMAC for the static one registered with
`batchd webhooks register`), deduplicates by webhook-id and fetches the batch at once, with polls 10 minutes
apart. Forged, replayed and duplicated deliveries are refused or acted on once.

One emulator (in this process) and one daemon (a real process, provider "gemini" pointed at the emulator)
serve the module.
"""

from __future__ import annotations

import json
import secrets
import time
from datetime import UTC, datetime

import jwt
import pytest
import standardwebhooks
from cryptography.hazmat.primitives.asymmetric import rsa

from batchd.testing import Emulator, Workspace
from webtools import free_port, metric, request, scrape, wait_until

JOB_SECONDS = 1.0


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    root = tmp_path_factory.mktemp("push")
    emulator = Emulator(root / "emulator", job_seconds=JOB_SECONDS, faults=["webhook-duplicate@batchd-dup-*", "webhook-lost@batchd-lost-*"]).start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    hook = f"{url}/webhooks/gemini"
    workspace = Workspace.create(root / "ws", job_seconds=JOB_SECONDS, http=f"127.0.0.1:{port}",
                                 webhook_public_url=hook, poll_interval=600, poll_max_interval=600)
    env = {"BATCHD_PROVIDER": "gemini", "GEMINI_API_KEY": emulator.api_key, "GOOGLE_GEMINI_BASE_URL": emulator.base_url}
    # The static webhook as `batchd webhooks register` makes it (that command is tested below, in the slow step).
    secret = emulator.client().webhooks.create(name="batchd", uri=hook, subscribed_events=[
        "batch.succeeded", "batch.failed", "batch.cancelled", "batch.expired"]).new_signing_secret
    assert secret.startswith("whsec_")
    process = workspace.start("run", BATCHD_WEBHOOK_SECRET=secret, **env)
    try:
        wait_until(lambda: _ready(url), what="the daemon ready")
        yield {"workspace": workspace, "emulator": emulator, "url": url, "hook": hook, "secret": secret,
               "process": process, "env": env}
    finally:
        process.stop()
        emulator.stop()


def _ready(url: str) -> bool:
    try:
        return request(url + "/readyz", timeout=1).status == 200
    except OSError:
        return False


def _delivered_at(workspace, name: str, timeout: float = 30) -> tuple[dict, float]:
    folder = workspace.wait_for(lambda: workspace.outbox_folders().get(name), timeout, what=f"{name} delivered")
    return folder.summary, time.time()


def _end_time(emulator, summary: dict) -> float:
    [remote] = summary["remote_batches"]
    name = remote["name"] if isinstance(remote, dict) else remote
    job = emulator.client().batches.get(name=name)
    return job.end_time.timestamp()


def test_a_job_is_delivered_within_a_second_of_its_end_with_polls_ten_minutes_apart(pushed):
    workspace, url = pushed["workspace"], pushed["url"]
    before = scrape(url)
    workspace.drop_manifest("pushy.toml", {"task": "translate", "texts": ["one", "two"], "languages": ["French"]})
    summary, delivered_at = _delivered_at(workspace, "pushy")
    assert summary["state"] == "succeeded"
    lag = delivered_at - _end_time(pushed["emulator"], summary)
    assert lag < 1.0, f"delivered {lag:.2f} s after its batch ended"
    after = scrape(url)
    # The per-job webhook (an RS256 JWT) told of it: one get, no list pass since the first.
    assert metric(after, "batchd_webhook_deliveries_total", result="taken") > metric(
        before, "batchd_webhook_deliveries_total", result="taken")
    assert metric(after, "batchd_webhooks_healthy") == 1
    assert metric(after, "batchd_remote_calls_total", method="batches.list") - metric(
        before, "batchd_remote_calls_total", method="batches.list") <= 1
    assert metric(after, "batchd_remote_errors_total", method="batches.get", kind="404") == 0


def test_a_static_webhook_signed_with_its_secret_delivers_an_embed_job(pushed):
    # Embed batches are created without webhook_config (google-genai's create_embeddings has none): the
    # project's static webhook hears of them, signed per Standard Webhooks with the registered secret.
    workspace, url = pushed["workspace"], pushed["url"]
    workspace.drop_manifest("vectors.toml", {"task": "embed", "items": [{"id": "a", "text": "alpha"},
                                                                       {"id": "b", "text": "beta"}]})
    summary, delivered_at = _delivered_at(workspace, "vectors")
    assert summary["state"] == "succeeded"
    assert delivered_at - _end_time(pushed["emulator"], summary) < 1.0


def test_a_delivery_sent_twice_is_acted_on_once(pushed):
    workspace, url = pushed["workspace"], pushed["url"]
    before = scrape(url)
    workspace.drop_manifest("dup.toml", {"task": "translate", "texts": ["twice"], "languages": ["German"]})
    summary, _ = _delivered_at(workspace, "dup")
    assert summary["state"] == "succeeded"
    after = wait_until(lambda: (s := scrape(url)) and metric(s, "batchd_webhook_deliveries_total", result="duplicate")
                       + metric(s, "batchd_webhook_deliveries_total", result="duplicate_in_loop") > metric(
                           before, "batchd_webhook_deliveries_total", result="duplicate") + metric(
                           before, "batchd_webhook_deliveries_total", result="duplicate_in_loop") and s,
                       what="the second copy counted as a duplicate")
    assert metric(after, "batchd_webhook_deliveries_total", result="taken") == metric(
        before, "batchd_webhook_deliveries_total", result="taken") + 1
    assert [name for name in workspace.outbox_folders() if name.startswith("dup")] == ["dup"]


def _signed(secret: str, body: bytes, *, msg_id: str | None = None, at: float | None = None) -> dict:
    msg_id = msg_id or "msg_" + secrets.token_urlsafe(12)
    when = datetime.fromtimestamp(int(at if at is not None else time.time()), UTC)
    signature = standardwebhooks.Webhook(secret).sign(msg_id, when, body.decode())
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(when.timestamp())), "webhook-signature": signature,
            "content-type": "application/json"}


def _event(name: str = "batches/not-ours") -> bytes:
    return json.dumps({"type": "batch.succeeded", "timestamp": "2026-01-01T00:00:00Z",
                       "data": {"name": name, "state": "BATCH_STATE_SUCCEEDED"}}).encode()


def _post(url: str, body: bytes, headers: dict):
    return request(url + "/webhooks/gemini", method="POST", body=body, headers=headers)


def test_forged_and_replayed_deliveries_are_refused_401(pushed):
    url, secret = pushed["url"], pushed["secret"]
    body = _event()
    other = "whsec_" + "QUJD" * 8
    assert _post(url, body, _signed(other, body)).status == 401  # another secret
    tampered = _signed(secret, body)
    assert _post(url, _event("batches/tampered"), tampered).status == 401  # the body changed after signing
    replayed = _post(url, body, _signed(secret, body, at=time.time() - 600))
    assert replayed.status == 401 and "5 minutes" in replayed.json()["error"]
    assert _post(url, body, _signed(secret, body, at=time.time() + 600)).status == 401
    garbage = {"webhook-id": "x", "webhook-timestamp": str(int(time.time())), "webhook-signature": "nonsense"}
    assert _post(url, body, garbage).status == 401
    # A JWT signed by a key that is not in the provider's JWKS.
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    token = jwt.encode({"iss": "https://generativelanguage.googleapis.com", "aud": pushed["hook"], "iat": now,
                        "exp": now + 300, "webhook_id": "msg_forged", "body_sha256": "x"}, key, algorithm="RS256",
                       headers={"kid": "not-a-real-kid"})
    forged = _post(url, body, {"webhook-id": "msg_forged", "webhook-timestamp": str(now), "webhook-signature": token})
    assert forged.status == 401 and "JWT" in forged.json()["error"]
    assert _post(url, body, _signed(secret, body)).status == 200  # the genuine article
    samples = scrape(url)
    assert metric(samples, "batchd_webhook_deliveries_total", result="refused") >= 6
    log = pushed["process"].output()
    assert secret not in log
    assert pushed["process"].poll() is None


def test_the_same_webhook_id_twice_is_answered_200_and_taken_once(pushed):
    url, secret = pushed["url"], pushed["secret"]
    before = scrape(url)
    body = _event()
    headers = _signed(secret, body, msg_id="msg_twice_" + secrets.token_hex(4))
    assert _post(url, body, headers).status == 200
    taken = wait_until(lambda: (s := scrape(url)) and metric(s, "batchd_queue_depth", queue="inbound") == 0 and metric(
        s, "batchd_webhook_deliveries_total", result="taken") > metric(
        before, "batchd_webhook_deliveries_total", result="taken") and s, what="the delivery taken")
    again = _post(url, body, _signed(secret, body, msg_id=headers["webhook-id"]))
    # Answered 200: "duplicate" once the first copy's tick has committed, else queued and dropped by the loop.
    assert again.status == 200 and again.json()["status"] in ("duplicate", "accepted")

    def duplicates(samples):
        return metric(samples, "batchd_webhook_deliveries_total", result="duplicate") + metric(
            samples, "batchd_webhook_deliveries_total", result="duplicate_in_loop")

    after = wait_until(lambda: (s := scrape(url)) and duplicates(s) == duplicates(taken) + 1 and s,
                       what="the second copy dropped")
    assert metric(after, "batchd_webhook_deliveries_total", result="taken") == metric(
        taken, "batchd_webhook_deliveries_total", result="taken")


@pytest.mark.slow  # three CLI processes, each importing google-genai's webhooks client (seconds)
def test_batchd_webhooks_register_list_and_delete_through_the_sdk(pushed):
    workspace, env = pushed["workspace"], pushed["env"]
    uri = pushed["hook"] + "?second"
    registered = workspace.batchd("webhooks", "register", uri, **env)
    assert registered.returncode == 0, registered.stderr
    secret = registered.stdout.strip().splitlines()[-1]
    assert secret.startswith("whsec_") and "shown once" in registered.stdout
    listed = workspace.batchd("webhooks", "list", "--json", **env)
    assert listed.returncode == 0, listed.stderr
    [webhook] = [w for w in json.loads(listed.stdout) if w["uri"] == uri]
    assert "batch.succeeded" in webhook["subscribed_events"] and webhook["state"] == "enabled"
    assert secret not in listed.stdout
    deleted = workspace.batchd("webhooks", "delete", webhook["id"], **env)
    assert deleted.returncode == 0 and webhook["id"] in deleted.stdout
    assert uri not in workspace.batchd("webhooks", "list", **env).stdout


@pytest.mark.slow  # a daemon of its own, and a poll interval to wait out
def test_with_webhooks_healthy_polls_stretch_and_still_deliver_a_batch_whose_webhook_was_lost(pushed, tmp_path):
    emulator, env = pushed["emulator"], pushed["env"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    workspace = Workspace.create(tmp_path, job_seconds=JOB_SECONDS, http=f"127.0.0.1:{port}",
                                 webhook_public_url=f"{url}/webhooks/gemini", poll_interval=0.2,
                                 poll_max_interval=0.4, webhook_poll_interval=3.0)
    process = workspace.start("run", BATCHD_WEBHOOK_SECRET=pushed["secret"], **env)
    try:
        wait_until(lambda: _ready(url), what="the daemon ready")
        workspace.drop_manifest("first.toml", {"task": "translate", "texts": ["hello"], "languages": ["French"]})
        _delivered_at(workspace, "first")
        assert metric(scrape(url), "batchd_webhooks_healthy") == 1
        before = scrape(url)
        workspace.drop_manifest("lost.toml", {"task": "translate", "texts": ["unheard"], "languages": ["French"]})
        started = time.time()
        summary, delivered_at = _delivered_at(workspace, "lost", timeout=30)
        assert summary["state"] == "succeeded"  # found by the poll: its webhook never came
        lists = metric(scrape(url), "batchd_remote_calls_total", method="batches.list") - metric(
            before, "batchd_remote_calls_total", method="batches.list")
        # Polls 3 s apart, not 0.2-0.4 s: at most one list pass per 3 s (plus the one in progress).
        assert lists <= (delivered_at - started) / 3.0 + 2, lists
    finally:
        process.stop()


@pytest.mark.slow
def test_the_gets_webhooks_ask_for_hold_no_other_job_while_the_service_is_slow(tmp_path):
    """A job of four chunks ends: four webhook deliveries, each asking for a get that takes the service 3 s.
    The gets go out from the monitor's pool together, and a manifest dropped meanwhile is submitted at
    once. Before, the loop made them one after the other and waited for each: 12 s in which no other job
    moved."""
    with Emulator(tmp_path / "emulator", job_seconds=JOB_SECONDS, faults=["slow=3@get"]) as emulator:
        port = free_port()
        hook = f"http://127.0.0.1:{port}/webhooks/gemini"
        workspace = Workspace.create(tmp_path / "ws", job_seconds=JOB_SECONDS, http=f"127.0.0.1:{port}",
                                     webhook_public_url=hook, poll_interval=600, poll_max_interval=600,
                                     chunk_max_requests=1)
        secret = emulator.client().webhooks.create(name="batchd", uri=hook, subscribed_events=[
            "batch.succeeded", "batch.failed", "batch.cancelled", "batch.expired"]).new_signing_secret
        process = workspace.start("run", BATCHD_WEBHOOK_SECRET=secret, BATCHD_PROVIDER="gemini",
                                  GEMINI_API_KEY=emulator.api_key, GOOGLE_GEMINI_BASE_URL=emulator.base_url)
        try:
            workspace.drop_manifest("four.toml", {"task": "translate", "texts": ["one", "two"],
                                                  "languages": ["French", "German"]})
            workspace.wait_for(lambda: "webhook " in process.output(), what="the first webhook delivery")
            dropped = time.monotonic()
            workspace.drop_manifest("other.toml", {"task": "translate", "texts": ["three"], "languages": ["French"]})
            workspace.wait_for(lambda: any(job["name"] == "other" and job["state"] in ("submitted", "done")
                                           for job in workspace.status()), what="the other job submitted")
            assert time.monotonic() - dropped < 5, process.output()[-2000:]
            assert workspace.wait_for_delivery("four").summary["state"] == "succeeded"
        finally:
            assert process.stop() == 0
