"""Property-based fuzzing of both front doors of the session cluster: no input gives a 5xx, nothing hangs.

HTTP: every operation of the app's own OpenAPI document (``serving.ingress.deployment.http_app``), with
schemathesis generating valid and invalid requests. gRPC: hypothesis generating ``CreateVideoRequest``
messages and ids. Jobs that a fuzzed request happens to create are cancelled at once, so the fuzzing adds
little load.
"""

from __future__ import annotations

import grpc
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.ingress.deployment import http_app
from serving.proto import video_pb2
from tests.serving.conftest import bearer, grpc_stub

pytestmark = pytest.mark.cluster  # starts a Ray cluster: not in `make check`

schema = schemathesis.openapi.from_dict(http_app.openapi())
_FUZZ = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def cancel_all(served):
    """Cancels whatever the fuzzing created, when the module ends."""
    created: list[str] = []
    yield created
    with httpx.Client(base_url=served["http"], headers=bearer(), timeout=30) as client:
        for job_id in created:
            client.post(f"/v1/videos/{job_id}/cancel")


@schema.parametrize()
@_FUZZ
def test_no_http_request_gives_a_5xx_or_hangs(case, served, cancel_all):
    response = case.call(base_url=served["http"], headers=bearer(), timeout=30)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
    if case.method == "POST" and case.path == "/v1/videos" and response.status_code == 200:
        job_id = response.json()["id"]
        httpx.post(f"{served['http']}/v1/videos/{job_id}/cancel", headers=bearer(), timeout=30)
        cancel_all.append(job_id)


_TEXT = st.text(max_size=40)
_CREATE = st.builds(
    video_pb2.CreateVideoRequest,
    prompt=_TEXT,
    image=st.one_of(st.just(b""), st.binary(max_size=64)),
    seconds=st.floats(allow_nan=True, allow_infinity=True),
    size=st.one_of(st.just(""), st.just("64x64"), _TEXT),
    fps=st.integers(-(2**31), 2**31 - 1),
    seed=st.integers(-(2**63), 2**63 - 1),
    negative_prompt=_TEXT,
    model=st.one_of(st.just(""), _TEXT),
    priority=st.one_of(st.just(""), st.sampled_from(["low", "normal", "high", "urgent"]), _TEXT),
    callback_url=st.one_of(st.just(""), _TEXT),
    idempotency_key=st.one_of(st.just(""), _TEXT),
)
_ACCEPTABLE = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
               grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION}


@pytest.fixture(scope="module")
def fuzz_stub(served):
    stub, channel = grpc_stub(served["grpc"])
    yield stub
    channel.close()


@given(request=_CREATE)
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_grpc_create_gives_an_internal_error_or_hangs(request, fuzz_stub, cancel_all):
    try:
        video = fuzz_stub.CreateVideo(request, timeout=30)
    except grpc.RpcError as error:
        assert error.code() in _ACCEPTABLE, (error.code(), error.details())
        assert "Traceback" not in (error.details() or "")
        return
    fuzz_stub.CancelVideo(video_pb2.CancelVideoRequest(id=video.id), timeout=30)
    cancel_all.append(video.id)


@given(job_id=st.text(max_size=80))
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_grpc_id_gives_an_internal_error_or_hangs(job_id, fuzz_stub):
    for call in (lambda: fuzz_stub.GetVideo(video_pb2.GetVideoRequest(id=job_id), timeout=30),
                 lambda: fuzz_stub.CancelVideo(video_pb2.CancelVideoRequest(id=job_id), timeout=30),
                 lambda: list(fuzz_stub.DownloadVideo(video_pb2.DownloadVideoRequest(id=job_id), timeout=30))):
        try:
            call()
        except grpc.RpcError as error:
            assert error.code() in _ACCEPTABLE, (error.code(), error.details())
