"""`reelserve k8s render`: Kubernetes manifests for a KubeRay cluster, from the one deployment config.

For a config (a profile in ``cluster/profiles/``) it writes one folder:

- ``rayservice.yaml``: the KubeRay ``RayService`` (``ray.io/v1``). Its
  ``serveConfigV2`` is the app (``graphs:build_app`` with the config as
  ``args``), Serve's HTTP and gRPC options included. The head group plus one
  worker group per ``nodes`` entry, with ``nvidia.com/gpu`` limits, a GPU
  product affinity and a GPU toleration, Ray's ``accelerator_type`` resource;
  in-tree autoscaling tuned for minutes-long jobs; ``NewCluster`` upgrades;
  GCS fault tolerance on Redis; a Serve Service for HTTP and gRPC.
- ``redis.yaml``: two Redis instances, each a Deployment with a persistent
  volume, its Service and a NetworkPolicy: the job store's (every Ray pod may
  connect) and Ray's GCS state (only the head may). Not written when a managed
  Redis is given (``--redis-url``).
- ``storage.yaml``: the shared results volume (ReadWriteMany) and, for real
  checkpoints, the model volume the pods mount read-only at ``/models``.
- ``services.yaml``: the metrics Service (port 8080 on every Ray pod) and the
  NetworkPolicy of the Ray pods.
- ``monitoring.yaml``: a Prometheus Operator ``PodMonitor``.
- ``disruption.yaml``: a ``PodDisruptionBudget`` per worker group that holds
  stages' minimum replicas: node maintenance never evicts below them.
- ``kustomization.yaml``: the folder as a kustomize base (image, namespace).

``serveConfigV2`` holds the applications ``cluster.apps`` lists: the front
(ingress + orchestrator) and one per stage, so editing the config restarts
only what the edit touches. Worker pods keep the drain: each group's
``terminationGracePeriodSeconds`` and preStop hook (``python -m cluster.drain``:
drain the node, wait for its Serve replicas) come from the longest drain of
the stages the group can hold, so a rollout or node maintenance never cuts a
diffusion replica's drain at Kubernetes' default 30 s.

The config is used as written, with what a Kubernetes cluster fixes for it:
the ingress listens on all interfaces, jobs live in Redis and results on the
shared volume, and a prompt rewriter left on ``auto`` is off where no node
has a GPU (the image's vLLM is the CUDA build). The Ray pod of a node asks
for 90 % of the node's CPUs and memory, leaving room for the kubelet.

Closed by default. Secrets are never rendered (their values are yours to make, once per
namespace) and never travel in ``serveConfigV2``; the pods read them from the Secrets
named in ``SECRETS``, and do not start until the required ones exist:

- Ray token authentication (KubeRay ``authOptions``): every call to the GCS, the
  dashboard and the Jobs API needs the token in ``<name>-ray-token`` (key ``auth_token``).
- Both Redis instances require a password (``<name>-redis``, keys ``jobs-password`` and
  ``gcs-password``); the app reads the job store's from ``REELSERVE_REDIS_PASSWORD``.
- The head's Service is ClusterIP; the dashboard answers only inside the cluster and,
  by NetworkPolicy, only Ray pods and the KubeRay operator reach it. From elsewhere the
  Ray pods accept only the API ports (HTTP and gRPC), and Prometheus the metrics port.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import cast
from urllib.parse import urlparse

import yaml

from cluster.apps import serve_applications
from cluster.auth_config import REDIS_PASSWORD_ENV, WEBHOOK_SECRET_ENV
from cluster.config import NodeType, ReelserveConfig
from cluster.local import GRPC_SERVICER
from cluster.placement import drain_seconds, orchestrator_options
from cluster.plan import make_plan

__all__ = ["render", "write", "k8s_args", "DEFAULT_IMAGE", "RenderError", "SECRETS", "API_KEYS_MOUNT", "MAX_REQUEST_BYTES"]

DEFAULT_IMAGE = "reelserve:0.1.0"
RAY_VERSION = "2.60.0"
REDIS_IMAGE = "redis:7.4-alpine"
REDIS_PORT = 6380  # the job store's Redis
GCS_REDIS_PORT = 6381  # Ray's GCS state, in its own Redis
GCS_REDIS_STORAGE = "5Gi"
RESULTS_MOUNT = "/shared/reelserve"
MODELS_MOUNT = "/models"
METRICS_PORT = 8080  # Ray's metrics export port on every node
DASHBOARD_PORT = 8265
AGENT_PORT = 52365  # Ray's dashboard agent: the raylet health endpoint
POD_SHARE = 0.9  # of a node's CPUs and memory for its Ray pod
STOP_MARGIN_S = 30  # after the preStop hook: Ray's own processes stop (SIGTERM, then the kubelet's SIGKILL)
GROUP_LABEL = "reelserve.io/node-group"  # on every worker pod: its group (what its disruption budget selects)
NODE_IDLE_TIMEOUT_S = 300  # a worker node with nothing on it goes after this (after Serve's own downscale delay)
_POD_SECURITY = {"fsGroup": 1000}  # the image's user (ray, uid 1000) can write the shared results volume
CPU_NODE = NodeType(name="cpu", cpus=8, memory_gb=32, min_nodes=1, max_nodes=2)  # when the config names no nodes
MAX_REQUEST_BYTES = 32 * 1024 * 1024  # = serving.ingress.body_limits.DEFAULT_MAX_BODY_BYTES (cluster/ imports no serving/)
API_KEYS_MOUNT = "/etc/reelserve/api-keys"  # where the API keys Secret is mounted (auth.key_file lives here)
API_KEYS_FILE = "tenants.yaml"  # the Secret's key holding the tenants (the key file's format: cluster.auth_config)
# Secrets the manifests read (suffix after the app name -> keys, and whether pods wait for it). Never rendered.
SECRETS = {
    "ray-token": {"keys": ["auth_token"], "required": True},
    "redis": {"keys": ["jobs-password", "gcs-password"], "required": True},
    "webhooks": {"keys": ["signing-secret"], "required": False},
}

# nvidia.com/gpu.product values that NVIDIA GPU Feature Discovery (the GPU Operator) puts on nodes, per Ray
# accelerator type. Clusters labelled otherwise (e.g. GKE's cloud.google.com/gke-accelerator) patch the affinity.
GPU_PRODUCTS = {
    "H100": ["NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe", "NVIDIA-H100-NVL"],
    "H200": ["NVIDIA-H200", "NVIDIA-H200-NVL"],
    "B200": ["NVIDIA-B200"],
    "A100-80G": ["NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-80GB-PCIe"],
    "A100-40G": ["NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-PCIE-40GB"],
    "L40S": ["NVIDIA-L40S"],
    "L4": ["NVIDIA-L4"],
    "A10G": ["NVIDIA-A10G"],
}


class RenderError(ValueError):
    """A config that cannot become manifests; the message names the field."""


def k8s_args(raw: dict, config: ReelserveConfig, redis_url: str, api_keys_secret: str | None = None) -> dict:
    """The app's ``args``: the config as written, with what the cluster fixes for it (and, with an API key
    Secret, the key file it mounts)."""
    args = copy.deepcopy(raw)
    if api_keys_secret is not None:
        args.setdefault("auth", {})["key_file"] = f"{API_KEYS_MOUNT}/{API_KEYS_FILE}"
    args.setdefault("ingress", {})["host"] = "0.0.0.0"
    jobs = args.setdefault("jobs", {})
    jobs.pop("sqlite_path", None)
    jobs.update(backend="redis", redis_url=redis_url)
    if (args.get("storage") or {}).get("results_url"):  # an object store (or a directory of its own) holds results
        jobs.pop("results_dir", None)
    else:
        jobs["results_dir"] = RESULTS_MOUNT
    if config.rewriter.enabled and not _has_gpus(config) and args.get("rewriter", {}).get("enabled", "auto") == "auto":
        args.setdefault("rewriter", {})["enabled"] = False
    return args


def render(raw: dict, source: str, image: str = DEFAULT_IMAGE, redis_url: str | None = None, *,
           gcs_redis_url: str | None = None, api_keys_secret: str | None = None,
           max_request_bytes: int | None = None) -> dict[str, str]:
    """File name -> YAML text for the config ``raw`` (a YAML mapping) read from ``source``.

    ``redis_url``: a managed Redis for the jobs (and, unless ``gcs_redis_url`` names
    another, for Ray's GCS state) instead of the two in-cluster ones. ``api_keys_secret``:
    a Secret holding the API key file, mounted read-only at ``API_KEYS_MOUNT`` in every Ray pod.
    ``max_request_bytes``: the largest gRPC message Serve's proxies accept (and send); unset: the config's
    ``ingress.max_body_bytes``, the HTTP body's cap.
    """
    config = ReelserveConfig.model_validate(copy.deepcopy(raw))
    max_request_bytes = max_request_bytes or config.ingress.max_body_bytes
    name = config.app_name
    _check_name(name, "app_name")
    managed_redis = redis_url is not None
    if redis_url is not None:
        _redis_address(redis_url, "--redis-url")
        gcs_address = _redis_address(gcs_redis_url or redis_url, "--gcs-redis-url" if gcs_redis_url else "--redis-url")
    else:
        redis_url = f"redis://{name}-redis:{REDIS_PORT}/1"
        gcs_address = f"{name}-gcs-redis:{GCS_REDIS_PORT}"
    if api_keys_secret is not None:
        _check_name(api_keys_secret, "api_keys_secret")
    pods = _PodSettings(name, image, config, api_keys_secret, max_request_bytes)
    args = k8s_args(raw, config, redis_url, api_keys_secret)
    header = (
        f"# Written by `reelserve k8s render --config {source}`: change the config and render again.\n"
    )
    files = {
        "rayservice.yaml": [_rayservice(pods, args, gcs_address)],
        "storage.yaml": _volumes(name, config),
        "services.yaml": [_metrics_service(name), _ray_network_policy(name, config)],
        "monitoring.yaml": [_pod_monitor(name)],
    }
    budgets = _disruption_budgets(name, config)
    if budgets:
        files["disruption.yaml"] = budgets
    if not managed_redis:
        files["redis.yaml"] = _redis(name)
    texts = {file: header + _dump_all(objects) for file, objects in sorted(files.items())}
    texts["kustomization.yaml"] = header + _dump_all([_kustomization(sorted(files), image)])
    return texts


def write(files: dict[str, str], out: Path) -> list[Path]:
    """Write the rendered files into ``out`` (created), replacing what a previous render left."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        path = out / name
        path.write_text(text)
        written.append(path)
    return written


# ------------------------------------------------------------------ the RayService


@dataclass(frozen=True)
class _PodSettings:
    """What every Ray pod template is made from."""

    name: str
    image: str
    config: ReelserveConfig
    api_keys_secret: str | None
    max_request_bytes: int


def _rayservice(pods: _PodSettings, args: dict, gcs_address: str) -> dict:
    name, config = pods.name, pods.config
    serve_config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": config.ingress.http_port},
        "grpc_options": {"port": config.ingress.grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]},
        "applications": serve_applications(args),
    }
    nodes = config.nodes or [CPU_NODE]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "labels": _labels(name, "rayservice")},
        "spec": {
            # A new cluster comes up beside the old one and takes the traffic once its app is ready, so an
            # upgrade drops no request; it needs room for both clusters while it runs.
            "upgradeStrategy": {"type": "NewCluster"},
            "serveService": {
                "metadata": {"name": f"{name}-serve", "labels": _labels(name, "serve")},
                "spec": {
                    "type": "ClusterIP",
                    "ports": [
                        {"name": "http", "port": config.ingress.http_port, "targetPort": config.ingress.http_port},
                        {"name": "grpc", "port": config.ingress.grpc_port, "targetPort": config.ingress.grpc_port,
                         "appProtocol": "grpc"},
                    ],
                },
            },
            "serveConfigV2": _dump(serve_config),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {
                    "upscalingMode": "Default",  # a burst of jobs asks for every node it needs at once
                    "idleTimeoutSeconds": NODE_IDLE_TIMEOUT_S,
                    "resources": _resources(0.5, 0.5),
                },
                # Every GCS, dashboard and Jobs API call needs the token; KubeRay gives it to every Ray container.
                "authOptions": {"mode": "token", "secretName": f"{name}-ray-token"},
                "gcsFaultToleranceOptions": {
                    "redisAddress": gcs_address,
                    "redisPassword": {"valueFrom": {"secretKeyRef": {"name": f"{name}-redis", "key": "gcs-password"}}},
                },
                "headGroupSpec": _head(pods),
                "workerGroupSpecs": [_worker_group(pods, node, index) for index, node in enumerate(nodes)],
            },
        },
    }


