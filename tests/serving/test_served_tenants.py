"""Many teams on the session cluster: keys, isolation, quotas, fair share, the store-side queue, idempotency,
webhooks and limits before work, on the real local cluster with real Redis.

The session app requires API keys (``tests/serving/conftest.py``): "tests" is every other test's tenant,
team-a and team-b are set against each other here, team-c has a tight rate limit.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import httpx
import psutil
import pytest
from PIL import Image

from serving.proto import video_pb2
from serving.tenancy.webhooks import verify_webhook
from tests.conftest import png_with_claimed_size
from tests.serving.conftest import (
    CALLBACK_PREFIX_PORT,
    KEYS,
    SLOW,
    WEBHOOK_SECRET,
    bearer,
    grpc_stub,
    wait_terminal,
    wait_until,
)

pytestmark = pytest.mark.cluster  # starts a Ray cluster: not in `make check`

SMALL = {"seconds": 1, "size": "64x64"}


@pytest.fixture(scope="module")
def clients(served):
    """HTTP clients and gRPC stubs per tenant (and one without a key)."""
    http = {name: httpx.Client(base_url=served["http"], headers=bearer(name), timeout=60) for name in KEYS}
    http[None] = httpx.Client(base_url=served["http"], timeout=60)
    stubs, channels = {}, []
    for name in [*KEYS, None]:
        stubs[name], channel = grpc_stub(served["grpc"], name)
        channels.append(channel)
    yield http, stubs
    for client in http.values():
        client.close()
    for channel in channels:
        channel.close()


def _create(http, prompt: str, **extra) -> dict:
    response = http.post("/v1/videos", json={"prompt": prompt, **SMALL, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def _cancel_all(http, ids) -> None:
    for job_id in ids:
        http.post(f"/v1/videos/{job_id}/cancel")


# ---------------------------------------------------------------------------------------------- keys and isolation


def test_every_route_needs_a_key_and_another_tenants_job_is_not_found(clients):
    http, stubs = clients
    job = _create(http["team-a"], "a lighthouse at dusk")
    job_id = job["id"]

    routes = [("get", f"/v1/videos/{job_id}"), ("get", f"/v1/videos/{job_id}/content"),
              ("post", f"/v1/videos/{job_id}/cancel"), ("delete", f"/v1/videos/{job_id}")]
    for method, path in routes:
        assert getattr(http[None], method)(path).status_code == 401
        wrong = httpx.request(method, http[None].base_url.join(path), headers={"Authorization": "Bearer rs_revoked"})
        assert wrong.status_code == 401 and "rs_revoked" not in wrong.text
        other = getattr(http["team-b"], method)(path)
        assert other.status_code == 404, (method, path, other.text)
        assert other.json()["error"]["message"] == f"no video with id '{job_id}'"  # as an unknown id
    assert http[None].post("/v1/videos", json={"prompt": "x"}).status_code == 401
    assert http[None].get("/v1/videos").headers["www-authenticate"] == "Bearer"
    assert http[None].get("/healthz").json() == {"status": "ok"}  # open, and says nothing about jobs
    listed_b = [v["id"] for v in http["team-b"].get("/v1/videos", params={"limit": 100}).json()["data"]]
    listed_a = [v["id"] for v in http["team-a"].get("/v1/videos", params={"limit": 100}).json()["data"]]
    assert job_id in listed_a and job_id not in listed_b

    calls = [
        lambda stub: stub.GetVideo(video_pb2.GetVideoRequest(id=job_id)),
        lambda stub: stub.CancelVideo(video_pb2.CancelVideoRequest(id=job_id)),
        lambda stub: list(stub.WatchVideo(video_pb2.WatchVideoRequest(id=job_id))),
        lambda stub: list(stub.DownloadVideo(video_pb2.DownloadVideoRequest(id=job_id))),
        lambda stub: stub.ListVideos(video_pb2.ListVideosRequest()),
        lambda stub: stub.CreateVideo(video_pb2.CreateVideoRequest(prompt="x")),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as missing:
            call(stubs[None])
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for call in calls[:4]:
        with pytest.raises(grpc.RpcError) as foreign:
            call(stubs["team-b"])
        assert foreign.value.code() == grpc.StatusCode.NOT_FOUND
    assert job_id not in [v.id for v in stubs["team-b"].ListVideos(video_pb2.ListVideosRequest(limit=100)).videos]
    assert stubs["team-a"].GetVideo(video_pb2.GetVideoRequest(id=job_id)).priority == "normal"
    _cancel_all(http["team-a"], [job_id])


# ---------------------------------------------------------------------------------------------- fair share and the queue


def test_fair_share_the_store_side_queue_and_heartbeats(clients, job_store, figures):
    """team-a submits 8 jobs, then team-b 1: of the jobs that start after b's was created, b's is among the first
    two (two orchestrators may each claim from a look at the queue taken just before). Meanwhile the waiting jobs
    stay queued in the store, each with its own queue position, and a waiting job's stream hears a heartbeat."""
    http, stubs = clients
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:  # a's 8 jobs at once, then b's
        a_ids = [job["id"] for job in pool.map(lambda i: _create(http["team-a"], f"a fox runs {i} {SLOW}"), range(8))]
    b_id = _create(http["team-b"], f"a heron stands {SLOW}")["id"]
    try:
        _check_fair_share(stubs, job_store, figures, a_ids, b_id)
    finally:
        _cancel_all(http["team-a"], a_ids)
        _cancel_all(http["team-b"], [b_id])
        for job_id in a_ids + [b_id]:
            wait_terminal(stubs["team-a" if job_id != b_id else "team-b"], job_id, timeout_s=120)


