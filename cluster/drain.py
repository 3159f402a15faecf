"""The preStop hook of a Ray worker pod: drain this node, then wait for its Serve replicas to finish.

Kubernetes runs it before it sends the pod SIGTERM (a node drained for maintenance, the old cluster of a
``NewCluster`` upgrade, a scale-down), within ``terminationGracePeriodSeconds``, which the render
(``cluster.k8s``) sizes from the longest drain of the stages the pod's group can hold:

1. ``ray drain-node`` (this node, reason preemption, the deadline given): Ray stops placing work here, and Serve
   starts replacements elsewhere and stops this node's replicas gracefully: an orchestrator hands its jobs back,
   a diffusion replica finishes (or checkpoints) what it holds within its ``graceful_shutdown_timeout_s``.
2. Waiting until no Serve replica runs on this node any more (or the deadline passed).

    python -m cluster.drain --timeout 630
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

__all__ = ["main", "replica_processes"]

_POLL_S = 2.0


def replica_processes() -> list[psutil.Process]:
    """Serve replica processes on this machine (Ray titles them ``ray::ServeReplica:<app>:<deployment>``)."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline", "name"]):
        try:
            title = " ".join(process.info["cmdline"] or []) or process.info["name"] or ""
            if process.pid != os.getpid() and "ServeReplica" in title:
                found.append(process)
        except psutil.Error:
            continue
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.drain", description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, required=True, help="seconds until Kubernetes stops the pod")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.timeout
    ray = str(Path(sys.executable).parent / "ray")
    drained = subprocess.run(
        [ray, "drain-node", "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "the pod is terminating",
         "--deadline-remaining-seconds", str(int(args.timeout))],
        capture_output=True, text=True, check=False,
    )
    print(f"drain-node: exit {drained.returncode} {drained.stderr.strip()[-300:]}", file=sys.stderr)
    while time.monotonic() < deadline:
        left = replica_processes()
        if not left:
            print("every Serve replica on this node has stopped", file=sys.stderr)
            return 0
        time.sleep(_POLL_S)
    print(f"{len(replica_processes())} Serve replica(s) still running at the deadline", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
