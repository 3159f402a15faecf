"""A diffusion replica that spans N GPUs of one node: N-1 worker actors join it in one torch.distributed group.

The replica itself is rank 0. Serve gives it a placement group of N bundles
(one GPU each, ``STRICT_PACK``: one node) through ``replica_placement``; the
replica starts a worker actor in each other bundle, and every rank loads the
transformer and wraps it in ``SequenceParallelTransformer``. Per pass, the
replica ships each worker only a small description of the inputs (one Ray
call); the tensors themselves go out by ``torch.distributed`` broadcast (NVLink
on GPUs), every rank computes its share, and every rank ends with the output.

Ray is imported only inside the functions that need it; the model code stays
in ``serving.families``.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Protocol

import torch
import torch.distributed as dist

from serving.families.ltx2.parallel import (
    PassSpec,
    SequenceParallelTransformer,
    broadcast_pass_inputs,
    describe_pass_inputs,
)

__all__ = [
    "replica_placement",
    "TransformerLoader",
    "TinyTransformerLoader",
    "PretrainedTransformerLoader",
    "ReferenceTransformerLoader",
    "ShardWorker",
    "ShardedTransformerGroup",
]


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


# --------------------------------------------------------------------------- what each rank loads


class TransformerLoader(Protocol):
    """Picklable: builds the same transformer on every rank (the worker actors call it)."""

    def __call__(self, device: torch.device, dtype: torch.dtype) -> torch.nn.Module: ...


@dataclass(frozen=True)
class TinyTransformerLoader:
    """The tiny checkpoint's transformer, built in code (deterministic: identical on every rank)."""

    def __call__(self, device, dtype):
        from serving.families.ltx2.tiny import tiny_ltx2_components

        return tiny_ltx2_components()["transformer"].to(device=device, dtype=dtype).eval()


@dataclass(frozen=True)
class PretrainedTransformerLoader:
    """A diffusers checkpoint's transformer (a local path every node can read, or a reachable hub id)."""

    path: str
    subfolder: str = "transformer"

    def __call__(self, device, dtype):
        from diffusers import LTX2VideoTransformer3DModel

        model = LTX2VideoTransformer3DModel.from_pretrained(self.path, subfolder=self.subfolder, torch_dtype=dtype)
        return model.to(device).eval()


@dataclass(frozen=True)
class ReferenceTransformerLoader:
    """The real LTX-2 19B dims with seeded random weights (benchmarks: nothing downloaded)."""

    seed: int = 0
    overrides: dict = field(default_factory=dict)

    def __call__(self, device, dtype):
        from serving.families.ltx2.reference import build_component

        return build_component("transformer", device=device, dtype=dtype, seed=self.seed, overrides=self.overrides)


# --------------------------------------------------------------------------- ranks


def _device_and_backend() -> tuple[torch.device, str]:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device()), "nccl"
    return torch.device("cpu"), "gloo"


class ShardWorker:
    """Rank 1..N-1 of a replica: joins the group, loads the transformer, then runs each pass rank 0 announces."""

    def __init__(self, rank: int, world: int, loader: TransformerLoader, dtype: str):
        self.rank, self.world, self.loader, self.dtype = rank, world, loader, getattr(torch, dtype)
        self.device, self.backend = _device_and_backend()
        self.sharded: SequenceParallelTransformer | None = None

    def join(self, address: str, port: int, timeout_s: float) -> str:
        dist.init_process_group(
            self.backend, init_method=f"tcp://{address}:{port}", rank=self.rank, world_size=self.world,
            timeout=timedelta(seconds=timeout_s),
        )
        self.sharded = SequenceParallelTransformer(self.loader(self.device, self.dtype))
        return f"rank {self.rank} on {self.device} ({self.backend})"

    def run_pass(self, spec: PassSpec) -> None:
        inputs = broadcast_pass_inputs(spec, None, self.device)
        self.sharded(**inputs)

    def leave(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class ShardedTransformerGroup:
    """Rank 0's handle (inside the replica): call it like the transformer; the pass runs on all ranks."""

    sharded: SequenceParallelTransformer | Callable
    workers: list
    device: torch.device
    timeout_s: float

    @classmethod
    def start(
        cls,
        loader: TransformerLoader,
        degree: int,
        *,
        dtype: torch.dtype = torch.bfloat16,
        placement_group=None,
        timeout_s: float = 600.0,
    ) -> ShardedTransformerGroup:
        """Start ``degree - 1`` workers in this replica's placement group and join them; ``degree`` 1 runs alone."""
        device, backend = _device_and_backend()
        if degree == 1:
            model = loader(device, dtype)
            return cls(sharded=lambda **kwargs: model(**kwargs, return_dict=False), workers=[], device=device, timeout_s=timeout_s)
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = placement_group or ray.util.get_current_placement_group()
        if group is None or len(group.bundle_specs) < degree:
            raise ValueError(
                f"a diffusion replica spanning {degree} GPUs needs a placement group of {degree} bundles: deploy it with "
                "replica_placement(degree) as its Serve options"
            )
        address, port = ray.util.get_node_ip_address(), _free_port()
        dtype_name = str(dtype).removeprefix("torch.")
        workers = []
        for rank in range(1, degree):
            bundle = group.bundle_specs[rank]
            actor = ray.remote(ShardWorker).options(
                num_cpus=bundle.get("CPU", 0),
                num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=rank),
            )
            workers.append(actor.remote(rank, degree, loader, dtype_name))
        joined = [worker.join.remote(address, port, timeout_s) for worker in workers]
        dist.init_process_group(
            backend, init_method=f"tcp://{address}:{port}", rank=0, world_size=degree, timeout=timedelta(seconds=timeout_s)
        )
        ray.get(joined, timeout=timeout_s)
        sharded = SequenceParallelTransformer(loader(device, dtype))
        return cls(sharded=sharded, workers=workers, device=device, timeout_s=timeout_s)

    @property
    def degree(self) -> int:
        return len(self.workers) + 1

    def __call__(self, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """One transformer pass (same arguments as the model's forward); returns (video, audio) on this device."""
        kwargs.pop("return_dict", None)
        if not self.workers:
            return self.sharded(**kwargs)
        import ray

        spec = describe_pass_inputs(kwargs)
        running = [worker.run_pass.remote(spec) for worker in self.workers]
        inputs = broadcast_pass_inputs(spec, kwargs, self.device)
        output = self.sharded(**inputs)
        ray.get(running, timeout=self.timeout_s)  # surfaces a worker's error
        return output

    def close(self) -> None:
        if not self.workers:
            return
        import ray

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