def _head(pods: _PodSettings) -> dict:
    container = _ray_container(pods, "ray-head", cpus=4, memory_gb=16, gpus=0)
    container["ports"] += [{"name": "dashboard", "containerPort": DASHBOARD_PORT}, {"name": "gcs-server", "containerPort": 6379}]
    # The head is healthy when its GCS answers; it runs no replicas (num-cpus 0), only Serve's controller and a proxy.
    container["readinessProbe"] = _probe("/api/gcs_healthz", DASHBOARD_PORT, period_s=5, failures=6)
    container["livenessProbe"] = _probe("/api/gcs_healthz", DASHBOARD_PORT, period_s=10, failures=12, delay_s=30)
    return {
        # Inside a pod, all interfaces are the pod's own address on the cluster network (and loopback): the
        # operator and the probes reach the dashboard there. Nothing outside the cluster does: the head's
        # Service is ClusterIP, and the NetworkPolicy of the Ray pods admits only Ray pods and the operator.
        "serviceType": "ClusterIP",
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "template": {
            "metadata": {"labels": _labels(pods.name, "ray-head")},
            "spec": {"containers": [container], "volumes": _pod_volumes(pods, memory_gb=16), "securityContext": _POD_SECURITY},
        },
    }


def _worker_group(pods: _PodSettings, node: NodeType, index: int) -> dict:
    _check_name(node.name, f"nodes[{index}].name")
    cpus = max(1, math.floor(node.cpus * POD_SHARE))
    memory_gb = max(1, math.floor(node.memory_gb * POD_SHARE))
    container = _ray_container(pods, "ray-worker", cpus=cpus, memory_gb=memory_gb, gpus=node.gpus)
    # Ready once Serve's proxy on the node answers (the Serve Service sends traffic only there); alive while the
    # raylet is (a model loading for minutes does not make the pod unhealthy).
    container["readinessProbe"] = _probe("/-/healthz", pods.config.ingress.http_port, period_s=5, failures=3)
    container["livenessProbe"] = _probe("/api/local_raylet_healthz", AGENT_PORT, period_s=10, failures=12, delay_s=30)
    # Kubernetes stops a pod only after its preStop hook: drain the node, wait for its replicas (cluster.drain).
    drain = math.ceil(group_drain_seconds(pods.config, node))
    container["lifecycle"] = {"preStop": {"exec": {"command": ["python", "-m", "cluster.drain", "--timeout", str(drain)]}}}
    pod: dict = {"containers": [container], "volumes": _pod_volumes(pods, memory_gb), "securityContext": _POD_SECURITY,
                 "terminationGracePeriodSeconds": drain + STOP_MARGIN_S}
    start: dict = {}
    if node.gpus:
        products = GPU_PRODUCTS.get(cast(str, node.accelerator_type))
        if products is None:
            raise RenderError(
                f"nodes[{index}].accelerator_type: no GPU product labels known for '{node.accelerator_type}'; "
                f"known: {', '.join(GPU_PRODUCTS)}"
            )
        pod["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In", "values": products}]}
        ]}}}
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        # Known before the node exists, so the autoscaler can start one for a replica that asks for this type.
        start["resources"] = json.dumps(json.dumps({f"accelerator_type:{node.accelerator_type}": 1}))
    return {
        "groupName": node.name,
        "replicas": node.min_nodes,
        "minReplicas": node.min_nodes,
        "maxReplicas": node.max_nodes,
        "rayStartParams": start,
        "template": {"metadata": {"labels": {**_labels(pods.name, "ray-worker"), GROUP_LABEL: node.name}}, "spec": pod},
    }


