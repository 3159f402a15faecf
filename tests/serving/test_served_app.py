"""The real app on a local Ray cluster: gRPC and the official openai SDK against it.

The cluster is the session's (``tests/serving/conftest.py``): Redis job store,
two orchestrator replicas, two diffusion replicas, a real vLLM rewriter, and
every input, MP4, stage output and checkpoint in a real S3 API server.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import time
from urllib.parse import quote

import grpc
import httpx
import pytest
import redis

from serving.jobs.record import JobRecord, new_job_id
from serving.jobs.redis_store import RedisJobStore
from serving.proto import video_pb2
from serving.protocol import JobStatus
from tests.serving.conftest import (
    SLOW,
    STEPS,
    app_of,
    bearer,
    bucket_keys,
    stage_stats,
    wait_terminal,
    wait_until,
)

pytestmark = pytest.mark.cluster  # starts a Ray cluster: not in `make check`

# Every call of these tests is the tenant "tests"'s (the session app requires API keys).
_http = httpx.Client(headers=bearer(), timeout=60)

SMALL = dict(seconds=1.0, size="64x64")


def _wait_terminal_grpc(stub, job_id: str, timeout_s: float = 180) -> video_pb2.Video:
    return wait_terminal(stub, job_id, timeout_s)


# ---------------------------------------------------------------------------- jobs that complete


def test_grpc_job_streams_progress_to_100_and_downloads_an_mp4(served, stub, photos, probe_mp4, tmp_path):
    created = stub.CreateVideo(video_pb2.CreateVideoRequest(prompt="a cat blinks", image=photos.jpeg, seed=3, **SMALL))
    assert created.id.startswith("video_") and created.status == video_pb2.QUEUED
    assert (created.size, created.seconds, created.seed) == ("64x64", 1.0, 3)

    events = [e.video for e in stub.WatchVideo(video_pb2.WatchVideoRequest(id=created.id)) if not e.heartbeat]
    progress = [e.progress for e in events]
    assert all(b > a for a, b in zip(progress, progress[1:])), progress
    assert progress[-1] == 100 and events[-1].status == video_pb2.COMPLETED
    assert any(e.stage == "diffusion" for e in events)
    assert set(events[-1].stage_seconds) >= {"text_encoder", "image_conditioner", "diffusion", "video_decoder", "audio_decoder", "muxer"}

    chunks = list(stub.DownloadVideo(video_pb2.DownloadVideoRequest(id=created.id)))
    data = b"".join(c.data for c in chunks)
    assert len(data) == chunks[0].total_bytes == events[-1].result_bytes
    assert all(len(c.data) <= 1024 * 1024 for c in chunks)
    path = tmp_path / "grpc.mp4"
    path.write_bytes(data)
    info = probe_mp4(path)
    assert (info["video_streams"], info["audio_streams"]) == (1, 1)
    assert (info["video_codec"], info["audio_codec"], info["pix_fmt"]) == ("h264", "aac", "yuv420p")
    assert (info["width"], info["height"]) == (64, 64)
    assert abs(info["video_duration"] - 1.0) <= 1 / 24 + 1e-6
    assert abs(info["audio_duration"] - 1.0) <= 1 / 24 + 1e-6

    # The MP4 is an object of the bucket, under the attempt the record accepted; GetVideo signs a URL to it.
    stored = bucket_keys(served, created.id)
    assert stored["results-store"] == {f"inputs/{created.id}/photo", f"results/{created.id}/1/video.mp4"}
    assert any(key.endswith("/video_latents.safetensors") for key in stored["artifacts-store"])
    video = stub.GetVideo(video_pb2.GetVideoRequest(id=created.id))
    assert video.download_url.startswith(served["s3"].endpoint_url + "/") and "X-Amz-Signature=" in video.download_url
    assert httpx.get(video.download_url).content == data
    ttl = served["config"].get("storage", {}).get("results_ttl_s", 604800)
    assert video.expires_at == pytest.approx(video.completed_at + ttl)


def test_openai_sdk_creates_retrieves_lists_and_downloads(served, openai_client, photos, probe_mp4, tmp_path):
    video = openai_client.videos.create(
        prompt="a cat purrs", seconds="1", size="64x64", input_reference=("cat.jpg", photos.jpeg, "image/jpeg")
    )
    assert video.object == "video" and video.status == "queued" and video.model == "ltx-2-tiny"
    assert (video.seconds, video.size, video.progress) == ("1", "64x64", 0)
    deadline = time.time() + 180
    while video.status in ("queued", "in_progress") and time.time() < deadline:
        time.sleep(0.3)
        video = openai_client.videos.retrieve(video.id)
    assert video.status == "completed", video.error
    assert video.progress == 100 and video.completed_at >= video.created_at

    content = openai_client.videos.download_content(video.id)  # the SDK follows the redirect to the bucket
    path = tmp_path / "sdk.mp4"
    path.write_bytes(content.content)
    info = probe_mp4(path)
    assert (info["video_streams"], info["audio_streams"]) == (1, 1)
    assert (info["width"], info["height"]) == (64, 64)
    assert video.expires_at and video.expires_at >= video.completed_at + 3600

    redirect = _http.get(f"{served['http']}/v1/videos/{video.id}/content")
    assert redirect.status_code == 307, redirect.text  # the bytes never pass through Ray
    location = redirect.headers["location"]
    assert location.startswith(f"{served['s3'].endpoint_url}/reelserve-served/results-store/results/{video.id}/1/")
    assert httpx.get(location).content == content.content

    listed = [v.id for v in openai_client.videos.list(limit=100)]
    assert video.id in listed


def test_http_json_create_accepts_numeric_seconds(served):
    response = _http.post(served["http"] + "/v1/videos", json={"prompt": "waves", "seconds": 1, "size": "64x64"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["seconds"] == "1" and body["status"] == "queued"


def test_list_pages_with_after_and_order(served, openai_client):
    first = openai_client.videos.list(limit=1, order="asc")
    second = openai_client.videos.list(limit=1, order="asc", after=first.data[0].id)
    assert first.data[0].id != second.data[0].id
    assert first.data[0].created_at <= second.data[0].created_at


# ---------------------------------------------------------------------------- prompt rewriting


def _wait_terminal_http(served, job_id: str, timeout_s: float = 180) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        body = _http.get(f"{served['http']}/v1/videos/{job_id}").json()
        if body["status"] in ("completed", "failed"):
            return body
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish in {timeout_s} s")


def test_rewritten_prompt_shows_through_both_ingresses_and_repeats_for_a_seed(served, stub):
    fields = {"prompt": "a cat", "seconds": "1", "size": "64x64", "seed": "5", "enhance_prompt": "true"}
    first = _http.post(served["http"] + "/v1/videos", data=fields).json()
    second = _http.post(served["http"] + "/v1/videos", data=fields).json()
    assert first["enhance_prompt"] is True
    first, second = _wait_terminal_http(served, first["id"]), _wait_terminal_http(served, second["id"])
    assert first["status"] == second["status"] == "completed"
    assert first["prompt"] == "a cat"
    assert first["revised_prompt"] and first["revised_prompt"] != "a cat"
    assert first["prompt_rewrite_fallback"] is None
    assert second["revised_prompt"] == first["revised_prompt"], "same seed, same rewrite"
    assert "prompt_rewriter" in first["stage_seconds"]

    over_grpc = stub.GetVideo(video_pb2.GetVideoRequest(id=first["id"]))
    assert over_grpc.enhance_prompt and over_grpc.revised_prompt == first["revised_prompt"]

    stats = stage_stats("prompt_rewriter")
    assert stats["requests_total"] >= 2 and stats["extra"]["tokens_generated_total"] > 0


def test_rewriting_off_keeps_the_prompt_and_grpc_can_ask_for_it(served, stub):
    plain = stub.CreateVideo(video_pb2.CreateVideoRequest(prompt="a dog", enhance_prompt=False, **SMALL))
    asked = stub.CreateVideo(video_pb2.CreateVideoRequest(prompt="a dog", enhance_prompt=True, seed=9, **SMALL))
    plain, asked = _wait_terminal_grpc(stub, plain.id), _wait_terminal_grpc(stub, asked.id)
    assert plain.status == asked.status == video_pb2.COMPLETED
    assert not plain.enhance_prompt and plain.revised_prompt == ""
    assert "prompt_rewriter" not in plain.stage_seconds
    assert asked.enhance_prompt and asked.revised_prompt and asked.prompt == "a dog"
    assert _http.get(f"{served['http']}/v1/videos/{asked.id}").json()["revised_prompt"] == asked.revised_prompt


def test_enhance_prompt_must_be_a_boolean(served):
    response = _http.post(served["http"] + "/v1/videos", json={"prompt": "a cat", "enhance_prompt": "maybe"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "enhance_prompt"


# ---------------------------------------------------------------------------- cancellation


def test_cancel_stops_the_denoising_loop_within_a_step(served, stub):
    created = stub.CreateVideo(video_pb2.CreateVideoRequest(prompt=f"a long take of a city street {SLOW}", **SMALL))
    wait_until(lambda: stub.GetVideo(video_pb2.GetVideoRequest(id=created.id)).step >= 2, what="two steps")

    stub.CancelVideo(video_pb2.CancelVideoRequest(id=created.id))
    final = _wait_terminal_grpc(stub, created.id, timeout_s=60)
    assert final.status == video_pb2.CANCELLED
    assert final.step < STEPS, "the loop ran to the end despite the cancel"
    time.sleep(1.5)
    kept = bucket_keys(served, created.id)["artifacts-store"]
    assert kept and not any(key.endswith("/video_latents.safetensors") for key in kept), (
        "denoising went on to the end after the cancel"
    )
    assert stub.GetVideo(video_pb2.GetVideoRequest(id=created.id)).step == final.step

    with pytest.raises(grpc.RpcError) as raised:
        list(stub.DownloadVideo(video_pb2.DownloadVideoRequest(id=created.id)))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_http_delete_cancels_a_running_job_and_removes_it(served, stub):
    created = stub.CreateVideo(video_pb2.CreateVideoRequest(prompt=f"rain on a window {SLOW}", **SMALL))
    wait_until(lambda: stub.GetVideo(video_pb2.GetVideoRequest(id=created.id)).step >= 1, what="a first step")
    response = _http.delete(f"{served['http']}/v1/videos/{created.id}")
    assert response.status_code == 200
    assert response.json() == {"id": created.id, "object": "video.deleted", "deleted": True}
    assert _http.get(f"{served['http']}/v1/videos/{created.id}").status_code == 404

    store = RedisJobStore(served["redis_url"])
    deadline = time.time() + 30
    while store.get(created.id) is not None and time.time() < deadline:
        time.sleep(0.2)
    assert store.get(created.id) is None, "the record should be removed once the job stopped"


# ---------------------------------------------------------------------------- backpressure


def test_a_burst_beyond_capacity_is_refused_with_retry_after_and_nothing_is_lost(served, openai_client, stub):
    def create(i):
        return _http.post(
            served["http"] + "/v1/videos", json={"prompt": f"burst {i}", "seconds": 1, "size": "64x64"}, timeout=60
        )

    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(create, range(12)))
    accepted = [r.json()["id"] for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(accepted) + len(refused) == 12
    assert 1 <= len(accepted) <= served["config"]["jobs"]["max_active_jobs"]
    assert refused, "the burst exceeded max_active_jobs but nothing was refused"
    assert all(r.headers.get("retry-after") == "2" for r in refused)
    assert all(r.json()["error"]["type"] == "rate_limit_error" for r in refused)

    with pytest.raises(grpc.RpcError) as raised:
        for _ in range(8):  # keep the system full while we ask over gRPC
            stub.CreateVideo(video_pb2.CreateVideoRequest(prompt="one more", **SMALL))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    for job_id in accepted:
        assert _wait_terminal_grpc(stub, job_id).status == video_pb2.COMPLETED


# ---------------------------------------------------------------------------- bad input

_LONG_PROMPT = "word " * 400  # over the tiny model's 256-token limit


def _bad_requests(photos) -> dict[str, tuple[dict, str]]:
    """name -> (fields, the field the error must name)."""
    return {
        "empty image": ({"image": photos.empty}, "image"),
        "truncated image": ({"image": photos.truncated_jpeg}, "image"),
        "not an image": ({"image": photos.text}, "image"),
        "decompression bomb": ({"image": photos.bomb_png}, "image"),
        "over the pixel cap": ({"image": photos.over_cap_png}, "image"),
        "prompt over the limit": ({"prompt": _LONG_PROMPT}, "prompt"),
        "empty prompt": ({"prompt": "  "}, "prompt"),
        "unknown model": ({"model": "sora-2"}, "model"),
        "seconds zero": ({"seconds": "0"}, "seconds"),
        "seconds negative": ({"seconds": "-1"}, "seconds"),
        "seconds too long": ({"seconds": "999"}, "seconds"),
        "seconds not a number": ({"seconds": "four"}, "seconds"),
        "size malformed": ({"size": "big"}, "size"),
        "size not a multiple": ({"size": "100x100"}, "size"),
        "size too large": ({"size": "4096x4096"}, "size"),
    }


BAD_NAMES = [
    "empty image", "truncated image", "not an image", "decompression bomb", "over the pixel cap",
    "prompt over the limit", "empty prompt", "unknown model", "seconds zero", "seconds negative",
    "seconds too long", "seconds not a number", "size malformed", "size not a multiple", "size too large",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_input_over_http_is_a_400_naming_the_field(served, photos, name):
    fields, field = _bad_requests(photos)[name]
    form = {"prompt": "a cat", "seconds": "1", "size": "64x64"}
    files = None
    for key, value in fields.items():
        if key == "image":
            files = {"input_reference": ("photo.bin", value, "application/octet-stream")}
        else:
            form[key] = value
    response = _http.post(served["http"] + "/v1/videos", data=form, files=files)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    expected_field = "input_reference" if field == "image" else field
    assert error["param"] == expected_field
    assert error["message"].startswith(expected_field + ":")
    assert "Traceback" not in response.text


# Over gRPC `seconds` is a number whose proto3 zero means "the default", and empty bytes
# mean "no photo" (text-to-video), so these three cases do not exist there.
GRPC_BAD_NAMES = [n for n in BAD_NAMES if n not in ("seconds not a number", "seconds zero", "empty image")]


@pytest.mark.parametrize("name", GRPC_BAD_NAMES)
def test_bad_input_over_grpc_is_invalid_argument_naming_the_field(stub, photos, name):
    fields, field = _bad_requests(photos)[name]
    request = {"prompt": "a cat", "seconds": 1.0, "size": "64x64"}
    for key, value in fields.items():
        request[key] = float(value) if key == "seconds" else value
    with pytest.raises(grpc.RpcError) as raised:
        stub.CreateVideo(video_pb2.CreateVideoRequest(**request))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith(field + ":")
    assert "Traceback" not in raised.value.details()


def test_unknown_ids_and_unfinished_downloads(served, stub):
    base = served["http"] + "/v1/videos"
    assert _http.get(base + "/video_nope").status_code == 404
    assert _http.get(base + "/video_nope/content").status_code == 404
    assert _http.delete(base + "/video_nope").status_code == 404
    for call, request in [
        (stub.GetVideo, video_pb2.GetVideoRequest(id="video_nope")),
        (stub.CancelVideo, video_pb2.CancelVideoRequest(id="video_nope")),
    ]:
        with pytest.raises(grpc.RpcError) as raised:
            call(request)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.WatchVideo(video_pb2.WatchVideoRequest(id="video_nope")))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND

    created = stub.CreateVideo(video_pb2.CreateVideoRequest(prompt="not done yet", **SMALL))
    response = _http.get(f"{base}/{created.id}/content")
    assert response.status_code == 409 and "completed" in response.json()["error"]["message"]
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.DownloadVideo(video_pb2.DownloadVideoRequest(id=created.id)))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _wait_terminal_grpc(stub, created.id).status == video_pb2.COMPLETED, "the server kept serving"

    assert _http.get(base, params={"limit": "0"}).status_code == 400
    assert _http.get(base, params={"order": "sideways"}).status_code == 400
    assert _http.get(base, params={"after": "video_nope"}).status_code == 404


# ---------------------------------------------------------------------------- storage: expiry, ids, records


def _forge(served, job_id: str, **fields) -> None:
    """Write fields into the job's record in Redis by hand, as someone with access to it could."""
    client = redis.Redis.from_url(served["redis_url"])
    key = f"reelserve:job:{job_id}"
    data = json.loads(client.hget(key, "data"))
    data.update(fields)
    client.hset(key, "data", json.dumps(data))
    client.close()


