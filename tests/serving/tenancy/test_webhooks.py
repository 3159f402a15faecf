"""Webhooks: Standard Webhooks signatures, callback URL allow-lists, and delivery to a real local receiver."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import standardwebhooks

from cluster.auth_config import CallbacksConfig
from serving.errors import InvalidRequest
from serving.tenancy import webhooks as module
from serving.tenancy.webhooks import (
    WebhookSigner,
    WebhookVerificationError,
    check_callback_url,
    deliver_webhook,
    new_signing_secret,
    verify_webhook,
    webhook_message_id,
)

SECRET = new_signing_secret()
VIDEO = {"id": "video_abc", "object": "video", "status": "completed", "progress": 100}


class Receiver:
    """A threaded HTTP server on 127.0.0.1 answering each path with a scripted list of statuses (then 200)."""

    def __init__(self):
        self.script: dict[str, list[tuple[int, dict]]] = {}
        self.received: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.received.append({"path": self.path, "body": body, "at": time.monotonic(),
                                          "headers": {k.lower(): v for k, v in self.headers.items()}})
                scripted = receiver.script.get(self.path)
                status, headers = scripted.pop(0) if scripted else (200, {})
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def at(self, path: str) -> list[dict]:
        return [r for r in self.received if r["path"] == path]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver():
    server = Receiver()
    yield server
    server.close()


def _config(receiver: Receiver, **overrides) -> CallbacksConfig:
    settings = {"allowed_url_prefixes": [receiver.base + "/hooks/"], "refuse_private_addresses": False,
                "backoff_base_s": 0.05, "backoff_cap_s": 0.2, "timeout_s": 2, "max_attempts": 5}
    return CallbacksConfig(**{**settings, **overrides})


# ------------------------------------------------------------------ signing


def test_signatures_follow_the_standard_and_verify_with_its_reference_library():
    signer = WebhookSigner([SECRET])
    body = json.dumps(VIDEO).encode()
    headers = signer.headers("msg_1", body)
    assert headers["webhook-id"] == "msg_1" and abs(int(headers["webhook-timestamp"]) - time.time()) < 5
    assert headers["webhook-signature"].startswith("v1,") and " " not in headers["webhook-signature"]
    verify_webhook(SECRET, headers, body)
    assert standardwebhooks.Webhook(SECRET).verify(body, headers) == VIDEO


def test_the_signature_is_hmac_sha256_over_id_timestamp_and_body():
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    expected = base64.b64encode(hmac.new(key, b"msg_1.1700000000.{}", hashlib.sha256).digest()).decode()
    assert WebhookSigner([SECRET]).headers("msg_1", b"{}", timestamp=1700000000)["webhook-signature"] == f"v1,{expected}"


def test_a_rotation_signs_with_both_secrets_and_either_verifies():
    old, new = new_signing_secret(), new_signing_secret()
    headers = WebhookSigner([new, old]).headers("msg_2", b"{}")
    assert len(headers["webhook-signature"].split()) == 2
    verify_webhook(old, headers, b"{}")
    verify_webhook(new, headers, b"{}")


@pytest.mark.parametrize("tamper, message", [
    (lambda h, b: (h, b + b" "), "no matching signature"),
    (lambda h, b: ({**h, "webhook-id": "msg_other"}, b), "no matching signature"),
    (lambda h, b: ({**h, "webhook-timestamp": str(int(time.time()) - 301)}, b), "more than 300 s from now"),
    (lambda h, b: ({**h, "webhook-timestamp": "soon"}, b), "not whole seconds"),
    (lambda h, b: ({k: v for k, v in h.items() if k != "webhook-signature"}, b), "missing webhook-id"),
])
def test_tampered_stale_or_incomplete_callbacks_fail_verification(tamper, message):
    body = b'{"id":"video_abc"}'
    headers, body = tamper(WebhookSigner([SECRET]).headers("msg_3", body), body)
    with pytest.raises(WebhookVerificationError, match=message):
        verify_webhook(SECRET, headers, body)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(new_signing_secret(), WebhookSigner([SECRET]).headers("msg_3", b"{}"), b"{}")


def test_the_secret_comes_from_its_environment_variable_and_is_checked():
    config = CallbacksConfig()
    assert WebhookSigner.from_env(config, {"REELSERVE_WEBHOOK_SECRET": f"{SECRET} {new_signing_secret()}"})
    with pytest.raises(ValueError, match="REELSERVE_WEBHOOK_SECRET: not set; callbacks need a signing secret"):
        WebhookSigner.from_env(config, {})
    with pytest.raises(ValueError, match="REELSERVE_WEBHOOK_SECRET: a webhook signing secret must be whsec_"):
        WebhookSigner.from_env(config, {"REELSERVE_WEBHOOK_SECRET": "whsec_not*base64"})
    with pytest.raises(ValueError, match="at least 16 random bytes"):
        WebhookSigner(["whsec_" + base64.b64encode(b"short").decode()])
    assert webhook_message_id("video_abc", "completed") == "msg_video_abc_completed"


# ------------------------------------------------------------------ URL allow-list

ALLOWED = ["https://hooks.example.com/reelserve/", "http://10.1.2.3:8080/cb"]


@pytest.mark.parametrize("url", [
    "https://hooks.example.com/reelserve/",
    "https://hooks.example.com/reelserve/team-a/done?job=1",
    "https://HOOKS.example.com./reelserve/x",
    "https://hooks.example.com:443/reelserve/x",
    "http://10.1.2.3:8080/cb",
    "http://10.1.2.3:8080/cb/sub",
])
def test_urls_under_an_allowed_prefix_pass(url):
    assert check_callback_url(url, ALLOWED) == url


@pytest.mark.parametrize("url", [
    "https://hooks.example.com.evil.net/reelserve/",      # another host that starts the same
    "https://evil.net/https://hooks.example.com/reelserve/",
    "https://hooks.example.com@evil.net/reelserve/",      # userinfo trick
    "https://user:pw@hooks.example.com/reelserve/",
    "http://hooks.example.com/reelserve/",                # another scheme
    "https://hooks.example.com:8443/reelserve/",          # another port
    "https://hooks.example.com/reelserve-admin/",         # path prefix only at a segment boundary
    "https://hooks.example.com/reelserve/../admin",
    "https://hooks.example.com/reelserve/%2e%2e/admin",
    "https://hooks.example.com/reelserve/a%2Fb",
    "https://hooks.example.com\\@evil.net/reelserve/",
    "http://10.1.2.3:8080/cbx",
    "ftp://hooks.example.com/reelserve/",
    "https://hooks.example.com/reelserve/#frag",
    "https://[::1/reelserve/",
    "https://hooks.example.com:99999/reelserve/",
    "//hooks.example.com/reelserve/",
])
def test_urls_outside_the_prefixes_or_ambiguous_are_refused_naming_the_field(url):
    with pytest.raises(InvalidRequest) as caught:
        check_callback_url(url, ALLOWED)
    assert caught.value.field == "callback_url" and "\n" not in str(caught.value)


def test_no_prefixes_means_callbacks_are_off_and_no_url_is_fine():
    with pytest.raises(InvalidRequest, match="callback_url: callbacks are not enabled on this server"):
        check_callback_url("https://hooks.example.com/x", [])
    assert check_callback_url(None, []) is None


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("127.0.0.1", False), ("10.0.0.1", False),
    ("172.16.5.4", False), ("192.168.1.1", False), ("169.254.169.254", False), ("100.64.0.1", False),
    ("0.0.0.0", False), ("::1", False), ("fe80::1%eth0", False), ("fd00::1", False), ("::ffff:127.0.0.1", False),
    ("224.0.0.1", False),
    # IPv4 inside IPv6: judged by the IPv4 address reached (NAT64, 6to4, IPv4-compatible)
    ("64:ff9b::a9fe:a9fe", False), ("64:ff9b::808:808", True), ("2002:a9fe:a9fe::", False), ("::127.0.0.1", False),
])
def test_only_public_addresses_count_as_public(address, public):
    assert module.is_public_address(address) is public


def test_the_connection_is_pinned_to_the_checked_address_keeping_host_and_tls_name():
    url, headers, extensions = module.pinned_url("https://hooks.example.com/reelserve/x?a=1", "93.184.216.34")
    assert (url, headers, extensions) == ("https://93.184.216.34/reelserve/x?a=1", {"host": "hooks.example.com"},
                                          {"sni_hostname": "hooks.example.com"})
    url, headers, extensions = module.pinned_url("http://hooks.example.com:8080/x", "2606:2800:220:1::1")
    assert (url, headers, extensions) == ("http://[2606:2800:220:1::1]:8080/x", {"host": "hooks.example.com:8080"}, {})


# ------------------------------------------------------------------ delivery to a real receiver


def test_a_receiver_failing_twice_then_accepting_gets_one_signed_message_three_times(receiver):
    receiver.script["/hooks/flaky"] = [(500, {}), (503, {}), (200, {})]
    outcome = asyncio.run(deliver_webhook(receiver.base + "/hooks/flaky", VIDEO, signer=WebhookSigner([SECRET]),
                                          config=_config(receiver), message_id="msg_video_abc_completed"))
    assert (outcome.delivered, outcome.attempts, outcome.last_status, outcome.last_error) == (True, 3, 200, None)
    calls = receiver.at("/hooks/flaky")
    assert len(calls) == 3 and {c["headers"]["webhook-id"] for c in calls} == {"msg_video_abc_completed"}
    for call in calls:
        verify_webhook(SECRET, call["headers"], call["body"])
        assert json.loads(call["body"]) == VIDEO and call["headers"]["content-type"] == "application/json"
    waits = [b["at"] - a["at"] for a, b in itertools.pairwise(calls)]
    assert 0.025 <= waits[0] < 0.5 and 0.05 <= waits[1] < 0.5  # backoff: 50-100 % of 0.05 s, then of 0.1 s
    assert outcome.to_dict()["message_id"] == "msg_video_abc_completed"


def test_a_receiver_that_is_down_never_raises_and_bounds_attempts(receiver):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = CallbacksConfig(allowed_url_prefixes=[dead + "/"], refuse_private_addresses=False, max_attempts=4,
                             backoff_base_s=0.01, backoff_cap_s=0.02)
    outcome = asyncio.run(deliver_webhook(dead + "/x", VIDEO, signer=WebhookSigner([SECRET]), config=config,
                                          message_id="m"))
    assert (outcome.delivered, outcome.attempts, outcome.last_status, outcome.last_error) == (
        False, 4, None, "ConnectError")


def test_total_time_bounds_delivery_whatever_attempts_remain(receiver):
    receiver.script["/hooks/always-500"] = [(500, {})] * 50
    config = _config(receiver, max_attempts=50, backoff_base_s=0.1, backoff_cap_s=0.1, max_elapsed_s=0.35)
    outcome = asyncio.run(deliver_webhook(receiver.base + "/hooks/always-500", VIDEO, signer=WebhookSigner([SECRET]),
                                          config=config, message_id="m", jitter=lambda: 1.0))
    assert not outcome.delivered and outcome.last_status == 500 and outcome.last_error == "HTTP 500"
    assert 2 <= outcome.attempts <= 4 and outcome.elapsed_s < 1.5  # unbounded, 50 attempts would take over 5 s


@pytest.mark.parametrize("status, error", [(410, "the receiver answered 410 Gone"),
                                           (302, "redirects are not followed")])
def test_gone_and_redirects_stop_at_once(receiver, status, error):
    path = f"/hooks/stop-{status}"
    receiver.script[path] = [(status, {"location": "http://169.254.169.254/"})]
    outcome = asyncio.run(deliver_webhook(receiver.base + path, VIDEO, signer=WebhookSigner([SECRET]),
                                          config=_config(receiver), message_id="m"))
    assert (outcome.delivered, outcome.attempts, outcome.last_status, outcome.last_error) == (False, 1, status, error)


def test_retry_after_from_the_receiver_is_honoured_within_the_cap(receiver):
    receiver.script["/hooks/busy"] = [(429, {"retry-after": "0.15"}), (200, {})]
    waited = []

    async def sleep(seconds):
        waited.append(seconds)

    outcome = asyncio.run(deliver_webhook(receiver.base + "/hooks/busy", VIDEO, signer=WebhookSigner([SECRET]),
                                          config=_config(receiver, backoff_cap_s=10), message_id="m", sleep=sleep))
    assert outcome.delivered and outcome.attempts == 2 and waited == [0.15]


@pytest.mark.parametrize("url, error", [
    ("http://localhost:9/hooks/x", "callback_url resolves to a non-public address"),
    ("http://127.0.0.1:9/hooks/x", "callback_url resolves to a non-public address"),
    ("http://evil.example/hooks/x", "callback_url is not under an allowed prefix"),
])
def test_private_addresses_and_urls_off_the_list_are_refused_without_a_request(url, error):
    config = CallbacksConfig(allowed_url_prefixes=["http://localhost:9/hooks/", "http://127.0.0.1:9/hooks/"])
    outcome = asyncio.run(deliver_webhook(url, VIDEO, signer=WebhookSigner([SECRET]), config=config, message_id="m"))
    assert (outcome.delivered, outcome.attempts, outcome.last_status) == (False, 0, None)
    assert outcome.last_error.startswith("refused before sending: " + error)


def test_a_callback_url_that_is_not_a_string_is_a_400_naming_the_field():
    for value in ({}, [], 5, True):
        with pytest.raises(InvalidRequest) as refused:
            check_callback_url(value, ["https://hooks.example.com/"])
        assert refused.value.field == "callback_url"