def group_drain_seconds(config: ReelserveConfig, node: NodeType) -> float:
    """The longest drain of what a worker group's pods can hold: every stage Ray may place there, and the
    orchestrator (it hands its jobs back)."""
    drains = [orchestrator_options(config)["graceful_shutdown_timeout_s"]]
    for name in config.stage_names:
        stage = config.stages[name]
        if stage.gpus_per_replica > 0 and (
            node.gpus == 0 or stage.accelerator_type not in (None, node.accelerator_type)
        ):
            continue  # a GPU stage never lands on this group
        drains.append(drain_seconds(name, config))
    return max(drains)


def _disruption_budgets(name: str, config: ReelserveConfig) -> list[dict]:
    """A PodDisruptionBudget per worker group whose pods hold stages' minimum replicas: maintenance evicts pods
    one group's spare at a time, never below what the minimum replicas need."""
    # The plan's GPU counts at the minimum replicas.
    plan = make_plan(config)
    budgets = []
    for node in config.nodes or [CPU_NODE]:
        if node.gpus:
            needed = math.ceil(plan.gpus_at_min.get(cast(str, node.accelerator_type), 0) / node.gpus)
        else:
            needed = 1  # the ingress, the orchestrators and the CPU stages
        needed = min(needed, node.max_nodes)
        if needed < 1:
            continue
        budgets.append({
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": {"name": f"{name}-{node.name}", "labels": _labels(name, "disruption-budget")},
            "spec": {
                "minAvailable": needed,
                "selector": {"matchLabels": {**_pods(name, "ray-worker")["podSelector"]["matchLabels"],
                                             GROUP_LABEL: node.name}},
            },
        })
    return budgets