def test_a_job_past_its_ttl_answers_410_and_its_objects_are_gone(served, stub, photos):
    created = stub.CreateVideo(video_pb2.CreateVideoRequest(prompt="an hourglass", image=photos.jpeg, **SMALL))
    assert _wait_terminal_grpc(stub, created.id).status == video_pb2.COMPLETED
    stored = bucket_keys(served, created.id)
    assert stored["results-store"] and stored["artifacts-store"]
    ttl = redis.Redis.from_url(served["redis_url"]).ttl(f"reelserve:job:{created.id}")
    assert 604800 < ttl <= 604800 + 86400 + 1, ttl  # the ended job's record goes a day after its video

    _forge(served, created.id, expires_at=time.time() - 1)  # as if results_ttl_s had passed
    response = _http.get(f"{served['http']}/v1/videos/{created.id}/content")
    assert response.status_code == 410, response.text
    assert response.json()["error"]["code"] == "expired" and "expired" in response.json()["error"]["message"]
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.DownloadVideo(video_pb2.DownloadVideoRequest(id=created.id)))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND and "expired" in raised.value.details()
    assert bucket_keys(served, created.id) == {"results-store": set(), "artifacts-store": set()}
    assert stub.GetVideo(video_pb2.GetVideoRequest(id=created.id)).download_url == ""
    assert _http.get(f"{served['http']}/v1/videos/{created.id}").json()["expires_at"] < time.time()


