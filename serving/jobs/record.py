"""The job record: everything the API shows about a job, plus what recovery needs."""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict, dataclass, field, fields

from serving.protocol import InputSpec, JobSpec, JobStatus, RenderPlan

__all__ = ["JobRecord", "new_job_id", "job_spec", "PHOTO_INPUT", "RECORD_KEPT_AFTER_EXPIRY_S"]

# An expired job's record outlives its video by this long, so its routes answer "expired" (410), not "unknown".
RECORD_KEPT_AFTER_EXPIRY_S = 86400.0
PHOTO_INPUT = InputSpec(name="photo", kind="image", role="first_frame")  # the one photo of an image-to-video job


def new_job_id() -> str:
    return "video_" + secrets.token_hex(12)


@dataclass
class JobRecord:
    id: str
    model: str
    prompt: str
    negative_prompt: str
    seconds: float
    width: int
    height: int
    fps: int
    seed: int
    has_image: bool
    inputs: list[dict] = field(default_factory=list)  # the stored inputs: name, kind, role (InputSpec fields)
    enhance_prompt: bool = False
    revised_prompt: str | None = None  # the rewriter's version of ``prompt`` (as OpenAI's image API names it)
    rewrite_fallback: str | None = None  # why the original prompt was used although a rewrite was asked for
    status: JobStatus = JobStatus.QUEUED
    progress: int = 0  # 0..100
    stage: str = "queued"  # which stage the job is in
    step: int = 0  # finished denoising steps
    total_steps: int = 0
    num_inference_steps: int | None = None  # what the request asked for (None: the model's configured steps)
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    completed_at: float | None = None
    error_code: str | None = None
    error_message: str | None = None
    result_attempt: int | None = None  # whose MP4 is the result: named by the fenced write that completed the job
    result_bytes: int = 0
    expires_at: float | None = None  # when an ended job's video and inputs go (storage.results_ttl_s after its end)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    cancel_requested: bool = False
    delete_requested: bool = False
    owner: str | None = None  # orchestrator currently running it; None while queued or handed over
    lease_until: float = 0.0  # the owner must renew before this time (the store's clock)
    attempts: int = 0  # claims so far; the current owner's writes carry this number (its fence)
    takeovers: int = 0  # claims after an owner vanished without handing the job over (a crash)
    deadline_at: float | None = None  # first start + jobs.job_timeout_s: attempts share one deadline
    done_stages: list[str] = field(default_factory=list)  # stages whose outputs are kept for a takeover
    resumed_from_step: int | None = None  # denoising step a takeover resumed from (no finished step redone)
    tenant: str = "default"  # who owns the job (the API key's tenant; "default" when the server runs open)
    priority: int = 1  # within its tenant: 0 low, 1 normal, 2 high
    max_queue_wait_s: float | None = None  # the job expires if still queued this long after it was created
    return_last_frame: bool = False  # the Seedance-compatible route also offers the video's last frame as PNG
    callback_url: str | None = None  # where its terminal state is POSTed (signed), if anywhere
    webhook: dict | None = None  # delivery state of that POST: delivered, attempts, last_status, owner, lease_until

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["status"] = int(self.status)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> JobRecord:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["status"] = JobStatus(int(values.get("status", 0)))
        return cls(**values)


def job_spec(record: JobRecord, num_inference_steps: int, frame_rule: tuple[int, int]) -> JobSpec:
    """What the record asks a pipeline to generate. ``frame_rule``: the family's (step, offset) of frame counts."""
    frame_step, frame_offset = frame_rule
    plan = RenderPlan.build(
        width=record.width, height=record.height, fps=record.fps, seconds=record.seconds, seed=record.seed,
        num_inference_steps=num_inference_steps, frame_step=frame_step, frame_offset=frame_offset,
    )
    inputs = tuple(InputSpec(**spec) for spec in record.inputs)
    if record.has_image and not inputs:  # recorded before inputs were listed
        inputs = (PHOTO_INPUT,)
    return JobSpec(
        job_id=record.id, prompt=record.prompt, negative_prompt=record.negative_prompt, plan=plan, inputs=inputs,
        enhance_prompt=record.enhance_prompt,
    )
