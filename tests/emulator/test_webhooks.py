"""Webhooks as the Gemini API pushes them: static ones through the WebhookService (google-genai's
``client.webhooks``), signed per Standard Webhooks and checked here with the standardwebhooks library;
per-job ones (``webhook_config``), signed with an RS256 JWT checked against the emulator's JWKS with
PyJWT; retries, durability across a restart, and the lost / duplicated / late delivery faults. The
receiver is a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import pytest
import standardwebhooks
from google.genai import types

from batchd.emulator import EmulatorServer
from batchd.emulator.webhooks import JWKS_PATH

from .support import MODEL, inline_requests, make_client, wait_done

pytestmark = pytest.mark.filterwarnings("ignore:.*is experimental")


class Receiver:
    """A webhook receiver: records every delivery; ``answers`` (a list of statuses) are used up first."""

    def __init__(self) -> None:
        self.deliveries: list[dict] = []
        self.answers: list[int] = []
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                status = receiver.answers.pop(0) if receiver.answers else 204
                with receiver.arrived:
                    receiver.deliveries.append({"headers": {k.lower(): v for k, v in self.headers.items()},
                                                "body": body, "path": self.path, "status": status,
                                                "at": time.time()})
                    receiver.arrived.notify_all()
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_port}/gemini"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count: int, timeout: float = 20) -> list[dict]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.deliveries) >= count, timeout), \
                f"{len(self.deliveries)} of {count} deliveries arrived"
            return list(self.deliveries)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[EmulatorServer]:
    with EmulatorServer(tmp_path / "emulator", job_seconds=0.3, webhook_retry_seconds=0.1) as server:
        yield server


def verified(delivery: dict, secret: str) -> dict:
    """The event of a static webhook's delivery, after the library checks its signature."""
    return standardwebhooks.Webhook(secret).verify(delivery["body"].decode(), delivery["headers"])


def test_a_static_webhook_hears_of_a_batch_that_ends_signed_with_its_secret(emulator, receiver):
    client = make_client(emulator.base_url)
    webhook = client.webhooks.create(name="batchd", subscribed_events=["batch.succeeded", "batch.failed"],
                                     uri=receiver.uri)
    assert webhook.new_signing_secret.startswith("whsec_") and webhook.state == "enabled"
    job = client.batches.create(model=MODEL, src=inline_requests(1), config={"display_name": "hooked"})
    [delivery] = receiver.wait(1)
    event = verified(delivery, webhook.new_signing_secret)
    assert event["type"] == "batch.succeeded"
    assert event["data"]["name"] == job.name and event["data"]["state"] == "BATCH_STATE_SUCCEEDED"
    assert event["data"]["display_name"] == "hooked"
    assert delivery["headers"]["webhook-id"].startswith("msg_")
    assert abs(int(delivery["headers"]["webhook-timestamp"]) - time.time()) < 60
    assert client.batches.get(name=job.name).state == types.JobState.JOB_STATE_SUCCEEDED  # it had ended
    with pytest.raises(standardwebhooks.WebhookVerificationError):  # another secret does not verify it
        standardwebhooks.Webhook("whsec_" + base64.b64encode(b"x" * 32).decode()).verify(
            delivery["body"].decode(), delivery["headers"])


def test_only_subscribed_events_are_delivered(emulator, receiver):
    client = make_client(emulator.base_url)
    webhook = client.webhooks.create(subscribed_events=["batch.failed", "batch.cancelled"], uri=receiver.uri)
    wait_done(client, client.batches.create(model=MODEL, src=inline_requests(1)).name)  # succeeded: not told
    failing = make_client(emulator.base_url, fault="job-failed")
    failed = failing.batches.create(model=MODEL, src=inline_requests(1))
    stuck_client = make_client(emulator.base_url, fault="stuck-pending")  # kept: a dropped client closes itself
    stuck = stuck_client.batches.create(model=MODEL, src=inline_requests(1))
    client.batches.cancel(name=stuck.name)
    deliveries = receiver.wait(2)
    events = {verified(d, webhook.new_signing_secret)["data"]["name"]: verified(d, webhook.new_signing_secret)["type"]
              for d in deliveries}
    assert events == {failed.name: "batch.failed", stuck.name: "batch.cancelled"}
    time.sleep(0.5)
    assert len(receiver.deliveries) == 2


