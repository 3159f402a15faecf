"""`reelserve plan`: where every stage lands, what it needs, and whether the config can work at all.

Nothing is loaded or started: memory comes from the family's sizing (config
files and safetensors headers, or the published configs), placement from the
same options ``cluster.placement`` gives Ray Serve. Problems name the config
field to change; a config with problems is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cluster.config import ACCELERATOR_MEMORY_GB, REWRITER_STAGE, NodeType, ReelserveConfig, StageConfig, parse_size
from cluster.placement import drain_seconds
from cluster.storage_config import default_results_dir

__all__ = ["Plan", "StagePlan", "Problem", "make_plan", "format_plan"]

GB = 1e9
_CUDA_CONTEXT_GB = 0.5  # every process that touches a GPU holds a CUDA context (kernels, cuBLAS workspace)


@dataclass(frozen=True)
class Problem:
    """Something that cannot work; ``field`` is the config field to change."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


@dataclass
class StagePlan:
    name: str
    replicas: tuple[int, int]  # (min, max)
    device: str
    accelerator: str | None
    gpus_per_replica: float
    budget_gb: float | None  # device memory one replica may use; None where unknown
    weights_gb: float
    activations_gb: float
    note: str
    handoff_out_bytes: int
    drain_s: float

    @property
    def needs_gb(self) -> float:
        return self.weights_gb + self.activations_gb


@dataclass
class Plan:
    stages: list[StagePlan]
    handoffs: dict[str, int]  # bytes per job at the default request size
    handoff_size: str  # the request size the hand-offs are computed for
    gpus_at_min: dict[str, int]  # whole GPUs needed per accelerator type, shares packed
    gpus_at_max: dict[str, int]
    gpus_available: dict[str, int]  # per accelerator type, every node type at max_nodes
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    storage: list[str] = field(default_factory=list)  # where results and stage outputs go (StorageConfig.describe)

    @property
    def fits(self) -> bool:
        return not self.problems


def make_plan(config: ReelserveConfig, size: str | None = None, seconds: float | None = None) -> Plan:
    """The plan for ``config``; hand-offs are sized for ``size`` x ``seconds`` (default: the model's defaults)."""
    from serving.families import get_family

    family = get_family(config.model.family)
    width, height = parse_size(size or config.model.default_size)
    seconds = seconds or config.model.default_seconds
    handoffs = family.handoff_sizes(config.model, width, height, seconds, config.model.default_fps)
    outgoing = _outgoing_bytes(family, handoffs.as_dict())

    problems: list[Problem] = []
    stages = []
    for name in config.stage_names:
        stages.append(_stage_plan(name, config, family, outgoing.get(name, 0), problems))

    available = _gpus_available(config.nodes)
    at_min, at_max = _gpus_needed(stages, min_replicas=True), _gpus_needed(stages, min_replicas=False)
    warnings: list[str] = []
    if config.nodes:
        for accelerator, needed in at_min.items():
            have = available.get(accelerator, 0)
            if needed > have:
                problems.append(Problem(
                    "nodes", f"the stages need {needed} {accelerator} GPU(s) at their minimum replicas; the node "
                    f"types offer at most {have}",
                ))
        for accelerator, needed in at_max.items():
            have = available.get(accelerator, 0)
            if at_min.get(accelerator, 0) <= have < needed:
                warnings.append(
                    f"at max replicas the stages want {needed} {accelerator} GPU(s) but the nodes offer {have}: "
                    "scaling stops earlier"
                )
    return Plan(
        stages=stages, handoffs=handoffs.as_dict(), handoff_size=f"{width}x{height}, {seconds:g} s",
        gpus_at_min=at_min, gpus_at_max=at_max, gpus_available=available, problems=problems, warnings=warnings,
        storage=config.storage.describe(default_results_dir()),
    )


def _outgoing_bytes(family, handoffs: dict[str, int]) -> dict[str, int]:
    """Bytes each stage hands on per job: the sizes of the outputs its methods declare."""
    return {
        stage.name: sum(handoffs.get(name, 0) for outputs in stage.methods.values() for name in outputs)
        for stage in family.stages
    }


def _replicas(stage: StageConfig) -> tuple[int, int]:
    if stage.num_replicas is not None:
        return stage.num_replicas, stage.num_replicas
    return stage.min_replicas, stage.max_replicas


def _accelerator(stage: StageConfig, nodes: list[NodeType]) -> str | None:
    """The stage's accelerator type, or the only one the cluster has."""
    if stage.accelerator_type is not None:
        return stage.accelerator_type
    types = {n.accelerator_type for n in nodes if n.gpus > 0}
    return types.pop() if len(types) == 1 else None