def _ray_container(pods: _PodSettings, container_name: str, cpus: float, memory_gb: int, gpus: int) -> dict:
    name, config = pods.name, pods.config
    limits = {"cpu": _quantity(cpus), "memory": f"{memory_gb}Gi"}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    mounts: list[dict[str, object]] = [{"name": "results", "mountPath": RESULTS_MOUNT}, {"name": "shm", "mountPath": "/dev/shm"}]
    if _uses_model_volume(config):
        mounts.append({"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True})
    if pods.api_keys_secret is not None:
        mounts.append({"name": "api-keys", "mountPath": API_KEYS_MOUNT, "readOnly": True})
    return {
        "name": container_name,
        "image": pods.image,
        "resources": {"limits": limits, "requests": dict(limits)},
        "ports": [
            {"name": "serve", "containerPort": config.ingress.http_port},
            {"name": "grpc", "containerPort": config.ingress.grpc_port},
            {"name": "metrics", "containerPort": METRICS_PORT},
        ],
        "env": [
            {"name": "HF_HUB_OFFLINE", "value": "1"},  # weights come from the volume, never from a hub at run time
            # Serve's gRPC proxy reads its message cap from here (default 2 GiB): the same cap as HTTP bodies.
            {"name": "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", "value": str(pods.max_request_bytes)},
            # Secrets reach the app as variables, never through serveConfigV2 (readable by anyone who reads the RayService).
            _secret_env(REDIS_PASSWORD_ENV, f"{name}-redis", "jobs-password"),
            _secret_env(WEBHOOK_SECRET_ENV, f"{name}-webhooks", "signing-secret", optional=True),
        ],
        "volumeMounts": mounts,
    }


def _secret_env(variable: str, secret: str, key: str, optional: bool = False) -> dict:
    reference: dict[str, object] = {"name": secret, "key": key}
    if optional:
        reference["optional"] = True
    return {"name": variable, "valueFrom": {"secretKeyRef": reference}}


def _probe(path: str, port: int, period_s: int, failures: int, delay_s: int = 10) -> dict:
    return {
        "httpGet": {"path": path, "port": port},
        "initialDelaySeconds": delay_s,
        "periodSeconds": period_s,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def _pod_volumes(pods: _PodSettings, memory_gb: int) -> list[dict]:
    name, config = pods.name, pods.config
    # Ray's object store lives in /dev/shm and takes 30 % of the pod's memory by default.
    shm = {"medium": "Memory", "sizeLimit": f"{max(1, math.ceil(memory_gb * 0.3))}Gi"}
    volumes = [
        {"name": "results", "persistentVolumeClaim": {"claimName": f"{name}-results"}},
        {"name": "shm", "emptyDir": shm},
    ]
    if _uses_model_volume(config):
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": f"{name}-models", "readOnly": True}})
    if pods.api_keys_secret is not None:
        volumes.append({"name": "api-keys", "secret": {"secretName": pods.api_keys_secret, "defaultMode": 0o440}})
    return volumes


def _uses_model_volume(config: ReelserveConfig) -> bool:
    return not config.model.uses_tiny_checkpoint or config.rewriter.model_path is not None


def _has_gpus(config: ReelserveConfig) -> bool:
    return any(node.gpus for node in config.nodes)


# ------------------------------------------------------------------ the objects beside it


def _volumes(name: str, config: ReelserveConfig) -> list[dict]:
    claims = [_claim(name, "results", "500Gi", "ReadWriteMany",
                     "Photos and MP4s (jobs.results_dir): every Ray pod writes and reads them.")]
    if _uses_model_volume(config):
        claims.append(_claim(name, "models", "200Gi", "ReadWriteMany",
                             "Checkpoints in diffusers layout under /models, filled once by you; pods mount it read-only."))
    return claims


def _claim(name: str, role: str, size: str, mode: str, why: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": f"{name}-{role}", "labels": _labels(name, role), "annotations": {"reelserve.io/purpose": why}},
        "spec": {"accessModes": [mode], "resources": {"requests": {"storage": size}}},
    }


def _redis(name: str) -> list[dict]:
    """The job store's Redis and Ray's GCS Redis: apart, each with its password and its NetworkPolicy."""
    ray_pods = [_pods(name, "ray-head", "ray-worker")]
    return [
        *_redis_instance(name, "redis", REDIS_PORT, "20Gi", "jobs-password", ray_pods,
                         "Redis' append-only file: the job store (every job and its state)."),
        # The GCS runs on the head only (KubeRay's Redis cleanup Job is built from the head's pod template).
        *_redis_instance(name, "gcs-redis", GCS_REDIS_PORT, GCS_REDIS_STORAGE, "gcs-password", [_pods(name, "ray-head")],
                         "Redis' append-only file: Ray's GCS state (fault tolerance of the head)."),
    ]


def _redis_instance(name: str, role: str, port: int, size: str, password_key: str, clients: list[dict],
                    purpose: str) -> list[dict]:
    labels = _labels(name, role)
    selector = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": role}
    data = _claim(name, f"{role}-data", size, "ReadWriteOnce", purpose)
    probe = {"tcpSocket": {"port": port}, "periodSeconds": 5, "timeoutSeconds": 3}
    # The password goes to redis-server as configuration on stdin, so it is in no process's arguments.
    start = (
        f'exec redis-server - --port {port} --appendonly yes --save "" <<EOF\n'
        'requirepass "$REDIS_PASSWORD"\n'
        "EOF\n"
    )
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": f"{name}-{role}", "labels": labels},
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},  # one writer on a ReadWriteOnce volume
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [{
                        "name": "redis",
                        "image": REDIS_IMAGE,
                        "command": ["sh", "-c", start],
                        "env": [_secret_env("REDIS_PASSWORD", f"{name}-redis", password_key)],
                        "ports": [{"name": "redis", "containerPort": port}],
                        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}},
                        "readinessProbe": probe,
                        "livenessProbe": {**probe, "initialDelaySeconds": 10, "failureThreshold": 6},
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                    }],
                    "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": f"{name}-{role}-data"}}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"{name}-{role}", "labels": labels},
        "spec": {"type": "ClusterIP", "selector": selector,
                 "ports": [{"name": "redis", "port": port, "targetPort": port}]},
    }
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"{name}-{role}", "labels": labels},
        "spec": {
            "podSelector": {"matchLabels": selector},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": clients, "ports": [{"protocol": "TCP", "port": port}]}],
        },
    }
    return [data, deployment, service, policy]


