"""Object keys, built only from checked parts: nothing a client or a record says reaches a store unchecked.

The layout (relative to the configured store URL, e.g. ``s3://videos/reelserve``)::

    inputs/<job>/<input>                    photo, first_frame, last_frame, ref-<n>: what the client sent
    results/<job>/<attempt>/<result>        video.mp4, last_frame.png: one attempt's finished output
    artifacts/<job>/<attempt>/<name>.safetensors
                                            stage outputs of one attempt
    artifacts/<job>/<attempt>/checkpoint-<step>.safetensors
                                            denoising checkpoints of one attempt (newest = highest step)

Results are kept per attempt too: the record's fenced "completed" write names
the attempt whose MP4 is the result, so two overlapping attempts never write
the same object, a stale attempt's MP4 is never served, and sweeping it is a
prefix delete. There are no "partial" keys: every put is atomic (see
``serving.storage.store``), so a reader sees a whole object or none.

Every key any store method receives is parsed against this grammar again
(``parse_key``), so a key string from anywhere else is refused there too.
Everything is ASCII by construction: look-alike characters (fullwidth
solidus, Cyrillic letters), NUL, ``/``, ``..`` and absolute paths never match.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, cast

__all__ = [
    "AREAS",
    "INPUT_NAMES",
    "JOB_ID_PATTERNS",
    "MAX_ATTEMPT",
    "RESULT_NAMES",
    "ParsedKey",
    "area_prefix",
    "artifact_key",
    "attempt_prefix",
    "check_attempt",
    "check_job_id",
    "check_prefix",
    "checkpoint_key",
    "input_key",
    "job_prefix",
    "parse_key",
    "result_key",
]

# Every job id shape the project hands out, and nothing else. The first is
# ``serving.jobs.record.new_job_id``; the second is a Seedance-compatible task id.
JOB_ID_PATTERNS: tuple[str, ...] = (
    r"video_[0-9a-f]{24}",
    r"cgt-[0-9a-f]{24}",
)
_JOB_ID = "(?:" + "|".join(JOB_ID_PATTERNS) + ")"

Area = Literal["inputs", "results", "artifacts"]
AREAS: tuple[Area, ...] = ("inputs", "results", "artifacts")

# What a client may send (one photo, keyframes, up to 100 references), and what a job leaves.
_INPUT_NAME = r"(?:photo|first_frame|last_frame|ref-(?:[0-9]|[1-9][0-9]))"
INPUT_NAMES = ("photo", "first_frame", "last_frame", "ref-<0..99>")
RESULT_NAMES: tuple[str, ...] = ("video.mp4", "last_frame.png")
_RESULT_NAME = "(?:" + "|".join(re.escape(name) for name in RESULT_NAMES) + ")"
_OUTPUT_NAME = r"[a-z][a-z0-9_]{0,47}"
_CHECKPOINT = r"checkpoint-[0-9]{6}"
_ARTIFACT_NAME = rf"(?:{_CHECKPOINT}|{_OUTPUT_NAME})\.safetensors"

MAX_ATTEMPT = 999_999
MAX_STEP = 999_999
_ATTEMPT = r"[1-9][0-9]{0,5}"  # 1..999999, no leading zeros: one spelling per attempt

_KEY = re.compile(
    rf"(?P<area>inputs)/(?P<job>{_JOB_ID})/(?P<name>{_INPUT_NAME})"
    rf"|(?P<area_r>results)/(?P<job_r>{_JOB_ID})/(?P<attempt_r>{_ATTEMPT})/(?P<name_r>{_RESULT_NAME})"
    rf"|(?P<area_a>artifacts)/(?P<job_a>{_JOB_ID})/(?P<attempt_a>{_ATTEMPT})/(?P<name_a>{_ARTIFACT_NAME})"
)
_PREFIX = re.compile(
    rf"(?:(?:inputs|results|artifacts)/(?:{_JOB_ID}/)?"
    rf"|(?:results|artifacts)/{_JOB_ID}/{_ATTEMPT}/)?"
)


@dataclass(frozen=True)
class ParsedKey:
    """A key taken apart. ``attempt`` is ``None`` for inputs (they belong to the job, not to one attempt)."""

    key: str
    area: Area
    job_id: str
    attempt: int | None
    name: str

    @property
    def checkpoint_step(self) -> int | None:
        """The denoising step of a checkpoint key, else ``None``."""
        if self.area == "artifacts" and self.name.startswith("checkpoint-"):
            return int(self.name.removeprefix("checkpoint-").removesuffix(".safetensors"))
        return None


def _shown(value: object) -> str:
    """The refused value for an error message: repr (control characters escaped), cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_job_id(job_id: object) -> str:
    """``job_id`` if it has one of ``JOB_ID_PATTERNS``' shapes; ``ValueError`` otherwise."""
    if not isinstance(job_id, str) or re.fullmatch(_JOB_ID, job_id) is None:
        raise ValueError(f"not a job id: {_shown(job_id)}")
    return job_id


