"""The ``startup:`` section of the config: how a replica gets from process start to ready.

```yaml
startup:
  weights_cache_dir: /local-nvme/reelserve-weights   # filled once per node from model.path
  shared_read_gb_per_s: 1.0                           # model.path (a network volume)
  cache_read_gb_per_s: 3.0                            # the node-local copy
```

A replica loads its weights straight onto its device (``serving.weights``),
then warms up (one request of the default size; diffusion: every shape bucket,
compile included) inside its constructor, so Serve routes nothing to it before
it is ready. ``reelserve plan`` turns each stage's weight bytes and these
bandwidths into an expected start time.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["CUDA_CONTEXT_GB", "StageRuntime", "StartupConfig"]

CUDA_CONTEXT_GB = 0.5  # every process that touches a GPU holds a CUDA context (kernels, cuBLAS workspace)


class StartupConfig(BaseModel):
    """Where replicas read their weights from, how fast, and the warm-up that gates their readiness."""

    model_config = ConfigDict(extra="forbid")

    weights_cache_dir: str | None = Field(
        None,
        description=(
            "Node-local directory (e.g. an NVMe disk) that holds a copy of the weights each stage loads, filled once "
            "per node from model.path (the first replica on a node copies, the others wait for it and read the copy). "
            "Unset: every replica reads model.path directly."
        ),
    )
    shared_read_gb_per_s: float = Field(
        1.0, gt=0,
        description="Read bandwidth of one replica from model.path (a network volume or object store mount), GB/s; `reelserve plan` uses it for the expected start time.",
    )
    cache_read_gb_per_s: float = Field(
        3.0, gt=0,
        description="Read bandwidth of one replica from weights_cache_dir (a node-local disk), GB/s; `reelserve plan` uses it for starts after the first on a node.",
    )
    warmup: bool = Field(
        True,
        description=(
            "Every model stage runs one request of the default size (diffusion: each of model.speed.shape_buckets, "
            "compile included) in its constructor, before Serve routes anything to it. false: the first request pays."
        ),
    )

    @field_validator("weights_cache_dir")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("/", "~")):
            raise ValueError(f"weights_cache_dir must be an absolute directory (every replica resolves it alike), not {value!r}")
        return value


class StageRuntime(BaseModel):
    """What one stage replica needs to start, besides its model: the planned device share and its ranks."""

    model_config = ConfigDict(extra="forbid")

    startup: StartupConfig = Field(default_factory=StartupConfig, description="The config's startup section.")
    memory_fraction: float | None = Field(
        None, gt=0, le=1,
        description=(
            "The planned share of its GPU (the stage's reservation): the process's allocations are capped at it, "
            "less the CUDA context (torch's per-process memory fraction). None: no cap (whole GPUs, or no GPU)."
        ),
    )
    ranks: int = Field(
        1, ge=1,
        description="Processes of one replica: the replica and ranks - 1 worker actors in its placement group (diffusion's num_gpus).",
    )
