"""Webhooks: the Gemini API pushes a batch's end to the client instead of making it poll.

Two kinds, as Google has them:

- **Static** webhooks are project-wide, managed through the WebhookService (``/{v}/webhooks``: create,
  list, get, update, delete, ``:ping``, ``:rotateSigningSecret``; google-genai's ``client.webhooks``,
  which speaks snake_case JSON). Each subscribes to events (``batch.succeeded``, ``batch.failed``,
  ``batch.cancelled``, ``batch.expired``, ...) and is signed per Standard Webhooks with its
  ``whsec_`` secret, returned once, at create (``new_signing_secret``) or rotation (``secret``).
- **Per-job** ("dynamic") webhooks: ``batch.webhookConfig = {uris, userMetadata}`` on a create. Its
  events go to those URIs *instead of* the static webhooks, carry the ``user_metadata``, and are
  signed with an RS256 JWT whose key the emulator publishes as a JWKS (``/.well-known/jwks.json``).

A delivery is an HTTP POST of a JSON event (``{"type", "timestamp", "data": {...}}``, the Standard
Webhooks payload shape) with the headers ``webhook-id`` (the same on every attempt: the receiver's
idempotency key), ``webhook-timestamp`` (Unix seconds of the attempt) and ``webhook-signature``:
``v1,<base64 HMAC-SHA256 of id.timestamp.body>`` per active secret for a static webhook (several
during a rotation), the JWT for a per-job one. Any 2xx acknowledges; anything else, or no answer
within 10 s, is retried with exponential backoff (``retry_seconds``, doubling, at most
``attempts`` tries); a static webhook whose delivery gives up is ``disabled_due_to_failed_deliveries``.
Delivery is at least once and unordered, as Google's. Deliveries are documents in the state
directory, so a restarted emulator still delivers them (at once, its backoff forgotten).

A job's end is noticed by a watcher thread (a job's state is a function of the clock, jobs.py):
only jobs created while a static webhook exists or with a ``webhookConfig`` are watched, so the
emulator pays nothing for webhooks nobody asked for. Job faults ``webhook-lost``,
``webhook-duplicate`` and ``webhook-late=SECONDS`` test a receiver's resilience.

Not confirmed against Google (documented as the emulator's reading): the exact field names of the
event body, the JWKS URL and the JWT's claims (here ``iss``, ``aud`` = the receiving URI, ``iat``,
``exp``, ``webhook_id`` and ``body_sha256``, the unpadded base64url SHA-256 of the body).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import standardwebhooks

from batchd.emulator.errors import invalid, not_found
from batchd.emulator.jobs import job_faults
from batchd.emulator.store import Doc, Store, replace_file
from batchd.emulator.wire import new_id, rfc3339

log = logging.getLogger("batchd.emulator")

#: Batch states that end a job → the event a webhook hears of it.
BATCH_EVENTS = {"SUCCEEDED": "batch.succeeded", "FAILED": "batch.failed", "CANCELLED": "batch.cancelled",
                "EXPIRED": "batch.expired"}
#: What a webhook may subscribe to (Google's list; the emulator produces only the batch events).
SUBSCRIBABLE_EVENTS = frozenset({*BATCH_EVENTS.values(), "interaction.requires_action", "interaction.completed",
                                 "interaction.failed", "video.generated"})
WEBHOOK_STATES = frozenset({"enabled", "disabled", "disabled_due_to_failed_deliveries"})
REVOCATIONS = frozenset({"revoke_previous_secrets_after_h24", "revoke_previous_secrets_immediately"})
ISSUER = "https://generativelanguage.googleapis.com"
JWKS_PATH = "/.well-known/jwks.json"
#: How often the watcher looks at the jobs it watches (a job's end is told at most this late).
WATCH_SECONDS = 0.1
DELIVERY_TIMEOUT_SECONDS = 10.0
#: A receiver should refuse a delivery whose timestamp is further off than this (Standard Webhooks).
TOLERANCE_SECONDS = 300


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


class JwtSigner:
    """Signs per-job webhook deliveries with an RSA key kept in the state directory (stable across
    restarts, so receivers' cached JWKS stay valid)."""

    def __init__(self, key_path: Path) -> None:
        # Imported here: most emulators (one per daemon test) never sign a JWT, and these cost 80 ms.
        import jwt
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        self._jwt = jwt
        if key_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        else:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            replace_file(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
        self._key = key
        public = key.public_key()
        self._jwk = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
        der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.kid = hashlib.sha256(der).hexdigest()[:16]

    def jwks(self) -> dict:
        return {"keys": [{**self._jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}]}

    def token(self, uri: str, message_id: str, timestamp: int, body: bytes) -> str:
        digest = base64.urlsafe_b64encode(hashlib.sha256(body).digest()).rstrip(b"=").decode()
        claims = {"iss": ISSUER, "aud": uri, "iat": timestamp, "exp": timestamp + TOLERANCE_SECONDS,
                  "webhook_id": message_id, "body_sha256": digest}
        return self._jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.kid})