# "/", "..", NUL, and look-alikes of a real id (its shape with a path or a NUL inside): "zzbad" marks them.
BAD_IDS = ["video_zzbad/../video_0", "..", "zzbad..", "video_zzbad\x00", "video_zzbad%00", "../../etc/zzbad",
           "video_" + "0" * 12 + "/../zzbad" + "0" * 3, "video_" + "0" * 23 + "\x00zzbad"]


def test_a_job_id_of_no_job_shape_is_a_404_on_every_route_and_never_reaches_storage(served, stub):
    log = served["s3_log"]
    before = log.read_text(errors="ignore")
    base = served["http"] + "/v1/videos"
    for job_id in BAD_IDS:
        path = f"{base}/{quote(job_id, safe='')}"
        for method, url in [("GET", path), ("GET", path + "/content"), ("POST", path + "/cancel"), ("DELETE", path)]:
            response = _http.request(method, url)
            assert response.status_code == 404, (method, job_id, response.text)
        assert _http.get(base, params={"after": job_id}).status_code == 404
        for call, request in [
            (stub.GetVideo, video_pb2.GetVideoRequest(id=job_id)),
            (stub.CancelVideo, video_pb2.CancelVideoRequest(id=job_id)),
        ]:
            with pytest.raises(grpc.RpcError) as raised:
                call(request)
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND, job_id
        for stream, request in [
            (stub.WatchVideo, video_pb2.WatchVideoRequest(id=job_id)),
            (stub.DownloadVideo, video_pb2.DownloadVideoRequest(id=job_id)),
        ]:
            with pytest.raises(grpc.RpcError) as raised:
                list(stream(request))
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND, job_id
    assert "zzbad" not in log.read_text(errors="ignore")[len(before):]  # the S3 server never heard of them