def _check_fair_share(stubs, job_store, figures, a_ids: list[str], b_id: str) -> None:
    heartbeats = []
    last = a_ids[-1]

    def watch() -> None:
        for event in stubs["team-a"].WatchVideo(video_pb2.WatchVideoRequest(id=last)):
            if event.heartbeat:
                heartbeats.append(event.video.queue_position)
            if event.video.status != video_pb2.QUEUED:
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    time.sleep(1.0)
    queued = [stubs["team-a"].GetVideo(video_pb2.GetVideoRequest(id=i)) for i in a_ids]
    waiting = sorted((v for v in queued if v.status == video_pb2.QUEUED), key=lambda v: (v.created_at, v.id))
    assert len(waiting) >= 4  # two slots: most of the burst waits in the store, not in a stage's queue
    positions = [v.queue_position for v in waiting]
    assert positions == sorted(positions) and len(set(positions)) == len(positions) and positions[0] >= 1
    assert all(v.estimated_start_at > 0 for v in waiting)
    assert all(job_store.get(v.id).attempts == 0 for v in waiting)  # nobody claimed them

    b_created = job_store.get(b_id).created_at

    def started_at(job_id: str) -> float | None:
        return job_store.get(job_id).started_at

    def after_b(job_id: str) -> bool:
        started = started_at(job_id)
        return started is not None and started >= b_created

    wait_until(lambda: after_b(b_id) and sum(map(after_b, a_ids)) >= 2, timeout_s=240,
               what="b's job and two of a's starting after it was created")
    starts = sorted((started_at(i), "b" if i == b_id else "a") for i in a_ids + [b_id] if after_b(i))
    order = [tenant for _, tenant in starts]
    figures["fair_share_start_order_after_b"] = "".join(order)
    assert order.index("b") < 2, order
    watcher.join(30)
    assert heartbeats, "a job that waited over 10 s heard no heartbeat"


# ---------------------------------------------------------------------------------------------- quotas


