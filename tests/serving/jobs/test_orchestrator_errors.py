"""What a client reads when a job fails: a code and one clean line, never internals."""

from __future__ import annotations

import pytest

from serving.errors import GenerationFailed
from serving.jobs.orchestrator import client_safe_error


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError."""


class BackPressureError(Exception):
    """Named like Ray Serve's."""


@pytest.mark.parametrize(
    "error, code, needle",
    [
        (OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB on /dev/nvidia0"), "out_of_memory", "diffusion"),
        (RuntimeError("CUDA error: out of memory at 10.0.0.7"), "out_of_memory", "smaller size"),
        (BackPressureError("queue full"), "overloaded", "retry later"),
        (FileNotFoundError(2, "No such file or directory", "/var/secret/path"), "generation_failed", "FileNotFoundError"),
        (GenerationFailed("the photo could not be encoded"), "generation_failed", "the photo could not be encoded"),
    ],
)
def test_failures_become_a_code_and_a_clean_line(error, code, needle):
    got_code, message = client_safe_error(error, "diffusion")
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
    assert code == "out_of_memory" and "video_decoder" in message and "Traceback" not in message