def check_attempt(attempt: object) -> int:
    """``attempt`` if it is an int in 1..MAX_ATTEMPT (a record's ``attempts`` after its first claim)."""
    if type(attempt) is not int or not 1 <= attempt <= MAX_ATTEMPT:
        raise ValueError(f"not an attempt number: {_shown(attempt)}")
    return attempt


def _check(pattern: str, value: object, what: str) -> str:
    if not isinstance(value, str) or re.fullmatch(pattern, value) is None:
        raise ValueError(f"not {what}: {_shown(value)}")
    return value


def input_key(job_id: str, name: str) -> str:
    """``inputs/<job>/<name>``; ``name`` is one of ``INPUT_NAMES``."""
    return f"inputs/{check_job_id(job_id)}/{_check(_INPUT_NAME, name, 'an input name')}"


def result_key(job_id: str, attempt: int, name: str = "video.mp4") -> str:
    """``results/<job>/<attempt>/<name>``; ``name`` is one of ``RESULT_NAMES``."""
    return f"results/{check_job_id(job_id)}/{check_attempt(attempt)}/{_check(_RESULT_NAME, name, 'a result name')}"


def artifact_key(job_id: str, attempt: int, name: str) -> str:
    """``artifacts/<job>/<attempt>/<name>.safetensors`` for a stage output named ``name`` (``[a-z][a-z0-9_]*``)."""
    name = _check(_OUTPUT_NAME, name, "a stage output name")
    return f"artifacts/{check_job_id(job_id)}/{check_attempt(attempt)}/{name}.safetensors"


def checkpoint_key(job_id: str, attempt: int, step: int) -> str:
    """``artifacts/<job>/<attempt>/checkpoint-<step>.safetensors``, the step zero-padded so keys sort by step."""
    if type(step) is not int or not 0 <= step <= MAX_STEP:
        raise ValueError(f"not a step number: {_shown(step)}")
    return f"artifacts/{check_job_id(job_id)}/{check_attempt(attempt)}/checkpoint-{step:06d}.safetensors"


def _check_area(area: object) -> Area:
    if area not in AREAS:
        raise ValueError(f"not a storage area: {_shown(area)}")
    return area  # type: ignore[return-value]


def area_prefix(area: Area) -> str:
    """``<area>/``: everything of one kind (what a lifecycle rule or a sweep covers)."""
    return f"{_check_area(area)}/"


def job_prefix(area: Area, job_id: str) -> str:
    """``<area>/<job>/``: everything of one job in one area."""
    return f"{_check_area(area)}/{check_job_id(job_id)}/"


def attempt_prefix(area: Literal["results", "artifacts"], job_id: str, attempt: int) -> str:
    """``<area>/<job>/<attempt>/``: everything one attempt wrote in one area."""
    if area == "inputs":
        raise ValueError("inputs belong to the job, not to an attempt")
    return f"{_check_area(area)}/{check_job_id(job_id)}/{check_attempt(attempt)}/"


def parse_key(key: object) -> ParsedKey:
    """``key`` taken apart if it is a key of the layout; ``ValueError`` for anything else."""
    match = re.fullmatch(_KEY, key) if isinstance(key, str) else None
    if match is None:
        raise ValueError(f"not an object key of the layout: {_shown(key)}")
    text = cast(str, key)  # it matched: a str
    if match["area"]:
        return ParsedKey(text, "inputs", match["job"], None, match["name"])
    if match["area_r"]:
        return ParsedKey(text, "results", match["job_r"], int(match["attempt_r"]), match["name_r"])
    return ParsedKey(text, "artifacts", match["job_a"], int(match["attempt_a"]), match["name_a"])


def check_prefix(prefix: object) -> str:
    """``prefix`` if it is ``""`` or one of the prefixes above; ``ValueError`` otherwise."""
    if not isinstance(prefix, str) or re.fullmatch(_PREFIX, prefix) is None:
        raise ValueError(f"not a key prefix of the layout: {_shown(prefix)}")
    return prefix