def test_quotas_answer_429_with_retry_after(clients):
    """team-b runs 1 job at most and queues 1 more; team-c creates 2 jobs a minute."""
    http, stubs = clients
    created = {"team-b": [], "team-c": []}
    try:
        for i in range(2):
            created["team-b"].append(_create(http["team-b"], f"rain {i} {SLOW}")["id"])
        full = http["team-b"].post("/v1/videos", json={"prompt": "one more", **SMALL})
        assert full.status_code == 429 and full.json()["error"]["code"] == "tenant_queue_full", full.text
        assert int(full.headers["retry-after"]) >= 1
        for i in range(2):
            created["team-c"].append(_create(http["team-c"], f"snow {i}")["id"])
        over_rate = http["team-c"].post("/v1/videos", json={"prompt": "snow 2", **SMALL})
        assert over_rate.status_code == 429 and over_rate.json()["error"]["code"] == "tenant_rate"
        assert 1 <= int(over_rate.headers["retry-after"]) <= 60
        with pytest.raises(grpc.RpcError) as grpc_refused:
            stubs["team-c"].CreateVideo(video_pb2.CreateVideoRequest(prompt="snow", size="64x64", seconds=1))
        assert grpc_refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry after" in grpc_refused.value.details()
    finally:
        for name, ids in created.items():
            _cancel_all(http[name], ids)


def test_priority_callback_and_idempotency_fields_are_checked_before_any_work(clients):
    http, _ = clients
    above = http["tests"].post("/v1/videos", json={"prompt": "x", "priority": "high", **SMALL})
    assert above.status_code == 400 and above.json()["error"]["param"] == "priority"
    outside = http["tests"].post("/v1/videos", json={"prompt": "x", "callback_url": "https://example.org/x", **SMALL})
    assert outside.status_code == 400 and outside.json()["error"]["param"] == "callback_url"
    headers = {"Idempotency-Key": "key-reused-with-another-body"}
    first = http["tests"].post("/v1/videos", json={"prompt": "a kite", **SMALL}, headers=headers)
    assert first.status_code == 200
    again = http["tests"].post("/v1/videos", json={"prompt": "a kite", **SMALL}, headers=headers)
    assert again.json()["id"] == first.json()["id"]
    other = http["tests"].post("/v1/videos", json={"prompt": "a different kite", **SMALL}, headers=headers)
    assert other.status_code == 409 and other.json()["error"]["param"] == "Idempotency-Key"
    _cancel_all(http["tests"], [first.json()["id"]])


def test_an_sdk_retry_after_a_dropped_response_returns_the_same_job(served, clients):
    """A proxy forwards the first create but drops its answer; the openai SDK retries with the same key."""
    from openai import OpenAI  # noqa: PLC0415 - keeps collection of `make check` fast

    http, _ = clients
    proxy = _DroppingProxy(served["http"].rsplit(":", 1)[1])
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{proxy.port}/v1", api_key=KEYS["team-a"], max_retries=2,
                        timeout=30)
        video = client.videos.create(prompt="a paper boat", seconds="1", size="64x64",
                                     extra_headers={"Idempotency-Key": "paper-boat-1"})
    finally:
        proxy.close()
    assert proxy.dropped == 1 and proxy.forwarded >= 2
    mine = [v for v in http["team-a"].get("/v1/videos", params={"limit": 100}).json()["data"]
            if v["prompt"] == "a paper boat"]
    assert [v["id"] for v in mine] == [video.id]  # one job, though the request reached the server twice
    _cancel_all(http["team-a"], [video.id])


# ---------------------------------------------------------------------------------------------- webhooks


def test_a_callback_reaches_a_receiver_that_fails_twice_signed(clients):
    http, stubs = clients
    received = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["content-length"]))
            received.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(500 if len(received) <= 2 else 200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", CALLBACK_PREFIX_PORT), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        job = _create(http["tests"], "a bell rings",
                      callback_url=f"http://127.0.0.1:{CALLBACK_PREFIX_PORT}/hooks/done")
        wait_terminal(stubs["tests"], job["id"])
        wait_until(lambda: len(received) >= 3, timeout_s=60, what="the third delivery")
    finally:
        server.shutdown()
    headers, body = received[-1]
    verify_webhook(WEBHOOK_SECRET, headers, body)
    payload = json.loads(body)
    assert payload["id"] == job["id"] and payload["status"] == "completed"
    assert len({h["webhook-id"] for h, _ in received}) == 1
    wait_until(lambda: (http["tests"].get(f"/v1/videos/{job['id']}").status_code == 200), timeout_s=10)