def _stage_plan(name: str, config: ReelserveConfig, family, handoff_out: int, problems: list[Problem]) -> StagePlan:
    stage = config.stages[name]
    gpus = stage.gpus_per_replica
    accelerator = _accelerator(stage, config.nodes) if gpus > 0 else None
    model_stage = name != REWRITER_STAGE and family.stage(name).kind != "muxer"
    device = config.stage_model(name).device if model_stage else ("cuda" if gpus > 0 else "cpu")
    budget = None
    if gpus > 0 and accelerator in ACCELERATOR_MEMORY_GB:
        budget = gpus * ACCELERATOR_MEMORY_GB[accelerator]
    elif gpus == 0 and stage.memory_gb is not None:
        budget = stage.memory_gb * 1024**3 / GB

    weights = activations = 0.0
    note = ""
    if name == REWRITER_STAGE:
        weights, note = _rewriter_memory(config, stage, accelerator, problems)
    elif model_stage:
        estimate = family.stage_memory(config, name)
        weights, activations, note = estimate.weights / GB, estimate.activations / GB, estimate.note
        if gpus > 0:
            activations += _CUDA_CONTEXT_GB
            note += f", + {_CUDA_CONTEXT_GB:g} GB CUDA context"
    plan = StagePlan(
        name=name, replicas=_replicas(stage), device=device, accelerator=accelerator, gpus_per_replica=gpus,
        budget_gb=budget, weights_gb=weights, activations_gb=activations, note=note,
        handoff_out_bytes=handoff_out, drain_s=drain_seconds(name, config),
    )
    _check_fit(plan, stage, config, problems)
    return plan


def _rewriter_memory(config, stage: StageConfig, accelerator, problems: list[Problem]) -> tuple[float, str]:
    """vLLM takes its share of the GPU up front (weights + KV cache): gpu_memory_utilization x the GPU."""
    rewriter = config.rewriter
    if stage.gpus_per_replica == 0:
        return rewriter.kv_cache_memory_mb / 1024, "KV cache on the CPU (weights not counted)"
    if rewriter.gpu_memory_utilization > stage.gpus_per_replica + 1e-9:
        problems.append(Problem(
            "rewriter.gpu_memory_utilization",
            f"vLLM takes {rewriter.gpu_memory_utilization:g} of the GPU but stages.prompt_rewriter reserves "
            f"{stage.gpus_per_replica:g}; raise the reservation or lower the utilization",
        ))
    if accelerator not in ACCELERATOR_MEMORY_GB:
        return 0.0, "unknown GPU size"
    taken = rewriter.gpu_memory_utilization * ACCELERATOR_MEMORY_GB[accelerator]
    return taken, "vLLM's share of the GPU (weights + KV cache)"


def _check_fit(plan: StagePlan, stage: StageConfig, config: ReelserveConfig, problems: list[Problem]) -> None:
    where = f"stages.{plan.name}"
    budget_field = f"{where}.gpu_memory_gb" if stage.gpu_memory_gb is not None else f"{where}.num_gpus"
    if plan.gpus_per_replica == 0:
        budget_field = f"{where}.memory_gb"
    if plan.budget_gb is not None and plan.needs_gb > plan.budget_gb:
        if plan.weights_gb <= plan.budget_gb and plan.name == "diffusion":
            budget_field = "model.max_latent_tokens"  # the weights fit; the largest allowed request does not
        elif plan.weights_gb <= plan.budget_gb and plan.name == "video_decoder" and not getattr(config.model, "vae_tiling", True):
            budget_field = "model.vae_tiling"
        problems.append(Problem(
            budget_field,
            f"{plan.name} needs about {plan.needs_gb:.1f} GB ({plan.weights_gb:.1f} weights + "
            f"{plan.activations_gb:.1f} activations: {plan.note}) but a replica gets {plan.budget_gb:.1f} GB",
        ))
    if not config.nodes:
        return
    if stage.accelerator_type is not None and not any(n.accelerator_type == stage.accelerator_type for n in config.nodes):
        problems.append(Problem(
            f"{where}.accelerator_type",
            f"{stage.accelerator_type}, but no node type has {stage.accelerator_type} GPUs "
            f"(node types: {', '.join(n.name for n in config.nodes)})",
        ))
        return
    hosts = [n for n in config.nodes if _node_holds(n, stage, plan.accelerator)]
    if not hosts:
        largest = max((n.gpus for n in config.nodes if plan.accelerator in (None, n.accelerator_type)), default=0)
        if plan.gpus_per_replica > largest:
            problems.append(Problem(
                f"{where}.num_gpus",
                f"a replica spans {plan.gpus_per_replica:g} GPUs but the largest node has {largest}",
            ))
        else:
            problems.append(Problem(
                where, f"no node type can hold one replica ({stage.num_cpus:g} CPUs, {stage.memory_gb or 0:g} GiB, "
                f"{plan.gpus_per_replica:g} GPUs)",
            ))


