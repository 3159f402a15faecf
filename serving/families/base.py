"""What a model family declares: its stages, its pipeline, its config, limits, sizing and tiny checkpoint.

A family is a package under ``serving/families/`` whose ``FAMILY`` is a
:class:`Family`. Everything generic derives from it: ``build_app`` binds one
deployment per declared stage, the config checks stage names against it, the
job runner runs its ``pipeline``, progress marks follow its stages' shares,
``reelserve plan`` sizes them and ``reelserve generate`` runs the same
pipeline in one process.

Family code is Ray-free and knows no runner: it never imports
``serving.stages``, ``serving.jobs`` or ``serving.ingress``; a running job
reaches it only through :class:`serving.protocol.JobContext`.

Heavy parts (diffusers, transformers) are named by import path
(``"package.module:attribute"``) and imported on first use, so reading a
family's declaration (the config, ``reelserve plan``) never loads them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Protocol

if TYPE_CHECKING:  # the declaration stays importable without torch
    from cluster.model_config import ModelConfigBase
    from serving.engine.core import DiffusionEngine
    from serving.protocol import RenderPlan

__all__ = [
    "TINY_MARKER",
    "ModelLimits",
    "StageKind",
    "StageSpec",
    "DiffusionModel",
    "Family",
    "LazyCallable",
    "MEDIA_ROLES",
    "MediaInput",
]

StageKind = Literal["model", "diffusion", "muxer"]

# The roles a request's media may play, and the kind of file each is (Seedance's content roles; the OpenAI
# Videos API's input_reference is the first frame).
MEDIA_ROLES = {"first_frame": "image", "last_frame": "image", "reference_image": "image",
               "reference_video": "video", "reference_audio": "audio"}


@dataclass(frozen=True)
class MediaInput:
    """One file a client sent with a request, as the ingress hands it to a family's ``admit_inputs``.

    ``field`` is how the client named it (``references[2]``, ``last_frame``, ``input_reference``), so a
    refusal names what the client sent; ``role`` is one of ``MEDIA_ROLES``.
    """

    field: str
    role: str
    data: bytes


# Written last into a finished tiny checkpoint: {"family": ..., "tiny": true, ...}.
TINY_MARKER = "reelserve_tiny.json"


class LazyCallable:
    """A function or class named ``"package.module:attribute"``, imported when first called."""

    def __init__(self, import_path: str):
        module, _, attribute = import_path.partition(":")
        if not module or not attribute:
            raise ValueError(f"'{import_path}' is not an import path of the form package.module:attribute")
        self.import_path = import_path
        self._target: Callable | None = None

    @property
    def target(self) -> Any:
        if self._target is None:
            module, _, attribute = self.import_path.partition(":")
            self._target = getattr(importlib.import_module(module), attribute)
        return self._target

    def __call__(self, *args, **kwargs):
        return self.target(*args, **kwargs)

    def __reduce__(self):  # travels to Ray replicas as its import path, never as the loaded object
        return (LazyCallable, (self.import_path,))

    def __repr__(self) -> str:
        return f"LazyCallable({self.import_path!r})"


@dataclass(frozen=True)
class ModelLimits:
    """Shape rules of a loaded checkpoint, read from its component configs (no weights).

    A request's frames are ``k * frame_step + frame_offset``; its latent grid is
    the frame size divided by ``spatial_compression`` and the frame count
    compressed by ``temporal_compression``.
    """

    size_multiple: int  # width and height must be multiples of this
    temporal_compression: int
    audio_sample_rate: int
    max_prompt_tokens: int
    spatial_compression: int = 32
    frame_step: int = 0  # 0: the temporal compression (LTX-2: 8k + 1)
    frame_offset: int = 1

    @property
    def frames_step(self) -> int:
        return self.frame_step or self.temporal_compression


@dataclass(frozen=True)
class StageSpec:
    """One stage of a family's graph, as its deployment and the planner see it.

    - ``kind``: ``model`` (a component class the generic model stage loads and
      calls), ``diffusion`` (the family's ``DiffusionModel`` in reelserve's
      engine) or ``muxer`` (the shared MP4 writer).
    - ``component``: what a ``model`` stage loads, ``(model config) -> object``.
    - ``methods``: the methods a pipeline may call, each with the names of the
      hand-offs it returns, in order (kept under those names for a takeover).
    - ``gpu``: whether the stage computes on a GPU when one is reserved.
    - ``progress_share``: its share of a job's run time, for progress marks.
    - ``weights``: the checkpoint subfolders it reads weights from (what a
      node-local weights cache copies for it; configs are always copied).

    A ``model`` stage's component may have ``warm_up()`` (one request of the
    default size, run before the replica takes traffic) and ``loaded`` (a
    ``serving.weights.LoadLog`` of its components' load times).
    """

    name: str
    kind: StageKind
    methods: Mapping[str, tuple[str, ...]]
    component: Callable[[Any], Any] | None = None
    gpu: bool = True
    progress_share: float = 1.0
    summary: str = ""
    weights: tuple[str, ...] = ()

    def outputs(self, method: str) -> tuple[str, ...]:
        try:
            return tuple(self.methods[method])
        except KeyError:
            raise ValueError(
                f"stage {self.name} has no method '{method}'; it has {', '.join(sorted(self.methods))}"
            ) from None


class DiffusionModel(Protocol):
    """What a family gives the diffusion stage: its engine, and how a stage call becomes an engine request.

    The stage owns the loop's thread, progress, cancellation and checkpoint
    storage; this object owns the model's step math (inside ``engine``). The
    engine's checkpoints carry ``finished_steps``: the stage keys them by it and
    reports it as the job's ``resumed_from_step``.
    """

    engine: "DiffusionEngine"

    def request(self, request_id: str, *payloads: Any) -> Any:
        """The engine request for one ``denoise`` call (``payloads``: the call's hand-offs read back, and values)."""

    def plan_of(self, request: Any) -> "RenderPlan": ...

    def total_steps(self, request: Any) -> int:
        """Denoising steps the request runs, every phase of its recipe included."""

    def latent_tokens(self, request: Any) -> int:
        """Latent tokens of the request: the unit of the autoscaler's and admission's cost."""

    def warm_up(self) -> None:
        """Run every configured shape bucket once (compile included) before the replica takes traffic."""

    def outputs(self, result: Any) -> tuple[Any, ...]:
        """The engine's output split into the stage's declared hand-offs, in order."""


@dataclass(frozen=True)
class Family:
    """Everything one model family declares.

    ``pipeline(ctx, job)`` is the family's short async function over a
    :class:`~serving.protocol.JobContext`; it returns the muxer's ``StoredVideo``.
    """

    name: str
    config_class: type[ModelConfigBase]
    stages: tuple[StageSpec, ...]
    pipeline: Callable[..., Any]
    read_limits: Callable[[Any], ModelLimits]
    token_counter: Callable[[Any], Callable[[str], int]]  # (config) -> tokenizer-only counter
    # (config, passes=None) -> the diffusion stage's model; ``passes`` runs its transformer passes on a rank group.
    diffusion_model: Callable[..., DiffusionModel]
    stage_memory: Callable[[Any, str], Any]  # (ReelserveConfig, stage) -> MemoryEstimate
    handoff_sizes: Callable[..., Any]  # (model config, width, height, seconds, fps) -> HandoffSizes
    build_tiny_checkpoint: Callable[[Any], Any]  # (directory) -> path of a tiny random checkpoint
    ensure_tiny_checkpoint: Callable[[], Any]  # () -> path of the cached tiny checkpoint, built on first use
    pipeline_classes: tuple[str, ...] = ()  # diffusers class names in a checkpoint's index that mean this family
    # () -> the dataclasses its stages hand on or checkpoint, beyond serving.protocol's (kept without pickle).
    stored_types: Callable[[], tuple[type, ...]] = tuple
    # (config) -> a picklable ``(device, dtype) -> rank pass`` that every rank of a multi-GPU diffusion replica
    # builds after joining the group (serving.parallel_group); None: the family's transformer runs on one GPU.
    sequence_parallel: Callable[[Any], Any] | None = None
    # (config, [MediaInput]) -> the InputSpecs to store them under, in order, or InvalidRequest naming the client's
    # field: every rule on the request's media, checked on headers before any decode. None: the family takes at
    # most one first-frame photo, which the ingress decodes within its memory budget (LTX-2).
    admit_inputs: Callable[[Any, Any], Any] | None = None
    # (config) -> what `GET /v1/models` says of the model beyond its id: its workflows and request limits.
    describe: Callable[[Any], dict] | None = None

    def __post_init__(self):
        names = [stage.name for stage in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"family {self.name}: stage names repeat: {names}")
        diffusion = [stage.name for stage in self.stages if stage.kind == "diffusion"]
        if diffusion != ["diffusion"]:
            # One name across families: `stages.diffusion` in every config, and what autoscaling and admission read.
            raise ValueError(f"family {self.name}: exactly one stage of kind diffusion, named diffusion; got {diffusion}")

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(stage.name for stage in self.stages)

    def stage(self, name: str) -> StageSpec:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ValueError(f"family {self.name} has no stage '{name}'; its stages are {', '.join(self.stage_names)}")

    @property
    def diffusion_stage(self) -> StageSpec:
        return next(stage for stage in self.stages if stage.kind == "diffusion")