def _pods(name: str, *components: str) -> dict:
    """A NetworkPolicy peer: this app's pods of the given components (in the policy's namespace)."""
    return {"podSelector": {
        "matchLabels": {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": name},
        "matchExpressions": [{"key": "app.kubernetes.io/component", "operator": "In", "values": list(components)}],
    }}


def _ray_network_policy(name: str, config: ReelserveConfig) -> dict:
    """Who reaches the Ray pods: anyone the API ports; Ray pods everything; the operator; Prometheus the metrics."""
    api_ports = [{"protocol": "TCP", "port": config.ingress.http_port}, {"protocol": "TCP", "port": config.ingress.grpc_port}]
    anywhere: dict[str, dict] = {"namespaceSelector": {}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"{name}-ray", "labels": _labels(name, "network-policy")},
        "spec": {
            "podSelector": _pods(name, "ray-head", "ray-worker")["podSelector"],
            "policyTypes": ["Ingress"],
            "ingress": [
                # The API (the Serve Service's ports): from any client your Ingress or Gateway lets in; keys guard it.
                {"ports": api_ports},
                # Ray among its own pods: GCS, raylets, object transfers, workers, the dashboard and its agents.
                {"from": [_pods(name, "ray-head", "ray-worker")]},
                # The KubeRay operator: it deploys the app through the dashboard and checks the pods.
                {"from": [{**anywhere, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}]},
                # Prometheus (the Prometheus Operator's pods): the metrics port only.
                {"from": [{**anywhere, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}],
                 "ports": [{"protocol": "TCP", "port": METRICS_PORT}]},
            ],
        },
    }


