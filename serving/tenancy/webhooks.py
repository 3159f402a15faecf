"""Job callbacks: Standard Webhooks signing, callback URL checks, and delivery that never fails a job.

**Signing** (https://www.standardwebhooks.com): every POST carries

- ``webhook-id``: the message id, the same on every retry (receivers deduplicate on it);
- ``webhook-timestamp``: seconds since the epoch, of this attempt;
- ``webhook-signature``: ``v1,<base64 HMAC-SHA256(secret, f"{id}.{timestamp}.{body}")>``, one
  per signing secret, space-separated (two during a secret rotation).

The secret is ``whsec_`` + base64 of random bytes; the HMAC key is the decoded bytes.

**URL checks**: a ``callback_url`` must match one of ``callbacks.allowed_url_prefixes``
on the parsed URL (same scheme, host and port; the path within the prefix's path), with
no user part, no ``.``/``..`` segments and nothing a parser could read two ways. At
delivery the host is resolved and, unless turned off, refused if any of its addresses
is not public; the connection then goes to the address that was checked (TLS still
checks the certificate against the host name), so DNS cannot change between check and use.

**Delivery** (``deliver_webhook``): bounded attempts and total time, exponential backoff
with jitter; 2xx is delivered, a redirect or 410 Gone stops at once, anything else is
retried. It never raises for anything a receiver does: the outcome says what happened.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import os
import random
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast
from urllib.parse import unquote, urlsplit, urlunsplit

from cluster.auth_config import CallbacksConfig
from serving.errors import InvalidRequest

__all__ = [
    "SECRET_PREFIX",
    "new_signing_secret",
    "WebhookSigner",
    "WebhookVerificationError",
    "verify_webhook",
    "webhook_message_id",
    "check_callback_url",
    "check_url_prefix",
    "is_public_address",
    "pinned_url",
    "resolve_addresses",
    "DeliveryOutcome",
    "deliver_webhook",
]

SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE_S = 300  # receivers refuse timestamps further than this from their clock (replay window)


def new_signing_secret() -> str:
    """A new signing secret: ``whsec_`` + base64 of 32 random bytes (give it to the receiver, and to reelserve's Secret)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def _secret_bytes(secret: str) -> bytes:
    body = secret.strip().removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except ValueError:
        raise ValueError("a webhook signing secret must be whsec_ followed by base64") from None
    if len(key) < 16:
        raise ValueError("a webhook signing secret must hold at least 16 random bytes")
    return key


def _sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")


class WebhookSigner:
    """Signs callback bodies with one or more secrets (the first is the current one; more during a rotation)."""

    def __init__(self, signing_secrets: Sequence[str]):
        if not signing_secrets:
            raise ValueError("at least one webhook signing secret is needed")
        self._keys = [_secret_bytes(s) for s in signing_secrets]

    @classmethod
    def from_env(cls, config: CallbacksConfig, environ: Mapping[str, str] | None = None) -> WebhookSigner:
        """The secret(s) from ``config.signing_secret_env`` (space-separated); ``ValueError`` naming the variable."""
        name = config.signing_secret_env
        value = (os.environ if environ is None else environ).get(name, "")
        if not value.strip():
            raise ValueError(f"{name}: not set; callbacks need a signing secret (whsec_..., e.g. from a Secret)")
        try:
            return cls(value.split())
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None

    def headers(self, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        """The three Standard Webhooks headers for ``body`` (timestamp: now)."""
        timestamp = int(time.time()) if timestamp is None else int(timestamp)
        signature = " ".join(_sign(key, msg_id, timestamp, body) for key in self._keys)
        return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}


class WebhookVerificationError(Exception):
    """Missing headers, a timestamp outside the tolerance, or no matching signature."""


def verify_webhook(secret: str, headers: Mapping[str, str], body: bytes, *, tolerance_s: float = DEFAULT_TOLERANCE_S,
                   now: float | None = None) -> None:
    """Check a callback as a receiver does; raise ``WebhookVerificationError`` when it is not genuine.

    In a receiver (any framework; the body must be the raw bytes, before JSON parsing)::

        from serving.tenancy.webhooks import WebhookVerificationError, verify_webhook

        def on_callback(request):
            try:
                verify_webhook(os.environ["REELSERVE_WEBHOOK_SECRET"], request.headers, request.body)
            except WebhookVerificationError:
                return 400
            video = json.loads(request.body)   # then deduplicate on request.headers["webhook-id"]
            ...

    Any Standard Webhooks library verifies them too (``standardwebhooks.Webhook(secret).verify(body, headers)``).
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id, stamp, signatures = (lowered.get(h) for h in ("webhook-id", "webhook-timestamp", "webhook-signature"))
    if not (msg_id and stamp and signatures):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not whole seconds") from None
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        raise WebhookVerificationError(f"webhook-timestamp is more than {tolerance_s:g} s from now")
    expected = _sign(_secret_bytes(secret), msg_id, timestamp, body).encode("ascii")
    matched = False
    for candidate in signatures.split():
        matched |= hmac.compare_digest(candidate.encode("ascii", "replace"), expected)
    if not matched:
        raise WebhookVerificationError("no matching signature")


def webhook_message_id(job_id: str, status: str) -> str:
    """One id per (job, terminal state): the same on every retry and after a runner takeover."""
    return f"msg_{job_id}_{status}"


# ------------------------------------------------------------------ URL checks


def check_callback_url(url: str | None, allowed_prefixes: Sequence[str], field: str = "callback_url") -> str | None:
    """The URL if allowed (None when absent); ``InvalidRequest`` naming ``field`` and what is allowed."""
    if url is None or url == "":
        return None
    if not isinstance(url, str):
        raise InvalidRequest(field, "must be a URL (a string)")
    if not allowed_prefixes:
        raise InvalidRequest(field, "callbacks are not enabled on this server (callbacks.allowed_url_prefixes is empty)")
    if len(url) > 2048 or not url.isascii() or not url.isprintable() or " " in url or "\\" in url:
        raise InvalidRequest(field, "must be an absolute http(s) URL of printable ASCII, at most 2048 characters")
    target = _parse(url)
    if target is None:
        raise InvalidRequest(field, "must be an absolute http(s) URL with a host, no user part and no '.' or '..' segments")
    check_url_prefix(url, allowed_prefixes, field)
    return url


def check_url_prefix(url: str, allowed_prefixes: Sequence[str], field: str) -> None:
    """``InvalidRequest`` naming ``field`` unless ``url`` lies under one of ``allowed_prefixes`` (same scheme, host
    and port; the path within the prefix's path; no user part, no dot segments)."""
    target = _parse(url)
    if target is None:
        raise InvalidRequest(field, "must be an absolute http(s) URL with a host, no user part and no '.' or '..' segments")
    if not any(_within(target, _parse(prefix)) for prefix in allowed_prefixes):
        raise InvalidRequest(field, f"is not under an allowed prefix; allowed: {', '.join(allowed_prefixes)}")


@dataclass(frozen=True)
class _Url:
    scheme: str
    host: str
    port: int
    path: str


def _parse(url: str) -> _Url | None:
    try:
        parts = urlsplit(url)
        port = parts.port or {"https": 443, "http": 80}.get(parts.scheme)
    except ValueError:  # a port that is not a number, an unbalanced IPv6 bracket
        return None
    if parts.scheme not in ("https", "http") or not parts.hostname or "@" in parts.netloc or parts.fragment:
        return None
    path = parts.path or "/"
    if any(unquote(segment) in (".", "..") for segment in path.split("/")) or "%2f" in path.lower():
        return None
    return _Url(parts.scheme, parts.hostname.rstrip(".").lower(), cast(int, port), path)  # the scheme gave one


def _within(target: _Url, prefix: _Url | None) -> bool:
    if prefix is None or (target.scheme, target.host, target.port) != (prefix.scheme, prefix.host, prefix.port):
        return False
    base = prefix.path if prefix.path.endswith("/") else prefix.path + "/"
    return target.path == prefix.path or target.path.startswith(base)


_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # the well-known NAT64 prefix: its last 32 bits are an IPv4 address
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated IPv4-compatible addresses (::127.0.0.1)


def is_public_address(address: str) -> bool:
    """Whether ``address`` is a global unicast address, IPv4 addresses carried inside IPv6 (mapped, 6to4, NAT64,
    IPv4-compatible) judged as the IPv4 address they reach."""
    ip = ipaddress.ip_address(address.split("%")[0])  # drop an IPv6 zone
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.sixtofour is not None:
            ip = ip.sixtofour
        elif ip in _NAT64 or ip in _IPV4_COMPATIBLE:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.is_global and not ip.is_multicast


async def resolve_addresses(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def pinned_url(url: str, address: str) -> tuple[str, dict[str, str], dict[str, Any]]:
    """The URL aimed at ``address``, with the Host header and TLS server name of the original host."""
    parts = urlsplit(url)
    host_in_url = f"[{address}]" if ":" in address else address
    netloc = host_in_url + (f":{parts.port}" if parts.port else "")
    host_header = parts.netloc.rsplit("@", 1)[-1]
    extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
    return urlunsplit(parts._replace(netloc=netloc)), {"host": host_header}, extensions


# ------------------------------------------------------------------ delivery


@dataclass(frozen=True)
class DeliveryOutcome:
    """What happened to one callback: for the job record (``asdict``-able)."""

    message_id: str
    delivered: bool
    attempts: int
    last_status: int | None  # the last HTTP status received, if any
    last_error: str | None  # why the last attempt failed (no receiver text, no secrets)
    elapsed_s: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Attempt:
    status: int | None = None
    error: str | None = None
    final: bool = False  # no retry can change the answer
    retry_after_s: float | None = None
    sent: bool = True  # False: refused before any request went out (not counted as an attempt)

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


async def deliver_webhook(
    url: str,
    payload: Mapping[str, Any] | bytes,
    *,
    signer: WebhookSigner,
    config: CallbacksConfig,
    message_id: str,
    client=None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    jitter: Callable[[], float] = random.random,
    clock: Callable[[], float] = time.monotonic,
) -> DeliveryOutcome:
    """POST ``payload`` (the video object, or body bytes) to ``url`` until it is accepted or the bounds run out.

    Never raises for a receiver's behaviour (down, slow, erroring, redirecting); only
    cancellation propagates. No attempt starts after ``max_elapsed_s``, so the whole takes
    at most ``max_elapsed_s + timeout_s``. ``client`` may be a shared ``httpx.AsyncClient`` (it must
    not follow redirects); otherwise one is made for this delivery.
    """
    import httpx  # noqa: PLC0415 - httpx is not a declared dependency; only this client needs it

    body = payload if isinstance(payload, bytes) else json.dumps(payload, separators=(",", ":")).encode()
    started, attempts = clock(), 0
    own_client = client is None
    if own_client:
        client = httpx.AsyncClient(follow_redirects=False, trust_env=False)
    try:
        while True:
            last = await _attempt(client, url, body, signer, config, message_id, timeout_s=config.timeout_s)
            attempts += last.sent
            if last.delivered or last.final or attempts >= config.max_attempts:
                break
            delay = _backoff(attempts, config, jitter)
            if last.retry_after_s is not None:
                delay = max(delay, min(last.retry_after_s, config.backoff_cap_s))
            if clock() - started + delay >= config.max_elapsed_s:
                break
            await sleep(delay)
    finally:
        if own_client:
            await client.aclose()
    return DeliveryOutcome(message_id, last.delivered, attempts, last.status, last.error, round(clock() - started, 3))


def _backoff(attempts: int, config: CallbacksConfig, jitter: Callable[[], float]) -> float:
    """Doubling from the base, capped; each wait is 50-100 % of that (receivers coming back are not hit at once)."""
    ceiling = min(config.backoff_cap_s, config.backoff_base_s * 2 ** (attempts - 1))
    return ceiling * (0.5 + 0.5 * jitter())


async def _attempt(client, url: str, body: bytes, signer: WebhookSigner, config: CallbacksConfig, message_id: str,
                   timeout_s: float) -> _Attempt:
    try:
        if check_callback_url(url, config.allowed_url_prefixes) is None:
            return _Attempt(error="refused before sending: no callback_url", final=True, sent=False)
    except InvalidRequest as error:
        return _Attempt(error=f"refused before sending: callback_url {error.message}", final=True, sent=False)
    try:
        headers: dict = {}
        extensions: dict = {}
        target = url
        if config.refuse_private_addresses:
            parts = urlsplit(url)
            addresses = await resolve_addresses(cast(str, parts.hostname), parts.port or (443 if parts.scheme == "https" else 80))
            if not addresses or not all(is_public_address(a) for a in addresses):
                return _Attempt(error="refused before sending: callback_url resolves to a non-public address",
                                final=True, sent=False)
            target, headers, extensions = pinned_url(url, addresses[0])
        headers.update(signer.headers(message_id, body))
        headers["content-type"] = "application/json"
        headers["user-agent"] = "reelserve-webhooks/1"
        async with client.stream("POST", target, content=body, headers=headers, extensions=extensions,
                                 timeout=max(0.1, timeout_s)) as response:
            status = response.status_code  # the body is never read: a receiver cannot make us hold anything
    except asyncio.CancelledError:
        raise
    except Exception as error:  # noqa: BLE001 -- DNS, connection, TLS, timeout: all retried
        return _Attempt(error=type(error).__name__)
    if 200 <= status < 300:
        return _Attempt(status=status)
    if 300 <= status < 400:
        return _Attempt(status=status, error="redirects are not followed", final=True)
    if status == 410:
        return _Attempt(status=status, error="the receiver answered 410 Gone", final=True)
    return _Attempt(status=status, error=f"HTTP {status}", retry_after_s=_retry_after(response.headers.get("retry-after")))


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
