"""The served side of a benchmark, in a process of its own: ``python -m serving.bench.cluster CONFIG READY``.

Starts a local Ray cluster of its own (``address="local"``), deploys the app from the JSON config
``CONFIG`` and writes ``READY`` (the gRPC address and the diffusion replica's torch threads) once
it serves; it shuts everything down on SIGTERM or when its stdin closes.

The benchmark's client runs in the parent, which never starts Ray: on Ray 2.60 a driver process
hung when it then ran torch work or a ``grpc.aio`` client (main thread waiting on a lock,
no CPU), and a real deployment has its clients outside the cluster anyway.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path

import ray
from ray import serve

from cluster.apps import deploy, serve_applications
from cluster.local import GRPC_SERVICER

__all__ = ["main"]


def _torch_threads() -> int:
    import torch  # noqa: PLC0415 - runs in a Ray worker: torch only there

    return torch.get_num_threads()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config_path, ready_path = Path(argv[0]), Path(argv[1])
    settings = json.loads(config_path.read_text())
    app_config, cluster = settings["app"], settings["cluster"]

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def stop_when_stdin_closes() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=stop_when_stdin_closes, daemon=True).start()
    ray.init(address="local", num_cpus=cluster["num_cpus"], include_dashboard=False,
             object_store_memory=cluster["object_store_mb"] * 1024**2, log_to_driver=False)
    try:
        # Ray sets a worker's OMP_NUM_THREADS (hence torch's threads) from its CPUs; asked before the app
        # takes the cluster's CPUs, with the diffusion replica's share.
        threads = ray.get(ray.remote(num_cpus=cluster["diffusion_cpus"])(_torch_threads).remote())
        ingress = app_config["ingress"]
        serve.start(
            http_options={"host": "127.0.0.1", "port": ingress["http_port"]},
            grpc_options={"port": ingress["grpc_port"], "grpc_servicer_functions": [GRPC_SERVICER]},
        )
        started = time.perf_counter()
        deploy(serve_applications(app_config))
        ready = {"grpc": f"127.0.0.1:{ingress['grpc_port']}", "deploy_seconds": round(time.perf_counter() - started, 1),
                 "diffusion_torch_threads": threads}
        partial = ready_path.with_suffix(".partial")
        partial.write_text(json.dumps(ready))
        partial.replace(ready_path)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