def test_a_path_or_key_forged_into_a_record_is_refused(served, stub, job_store, tmp_path):
    secret = tmp_path / "service-account-token"
    secret.write_text("TOP-SECRET-TOKEN")
    record = JobRecord(id=new_job_id(), model="ltx-2-tiny", prompt="forged", negative_prompt="", seconds=1.0,
                       width=64, height=64, fps=24, seed=1, has_image=False, status=JobStatus.COMPLETED,
                       completed_at=time.time(), result_bytes=16, tenant="tests")
    assert job_store.create(record)
    content = f"{served['http']}/v1/videos/{record.id}/content"
    for forged in ({"result_path": str(secret)},  # the old trusted path
                   {"result_path": str(secret), "result_attempt": f"1/../../../{secret}"},
                   {"result_attempt": "../../inputs/video_x/photo"}, {"result_attempt": -1}):
        _forge(served, record.id, **forged)
        response = _http.get(content, follow_redirects=True)
        assert response.status_code == 404 and "TOP-SECRET" not in response.text, (forged, response.text)
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.DownloadVideo(video_pb2.DownloadVideoRequest(id=record.id)))
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    # An attempt number is all a record can name: the key is this job's, and no such attempt wrote one.
    _forge(served, record.id, result_attempt=7)
    followed = _http.get(content, follow_redirects=True)
    assert followed.status_code == 404 and "TOP-SECRET" not in followed.text
    assert f"/results-store/results/{record.id}/7/video.mp4" in str(followed.url)


