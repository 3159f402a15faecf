"""Start, inspect, update and stop a local Ray cluster serving the app (``reelserve up/status/down``).

Every Ray process we start gets the same explicit token-auth settings
(``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN_PATH``): Ray 2.60 otherwise turns auth
on implicitly and a client with an explicit address fails to connect.

The app is deployed declaratively (``cluster.apps``: the front and one
application per stage), so ``reelserve up --config new.yaml`` on a running
cluster applies the new config in place: only the applications whose config
section changed restart. ``reelserve down`` stops every process its ``up``
started, Ray's client server (port 10001) included.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import platformdirs
import psutil

from cluster import apps
from cluster.config import ReelserveConfig

__all__ = [
    "ClusterError", "ClusterState", "ray_environment", "serve_app", "start_detached", "stop", "read_state", "status",
    "metrics_url", "metrics_endpoints", "update", "head_processes",
]

GRPC_SERVICER = "serving.proto.video_pb2_grpc.add_VideoServiceServicer_to_server"
_PROFILES = Path(__file__).parent / "profiles"


def default_config_path() -> Path:
    return _PROFILES / "local-cpu.yaml"


def state_dir() -> Path:
    path = Path(os.environ.get("REELSERVE_STATE_DIR") or platformdirs.user_state_dir("reelserve"))
    path.mkdir(parents=True, exist_ok=True)
    return path


class ClusterError(Exception):
    """Starting or reaching the local cluster failed; the message is one line for the user."""


@dataclass
class ClusterState:
    address: str
    http_url: str
    grpc_address: str
    app_name: str
    started_head: bool
    metrics_url: str = ""  # the local node's Prometheus endpoint (empty when joining a cluster)
    gcs_port: int | None = None  # the head `up` started: `down` stops only its processes


def ray_environment(config: ReelserveConfig | None = None) -> dict[str, str]:
    """Token-auth settings for every Ray process of ours (the token made once), and the gRPC proxy's receive limit
    (Serve's default is 2 GiB: the same cap as the HTTP body's)."""
    token = state_dir() / "ray_auth_token"
    if not token.exists():
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
    environment = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    if config is not None:
        environment["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] = str(config.ingress.max_body_bytes)
    return environment


def _apply_ray_environment(config: ReelserveConfig | None = None) -> None:
    os.environ.update(ray_environment(config))
    if "ray" in sys.modules:  # already imported: make it re-read the auth settings
        from ray._raylet import Config  # type: ignore[attr-defined]  # noqa: PLC0415 - only where Ray is already imported (the line above)

        Config.initialize("")


def serve_app(config: ReelserveConfig, address: str | None, args: dict | None = None) -> None:
    """Connect to (or start) Ray, start Serve with HTTP and gRPC, and deploy the app (``args``: the config as
    written, else ``config``)."""
    _apply_ray_environment(config)  # before Ray reads its config
    import ray  # noqa: PLC0415 - Ray reads the environment set just above when it is imported
    from ray import serve  # noqa: PLC0415 - Ray reads the environment set just above when it is imported

    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(
                address="local",  # a cluster of its own, even when another runs on this machine
                num_cpus=config.ray.num_cpus, num_gpus=config.ray.num_gpus, include_dashboard=False,
                object_store_memory=config.ray.object_store_memory_mb * 1024**2, log_to_driver=False,
                _metrics_export_port=config.ray.metrics_export_port,
            )
    serve.start(
        http_options={"host": config.ingress.host, "port": config.ingress.http_port},
        grpc_options={"port": config.ingress.grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]},
    )
    _deploy(config, args)


def _deploy(config: ReelserveConfig, args: dict | None) -> None:
    try:
        apps.deploy(apps.serve_applications(args if args is not None else config))
    except (RuntimeError, TimeoutError) as error:
        raise ClusterError(str(error)) from None


# Settings a running cluster cannot take in place (Serve's proxies and Ray itself are started with them).
_FIXED_AT_START = ("ingress.host", "ingress.http_port", "ingress.grpc_port", "ray", "app_name")


def update(state: ClusterState, config: ReelserveConfig, args: dict | None = None) -> list[str]:
    """Apply ``config`` to the running cluster in place; returns the applications that restarted.

    Refused, naming the field, for what only a new start can change (ports, the Ray section, the app name).
    """
    current = json.loads((state_dir() / "config.json").read_text()) if (state_dir() / "config.json").exists() else None
    if current is not None:
        before = ReelserveConfig.model_validate(current)
        for field in _FIXED_AT_START:
            if _field(before, field) != _field(config, field):
                raise ClusterError(f"{field}: cannot change on a running cluster; run `reelserve down` first")
    _apply_ray_environment(config)  # before Ray reads its config
    import ray  # noqa: PLC0415 - Ray reads the environment set just above when it is imported

    ray.init(address=state.address, log_to_driver=False)
    try:
        wanted = apps.serve_applications(args if args is not None else config)
        running = _running_args()
        _deploy(config, args)
        restarted = [app["name"] for app in wanted if running.get(app["name"]) != app["args"]]
    finally:
        ray.shutdown()
    _remember_config(args if args is not None else config.model_dump(mode="json"))
    return restarted


def _field(config: ReelserveConfig, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value.model_dump() if hasattr(value, "model_dump") else value


def _running_args() -> dict[str, dict | None]:
    """The args each running application was deployed with (what Serve compares to decide a restart)."""
    from ray.serve.context import _get_global_client  # noqa: PLC0415 - Ray only where a cluster is reached; the declarative config Serve keeps (no dashboard needed)

    client = _get_global_client()
    assert client is not None  # it raises instead when no controller runs
    applications = client.get_serve_details().get("applications", {})
    return {name: (app.get("deployed_app_config") or {}).get("args") for name, app in applications.items()}


def _remember_config(args: dict) -> None:
    (state_dir() / "config.json").write_text(json.dumps(args, indent=2))


def start_detached(config: ReelserveConfig, args: dict | None = None) -> ClusterState:
    """``ray start --head`` (unless joining an existing cluster), deploy, record the state, return."""
    address, started_head = config.ray.address, False
    if address is None:
        # "auto" finds the head started here; an explicit address would skip the auth token.
        address = "auto"
        command = [
            _ray_command(), "start", "--head", f"--port={config.ray.gcs_port}",
            "--include-dashboard=false", "--disable-usage-stats",
            f"--object-store-memory={config.ray.object_store_memory_mb * 1024**2}",
            # Ray's metrics agent serves /metrics on every node, also without the dashboard.
            f"--metrics-export-port={config.ray.metrics_export_port}",
        ]
        if config.ray.num_cpus is not None:
            command.append(f"--num-cpus={config.ray.num_cpus}")
        if config.ray.num_gpus is not None:
            command.append(f"--num-gpus={config.ray.num_gpus}")
        started = subprocess.run(command, env={**os.environ, **ray_environment(config)}, capture_output=True, text=True)
        if started.returncode != 0:
            reason = (started.stderr.strip().splitlines() or ["no output"])[-1]
            raise ClusterError(f"`ray start --head` failed: {reason}")
        started_head = True
    state = ClusterState(
        address=address,
        http_url=f"http://{config.ingress.host}:{config.ingress.http_port}",
        grpc_address=f"127.0.0.1:{config.ingress.grpc_port}",
        app_name=config.app_name,
        started_head=started_head,
        metrics_url=metrics_url(config) if started_head else "",
        gcs_port=config.ray.gcs_port if started_head else None,
    )
    # Recorded before deploying, so `reelserve down` can stop the head even if deploying fails.
    (state_dir() / "cluster.json").write_text(json.dumps(asdict(state), indent=2))
    _remember_config(args if args is not None else config.model_dump(mode="json"))
    try:
        serve_app(config, address, args)
    except Exception as error:  # noqa: BLE001 - leave nothing running behind a failed start
        stop(state)
        raise ClusterError(f"deploying failed, the cluster was stopped: {error}") from None
    return state


def _ray_command() -> str:
    """The ``ray`` executable installed beside this interpreter."""
    return str(Path(sys.executable).parent / "ray")


def read_state() -> ClusterState | None:
    path = state_dir() / "cluster.json"
    if not path.exists():
        return None
    return ClusterState(**json.loads(path.read_text()))


def status(state: ClusterState) -> dict:
    """Application and deployment statuses of a running cluster."""
    _apply_ray_environment()  # before Ray reads its config
    import ray  # noqa: PLC0415 - Ray reads the environment set just above when it is imported
    from ray import serve  # noqa: PLC0415 - Ray reads the environment set just above when it is imported

    ray.init(address=state.address, log_to_driver=False)
    try:
        ours = {name: app for name, app in serve.status().applications.items()
                if name == state.app_name or name.startswith(f"{state.app_name}-")}
        if state.app_name not in ours:
            return {"application": state.app_name, "status": "NOT_DEPLOYED", "deployments": {}}
        statuses = {_enum_text(app.status) for app in ours.values()}
        return {
            "application": state.app_name,
            "status": statuses.pop() if len(statuses) == 1 else "DEPLOYING",
            "deployments": {name: _enum_text(d.status) for app in ours.values() for name, d in app.deployments.items()},
            "replicas": _replica_ids(set(ours)),
            "http": state.http_url,
            "grpc": state.grpc_address,
            "metrics": metrics_endpoints(),
        }
    finally:
        ray.shutdown()


def _replica_ids(applications: set[str]) -> dict[str, list[str]]:
    """Each deployment's running replica ids (Serve names a replica's actor ``SERVE_REPLICA::app#deployment#id``)."""
    import ray  # noqa: PLC0415 - Ray only where a cluster is reached

    replicas: dict[str, list[str]] = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        app, _, rest = actor["name"].removeprefix("SERVE_REPLICA::").partition("#")
        deployment, _, replica = rest.partition("#")
        if actor["name"].startswith("SERVE_REPLICA::") and app in applications and replica:
            replicas.setdefault(deployment, []).append(replica)
    return {name: sorted(ids) for name, ids in sorted(replicas.items())}


