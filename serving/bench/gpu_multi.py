"""One transformer pass sequence-parallel over 2 devices against one device (GPUs with NCCL; CPUs with gloo)."""

from __future__ import annotations

import json
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from serving.families.ltx2 import reference as ref
from serving.families.ltx2.parallel import SequenceParallelTransformer

__all__ = ["sequence_parallel_seconds", "WORLD"]

WORLD = 2


def sequence_parallel_seconds(bench) -> dict:
    """Time the main-shape pass on one device, free it, then on ``WORLD`` ranks; report the speed-up."""
    profile = bench.profile
    cuda = bench.device.type == "cuda"
    if cuda and torch.cuda.device_count() < WORLD:
        return {"skipped": f"needs {WORLD} GPUs; this machine has {torch.cuda.device_count()}"}
    single = bench.pass_seconds(profile.main_shape)
    bench.models.drop("transformer")

    with tempfile.TemporaryDirectory(prefix="reelserve-sp-") as scratch:
        out = Path(scratch) / "rank0.json"
        # fork is quick (the children inherit the imports) but unsafe once CUDA is initialised
        mp.start_processes(
            _rank, args=(_free_port(), profile, bench.repeats, str(out)), nprocs=WORLD, join=True,
            start_method="spawn" if cuda else "fork",
        )
        sharded = json.loads(out.read_text())["seconds"]
    return {
        "shape": "x".join(map(str, profile.main_shape)),
        "ranks": WORLD,
        "backend": "nccl" if cuda else "gloo",
        "one_device_pass_seconds": round(single, 4),
        "sharded_pass_seconds": round(sharded, 4),
        "speedup": round(single / sharded, 3),
        "how": "Ulysses sequence parallelism (serving.families.ltx2.parallel), inputs on every rank, median after a warm-up",
    }


def _rank(rank: int, port: int, profile, repeats: int, out: str) -> None:
    cuda = profile.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        dtype = getattr(torch, profile.dtype)
        transformer = ref.build_component(
            "transformer", device=device, dtype=dtype, overrides=profile.overrides.get("transformer")
        )
        sharded = SequenceParallelTransformer(transformer)
        width, height, frames = profile.main_shape
        inputs = ref.random_transformer_inputs(
            transformer.config, width, height, frames, fps=profile.fps, text_tokens=profile.text_tokens,
            device=device, dtype=dtype,
        )
        samples = []
        with torch.no_grad():
            for attempt in range(repeats + 1):
                dist.barrier()
                start = time.perf_counter()
                sharded(**inputs)
                if cuda:
                    torch.cuda.synchronize(device)
                if attempt:  # the first is the warm-up
                    samples.append(time.perf_counter() - start)
        if rank == 0:
            Path(out).write_text(json.dumps({"seconds": statistics.median(samples)}))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