def _node_holds(node: NodeType, stage: StageConfig, accelerator: str | None) -> bool:
    gpus = stage.gpus_per_replica
    if gpus > 0 and (node.gpus < math.ceil(gpus) or (accelerator and node.accelerator_type != accelerator)):
        return False
    return node.cpus >= stage.num_cpus and node.memory_gb >= (stage.memory_gb or 0)


def _gpus_needed(stages: list[StagePlan], min_replicas: bool) -> dict[str, int]:
    """Whole GPUs per accelerator type, fractional shares packed first-fit decreasing (as Ray places them)."""
    shares: dict[str, list[float]] = {}
    whole: dict[str, int] = {}
    for stage in stages:
        if stage.gpus_per_replica == 0:
            continue
        accelerator = stage.accelerator or "GPU"
        count = stage.replicas[0] if min_replicas else stage.replicas[1]
        if stage.gpus_per_replica >= 1:
            whole[accelerator] = whole.get(accelerator, 0) + count * int(stage.gpus_per_replica)
        else:
            shares.setdefault(accelerator, []).extend([stage.gpus_per_replica] * count)
    for accelerator, fractions in shares.items():
        bins: list[float] = []
        for share in sorted(fractions, reverse=True):
            for index, used in enumerate(bins):
                if used + share <= 1.0 + 1e-9:
                    bins[index] += share
                    break
            else:
                bins.append(share)
        whole[accelerator] = whole.get(accelerator, 0) + len(bins)
    return whole


def _gpus_available(nodes: list[NodeType]) -> dict[str, int]:
    available: dict[str, int] = {}
    for node in nodes:
        if node.gpus > 0:
            available[node.accelerator_type] = available.get(node.accelerator_type, 0) + node.gpus * node.max_nodes
    return available


def format_plan(plan: Plan) -> str:
    """The plan as the table `reelserve plan` prints."""
    lines = [
        f"{'stage':<18} {'replicas':>9} {'device':>6} {'accel':>8} {'GPUs/rep':>8} {'needs GB':>9} {'budget GB':>9} "
        f"{'hand-off out':>13} {'drain s':>8}"
    ]
    for s in plan.stages:
        replicas = f"{s.replicas[0]}" if s.replicas[0] == s.replicas[1] else f"{s.replicas[0]}..{s.replicas[1]}"
        budget = "-" if s.budget_gb is None else f"{s.budget_gb:.1f}"
        lines.append(
            f"{s.name:<18} {replicas:>9} {s.device:>6} {s.accelerator or '-':>8} {s.gpus_per_replica:>8g} "
            f"{s.needs_gb:>9.2f} {budget:>9} {_megabytes(s.handoff_out_bytes):>13} {s.drain_s:>8g}"
        )
    lines.append("")
    for s in plan.stages:
        if s.note:
            lines.append(f"  {s.name}: {s.weights_gb:.2f} GB weights + {s.activations_gb:.2f} GB activations ({s.note})")
    lines.append("")
    # Everything but what reaches the muxer (the compressed video track and the waveform) carries tensors.
    encoder_to_decoders = sum(v for k, v in plan.handoffs.items() if k not in ("encoded_video", "waveform"))
    lines.append(
        f"hand-offs per job at {plan.handoff_size}: {_megabytes(encoder_to_decoders)} from the text encoder to the "
        f"decoders, {_megabytes(sum(plan.handoffs.values()))} in all"
    )
    lines.append("  " + ", ".join(f"{k} {_megabytes(v)}" for k, v in plan.handoffs.items()))
    lines.append(f"GPUs at min replicas: {_gpu_text(plan.gpus_at_min)}; at max replicas: {_gpu_text(plan.gpus_at_max)}"
                 + (f"; the nodes offer {_gpu_text(plan.gpus_available)}" if plan.gpus_available else ""))
    lines += [f"storage: {line}" for line in plan.storage]
    for warning in plan.warnings:
        lines.append(f"warning: {warning}")
    for problem in plan.problems:
        lines.append(f"problem: {problem}")
    lines.append("fits" if plan.fits else f"does not fit: {len(plan.problems)} problem(s)")
    return "\n".join(lines)


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.2f} MB" if count >= 10_000 else f"{count} B"


def _gpu_text(gpus: dict[str, int]) -> str:
    return ", ".join(f"{count} x {kind}" for kind, count in sorted(gpus.items())) or "none"