def metrics_url(config: ReelserveConfig) -> str:
    """The local node's metrics endpoint as `reelserve up` starts it."""
    return f"http://127.0.0.1:{config.ray.metrics_export_port}/metrics"


def metrics_endpoints() -> list[str]:
    """Every live node's Prometheus endpoint in the connected cluster (what Prometheus should scrape)."""
    import ray  # noqa: PLC0415 - Ray only where a cluster is reached

    return sorted(
        f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        for node in ray.nodes()
        if node.get("Alive") and node.get("MetricsExportPort")
    )


def _enum_text(value) -> str:
    return str(getattr(value, "value", value))


def stop(state: ClusterState) -> None:
    """Shut Serve down and, if ``up`` started the Ray head, stop Ray on this machine."""
    _apply_ray_environment()  # before Ray reads its config
    import ray  # noqa: PLC0415 - Ray reads the environment set just above when it is imported
    from ray import serve  # noqa: PLC0415 - Ray reads the environment set just above when it is imported

    try:
        ray.init(address=state.address, log_to_driver=False)
        serve.shutdown()
        ray.shutdown()
    finally:
        if state.started_head and state.gcs_port is not None:
            _stop_head_processes(state.gcs_port)
        elif state.started_head:  # recorded by an older version: no port known
            subprocess.run(
                [_ray_command(), "stop", "--force"],
                env={**os.environ, **ray_environment()}, capture_output=True,
            )
        (state_dir() / "cluster.json").unlink(missing_ok=True)


def head_processes(gcs_port: int) -> list:
    """Every process of the local head listening on ``gcs_port`` (``psutil.Process``), children included.

    The head's own processes name its GCS on their command line (``--gcs-address=IP:PORT``,
    ``--gcs_server_port=PORT``; Ray's client server, on port 10001, ``--address=IP:PORT``); workers and agents
    (renamed ``ray::...``) are the raylet's children. The client server is nobody's child once ``ray start`` has
    exited: it is found by its own command line.
    """
    ours = re.compile(rf"--(gcs[-_])?address=\S+:{gcs_port}(\s|$)|--gcs_server_port={gcs_port}(\s|$)")
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if process.pid != os.getpid() and ours.search(" ".join(process.info["cmdline"] or [])):
                for member in [process, *process.children(recursive=True)]:
                    found[member.pid] = member
        except psutil.Error:
            continue
    return list(found.values())


def _stop_head_processes(gcs_port: int, grace_s: float = 10.0) -> None:
    """Stop the Ray processes of the head listening on ``gcs_port``, and nothing else (``ray stop`` would end
    every Ray cluster on the machine)."""
    victims = head_processes(gcs_port)
    for process in victims:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(victims, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