def test_a_per_job_webhook_replaces_the_static_ones_and_is_signed_with_a_jwt(emulator, receiver):
    client = make_client(emulator.base_url)
    static = Receiver()
    try:
        client.webhooks.create(subscribed_events=["batch.succeeded"], uri=static.uri)
        job = client.batches.create(model=MODEL, src=inline_requests(1), config={
            "display_name": "per-job",
            "webhook_config": {"uris": [receiver.uri], "user_metadata": {"job": "j1", "chunk": 0}}})
        [delivery] = receiver.wait(1)
        time.sleep(0.3)
        assert static.deliveries == []  # the job's own webhook replaced the static one
    finally:
        static.close()
    token = delivery["headers"]["webhook-signature"]
    keys = jwt.PyJWKClient(emulator.base_url + JWKS_PATH)
    claims = jwt.decode(token, keys.get_signing_key_from_jwt(token).key, algorithms=["RS256"], audience=receiver.uri,
                        issuer="https://generativelanguage.googleapis.com")
    assert claims["webhook_id"] == delivery["headers"]["webhook-id"]
    digest = base64.urlsafe_b64encode(hashlib.sha256(delivery["body"]).digest()).rstrip(b"=").decode()
    assert claims["body_sha256"] == digest
    event = json.loads(delivery["body"])
    assert event["data"]["name"] == job.name and event["data"]["user_metadata"] == {"job": "j1", "chunk": 0}
    with pytest.raises(jwt.InvalidAudienceError):  # a token meant for one receiver is refused by another
        jwt.decode(token, keys.get_signing_key_from_jwt(token).key, algorithms=["RS256"], audience="https://other/")


def test_a_refused_delivery_is_retried_with_the_same_id_until_acknowledged(emulator, receiver):
    client = make_client(emulator.base_url)
    webhook = client.webhooks.create(subscribed_events=["batch.succeeded"], uri=receiver.uri)
    receiver.answers = [500, 503]
    client.batches.create(model=MODEL, src=inline_requests(1))
    deliveries = receiver.wait(3)
    assert [d["status"] for d in deliveries] == [500, 503, 204]
    assert len({d["headers"]["webhook-id"] for d in deliveries}) == 1
    first_wait, second_wait = (deliveries[1]["at"] - deliveries[0]["at"]), (deliveries[2]["at"] - deliveries[1]["at"])
    assert first_wait >= 0.1 and second_wait > first_wait  # backs off: 0.1 s, then 0.2 s
    assert all(verified(d, webhook.new_signing_secret)["type"] == "batch.succeeded" for d in deliveries)


def test_a_delivery_that_never_succeeds_gives_up_and_disables_the_webhook(tmp_path, receiver):
    with EmulatorServer(tmp_path / "e", job_seconds=0.2, webhook_retry_seconds=0.05, webhook_attempts=3) as emulator:
        client = make_client(emulator.base_url)
        webhook = client.webhooks.create(subscribed_events=["batch.succeeded"], uri=receiver.uri)
        receiver.answers = [500] * 10
        client.batches.create(model=MODEL, src=inline_requests(1))
        receiver.wait(3)
        deadline = time.monotonic() + 10
        while client.webhooks.get(id=webhook.id).state != "disabled_due_to_failed_deliveries":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert len(receiver.deliveries) == 3