class WebhookService:
    """Static webhooks (the WebhookService's resources), the events of jobs' ends, and their delivery."""

    def __init__(self, store: Store, *, view: Callable[[Doc, float], Any], retry_seconds: float = 1.0,
                 attempts: int = 8) -> None:
        self.store = store
        #: The state a job shows at a time (jobs.view_job with the emulator's settings).
        self._view = view
        self.retry_seconds = retry_seconds
        self.attempts = attempts
        self._signer: JwtSigner | None = None
        self._watched = {job_id for job_id, job in store.jobs.items()
                         if job.get("webhookWatch") and not job.get("webhookNotified")}
        self._lock = threading.Lock()
        self._jobs_to_watch = threading.Event()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._watch, name="emulator-webhook-watch", daemon=True),
                         threading.Thread(target=self._deliver, name="emulator-webhook-deliver", daemon=True)]
        self._http: Any = None  # an httpx2 client, made at the first delivery (its import costs 80 ms a start)

    @property
    def signer(self) -> JwtSigner:
        """The per-job webhooks' signer, made on first use (its key is generated once per state directory)."""
        with self._lock:
            if self._signer is None:
                self._signer = JwtSigner(self.store.root / "webhook-signing-key.pem")
            return self._signer

    def start(self) -> None:
        # What a previous process left undelivered goes out at once, its backoff forgotten.
        for delivery in list(self.store.deliveries.values()):
            if delivery["due"] > time.time():
                self.store.save_delivery({**delivery, "due": time.time()})
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._jobs_to_watch.set()
        for thread in self._threads:
            thread.join(timeout=DELIVERY_TIMEOUT_SECONDS + 1)
        if self._http is not None:
            self._http.close()

    # -- the WebhookService's resources -------------------------------------------------------------

    def create(self, body: dict) -> dict:
        uri, events = body.get("uri"), body.get("subscribed_events")
        _check_uri(uri)
        _check_events(events)
        now, secret = time.time(), new_secret()
        webhook = {"id": new_id(12), "name": body.get("name"), "uri": uri, "subscribedEvents": list(events),
                   "state": "enabled", "createTime": now, "updateTime": now,
                   "secrets": [{"secret": secret, "createTime": now, "expireTime": None}]}
        self.store.save_webhook(webhook)
        self._watch_every_running_job()  # events from now on reach it, for jobs already running too
        return {**render_webhook(webhook), "new_signing_secret": secret}

    def list(self) -> list[dict]:
        return [render_webhook(w) for w in sorted(self.store.webhooks.values(), key=lambda w: (w["createTime"], w["id"]))]

    def get(self, webhook_id: str) -> dict:
        return render_webhook(self._webhook(webhook_id))

    def update(self, webhook_id: str, body: dict, update_mask: str | None) -> dict:
        webhook = dict(self._webhook(webhook_id))
        fields = [f.strip() for f in update_mask.split(",")] if update_mask else [k for k in body if body[k] is not None]
        for field in fields:
            if field not in ("name", "uri", "subscribed_events", "state"):
                raise invalid(f"Field {field!r} cannot be updated: name, uri, subscribed_events or state.")
            value = body.get(field)
            if field == "uri":
                _check_uri(value)
            elif field == "subscribed_events":
                _check_events(value)
            elif field == "state" and value not in ("enabled", "disabled"):
                raise invalid("A webhook's state can be set to enabled or disabled.")
            webhook["subscribedEvents" if field == "subscribed_events" else field] = value
        webhook["updateTime"] = time.time()
        self.store.save_webhook(webhook)
        return render_webhook(webhook)

    def delete(self, webhook_id: str) -> None:
        self._webhook(webhook_id)
        self.store.delete_webhook(webhook_id)

    def ping(self, webhook_id: str) -> None:
        """Send the webhook a ``webhook.ping`` event (signed as any other), to test the receiver."""
        webhook = self._webhook(webhook_id)
        self._enqueue(webhook["uri"], {"type": "webhook.ping", "timestamp": rfc3339(time.time()),
                                       "data": {"webhook_id": webhook_id}}, webhook_id=webhook_id, faults=None)

    def rotate(self, webhook_id: str, revocation: str | None) -> str:
        """A new secret; the old ones sign on for 24 hours, or stop at once."""
        if revocation is not None and revocation not in REVOCATIONS:
            raise invalid(f"Invalid revocation_behavior {revocation!r}: use one of {', '.join(sorted(REVOCATIONS))}.")
        webhook = dict(self._webhook(webhook_id))
        now, secret = time.time(), new_secret()
        expire = now if revocation == "revoke_previous_secrets_immediately" else now + 24 * 3600
        kept = [{**s, "expireTime": min(s["expireTime"] or expire, expire)} for s in webhook["secrets"]
                if s["expireTime"] is None or s["expireTime"] > now]
        webhook["secrets"] = [{"secret": secret, "createTime": now, "expireTime": None},
                              *[s for s in kept if s["expireTime"] > now]]
        webhook["updateTime"] = now
        self.store.save_webhook(webhook)
        return secret

    def _webhook(self, webhook_id: str) -> Doc:
        webhook = self.store.webhooks.get(webhook_id)
        if webhook is None:
            raise not_found(f"Webhook webhooks/{webhook_id} not found.")
        return webhook

    # -- job events ---------------------------------------------------------------------------------

    def job_created(self, job: Doc) -> dict | None:
        """The fields to store with a new job: it is watched if anyone is to hear of its end."""
        if job.get("webhookConfig", {}).get("uris") or self.store.webhooks:
            return {"webhookWatch": True}
        return None

    def watch(self, job_id: str) -> None:
        with self._lock:
            self._watched.add(job_id)
        self._jobs_to_watch.set()

    def _watch_every_running_job(self) -> None:
        now = time.time()
        for job in list(self.store.jobs.values()):
            if not job.get("webhookWatch") and not self._view(job, now).terminal:
                if self.store.update_job(job["id"], webhookWatch=True) is not None:
                    self.watch(job["id"])

    def _watch(self) -> None:
        while not self._stopping.wait(WATCH_SECONDS):
            with self._lock:
                watched = list(self._watched)
                if not watched:
                    self._jobs_to_watch.clear()
            if not watched:
                self._jobs_to_watch.wait()  # nothing to watch: sleep until there is
                continue
            now = time.time()
            for job_id in watched:
                job = self.store.jobs.get(job_id)
                view = self._view(job, now) if job is not None else None
                if view is not None and not view.terminal:
                    continue
                with self._lock:
                    self._watched.discard(job_id)
                if view is not None:
                    try:
                        self._job_ended(job, view)
                    except Exception:  # noqa: BLE001 - one job's event must not stop the watcher
                        log.exception("emulator: the webhook event of batches/%s failed", job_id)

    def _job_ended(self, job: Doc, view: Any) -> None:
        event = BATCH_EVENTS[view.state]
        data: dict[str, Any] = {"name": f"batches/{job['id']}", "state": f"BATCH_STATE_{view.state}",
                                "model": job["model"], "display_name": job.get("displayName"),
                                "end_time": rfc3339(view.end_time or time.time(), nanoseconds=True)}
        payload = {"type": event, "timestamp": rfc3339(time.time()), "data": data}
        config = job.get("webhookConfig") or {}
        faults = job_faults(tuple(job["faults"]))
        if config.get("uris"):  # per-job webhooks replace the static ones for this job
            payload["data"]["user_metadata"] = config.get("userMetadata") or {}
            for uri in config["uris"]:
                self._enqueue(uri, payload, webhook_id=None, faults=faults)
        else:
            for webhook in list(self.store.webhooks.values()):
                if webhook["state"] == "enabled" and event in webhook["subscribedEvents"]:
                    self._enqueue(webhook["uri"], payload, webhook_id=webhook["id"], faults=faults)
        self.store.update_job(job["id"], webhookNotified=view.state)

    # -- delivery -------------------------------------------------------------------------------------

    def _enqueue(self, uri: str, payload: dict, *, webhook_id: str | None, faults: Any) -> None:
        if faults is not None and faults.webhook_lost:
            return
        copies = 2 if faults is not None and faults.webhook_duplicate else 1
        due = time.time() + (faults.webhook_late_seconds if faults is not None else 0.0)
        body = json.dumps(payload, separators=(",", ":"))
        message_id = "msg_" + secrets.token_urlsafe(18)
        for copy in range(copies):  # a duplicate is the same message (same webhook-id), sent again
            self.store.save_delivery({"id": f"{message_id}-{copy}", "messageId": message_id, "uri": uri, "body": body,
                                      "webhookId": webhook_id, "attempt": 0, "due": due})
        self._wake.set()

    def _deliver(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()  # before looking: an event queued from now on wakes the wait below
            now = time.time()
            pending = sorted(self.store.deliveries.values(), key=lambda d: d["due"])
            due = [d for d in pending if d["due"] <= now]
            for delivery in due:
                if self._stopping.is_set():
                    return
                self._attempt(delivery)
            if not due:
                wait = min((d["due"] for d in pending), default=now + 1.0) - now
                self._wake.wait(max(0.01, min(wait, 1.0)))

    def _attempt(self, delivery: Doc) -> None:
        webhook = self.store.webhooks.get(delivery["webhookId"]) if delivery["webhookId"] else None
        if delivery["webhookId"] and webhook is None:
            self.store.delete_delivery(delivery["id"])  # its webhook was deleted meanwhile
            return
        timestamp = int(time.time())
        body = delivery["body"].encode()
        headers = {"content-type": "application/json", "webhook-id": delivery["messageId"],
                   "webhook-timestamp": str(timestamp),
                   "webhook-signature": self._signature(webhook, delivery, timestamp, body)}
        import httpx2 as httpx  # google-genai's HTTP client

        if self._http is None:
            self._http = httpx.Client(timeout=DELIVERY_TIMEOUT_SECONDS, follow_redirects=False)
        try:
            status = self._http.post(delivery["uri"], content=body, headers=headers).status_code
        except httpx.HTTPError:
            status = None
        if status is not None and 200 <= status < 300:
            self.store.delete_delivery(delivery["id"])
            return
        attempt = delivery["attempt"] + 1
        if attempt >= self.attempts:
            log.warning("emulator: giving up on webhook delivery %s to %s after %d attempts",
                        delivery["messageId"], delivery["uri"], attempt)
            self.store.delete_delivery(delivery["id"])
            if webhook is not None:
                self.store.save_webhook({**webhook, "state": "disabled_due_to_failed_deliveries",
                                         "updateTime": time.time()})
            return
        self.store.save_delivery({**delivery, "attempt": attempt,
                                  "due": time.time() + self.retry_seconds * 2 ** (attempt - 1)})

    def _signature(self, webhook: Doc | None, delivery: Doc, timestamp: int, body: bytes) -> str:
        if webhook is None:
            return self.signer.token(delivery["uri"], delivery["messageId"], timestamp, body)
        when = datetime.fromtimestamp(timestamp, UTC)
        now = time.time()
        return " ".join(standardwebhooks.Webhook(s["secret"]).sign(delivery["messageId"], when, body.decode())
                        for s in webhook["secrets"] if s["expireTime"] is None or s["expireTime"] > now)


def render_webhook(webhook: Doc) -> dict:
    """A Webhook resource as the WebhookService answers it (snake_case; secrets only truncated)."""
    now = time.time()
    resource = {"id": webhook["id"], "uri": webhook["uri"], "subscribed_events": webhook["subscribedEvents"],
                "state": webhook["state"], "create_time": rfc3339(webhook["createTime"]),
                "update_time": rfc3339(webhook["updateTime"]),
                "signing_secrets": [{"truncated_secret": s["secret"][:10] + "…",
                                     **({"expire_time": rfc3339(s["expireTime"])} if s["expireTime"] else {})}
                                    for s in webhook["secrets"] if s["expireTime"] is None or s["expireTime"] > now]}
    if webhook.get("name"):
        resource["name"] = webhook["name"]
    return resource


def check_webhook_config(config: Any) -> None:
    """A create's ``batch.webhookConfig``: URIs a receiver can be reached at."""
    if config is None:
        return
    for uri in config.get("uris") or []:
        _check_uri(uri, where="batch.webhook_config.uris")


def _check_uri(uri: Any, where: str = "webhook.uri") -> None:
    if not isinstance(uri, str) or not uri.startswith(("https://", "http://")) or len(uri) > 2048:
        raise invalid(f"* {where}: must be an http(s) URI of at most 2,048 characters.")


def _check_events(events: Any) -> None:
    if not isinstance(events, list) or not events:
        raise invalid("* webhook.subscribed_events: at least one event is required.")
    unknown = [e for e in events if e not in SUBSCRIBABLE_EVENTS]
    if unknown:
        raise invalid(f"* webhook.subscribed_events: unknown event {unknown[0]!r}; "
                      f"known: {', '.join(sorted(SUBSCRIBABLE_EVENTS))}.")


__all__ = ["JWKS_PATH", "JwtSigner", "WebhookService", "check_webhook_config", "render_webhook"]