# ---------------------------------------------------------------------------------------------- limits before work


def test_limits_refuse_before_any_work(served, clients, figures):
    http, stubs = clients
    started = time.perf_counter()
    huge = http["tests"].post("/v1/videos", content=b"{" + b" " * (20 * 1024**2) + b"}",
                              headers={"content-type": "application/json"})
    figures["oversized_body_rejected_s"] = round(time.perf_counter() - started, 3)
    assert huge.status_code == 413 and huge.json()["error"]["param"] == "body"
    with pytest.raises(grpc.RpcError) as big:
        stubs["tests"].CreateVideo(video_pb2.CreateVideoRequest(prompt="x", image=b"\xff" * (20 * 1024**2)))
    assert big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    tiff = io.BytesIO()
    Image.new("RGB", (64, 64)).save(tiff, format="TIFF")
    for data, needle in ((tiff.getvalue(), "TIFF"), (png_with_claimed_size(50_000, 50_000), "pixels")):
        refused = http["tests"].post("/v1/videos", data={"prompt": "x", **SMALL},
                                     files={"input_reference": ("p", data, "application/octet-stream")})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "input_reference", refused.text
        assert needle in refused.json()["error"]["message"]
    assert http["tests"].get("/healthz").status_code == 200  # the replicas stay healthy


class _DroppingProxy:
    """Forwards HTTP connections to the ingress; the first answer to a POST is dropped (the client sees a reset)."""

    def __init__(self, target_port: str):
        self.target = ("127.0.0.1", int(target_port))
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.forwarded = self.dropped = 0
        self._open = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self._open:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client, socket.create_connection(self.target) as upstream:
            request = _read_http_message(client)
            if not request:
                return
            self.forwarded += 1
            upstream.sendall(request)
            answer = _read_http_message(upstream)
            if request.startswith(b"POST") and self.dropped == 0:
                self.dropped += 1
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                return  # closed with a reset: the answer never arrives
            client.sendall(answer)

    def close(self) -> None:
        self._open = False
        self.server.close()


def _read_http_message(sock: socket.socket) -> bytes:
    """One HTTP/1.1 message (headers and a Content-Length body) read whole."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def test_a_burst_of_40_photo_uploads_stays_within_the_decode_budget(served, clients, figures):
    """40 uploads of a 12-megapixel photo at once: decodes wait for room in the ingress's memory budget
    (ingress.decode_memory_mb), so the replica's memory grows by about the budget, not 40 decodes."""
    http, _ = clients
    ingress = next(p for p in psutil.process_iter(["cmdline"])
                   if "ServeReplica:reelserve:ingress" in " ".join(p.info["cmdline"] or []))
    photo = io.BytesIO()
    Image.new("RGB", (4000, 3000), (90, 120, 150)).save(photo, format="JPEG", quality=80)
    data = photo.getvalue()
    baseline = ingress.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, ingress.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    def upload(i: int):
        return http["tests"].post("/v1/videos", data={"prompt": f"a burst photo {i}", **SMALL},
                                  files={"input_reference": ("p.jpg", data, "image/jpeg")})

    with concurrent.futures.ThreadPoolExecutor(max_workers=40) as pool:
        responses = list(pool.map(upload, range(40)))
    done.set()
    sampler.join(5)
    growth_mb = (peak - baseline) / 1e6
    figures["ingress_peak_growth_mb_40_uploads_12mp"] = round(growth_mb)
    assert all(r.status_code in (200, 429) for r in responses), [r.text for r in responses if r.status_code >= 300][:2]
    budget_mb = served["config"]["ingress"].get("decode_memory_mb", 1024) * 1.048576
    assert growth_mb < budget_mb + 400, f"the ingress grew {growth_mb:.0f} MB for a {budget_mb:.0f} MB budget"
    _cancel_all(http["tests"], [r.json()["id"] for r in responses if r.status_code == 200])
