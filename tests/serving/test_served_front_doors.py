"""The front doors on the session cluster: the Seedance-compatible tasks API driven by plain HTTP to a finished
video and its last frame, `GET /v1/models`, the openai SDK's `extra_body` fields, and gRPC's new fields."""

from __future__ import annotations

import base64
import io
import time

import grpc
import httpx
import pytest
from PIL import Image

from serving.proto import video_pb2
from tests.serving.conftest import bearer, grpc_stub, wait_http

pytestmark = pytest.mark.cluster  # starts a Ray cluster: not in `make check`

TASKS = "/api/v3/contents/generations/tasks"


def _wait_task(http, task_id: str) -> dict:
    return wait_http(http, f"{TASKS}/{task_id}", ("queued", "running"), timeout_s=180)


def test_seedance_task_runs_to_succeeded_with_its_video_and_last_frame(http, photos, probe_mp4, tmp_path):
    photo = "data:image/jpeg;base64," + base64.b64encode(photos.jpeg).decode()
    created = http.post(TASKS, json={
        "model": "ltx-2-tiny",
        "content": [{"type": "text", "text": "a cat purrs --duration 1 --seed 5"},
                    {"type": "image_url", "image_url": {"url": photo}}],  # one image without a role: the first frame
        "resolution": "64x64", "return_last_frame": True,
    })
    assert created.status_code == 200, created.text
    task = _wait_task(http, created.json()["id"])
    assert task["status"] == "succeeded", task
    assert (task["seed"], task["duration"], task["framespersecond"], task["resolution"]) == (5, 1.0, 24, "64x64")
    video = httpx.get(task["content"]["video_url"], headers=bearer(), follow_redirects=True)
    path = tmp_path / "task.mp4"
    path.write_bytes(video.content)
    info = probe_mp4(path)
    assert (info["video_streams"], info["audio_streams"], info["width"]) == (1, 1, 64)
    frame = http.get(task["content"]["last_frame_url"])
    assert frame.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(frame.content)).size == (64, 64)

    listed = http.get(TASKS, params={"filter.status": "succeeded", "page_size": 100}).json()
    assert task["id"] in [item["id"] for item in listed["items"]]
    assert http.delete(f"{TASKS}/{task['id']}").status_code == 200  # an ended task is removed
    gone = http.get(f"{TASKS}/{task['id']}")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "ResourceNotFound"


def test_seedance_refusals_and_keys(served, http):
    bad = http.post(TASKS, json={"content": [{"type": "text", "text": "x"},
                                             {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,AA=="},
                                              "role": "reference_audio"}]})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "InvalidParameter"
    assert bad.json()["error"]["param"] == "content[1]"  # LTX-2 animates one first frame, nothing else
    anonymous = httpx.get(served["http"] + TASKS)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "AuthenticationError"


def test_models_list_the_served_model(http):
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    [model] = models["data"]
    assert (model["id"], model["object"], model["family"]) == ("ltx-2-tiny", "model", "ltx2")
    assert model["limits"]["frames"] == "8n + 1"


def test_openai_sdk_extra_body_steps_and_frames(openai_client, job_store):
    video = openai_client.videos.create(prompt="rain on a window", size="64x64",
                                        extra_body={"num_inference_steps": 4, "num_frames": 17})
    record = job_store.get(video.id)
    assert record.num_inference_steps == 4 and round(record.seconds * record.fps) == 17
    deadline = time.time() + 180
    while video.status in ("queued", "in_progress") and time.time() < deadline:
        time.sleep(0.3)
        video = openai_client.videos.retrieve(video.id)
    assert video.status == "completed", video.error
    assert job_store.get(video.id).step == 4  # the engine ran the steps the request asked for


def test_grpc_refuses_what_ltx2_does_not_take(served):
    stub, channel = grpc_stub(served["grpc"])
    try:
        with pytest.raises(grpc.RpcError) as refused:
            stub.CreateVideo(video_pb2.CreateVideoRequest(prompt="x", last_frame=b"\x89PNG"))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "last_frame" in refused.value.details()
        with pytest.raises(grpc.RpcError) as steps:
            stub.CreateVideo(video_pb2.CreateVideoRequest(prompt="x", num_inference_steps=1000))
        assert steps.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "num_inference_steps" in steps.value.details()
    finally:
        channel.close()
