"""Verifying Gemini webhook deliveries (``POST /webhooks/gemini``, served by :mod:`batchd.web`).

Two kinds, told apart by the ``webhook-signature`` header:

- a **static** webhook (``batchd webhooks register``) signs per Standard Webhooks: ``v1,<base64
  HMAC-SHA256 of id.timestamp.body>`` with its ``whsec_`` secret (``webhook_secret``), checked with
  the ``standardwebhooks`` library, which also refuses a ``webhook-timestamp`` more than 5 minutes
  off;
- a **per-job** webhook (``webhook_public_url``, sent with each batch as ``webhook_config``) carries
  an RS256 JWT whose key is in the provider's JWKS (fetched with PyJWT's ``PyJWKClient``, cached): its
  issuer must be Google's, its audience ``webhook_public_url``, its ``webhook_id`` the header's, its
  ``body_sha256`` the body's, and the ``webhook-timestamp`` within 5 minutes.

A delivery that fails any check raises :class:`Refused` (answered 401); nothing of it is acted on.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

#: A delivery's timestamp may be this far from our clock (Standard Webhooks' tolerance).
TOLERANCE_SECONDS = 300
#: Issuer of per-job webhooks' JWTs.
ISSUER = "https://generativelanguage.googleapis.com"
#: Where Google publishes the keys (the emulator serves the same path).
JWKS_PATH = "/.well-known/jwks.json"
#: A delivery's body is at most this big (an event is a few hundred bytes).
MAX_BODY_BYTES = 64 * 1024
#: How long fetched JWKS keys are kept before being fetched again.
JWKS_CACHE_SECONDS = 3600


class Refused(Exception):
    """A delivery that is not verified (the message says why, never a secret)."""


@dataclass(frozen=True)
class Verified:
    webhook_id: str
    kind: str  # "static" | "per-job"
    event: dict


class Verifier:
    """Checks deliveries against the configured secret and the provider's JWKS (thread-safe)."""

    def __init__(self, *, secret: str | None, audience: str | None, jwks_url: str | None) -> None:
        self._secret = secret
        self._audience = audience
        self._jwks_url = jwks_url
        self._jwks_client: Any = None
        self._lock = threading.Lock()

    def verify(self, body: bytes, headers: dict[str, str]) -> Verified:
        headers = {k.lower(): v for k, v in headers.items()}
        webhook_id = headers.get("webhook-id") or ""
        timestamp = headers.get("webhook-timestamp") or ""
        signature = headers.get("webhook-signature") or ""
        if not (webhook_id and timestamp and signature):
            raise Refused("missing webhook-id, webhook-timestamp or webhook-signature")
        if len(webhook_id) > 256 or len(signature) > 8192:
            raise Refused("webhook headers too long")
        try:
            sent_at = int(timestamp)
        except ValueError:
            raise Refused("webhook-timestamp is not a number") from None
        if abs(time.time() - sent_at) > TOLERANCE_SECONDS:
            raise Refused("webhook-timestamp is more than 5 minutes off (a replay, or a clock off)")
        if any(part.startswith("v1,") for part in signature.split()):
            self._static(body, headers)
            kind = "static"
        elif signature.count(".") == 2:
            self._per_job(body, webhook_id, signature)
            kind = "per-job"
        else:
            raise Refused("webhook-signature is neither a v1 HMAC nor a JWT")
        try:
            event = json.loads(body)
        except ValueError:
            raise Refused("the body is not JSON") from None
        if not isinstance(event, dict):
            raise Refused("the body is not a JSON object")
        return Verified(webhook_id, kind, event)

    def _static(self, body: bytes, headers: dict[str, str]) -> None:
        import standardwebhooks

        if not self._secret:
            raise Refused("a static webhook's delivery, but no webhook_secret is configured")
        try:
            standardwebhooks.Webhook(self._secret).verify(body, headers, json_parse=False)
        except standardwebhooks.WebhookVerificationError as error:
            raise Refused(f"signature not verified: {error}") from None
        except Exception:  # noqa: BLE001 - a malformed header or secret: refused, never a 500
            raise Refused("signature not verified") from None

    def _per_job(self, body: bytes, webhook_id: str, token: str) -> None:
        import jwt

        if not self._audience:
            raise Refused("a per-job webhook's delivery, but no webhook_public_url is configured")
        if not self._jwks_url:
            raise Refused("no JWKS URL to verify a per-job webhook's JWT with")
        try:
            key = self._jwks().get_signing_key_from_jwt(token).key
            claims = jwt.decode(token, key, algorithms=["RS256"], audience=self._audience, issuer=ISSUER,
                                leeway=TOLERANCE_SECONDS, options={"require": ["exp", "iat", "iss", "aud"]})
        except jwt.PyJWKClientConnectionError as error:
            raise Refused(f"cannot fetch the JWKS: {error}") from None
        except jwt.PyJWTError as error:
            raise Refused(f"JWT not verified: {error}") from None
        if not hmac.compare_digest(str(claims.get("webhook_id", "")), webhook_id):
            raise Refused("the JWT is for another webhook-id")
        digest = base64.urlsafe_b64encode(hashlib.sha256(body).digest()).rstrip(b"=").decode()
        if not hmac.compare_digest(str(claims.get("body_sha256", "")), digest):
            raise Refused("the JWT is for another body")

    def prefetch(self) -> None:
        if self._jwks_url:
            self._jwks().get_jwk_set()

    def _jwks(self) -> Any:
        import jwt

        with self._lock:
            if self._jwks_client is None:
                self._jwks_client = jwt.PyJWKClient(self._jwks_url, cache_keys=True, lifespan=JWKS_CACHE_SECONDS,
                                                    timeout=10)
            return self._jwks_client


def jwks_url_for(settings: Any, provider_base_url: str | None) -> str | None:
    """``webhook_jwks_url``, else the provider's base URL + :data:`JWKS_PATH` (Google's when none is set)."""
    if settings.webhook_jwks_url:
        return settings.webhook_jwks_url
    base = (provider_base_url or "https://generativelanguage.googleapis.com").rstrip("/")
    return base + JWKS_PATH


def remote_name_of(event: dict) -> str | None:
    data = event.get("data") if isinstance(event.get("data"), dict) else {}
    name = data.get("name")
    return name if isinstance(name, str) and name.startswith("batches/") and len(name) < 200 else None


def job_of(event: dict) -> str | None:
    data = event.get("data") if isinstance(event.get("data"), dict) else {}
    metadata = data.get("user_metadata") if isinstance(data.get("user_metadata"), dict) else {}
    job = metadata.get("batchd_job")
    return job if isinstance(job, str) and len(job) < 100 else None
