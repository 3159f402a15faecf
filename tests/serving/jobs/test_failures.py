"""What a client reads when a job fails: a code and one clean line, never internals."""

from __future__ import annotations

import pytest

from serving.errors import GenerationFailed, StageOutOfMemory
from serving.jobs.failures import client_safe_error


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError."""


class BackPressureError(Exception):
    """Named like Ray Serve's."""


@pytest.mark.parametrize(
    "error, code, needle",
    [
        (OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB on /dev/nvidia0"), "resource_exhausted", "diffusion"),
        (RuntimeError("CUDA error: out of memory at 10.0.0.7"), "resource_exhausted", "smaller size"),
        (StageOutOfMemory("diffusion"), "resource_exhausted", "the diffusion stage ran out of memory at 1280x704"),
        (BackPressureError("queue full"), "overloaded", "retry later"),
        (FileNotFoundError(2, "No such file or directory", "/var/secret/path"), "generation_failed", "FileNotFoundError"),
        (GenerationFailed("the photo could not be encoded"), "generation_failed", "the photo could not be encoded"),
    ],
)
def test_failures_become_a_code_and_a_clean_line(error, code, needle):
    got_code, message = client_safe_error(error, "diffusion", "1280x704, 5 s at 24 fps")
    assert got_code == code
    assert needle in message
    assert "\n" not in message
    assert "/var/secret" not in message and "10.0.0.7" not in message and "/dev/nvidia0" not in message


def test_ray_wrapped_errors_are_judged_by_their_cause():
    class Wrapped(Exception):
        def __init__(self, cause):
            super().__init__("ray.exceptions.RayTaskError: Traceback (most recent call last): ...")
            self.cause = cause

    code, message = client_safe_error(Wrapped(OutOfMemoryError("CUDA out of memory")), "video_decoder")
    assert code == "resource_exhausted" and "video_decoder" in message and "Traceback" not in message


def test_a_dead_replica_is_named_with_its_stage():
    class ActorDiedError(Exception):
        """Named like Ray's."""

    code, message = client_safe_error(ActorDiedError("the actor died at 10.0.0.7:1234"), "diffusion")
    assert code == "stage_unavailable" and "diffusion" in message and "10.0.0.7" not in message
