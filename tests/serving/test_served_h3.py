"""MiniMax-H3 served on the session's Ray cluster beside LTX-2: its own applications (``reelserve-h3``, HTTP under
``/h3``), job store (Redis database 1) and storage prefix. Each workflow runs end to end over HTTP and its soundtrack
equals diffusers' own ``MiniMaxH3Blocks`` output for the same seed and inputs; the limits answer 400 before any
work; the Seedance-compatible route and the openai SDK drive it; a diffusion replica killed mid-denoise resumes from
its checkpoint, a cancel lands within a step and an out-of-memory error names diffusion.

The module runs last (``tests/conftest.py``): while it runs two front applications exist, and gRPC clients would
have to name theirs.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch

from cluster.apps import deploy, serve_applications
from cluster.config import ReelserveConfig
from serving.families import get_family
from serving.jobs.job_storage import JobStorage, register_stored_types
from tests.conftest import REPO_ROOT
from tests.serving.conftest import BUCKET, KEYS, bearer, wait_http, wait_until
from tests.serving.families.minimax_h3.conftest import encode_image, encode_mp4, encode_wav

pytestmark = pytest.mark.cluster  # starts a Ray cluster: not in `make check`

APP = "reelserve-h3"
PREFIX = "/h3"
STEPS = 4  # sigma points: three transformer passes
SEED = 5
SIZE = {"size": "64x32", "seconds": 5}
H3_FAULTS = [
    {"stage": "diffusion", "kind": "slow", "prompt_contains": "[slow]", "stall_s": 1.0},
    {"stage": "diffusion", "kind": "out_of_memory", "prompt_contains": "[oom]", "at_step": 1},
    {"stage": "diffusion", "kind": "kill_replica", "prompt_contains": "[kill-diffusion]", "at_step": 2},
]


def data_url(data: bytes, kind: str) -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


@pytest.fixture(scope="module")
def h3_served(served, tmp_path_factory):
    """The H3 applications deployed beside the session's LTX-2 ones; removed again at the end."""
    from serving.families.minimax_h3.tiny import build_tiny_minimax_h3  # noqa: PLC0415 - keeps collection of `make check` fast

    checkpoint = build_tiny_minimax_h3(tmp_path_factory.mktemp("h3-served"))
    base = served["config"]
    redis_h3 = base["jobs"]["redis_url"].rsplit("/", 1)[0] + "/1"  # its own job store: runners claim only theirs
    config = {
        "app_name": APP,
        "model": {"family": "minimax_h3", "name": "minimax-h3-tiny", "path": str(checkpoint), "device": "cpu",
                  "dtype": "float32", "num_inference_steps": STEPS, "default_size": "64x32", "default_seconds": 5,
                  "max_width": 256, "max_height": 256, "max_pixels": 65536, "max_latent_tokens": 8192,
                  "max_prompt_tokens": 256, "max_video_reference_pixels": 640 * 360,
                  "diffusion": {"checkpoint_every_steps": 1}},
        "jobs": {**base["jobs"], "redis_url": redis_h3, "max_active_jobs": 10},
        "storage": {**base["storage"], "results_url": f"s3://{BUCKET}/h3-results",
                    "artifacts_url": f"s3://{BUCKET}/h3-artifacts"},
        "orchestrator": {"num_replicas": 1, "poll_interval_s": 0.3},
        "stages": {name: {"num_cpus": 0.1, "num_gpus": 0} for name in
                   ("text_encoder", "reference_encoder", "video_decoder", "audio_decoder", "muxer")}
        | {"diffusion": {"num_replicas": 1, "num_cpus": 0.1, "num_gpus": 0, "max_ongoing_requests": 2}},
        "rewriter": {"enabled": False},
        "ingress": {**base["ingress"], "route_prefix": PREFIX},
        "faults": H3_FAULTS,
        "auth": base["auth"],
    }
    front = serve_applications(base, served["overrides"])
    started = time.perf_counter()
    deploy(front + serve_applications(config), timeout_s=600)
    try:
        yield {"config": config, "checkpoint": checkpoint, "http": served["http"] + PREFIX,
               "deploy_s": time.perf_counter() - started}
    finally:
        # The H3 applications go; LTX-2's keep their replicas. Not waited for: this module runs last.
        deploy(front, timeout_s=300, wait=False)


@pytest.fixture(scope="module")
def h3_http(h3_served):
    with httpx.Client(base_url=h3_served["http"], headers=bearer(), timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def h3_storage(h3_served):
    config = ReelserveConfig.model_validate(h3_served["config"])
    register_stored_types(get_family("minimax_h3"))
    return JobStorage(config.storage, config.jobs.redis_url)


@pytest.fixture(scope="module")
def h3_media():
    rng = np.random.default_rng(3)
    return {"image": encode_image(rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)),
            "last": encode_image(rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)),
            "video": encode_mp4(2.0, 24, 64, 32, audio_rate=32000, seed=4), "audio": encode_wav(1.0, seed=5)}