def test_a_pending_delivery_survives_a_restart(tmp_path, receiver):
    state = tmp_path / "emulator"
    with EmulatorServer(state, job_seconds=0.2, webhook_retry_seconds=30) as emulator:
        client = make_client(emulator.base_url)
        webhook = client.webhooks.create(subscribed_events=["batch.succeeded"], uri=receiver.uri)
        receiver.answers = [503]
        job = client.batches.create(model=MODEL, src=inline_requests(1))
        receiver.wait(1)  # refused; the retry is 30 s away
    with EmulatorServer(state, job_seconds=0.2, webhook_retry_seconds=0.1):
        deliveries = receiver.wait(2, timeout=40)
    assert verified(deliveries[1], webhook.new_signing_secret)["data"]["name"] == job.name


@pytest.mark.parametrize("fault", ["webhook-lost", "webhook-duplicate", "webhook-late=1"])
def test_lost_duplicated_and_late_deliveries_can_be_injected(emulator, receiver, fault):
    client = make_client(emulator.base_url)
    webhook = client.webhooks.create(subscribed_events=["batch.succeeded"], uri=receiver.uri)
    faulty = make_client(emulator.base_url, fault=fault)
    job = faulty.batches.create(model=MODEL, src=inline_requests(1))
    ended_at = time.time()
    wait_done(client, job.name)
    if fault == "webhook-lost":
        time.sleep(1.0)
        assert receiver.deliveries == []
    elif fault == "webhook-duplicate":
        first, second = receiver.wait(2)
        assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"]  # the same message, twice
        assert verified(second, webhook.new_signing_secret)["data"]["name"] == job.name
    else:
        [late] = receiver.wait(1)
        assert late["at"] - ended_at >= 1.0


def test_the_webhook_service_lists_updates_rotates_pings_and_deletes(emulator, receiver):
    client = make_client(emulator.base_url)
    created = client.webhooks.create(name="one", subscribed_events=["batch.succeeded"], uri=receiver.uri)
    assert [w.id for w in client.webhooks.list().webhooks] == [created.id]
    assert client.webhooks.get(id=created.id).signing_secrets[0].truncated_secret.startswith("whsec_")
    assert client.webhooks.get(id=created.id).new_signing_secret is None  # returned once only

    client.webhooks.ping(id=created.id)
    [ping] = receiver.wait(1)
    assert verified(ping, created.new_signing_secret)["type"] == "webhook.ping"

    rotated = client.webhooks.rotate_signing_secret(id=created.id).secret
    client.webhooks.ping(id=created.id)
    second = receiver.wait(2)[1]
    assert len(second["headers"]["webhook-signature"].split()) == 2  # both secrets sign for 24 hours
    verified(second, created.new_signing_secret)
    verified(second, rotated)
    newest = client.webhooks.rotate_signing_secret(id=created.id,
                                                   revocation_behavior="revoke_previous_secrets_immediately").secret
    client.webhooks.ping(id=created.id)
    third = receiver.wait(3)[2]
    verified(third, newest)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        verified(third, rotated)

    updated = client.webhooks.update(id=created.id, state="disabled")
    assert updated.state == "disabled"
    wait_done(client, client.batches.create(model=MODEL, src=inline_requests(1)).name)
    time.sleep(0.5)
    assert len(receiver.deliveries) == 3  # a disabled webhook hears nothing
    client.webhooks.delete(id=created.id)
    assert client.webhooks.list().webhooks in (None, [])


def test_a_webhook_needs_a_uri_and_known_events(emulator):
    client = make_client(emulator.base_url)
    with pytest.raises(Exception, match="400") as raised:  # the SDK's webhooks client has its own error types
        client.webhooks.create(subscribed_events=["batch.exploded"], uri="https://example.com/hook")
    assert "unknown event 'batch.exploded'" in str(raised.value)
    with pytest.raises(Exception, match="400") as raised:
        client.webhooks.create(subscribed_events=["batch.succeeded"], uri="ftp://example.com/hook")
    assert "http(s) URI" in str(raised.value)
