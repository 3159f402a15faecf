"""A diffusion replica that spans N GPUs of one node: N-1 worker actors join it in one torch.distributed group.

The replica itself is rank 0. Serve gives it a placement group of N bundles
(one GPU each, ``STRICT_PACK``: one node): ``cluster.placement`` builds it from
``stages.diffusion.num_gpus``. The replica starts a worker actor in each other
bundle, and every rank builds the family's rank pass (its ``sequence_parallel``
hook: e.g. LTX-2's transformer wrapped for Ulysses sequence parallelism), each
loading the weights straight onto its own GPU. Per pass, the replica ships each
worker only a small description of the inputs (one Ray call); the tensors go
out by ``torch.distributed`` broadcast (NVLink on GPUs, gloo on CPUs), every
rank computes its share, and every rank ends with the output.

A worker that dies breaks the group: the pass in flight fails with a group
error, ``alive()`` turns false, and the replica is lost (``serving.stages.health``):
Serve replaces it and its jobs resume from their checkpoints elsewhere. Workers
are owned by the replica's process, so they end with it.

Family-free: what a rank computes comes from the family; the inputs travel as
``serving.engine.pass_inputs`` describes them.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist

from serving.engine.pass_inputs import broadcast_pass_inputs, describe_pass_inputs

__all__ = ["replica_placement", "RankPasses", "ShardWorker", "ShardedTransformerGroup"]


def replica_placement(degree: int, num_cpus_per_rank: float = 1.0, num_gpus_per_rank: float = 1.0) -> dict:
    """Serve deployment options for a replica spanning ``degree`` GPUs of one node.

    Bundle 0 holds the replica actor itself (its ``ray_actor_options`` must fit
    in it); bundles 1..degree-1 hold the worker actors. In the served graph the
    placement module builds the same layout from the diffusion stage's
    ``num_gpus``; this helper serves deployments built by hand (and tests).
    The group's degree is the bundle count, so pass ``degree=int(num_gpus)``.
    """
    if degree < 1:
        raise ValueError(f"degree must be at least 1; got {degree}")
    bundle = {"CPU": num_cpus_per_rank}
    if num_gpus_per_rank:
        bundle["GPU"] = num_gpus_per_rank
    return {"placement_group_bundles": [dict(bundle) for _ in range(degree)], "placement_group_strategy": "STRICT_PACK"}


# --------------------------------------------------------------------------- what each rank builds


class RankPasses(Protocol):
    """Picklable: what every rank builds once it joined the group, ``(device, dtype) -> pass``.

    The pass is called with a transformer pass's inputs (all ranks, same inputs) and returns its output; it
    has ``transformer`` (the loaded module: rank 0's engine reads its config).
    """

    def __call__(self, device: torch.device, dtype: torch.dtype) -> Callable[..., Any]: ...


# --------------------------------------------------------------------------- ranks


def _device_and_backend() -> tuple[torch.device, str]:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device()), "nccl"
    return torch.device("cpu"), "gloo"


class ShardWorker:
    """Rank 1..N-1 of a replica: joins the group, builds the family's rank pass, then runs each pass rank 0 announces.

    Threaded (two calls at once), so ``ping`` answers while a pass runs.
    """

    def __init__(self, rank: int, world: int, passes: RankPasses, dtype: str):
        self.rank, self.world, self.factory, self.dtype = rank, world, passes, getattr(torch, dtype)
        self.device, self.backend = _device_and_backend()
        self.passes: Callable[..., Any] | None = None

    def join(self, address: str, port: int, timeout_s: float) -> str:
        dist.init_process_group(
            self.backend, init_method=f"tcp://{address}:{port}", rank=self.rank, world_size=self.world,
            timeout=timedelta(seconds=timeout_s),
        )
        self.passes = self.factory(self.device, self.dtype)
        return f"rank {self.rank} on {self.device} ({self.backend})"

    def run_pass(self, spec) -> None:
        inputs = broadcast_pass_inputs(spec, None, self.device)
        assert self.passes is not None  # join made them
        with torch.inference_mode():
            self.passes(**inputs)

    def ping(self) -> int:
        return self.rank

    def placement(self) -> dict:
        """Where this rank really runs: what Ray gave it and the device it computes on."""
        import ray  # noqa: PLC0415 - a worker is a Ray actor

        context = ray.get_runtime_context()
        return {"rank": self.rank, "device": str(self.device), "backend": self.backend,
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "resources": context.get_assigned_resources(),
                "node_id": context.get_node_id()}

    def leave(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class ShardedTransformerGroup:
    """Rank 0's handle (inside the replica): call it like the rank pass; the pass runs on all ranks."""

    passes: Callable[..., Any]  # this rank's pass
    workers: list
    device: torch.device
    timeout_s: float
    worker_names: tuple[str, ...] = ()

    @classmethod
    def start(
        cls,
        passes: RankPasses,
        degree: int,
        *,
        dtype: torch.dtype = torch.bfloat16,
        placement_group=None,
        timeout_s: float = 600.0,
        name: str | None = None,
    ) -> ShardedTransformerGroup:
        """Start ``degree - 1`` workers in this replica's placement group and join them; ``degree`` 1 runs alone.

        ``name``: the workers are named ``<name>-rank<r>`` (an operator, or a test, can find them).
        """
        device, backend = _device_and_backend()
        if degree == 1:
            return cls(passes=passes(device, dtype), workers=[], device=device, timeout_s=timeout_s)
        import ray  # noqa: PLC0415 - only a multi-rank replica needs Ray here
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # noqa: PLC0415 - Ray only inside a replica

        group = placement_group or (ray.util.get_current_placement_group() if ray.is_initialized() else None)
        if group is None or len(group.bundle_specs) < degree:
            raise ValueError(
                f"a diffusion replica spanning {degree} GPUs needs a placement group of {degree} bundles: deploy it with "
                "replica_placement(degree) as its Serve options"
            )
        address, port = ray.util.get_node_ip_address(), _free_port()
        dtype_name = str(dtype).removeprefix("torch.")
        workers: list[Any] = []  # Ray actor handles
        names: list[str] = []
        for rank in range(1, degree):
            bundle = group.bundle_specs[rank]
            options = dict(
                num_cpus=bundle.get("CPU", 0),
                num_gpus=bundle.get("GPU", 0),
                max_concurrency=2,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=rank),
            )
            if name is not None:
                names.append(f"{name}-rank{rank}")
                options["name"] = names[-1]
            workers.append(ray.remote(ShardWorker).options(**options).remote(rank, degree, passes, dtype_name))
        joined = [worker.join.remote(address, port, timeout_s) for worker in workers]
        dist.init_process_group(
            backend, init_method=f"tcp://{address}:{port}", rank=0, world_size=degree, timeout=timedelta(seconds=timeout_s)
        )
        ray.get(joined, timeout=timeout_s)
        return cls(passes=passes(device, dtype), workers=workers, device=device, timeout_s=timeout_s,
                   worker_names=tuple(names))

    @property
    def degree(self) -> int:
        return len(self.workers) + 1

    def __getattr__(self, name: str):
        # What the family reads from its own pass (the loaded transformer, its speed switches, load times).
        if name in ("transformer", "speed", "loaded"):
            return getattr(self.passes, name)
        raise AttributeError(name)

    def __call__(self, **kwargs):
        """One pass (the rank pass's arguments); returns its output on this device."""
        kwargs.pop("return_dict", None)
        if not self.workers:
            return self.passes(**kwargs)
        import ray  # noqa: PLC0415 - a multi-rank group exists only inside Ray

        spec = describe_pass_inputs(kwargs)
        running = [worker.run_pass.remote(spec) for worker in self.workers]
        inputs = broadcast_pass_inputs(spec, kwargs, self.device)
        output = self.passes(**inputs)
        ray.get(running, timeout=self.timeout_s)  # surfaces a worker's error
        return output

    def placements(self, timeout_s: float = 30.0) -> list[dict]:
        """Each worker rank's ``placement`` (rank 1 first)."""
        if not self.workers:
            return []
        import ray  # noqa: PLC0415 - a multi-rank group exists only inside Ray

        return ray.get([worker.placement.remote() for worker in self.workers], timeout=timeout_s)

    def alive(self, timeout_s: float = 5.0) -> bool:
        """Every worker answers (a dead one raises at once; a hung one times out)."""
        if not self.workers:
            return True
        import ray  # noqa: PLC0415 - a multi-rank group exists only inside Ray

        try:
            ray.get([worker.ping.remote() for worker in self.workers], timeout=timeout_s)
            return True
        except Exception:  # noqa: BLE001 - ActorDiedError, GetTimeoutError: the group is broken
            return False

    def close(self) -> None:
        if not self.workers:
            return
        import ray  # noqa: PLC0415 - a multi-rank group exists only inside Ray

        ray.get([worker.leave.remote() for worker in self.workers], timeout=60)
        if dist.is_initialized():
            dist.destroy_process_group()
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]