# ---------------------------------------------------------------------------- durability (keep last)


def test_a_job_runs_on_while_the_ingress_replica_is_killed(served, stub, job_store):
    """The ingress only records jobs: losing it loses nothing, and no orchestrator has to take the job over."""
    import ray  # noqa: PLC0415 - keeps collection of `make check` fast

    created = stub.CreateVideo(video_pb2.CreateVideoRequest(prompt=f"a lighthouse at dusk {SLOW}", **SMALL))
    wait_until(lambda: job_store.get(created.id).owner, what="an orchestrator claiming the job")
    owner = job_store.get(created.id).owner

    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "#ingress#" in a["name"]]
    assert len(replicas) == 1
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=False)

    record = wait_until(lambda: (r := job_store.get(created.id)).status.is_terminal and r, timeout_s=120,
                        what="the job ending")
    assert record.status.api_name == "completed", (record.status, record.error_message)
    assert (record.owner, record.attempts, record.takeovers) == (None, 1, 0)  # finished by its first owner
    assert owner.startswith("orchestrator-")
    got = wait_until(lambda: _get_or_none(stub, created.id), timeout_s=120, what="the ingress answering again")
    assert got.status == video_pb2.COMPLETED


def _get_or_none(stub, job_id: str):
    try:
        return stub.GetVideo(video_pb2.GetVideoRequest(id=job_id))
    except grpc.RpcError:
        return None