def _wait(http, video_id: str) -> dict:
    return wait_http(http, f"/v1/videos/{video_id}", ("queued", "in_progress"))


def _workflow_bodies(media) -> dict[str, dict]:
    return {
        "t2va": {},
        "fl2va": {"input_reference": {"image_url": data_url(media["image"], "image/png")},
                  "last_frame": data_url(media["last"], "image/png")},
        "ref2va": {"references": [{"type": "image", "url": data_url(media["image"], "image/png")},
                                  {"type": "video", "url": data_url(media["video"], "video/mp4")},
                                  {"type": "audio", "url": data_url(media["audio"], "audio/wav")}]},
    }


def _diffusers_audio(checkpoint, workflow: str, media, tmp_path) -> np.ndarray:
    """diffusers' own MiniMax-H3 pipeline on the same checkpoint, seed and inputs: its soundtrack."""
    from diffusers import ModularPipeline  # noqa: PLC0415 - keeps collection of `make check` fast
    from diffusers.modular_pipelines.minimax_h3 import (  # noqa: PLC0415 - keeps collection of `make check` fast
        MiniMaxH3AudioReference,
        MiniMaxH3ImageReference,
        MiniMaxH3VideoReference,
    )
    from diffusers.utils import load_image  # noqa: PLC0415 - keeps collection of `make check` fast

    files = {}
    for name, suffix in (("image", "png"), ("last", "png"), ("video", "mp4"), ("audio", "wav")):
        files[name] = tmp_path / f"{name}.{suffix}"
        files[name].write_bytes(media[name])
    kwargs = {}
    if workflow == "fl2va":
        kwargs = {"image": load_image(str(files["image"])), "last_image": load_image(str(files["last"]))}
    elif workflow == "ref2va":
        kwargs = {"references": [MiniMaxH3ImageReference.from_file(str(files["image"])),
                                 MiniMaxH3VideoReference.from_file(str(files["video"])),
                                 MiniMaxH3AudioReference.from_file(str(files["audio"]))]}
    pipeline = ModularPipeline.from_pretrained(str(checkpoint), workflow=workflow)
    pipeline.load_components(dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    out = pipeline(prompt="a tabby cat looks around and purrs", height=32, width=64, num_frames=124,
                   num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED), output_type="pt",
                   output=["videos", "audio"], **kwargs)
    return out["audio"][0].numpy()


@pytest.mark.parametrize("workflow", ["t2va", "fl2va", "ref2va"])
def test_each_workflow_runs_served_and_its_soundtrack_equals_diffusers_blocks(
    workflow, h3_served, h3_http, h3_storage, h3_media, probe_mp4, tmp_path, figures
):
    body = {"prompt": "a tabby cat looks around and purrs", "seed": SEED, **SIZE, **_workflow_bodies(h3_media)[workflow]}
    created = h3_http.post("/v1/videos", json=body)
    assert created.status_code == 200, created.text
    video = _wait(h3_http, created.json()["id"])
    assert video["status"] == "completed", video["error"]
    assert video["model"] == "minimax-h3-tiny"
    mp4 = tmp_path / "out.mp4"
    mp4.write_bytes(h3_http.get(f"/v1/videos/{video['id']}/content", follow_redirects=True).content)
    info = probe_mp4(mp4)
    assert (info["video_streams"], info["audio_streams"], info["width"], info["height"]) == (1, 1, 64, 32)

    # The joint transformer pass denoises audio and video together: its soundtrack equal to diffusers' own means
    # every stage before it (text and reference encoders, the engine's steps, the audio decoder) computed the same.
    waveform = h3_storage.load_output(video["id"], 1, "waveform")
    expected = _diffusers_audio(h3_served["checkpoint"], workflow, h3_media, tmp_path)
    difference = float(np.abs(waveform.samples - expected).max())
    figures.setdefault("h3_served_vs_diffusers_audio_max_abs", {})[workflow] = difference
    figures["h3_deploy_beside_ltx2_s"] = round(h3_served["deploy_s"], 1)
    assert waveform.samples.shape == expected.shape and difference <= 1e-4


def test_limits_answer_400_before_any_work_and_models_say_what_h3_takes(h3_http, h3_media):
    image = data_url(h3_media["image"], "image/png")
    cases = [
        ({"references": [{"type": "image", "url": image}] * 10}, "references"),
        ({"references": [{"type": "audio", "url": data_url(h3_media["audio"], "audio/wav")}]}, "references"),
        ({"input_reference": image, "references": [{"type": "image", "url": image}]}, "input_reference"),
        ({"references": [{"type": "video", "url": data_url(b"not a video" * 40, "video/mp4")}]}, "references[0]"),
        ({"seconds": 2}, "seconds"),
    ]
    for extra, field in cases:
        answer = h3_http.post("/v1/videos", json={"prompt": "x", **SIZE, **extra})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == field, answer.text
    [model] = h3_http.get("/v1/models").json()["data"]
    assert model["family"] == "minimax_h3" and model["workflows"] == ["t2va", "fl2va", "ref2va"]


