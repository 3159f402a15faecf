"""`reelserve plan`: where every stage lands, what it needs, and whether the config can work at all.

Nothing is loaded or started: memory comes from the family's sizing (config
files and safetensors headers, or the published configs), placement from the
same options ``cluster.placement`` gives Ray Serve. Problems name the config
field to change; a config with problems is refused.

- A replica's expected load time is its weight bytes over the read bandwidth
  (``startup.shared_read_gb_per_s``; from a node-local copy,
  ``startup.cache_read_gb_per_s``), before its warm-up.
- GPUs shared by several stages are counted for the *worst* order their
  replicas may start in (Ray places each where it first fits, in start order;
  each process is capped at its share, so whatever starts first never takes
  another's room): a config that packs only in some orders is refused.
- A diffusion replica over N GPUs holds the whole transformer on every GPU and
  1/N of the activations (sequence parallelism): it is sized per GPU.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from typing import cast

from cluster.config import ACCELERATOR_MEMORY_GB, REWRITER_STAGE, NodeType, ReelserveConfig, StageConfig, parse_size
from cluster.placement import drain_seconds
from cluster.startup_config import CUDA_CONTEXT_GB
from cluster.storage_config import default_results_dir
from serving.families import get_family

__all__ = ["Plan", "StagePlan", "Problem", "make_plan", "format_plan"]

GB = 1e9
_CUDA_CONTEXT_GB = CUDA_CONTEXT_GB  # every process that touches a GPU holds one (kernels, cuBLAS workspace)


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
    load_s: float | None = None  # expected weight load from model.path (None: unknown, e.g. vLLM's share)
    cached_load_s: float | None = None  # from the node-local copy (startup.weights_cache_dir)

    @property
    def needs_gb(self) -> float:
        return self.weights_gb + self.activations_gb


@dataclass
class Plan:
    stages: list[StagePlan]
    handoffs: dict[str, int]  # bytes per job at the default request size
    handoff_size: str  # the request size the hand-offs are computed for
    gpus_at_min: dict[str, int]  # whole GPUs needed per accelerator type, shares packed in the worst start order
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
    packed = _gpus_needed(stages, min_replicas=True, worst_order=False)
    warnings: list[str] = []
    if config.nodes:
        for accelerator, needed in at_min.items():
            have = available.get(accelerator, 0)
            if packed.get(accelerator, 0) <= have < needed:
                shared = max((s for s in stages if 0 < s.gpus_per_replica < 1 and (s.accelerator or "GPU") == accelerator),
                             key=lambda s: s.gpus_per_replica)
                problems.append(Problem(
                    _budget_field(shared.name, config.stages[shared.name]),
                    f"the GPU shares fit {packed[accelerator]} {accelerator} GPU(s) packed largest first, but Ray "
                    f"places replicas in the order they start, and some orders need {needed}; the nodes offer {have}: "
                    "make the shares pack in any order (e.g. shares that add up to a whole GPU)",
                ))
            elif needed > have:
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


def _budget_field(name: str, stage: StageConfig) -> str:
    return f"stages.{name}.gpu_memory_gb" if stage.gpu_memory_gb is not None else f"stages.{name}.num_gpus"


def _stage_plan(name: str, config: ReelserveConfig, family, handoff_out: int, problems: list[Problem]) -> StagePlan:
    stage = config.stages[name]
    gpus = stage.gpus_per_replica
    accelerator = _accelerator(stage, config.nodes) if gpus > 0 else None
    model_stage = name != REWRITER_STAGE and family.stage(name).kind != "muxer"
    device = config.stage_model(name).device if model_stage else ("cuda" if gpus > 0 else "cpu")
    ranks = int(gpus) if gpus > 1 else 1  # a diffusion replica over N GPUs: sized per GPU (rank)
    if ranks > 1:
        _check_ranks(name, ranks, config, family, problems)
    budget = None
    if gpus > 0 and accelerator in ACCELERATOR_MEMORY_GB:
        budget = gpus / ranks * ACCELERATOR_MEMORY_GB[accelerator]
    elif gpus == 0 and stage.memory_gb is not None:
        budget = stage.memory_gb * 1024**3 / GB

    weights = activations = 0.0
    note = ""
    if name == REWRITER_STAGE:
        weights, note = _rewriter_memory(config, stage, accelerator, problems)
    elif model_stage:
        estimate = family.stage_memory(config, name)
        weights, activations, note = estimate.weights / GB, estimate.activations / GB, estimate.note
        if ranks > 1:
            activations /= ranks
            note += f"; per GPU of {ranks}: every GPU holds the weights, the activations are split"
        if gpus > 0:
            activations += _CUDA_CONTEXT_GB
            note += f", + {_CUDA_CONTEXT_GB:g} GB CUDA context"
    startup = config.startup
    reads = model_stage  # the rewriter's vLLM loads by itself; the muxer has no weights
    plan = StagePlan(
        name=name, replicas=_replicas(stage), device=device, accelerator=accelerator, gpus_per_replica=gpus,
        budget_gb=budget, weights_gb=weights, activations_gb=activations, note=note,
        handoff_out_bytes=handoff_out, drain_s=drain_seconds(name, config),
        load_s=weights / startup.shared_read_gb_per_s if reads else None,
        cached_load_s=weights / startup.cache_read_gb_per_s if reads else None,
    )
    _check_fit(plan, stage, config, problems)
    return plan


def _check_ranks(name: str, ranks: int, config: ReelserveConfig, family, problems: list[Problem]) -> None:
    """A replica over several GPUs: only diffusion, with a family that shards its passes, and nothing that keeps
    per-request state a rank would not see."""
    where = f"stages.{name}.num_gpus"
    if name == REWRITER_STAGE or family.stage(name).kind != "diffusion":
        problems.append(Problem(where, f"only diffusion spans several GPUs (sequence parallel); give {name} 1 or a share"))
        return
    if family.sequence_parallel is None:
        problems.append(Problem(where, f"the {family.name} family has no sequence-parallel pass yet; use 1"))
    loop, speed = getattr(config.model, "diffusion", None), getattr(config.model, "speed", None)
    if getattr(loop, "step_cache", "none") != "none":
        problems.append(Problem(
            "model.diffusion.step_cache",
            f"not with {where} {ranks}: the cache keeps per-request state between steps that the other ranks do not share",
        ))
    if getattr(speed, "compile", False):
        problems.append(Problem(
            "model.speed.compile",
            f"not with {where} {ranks} yet: the sequence-parallel attention's collectives under torch.compile are "
            "unverified (needs a GPU run)",
        ))
    if not config.nodes and config.ray.num_gpus is not None and ranks > config.ray.num_gpus:
        problems.append(Problem(where, f"a replica spans {ranks} GPUs but the local cluster offers {config.ray.num_gpus} (ray.num_gpus)"))


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


def _gpus_needed(stages: list[StagePlan], min_replicas: bool, worst_order: bool = True) -> dict[str, int]:
    """Whole GPUs per accelerator type; fractional shares packed first-fit in the worst order replicas may start
    in (Ray places each where it first fits), or largest first with ``worst_order`` False."""
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
        bins = worst_first_fit(fractions) if worst_order else _first_fit(sorted(fractions, reverse=True))
        whole[accelerator] = whole.get(accelerator, 0) + bins
    return whole


def _first_fit(order) -> int:
    """GPUs first-fit uses for the shares in this order."""
    bins: list[float] = []
    for share in order:
        for index, used in enumerate(bins):
            if used + share <= 1.0 + 1e-9:
                bins[index] += share
                break
        else:
            bins.append(share)
    return len(bins)


_MAX_ORDERS = 50_000  # distinct start orders tried before falling back to a bound that holds for every order


def worst_first_fit(shares: list[float]) -> int:
    """The most GPUs first-fit can use for these shares over every order they may start in.

    Distinct orders are tried (replicas of one stage are alike); past ``_MAX_ORDERS`` a bound that holds for every
    order is used: a new GPU is opened only when every open one is fuller than 1 - the largest share.
    """

    counts = Counter(round(share, 6) for share in shares)
    if _distinct_orders(counts) <= _MAX_ORDERS:
        return max(_first_fit(order) for order in islice(_multiset_orders(counts), _MAX_ORDERS))
    largest = max(shares)
    if largest >= 1 - 1e-9:
        return len(shares)
    return min(len(shares), math.floor(sum(shares) / (1 - largest)) + 1)


def _distinct_orders(counts) -> int:
    total = math.factorial(sum(counts.values()))
    for count in counts.values():
        total //= math.factorial(count)
    return total


def _multiset_orders(counts):
    """Every distinct order of a multiset of shares."""
    if not counts:
        yield ()
        return
    for value in sorted(counts):
        rest = counts.copy()
        rest[value] -= 1
        if not rest[value]:
            del rest[value]
        for tail in _multiset_orders(rest):
            yield (value, *tail)


def _gpus_available(nodes: list[NodeType]) -> dict[str, int]:
    available: dict[str, int] = {}
    for node in nodes:
        if node.gpus > 0:
            accelerator = cast(str, node.accelerator_type)  # set wherever gpus > 0 (NodeType checks it)
            available[accelerator] = available.get(accelerator, 0) + node.gpus * node.max_nodes
    return available


def format_plan(plan: Plan) -> str:
    """The plan as the table `reelserve plan` prints."""
    lines = [
        f"{'stage':<18} {'replicas':>9} {'device':>6} {'accel':>8} {'GPUs/rep':>8} {'needs GB':>9} {'budget GB':>9} "
        f"{'hand-off out':>13} {'drain s':>8} {'load s':>7}"
    ]
    for s in plan.stages:
        replicas = f"{s.replicas[0]}" if s.replicas[0] == s.replicas[1] else f"{s.replicas[0]}..{s.replicas[1]}"
        budget = "-" if s.budget_gb is None else f"{s.budget_gb:.1f}"
        lines.append(
            f"{s.name:<18} {replicas:>9} {s.device:>6} {s.accelerator or '-':>8} {s.gpus_per_replica:>8g} "
            f"{s.needs_gb:>9.2f} {budget:>9} {_megabytes(s.handoff_out_bytes):>13} {s.drain_s:>8g} "
            f"{'-' if s.load_s is None else f'{s.load_s:.1f}':>7}"
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
                 + (f"; the nodes offer {_gpu_text(plan.gpus_available)}" if plan.gpus_available else "")
                 + " (shared GPUs counted for the worst order replicas may start in)")
    lines += [f"storage: {line}" for line in plan.storage]
    loading = [s for s in plan.stages if s.load_s is not None]
    if loading:
        slowest = max(loading, key=lambda s: cast(float, s.load_s))
        lines.append(
            f"start: weights load in up to {slowest.load_s:.1f} s ({slowest.name}, {slowest.weights_gb:.1f} GB at "
            f"startup.shared_read_gb_per_s), {slowest.cached_load_s:.1f} s from a node-local copy "
            "(startup.weights_cache_dir); each replica then warms up before it takes traffic"
        )
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