def _metrics_service(name: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"{name}-metrics", "labels": _labels(name, "metrics")},
        "spec": {
            "clusterIP": "None",  # one address per Ray pod: each exports its own node's metrics
            "selector": {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": name},
            "ports": [{"name": "metrics", "port": METRICS_PORT, "targetPort": METRICS_PORT}],
        },
    }


def _pod_monitor(name: str) -> dict:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": f"{name}-ray", "labels": _labels(name, "monitoring")},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": name}},
            "podMetricsEndpoints": [{"port": "metrics", "interval": "15s"}],
        },
    }


def _kustomization(resources: list[str], image: str) -> dict:
    repository, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "latest")
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": resources,
        "images": [{"name": repository, "newName": repository, "newTag": tag}],
    }


# ------------------------------------------------------------------ small parts


def _labels(name: str, component: str) -> dict:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": name, "app.kubernetes.io/component": component}


def _resources(cpu: float, memory_gb: float) -> dict:
    amounts = {"cpu": _quantity(cpu), "memory": f"{int(memory_gb * 1024)}Mi"}
    return {"limits": amounts, "requests": dict(amounts)}


def _quantity(cpus: float) -> str:
    return str(int(cpus)) if float(cpus).is_integer() else f"{int(cpus * 1000)}m"


def _redis_address(url: str, flag: str) -> str:
    """``HOST:PORT`` of a managed Redis URL; a URL holding a password is refused (it would land in serveConfigV2)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss") or not parsed.hostname:
        raise RenderError(f"{flag}: '{url}' is not a Redis URL; write redis://HOST:PORT/DB")
    if parsed.password is not None or parsed.username is not None:
        raise RenderError(
            f"{flag}: the URL holds a user or password, which would be readable in serveConfigV2; write it without, "
            "and put the password in the Secret <app>-redis (keys jobs-password, gcs-password)"
        )
    return f"{parsed.hostname}:{parsed.port or 6379}"


def _check_name(value: str, field: str) -> None:
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?", value):
        raise RenderError(
            f"{field}: '{value}' is not a Kubernetes name; use lowercase letters, digits and '-' (at most 42)"
        )


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (serveConfigV2 reads as YAML inside YAML)."""


def _multiline(dumper: yaml.SafeDumper, text: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Dumper.add_representer(str, _multiline)


def _dump(value) -> str:
    return yaml.dump(value, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def _dump_all(objects: list[dict]) -> str:
    return "---\n".join(_dump(obj) for obj in objects)