def test_seedance_route_and_openai_sdk_drive_h3(h3_served, h3_http, h3_media):
    from openai import OpenAI  # noqa: PLC0415 - keeps collection of `make check` fast

    task = h3_http.post("/api/v3/contents/generations/tasks", json={
        "model": "minimax-h3-tiny",
        "content": [{"type": "text", "text": "a cat turns --duration 5 --seed 3"},
                    {"type": "image_url", "image_url": {"url": data_url(h3_media["image"], "image/png")},
                     "role": "reference_image"},
                    {"type": "audio_url", "audio_url": {"url": data_url(h3_media["audio"], "audio/wav")},
                     "role": "reference_audio"}],
        "resolution": "64x32",
    })
    assert task.status_code == 200, task.text
    sdk = OpenAI(base_url=h3_served["http"] + "/v1", api_key=KEYS["tests"], max_retries=0)
    video = sdk.videos.create(prompt="a cat blinks", size="64x32", seconds="5",
                              input_reference=("first.png", h3_media["image"], "image/png"))
    deadline = time.time() + 300
    while time.time() < deadline:
        status = h3_http.get(f"/api/v3/contents/generations/tasks/{task.json()['id']}").json()["status"]
        video = sdk.videos.retrieve(video.id)
        if status not in ("queued", "running") and video.status not in ("queued", "in_progress"):
            break
        time.sleep(0.5)
    assert status == "succeeded" and video.status == "completed", (status, video.error)


def test_a_diffusion_replica_killed_mid_denoise_resumes_and_cancel_and_oom_name_their_stage(h3_http, figures):
    killed = h3_http.post("/v1/videos", json={"prompt": "a kite [kill-diffusion]", **SIZE}).json()["id"]
    final = _wait(h3_http, killed)
    assert final["status"] == "completed", final["error"]
    assert final["resumed_from_step"] is not None and 0 < final["resumed_from_step"] <= 2
    figures["h3_diffusion_killed_at_step_resumed_from"] = final["resumed_from_step"]

    slow = h3_http.post("/v1/videos", json={"prompt": "a slow river [slow]", **SIZE}).json()["id"]
    wait_until(lambda: h3_http.get(f"/v1/videos/{slow}").json()["step"] >= 1, timeout_s=120,
               what="the slow job denoising")
    asked = time.perf_counter()
    h3_http.post(f"/v1/videos/{slow}/cancel")
    cancelled = _wait(h3_http, slow)
    assert cancelled["error"]["code"] == "cancelled" and cancelled["step"] < STEPS - 1
    figures["h3_cancel_seconds"] = round(time.perf_counter() - asked, 2)

    oom = h3_http.post("/v1/videos", json={"prompt": "a storm [oom]", **SIZE}).json()["id"]
    failed = _wait(h3_http, oom)
    assert failed["status"] == "failed" and failed["error"]["code"] == "resource_exhausted"
    assert "diffusion" in failed["error"]["message"]


def test_loadtest_drives_h3_with_a_reference_mix(h3_served, h3_media, tmp_path):
    """`reelserve loadtest --model` over HTTP with references in the mix, the key from REELSERVE_API_KEY."""
    (tmp_path / "ref.png").write_bytes(h3_media["image"])
    (tmp_path / "ref.wav").write_bytes(h3_media["audio"])
    (tmp_path / "mix.yaml").write_text(
        "- name: omni\n  size: 64x32\n  seconds: 5\n  photo: false\n  references:\n"
        f"    - {{kind: image, path: {tmp_path / 'ref.png'}}}\n    - {{kind: audio, path: {tmp_path / 'ref.wav'}}}\n"
        "- name: keyframes\n  size: 64x32\n  seconds: 5\n"
    )
    address = h3_served["http"].removeprefix("http://")
    result = subprocess.run(
        [sys.executable, "-m", "serving.cli", "loadtest", "--protocol", "http", "--address", address, "--model",
         "minimax-h3-tiny", "--requests", "4", "--concurrency", "2", "--mix", str(tmp_path / "mix.yaml"),
         "--out", str(tmp_path / "out"), "--quiet"],
        cwd=REPO_ROOT, env={**os.environ, "REELSERVE_API_KEY": KEYS["tests"]}, capture_output=True, text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["jobs"]["completed"] == 4, report["errors_by_code"]
    assert set(report["by_shape"]) <= {"omni", "keyframes"} and report["by_shape"]