# ---------------------------------------------------------------------------- no input a client sends is a 5xx


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompt"),
        ({"seconds": 1, "size": "64x64"}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": ["a cat"]}, "prompt"),
        ({"prompt": "a cat", "size": {"width": 64}}, "size"),
        ({"prompt": "a cat", "seconds": [1]}, "seconds"),
        ({"prompt": "a cat", "seed": 1.5e300}, "seed"),
        ({"prompt": "a cat", "fps": "inf"}, "fps"),
        ({"prompt": "a cat", "enhance_prompt": {}}, "enhance_prompt"),
        ({"prompt": "a cat", "negative_prompt": 3}, "negative_prompt"),
        ({"prompt": "a cat", "model": {"id": "x"}}, "model"),
        ({"prompt": "a cat", "colour": "red"}, "colour"),
    ],
)
def test_malformed_json_fields_are_a_400_naming_the_field(served, body, field):
    response = _http.post(served["http"] + "/v1/videos", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


def test_no_request_shape_reaches_a_5xx(served):
    """Random bodies, content types and query strings: every answer is below 500."""
    rng = random.Random(20261122)
    base = served["http"] + "/v1/videos"
    values = [None, True, -1, 0, 2**70, 1e308, float("nan"), "", "x" * 5000, "64x64", "1", [], {}, [1, "a"],
              {"a": {"b": []}}, "\x00\ud7ff", "NaN", "-0"]
    fields = ["prompt", "seconds", "size", "seed", "fps", "negative_prompt", "model", "enhance_prompt", "input_reference"]
    answers = []
    with httpx.Client(timeout=30, headers=bearer()) as client:
        for _ in range(60):
            body = {rng.choice(fields): rng.choice(values) for _ in range(rng.randint(0, 4))}
            text = json.dumps(body, allow_nan=True)
            kind = rng.choice(["application/json", "text/plain", "multipart/form-data", "application/x-www-form-urlencoded", ""])
            answers.append(client.post(base, content=text.encode(), headers={"content-type": kind}).status_code)
        for raw in (b"", b"{", b"[1,2", b"\xff\xfe", b"null", b'"just a string"', b"1e999"):
            answers.append(client.post(base, content=raw, headers={"content-type": "application/json"}).status_code)
        for params in ({"limit": "abc"}, {"limit": "-3"}, {"limit": "9" * 40}, {"order": ""}, {"after": "%00"},
                       {"after": "x" * 3000}):
            answers.append(client.get(base, params=params).status_code)
        for path in ("/video_x/content?variant=thumbnail", "/video_x/content", "/%2e%2e", "/video_x/cancel"):
            answers.append(client.get(base + path).status_code)
        answers.append(client.delete(base + "/video_unknown").status_code)
    assert answers and all(code < 500 for code in answers), sorted(set(answers))
    created = [code for code in answers if code == 200]
    assert len(created) < len(answers)  # most of these are refused; none crashed the ingress


# ---------------------------------------------------------------------------- what Ray placed


def test_replicas_get_the_resources_and_devices_the_config_names(served):
    """Asked of the running replicas, not of the options: a GPU share, a GB budget turned into a share of the
    named accelerator, and stages without a reservation that see no GPU (and compute on the CPU) although the
    node has GPUs."""
    from ray import serve  # noqa: PLC0415 - keeps collection of `make check` fast

    def where(stage: str) -> dict:
        return serve.get_deployment_handle(stage, app_of(stage)).placement.remote().result()

    muxer = where("muxer")
    assert muxer["resources"]["GPU"] == pytest.approx(0.5)
    assert muxer["resources"]["accelerator_type:H100"] > 0
    assert len(muxer["gpu_ids"]) == 1 and muxer["cuda_visible_devices"] == muxer["gpu_ids"][0]

    audio = where("audio_decoder")
    assert audio["resources"]["GPU"] == pytest.approx(20 / 80)  # gpu_memory_gb 20 of an 80 GB H100
    assert len(audio["gpu_ids"]) == 1 and audio["device"] == "cpu"  # device set explicitly: no CUDA here

    for stage in ("text_encoder", "image_conditioner", "diffusion", "video_decoder"):
        placed = where(stage)
        assert "GPU" not in placed["resources"] and placed["gpu_ids"] == [], (stage, placed)
        assert placed["device"] == "cpu", (stage, placed)  # device auto without a reservation: never a GPU
