"""`reelserve k8s render`: the checked-in manifests are its output, and every manifest validates.

- the RayService against KubeRay's CRD schema (a copy under ``kuberay/``), made strict: a field the schema does
  not know fails here, where an API server would silently drop it;
- the core objects with ``kubernetes-validate`` (strict);
- ``serveConfigV2`` with Ray's ``ServeDeploySchema``, and its app args really build the app (no Ray started).
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from cluster.config import ReelserveConfig
from cluster.k8s import GPU_PRODUCTS, RenderError, render
from cluster.placement import drain_seconds
from cluster.plan import make_plan
from serving.cli import main
from serving.ingress.body_limits import DEFAULT_MAX_BODY_BYTES

REPO = Path(__file__).resolve().parents[2]
PROFILES = sorted(path.stem for path in (REPO / "cluster" / "profiles").glob("*.yaml"))
CRD = Path(__file__).parent / "kuberay" / "ray.io_rayservices.yaml"
KUBERNETES_VERSION = "1.32"
NOT_CORE = {"RayService", "PodMonitor", "Kustomization"}  # everything else (NetworkPolicies too) validates as core


def _source(profile: str) -> str:
    return f"cluster/profiles/{profile}.yaml"


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, str]]:
    return {p: render(yaml.safe_load((REPO / _source(p)).read_text()), _source(p)) for p in PROFILES}


@pytest.fixture(scope="module")
def crd_validator():
    crd = yaml.safe_load(CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def _strict(schema):
    """Objects with listed properties accept no others (an API server would prune them without a word)."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


def _objects(files: dict[str, str]) -> list[dict]:
    return [obj for text in files.values() for obj in yaml.safe_load_all(text) if obj]


def _rayservice(files: dict[str, str]) -> dict:
    return yaml.safe_load(files["rayservice.yaml"])


def test_every_shipped_profile_has_manifests():
    assert PROFILES == ["1x-h100", "8x-h100", "8x-h100-h3", "h200-h3", "local-cpu", "local-cpu-h3", "mixed-l4-h100"]


@pytest.mark.parametrize("profile", PROFILES)
def test_the_checked_in_manifests_are_the_render_output(profile, rendered):
    folder = REPO / "k8s" / profile
    assert sorted(p.name for p in folder.iterdir()) == sorted(rendered[profile]), "files differ: render again"
    for name, text in rendered[profile].items():
        assert (folder / name).read_text() == text, (
            f"k8s/{profile}/{name} drifted from its config: run `reelserve k8s render --config {_source(profile)}`"
        )


@pytest.mark.parametrize("profile", PROFILES)
def test_the_rayservice_validates_against_kuberays_crd(profile, rendered, crd_validator):
    errors = sorted(crd_validator.iter_errors(_rayservice(rendered[profile])), key=str)
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5])


def test_the_strict_crd_check_catches_a_misplaced_field(rendered, crd_validator):
    service = _rayservice(rendered["8x-h100"])
    broken = copy.deepcopy(service)
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert any("maxReplica" in e.message for e in crd_validator.iter_errors(broken))
    broken = copy.deepcopy(service)
    broken["spec"]["upgradeStrategy"]["type"] = 7
    assert list(crd_validator.iter_errors(broken))


@pytest.mark.parametrize("profile", PROFILES)
def test_core_objects_validate_with_kubernetes_validate(profile, rendered):
    core = [obj for obj in _objects(rendered[profile]) if obj["kind"] not in NOT_CORE]
    assert {obj["kind"] for obj in core} >= {"PersistentVolumeClaim", "Service", "NetworkPolicy"}
    for obj in core:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):  # and the check can fail
        kubernetes_validate.validate({**core[0], "spec": {"nonsense": 1}}, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("profile", PROFILES)
def test_the_pod_templates_validate_as_core_pods(profile, rendered):
    cluster = _rayservice(rendered[profile])["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check", **template["metadata"]},
               "spec": template["spec"]}
        kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
        container = template["spec"]["containers"][0]
        assert container["readinessProbe"] and container["livenessProbe"]


@pytest.mark.parametrize("profile", PROFILES)
def test_serve_config_validates_with_rays_schema_and_its_apps_build(profile, rendered):
    from ray.serve._private.build_app import build_app as build_deployments  # noqa: PLC0415 - keeps collection of `make check` fast
    from ray.serve.schema import ServeDeploySchema  # noqa: PLC0415 - keeps collection of `make check` fast

    from graphs import build_app, build_stage_app  # noqa: PLC0415 - keeps collection of `make check` fast

    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(_rayservice(rendered[profile])["spec"]["serveConfigV2"]))
    assert serve_config.grpc_options.grpc_servicer_functions == [
        "serving.proto.video_pb2_grpc.add_VideoServiceServicer_to_server"
    ]
    front, *stages = serve_config.applications
    assert front.import_path == "graphs:build_app" and front.route_prefix == "/"
    config_file = yaml.safe_load((REPO / _source(profile)).read_text())
    assert front.args["model"] == config_file["model"] and front.args.get("stages") == config_file.get("stages")
    assert front.args["jobs"]["backend"] == "redis" and front.args["ingress"]["host"] == "0.0.0.0"
    if not any(node.get("gpus") for node in config_file.get("nodes", [])):  # the image's vLLM needs a GPU
        assert front.args["rewriter"]["enabled"] is False
    assert {d.name for d in build_deployments(build_app(front.args), name=front.name).deployments} == {
        "ingress", "orchestrator"}

    # One application per stage, no route (the front's ingress is the only one), args = the stage's own section.
    config = ReelserveConfig.model_validate(front.args)
    assert [app.name for app in stages] == [f"reelserve-{stage}" for stage in config.stage_names]
    for app in stages:
        assert app.import_path == "graphs:build_stage_app" and app.route_prefix is None
        assert "max_active_jobs" not in app.args["jobs"] or app.args["jobs"]["max_active_jobs"] == 32  # a default
        (deployment,) = build_deployments(build_stage_app(app.args), name=app.name).deployments
        (options,) = app.deployments  # the stage's Serve options: applied in place, no restart
        assert deployment.name == options.name == app.args["stage"]
    diffusion = next(app for app in stages if app.args["stage"] == "diffusion").deployments[0]
    if config_file["stages"].get("diffusion", {}).get("num_replicas", 1) is None:
        assert diffusion.autoscaling_config["policy"]["policy_function"] == "cluster.autoscaling:DiffusionBacklogPolicy"


@pytest.mark.parametrize("profile", PROFILES)
def test_worker_pods_keep_the_drain_and_budgets_keep_the_minimum_replicas(profile, rendered):
    config = ReelserveConfig.model_validate(yaml.safe_load((REPO / _source(profile)).read_text()))
    groups = _rayservice(rendered[profile])["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    longest = drain_seconds("diffusion", config)
    for group in groups:
        spec = group["template"]["spec"]
        command = spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
        assert command[:3] == ["python", "-m", "cluster.drain"]
        wait = int(command[command.index("--timeout") + 1])
        assert wait >= 40  # the orchestrator's hand-over at least
        assert spec["terminationGracePeriodSeconds"] > wait  # the hook finishes before Kubernetes stops the pod
        node = next(n for n in config.nodes or [] if n.name == group["groupName"]) if config.nodes else None
        if node is None or node.gpus and config.stages["diffusion"].accelerator_type in (None, node.accelerator_type):
            assert wait >= longest  # the group holds diffusion replicas: their whole drain fits
    budgets = {o["metadata"]["name"]: o for o in _objects(rendered[profile]) if o["kind"] == "PodDisruptionBudget"}
    plan = make_plan(config)
    for group in groups:
        name = group["groupName"]
        budget = budgets[f"reelserve-{name}"]
        labels = group["template"]["metadata"]["labels"]
        assert _selects(budget["spec"]["selector"], labels)
        node = next((n for n in config.nodes if n.name == name), None)
        if node is not None and node.gpus:  # enough pods for the stages' GPUs at their minimum replicas
            assert budget["spec"]["minAvailable"] * node.gpus >= plan.gpus_at_min[node.accelerator_type]
    # Each budget selects only its own group's pods.
    for name, budget in budgets.items():
        assert [g["groupName"] for g in groups if _selects(budget["spec"]["selector"], g["template"]["metadata"]["labels"])
                ] == [name.removeprefix("reelserve-")]


@pytest.mark.parametrize("profile", PROFILES)
def test_worker_groups_follow_the_configs_node_types(profile, rendered):
    config_file = yaml.safe_load((REPO / _source(profile)).read_text())
    groups = _rayservice(rendered[profile])["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    nodes = config_file.get("nodes") or [{"name": "cpu", "gpus": 0, "min_nodes": 1, "max_nodes": 2}]
    assert [g["groupName"] for g in groups] == [n["name"] for n in nodes]
    for group, node in zip(groups, nodes):
        assert (group["minReplicas"], group["maxReplicas"]) == (node.get("min_nodes", 0), node.get("max_nodes", 1))
        spec = group["template"]["spec"]
        limits = spec["containers"][0]["resources"]["limits"]
        if node.get("gpus"):
            assert limits["nvidia.com/gpu"] == str(node["gpus"])
            term = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            (expression,) = term["nodeSelectorTerms"][0]["matchExpressions"]
            assert expression["key"] == "nvidia.com/gpu.product"
            assert expression["values"] == GPU_PRODUCTS[node["accelerator_type"]]
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
            resources = yaml.safe_load(yaml.safe_load(f"v: {group['rayStartParams']['resources']}")["v"])
            assert resources == {f"accelerator_type:{node['accelerator_type']}": 1}
        else:
            assert "nvidia.com/gpu" not in limits and "affinity" not in spec


@pytest.mark.parametrize("profile", PROFILES)
def test_cluster_wide_settings(profile, rendered):
    spec = _rayservice(rendered[profile])["spec"]
    cluster = spec["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] >= 300  # nodes take minutes to start and load
    assert spec["upgradeStrategy"]["type"] == "NewCluster"
    assert {p["port"] for p in spec["serveService"]["spec"]["ports"]} == {8000, 9000}
    services = {o["metadata"]["name"]: o for o in _objects(rendered[profile]) if o["kind"] == "Service"}
    jobs_redis, gcs_redis = services["reelserve-redis"], services["reelserve-gcs-redis"]
    assert cluster["gcsFaultToleranceOptions"]["redisAddress"] == f"reelserve-gcs-redis:{gcs_redis['spec']['ports'][0]['port']}"
    args = yaml.safe_load(spec["serveConfigV2"])["applications"][0]["args"]
    assert args["jobs"]["redis_url"] == f"redis://reelserve-redis:{jobs_redis['spec']['ports'][0]['port']}/1"
    claims = {o["metadata"]["name"]: o for o in _objects(rendered[profile]) if o["kind"] == "PersistentVolumeClaim"}
    assert claims["reelserve-results"]["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("profile", PROFILES)
def test_prometheus_finds_the_ray_pods_metrics_port(profile, rendered):
    objects = _objects(rendered[profile])
    monitor = next(o for o in objects if o["kind"] == "PodMonitor")
    metrics = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"].endswith("metrics"))
    cluster = _rayservice(rendered[profile])["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        labels = template["metadata"]["labels"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert metrics["spec"]["selector"].items() <= labels.items()
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert ports[monitor["spec"]["podMetricsEndpoints"][0]["port"]] == 8080


@pytest.mark.parametrize("profile", PROFILES)
def test_each_folder_builds_with_kustomize_and_the_image_can_be_replaced(profile, tmp_path):
    assert shutil.which("kubectl"), "kubectl is missing: make test installs it (Debian's kubernetes-client)"
    overlay = tmp_path / "overlay"
    shutil.copytree(REPO / "k8s" / profile, tmp_path / "base")
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        # `bases`, not `resources`: the kustomize inside Debian's kubectl 1.20 reads a folder only there;
        # newer ones take both.
        "bases: [../base]\nnamespace: video\n"
        "images:\n- {name: reelserve, newName: registry.example.com/reelserve, newTag: '1.2.3'}\n"
    )
    built = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    objects = [o for o in yaml.safe_load_all(built.stdout) if o]
    assert all(o["metadata"]["namespace"] == "video" for o in objects)
    service = next(o for o in objects if o["kind"] == "RayService")
    assert "image: registry.example.com/reelserve:1.2.3" in yaml.safe_dump(service)


# ------------------------------------------------------------------ closed by default


def _selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels and In expressions, all the manifests use) against pod labels."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def _admits(policy: dict, labels: dict, port: int, same_namespace: bool = True) -> bool:
    """Whether an ingress NetworkPolicy lets a pod with ``labels`` connect to ``port`` of the pods it selects."""
    for rule in policy["spec"]["ingress"]:
        if "ports" in rule and port not in {p["port"] for p in rule["ports"]}:
            continue
        if "from" not in rule:
            return True
        for peer in rule["from"]:
            namespace_ok = same_namespace if "namespaceSelector" not in peer else peer["namespaceSelector"] == {}
            if namespace_ok and _selects(peer.get("podSelector", {}), labels):
                return True
    return False


def _pod_labels(files: dict[str, str]) -> dict[str, dict]:
    cluster = _rayservice(files)["spec"]["rayClusterConfig"]
    pods = {"head": cluster["headGroupSpec"]["template"]["metadata"]["labels"],
            "worker": cluster["workerGroupSpecs"][0]["template"]["metadata"]["labels"],
            "outsider": {"app.kubernetes.io/name": "someone-else"},
            "operator": {"app.kubernetes.io/name": "kuberay-operator"},
            "prometheus": {"app.kubernetes.io/name": "prometheus"}}
    for obj in _objects(files):
        if obj["kind"] == "Deployment":
            pods[obj["metadata"]["name"].removeprefix("reelserve-")] = obj["spec"]["template"]["metadata"]["labels"]
    return pods


@pytest.mark.parametrize("profile", PROFILES)
def test_ray_token_auth_is_on_and_nothing_is_exposed_outside_the_cluster(profile, rendered):
    cluster = _rayservice(rendered[profile])["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "reelserve-ray-token"}
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert _rayservice(rendered[profile])["spec"]["serveService"]["spec"]["type"] == "ClusterIP"
    for service in (o for o in _objects(rendered[profile]) if o["kind"] == "Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]


@pytest.mark.parametrize("profile", PROFILES)
def test_secrets_reach_the_pods_by_reference_and_never_through_serve_config(profile, rendered):
    service = _rayservice(rendered[profile])
    serve_config = service["spec"]["serveConfigV2"]
    assert "password" not in serve_config.lower() and "whsec_" not in serve_config and "secret" not in serve_config.lower()
    redis_url = yaml.safe_load(serve_config)["applications"][0]["args"]["jobs"]["redis_url"]
    assert "@" not in redis_url
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["gcsFaultToleranceOptions"]["redisPassword"] == {
        "valueFrom": {"secretKeyRef": {"name": "reelserve-redis", "key": "gcs-password"}}}
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        assert env["REELSERVE_REDIS_PASSWORD"]["valueFrom"] == {
            "secretKeyRef": {"name": "reelserve-redis", "key": "jobs-password"}}
        assert env["REELSERVE_WEBHOOK_SECRET"]["valueFrom"] == {
            "secretKeyRef": {"name": "reelserve-webhooks", "key": "signing-secret", "optional": True}}
        assert {name for name, e in env.items() if "value" in e} == {"HF_HUB_OFFLINE", "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"}
        assert env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"]["value"] == str(DEFAULT_MAX_BODY_BYTES)  # as the HTTP body cap
    assert not [o for o in _objects(rendered[profile]) if o["kind"] == "Secret"]  # values are never rendered


@pytest.mark.parametrize("profile", PROFILES)
def test_the_job_stores_redis_and_the_gcs_redis_are_apart_and_both_need_a_password(profile, rendered):
    deployments = {o["metadata"]["name"]: o for o in _objects(rendered[profile]) if o["kind"] == "Deployment"}
    assert set(deployments) == {"reelserve-redis", "reelserve-gcs-redis"}
    claims = {o["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] for o in deployments.values()}
    assert claims == {"reelserve-redis-data", "reelserve-gcs-redis-data"}
    for name, key in (("reelserve-redis", "jobs-password"), ("reelserve-gcs-redis", "gcs-password")):
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        assert container["env"] == [{"name": "REDIS_PASSWORD",
                                     "valueFrom": {"secretKeyRef": {"name": "reelserve-redis", "key": key}}}]
        command = " ".join(container["command"])
        assert 'requirepass "$REDIS_PASSWORD"' in command and "--appendonly yes" in command
        assert "args" not in container  # the password is read from stdin, not passed as an argument


@pytest.mark.parametrize("profile", PROFILES)
def test_network_policies_let_only_ray_pods_reach_redis_and_only_the_api_ports_in(profile, rendered):
    policies = {o["metadata"]["name"]: o for o in _objects(rendered[profile]) if o["kind"] == "NetworkPolicy"}
    assert set(policies) == {"reelserve-redis", "reelserve-gcs-redis", "reelserve-ray"}
    pods = _pod_labels(rendered[profile])
    selected = {name: {pod for pod, labels in pods.items() if _selects(p["spec"]["podSelector"], labels)}
                for name, p in policies.items()}
    assert selected == {"reelserve-redis": {"redis"}, "reelserve-gcs-redis": {"gcs-redis"},
                        "reelserve-ray": {"head", "worker"}}

    jobs, gcs, ray = policies["reelserve-redis"], policies["reelserve-gcs-redis"], policies["reelserve-ray"]
    assert _admits(jobs, pods["worker"], 6380) and _admits(jobs, pods["head"], 6380)
    assert not any(_admits(jobs, pods[p], 6380) for p in ("outsider", "operator", "prometheus", "gcs-redis"))
    assert _admits(gcs, pods["head"], 6381)
    assert not any(_admits(gcs, pods[p], 6381) for p in ("worker", "outsider", "operator"))
    for port in (8000, 9000):  # the API: from anywhere, even another namespace
        assert _admits(ray, pods["outsider"], port, same_namespace=False)
    for port in (8265, 6379, 10001, 52365, 8080, 12345):  # dashboard, GCS, Ray client, agent, metrics, a worker port
        assert not _admits(ray, pods["outsider"], port), port
        assert _admits(ray, pods["worker"], port) and _admits(ray, pods["head"], port)
    assert _admits(ray, pods["operator"], 8265, same_namespace=False)
    assert _admits(ray, pods["prometheus"], 8080, same_namespace=False) and not _admits(ray, pods["prometheus"], 8265)


def test_a_password_in_a_managed_redis_url_is_refused_and_the_gcs_can_have_its_own():
    raw = yaml.safe_load((REPO / _source("8x-h100")).read_text())
    with pytest.raises(RenderError, match="--redis-url: the URL holds a user or password, which would be readable in serveConfigV2"):
        render(raw, "x.yaml", redis_url="redis://:hunter2@redis.example.com:6380/2")
    with pytest.raises(RenderError, match="--gcs-redis-url: 'nope' is not a Redis URL"):
        render(raw, "x.yaml", redis_url="redis://jobs.example.com:6380/2", gcs_redis_url="nope")
    files = render(raw, "x.yaml", redis_url="rediss://jobs.example.com:6380/2", gcs_redis_url="redis://gcs.example.com:6379")
    assert "redis.yaml" not in files
    service = _rayservice(files)
    assert service["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisAddress"] == "gcs.example.com:6379"
    assert "rediss://jobs.example.com:6380/2" in service["spec"]["serveConfigV2"]


def test_the_api_keys_secret_is_mounted_read_only_when_named(crd_validator):
    raw = yaml.safe_load((REPO / _source("1x-h100")).read_text())
    files = render(raw, "x.yaml", api_keys_secret="reelserve-api-keys")
    cluster = _rayservice(files)["spec"]["rayClusterConfig"]
    for template in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        spec = template["spec"]
        assert {"name": "api-keys", "secret": {"secretName": "reelserve-api-keys", "defaultMode": 0o440}} in spec["volumes"]
        assert {"name": "api-keys", "mountPath": "/etc/reelserve/api-keys", "readOnly": True} in \
            spec["containers"][0]["volumeMounts"]
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": spec},
                                     KUBERNETES_VERSION, strict=True)
    assert not list(crd_validator.iter_errors(_rayservice(files)))
    assert "api-keys" not in render(raw, "x.yaml")["rayservice.yaml"]
    with pytest.raises(RenderError, match="api_keys_secret: 'Keys!' is not a Kubernetes name"):
        render(raw, "x.yaml", api_keys_secret="Keys!")


def test_the_cli_writes_a_folder_and_refuses_bad_input_by_name(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["k8s", "render", "--config", _source("8x-h100"), "--out", str(out),
                 "--redis-url", "rediss://redis.example.com:6380/2", "--image", "example/reelserve:9"]) == 0
    assert not (out / "redis.yaml").exists()  # a managed Redis: none rendered
    service = yaml.safe_load((out / "rayservice.yaml").read_text())
    assert service["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisAddress"] == "redis.example.com:6380"
    assert "rediss://redis.example.com:6380/2" in service["spec"]["serveConfigV2"]
    assert "example/reelserve:9" in (out / "rayservice.yaml").read_text()

    assert main(["k8s", "render", "--config", _source("8x-h100"), "--out", str(out), "--redis-url", "nope"]) == 2
    assert "--redis-url: 'nope' is not a Redis URL" in capsys.readouterr().err
    assert main(["k8s", "render", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "--config: no such file" in capsys.readouterr().err


def test_a_gpu_without_known_product_labels_is_refused_naming_the_field():
    raw = yaml.safe_load((REPO / _source("1x-h100")).read_text())
    raw["nodes"][0]["accelerator_type"] = "TPU-V5"
    with pytest.raises(RenderError, match=r"nodes\[0\].accelerator_type: no GPU product labels known for 'TPU-V5'"):
        render(raw, "x.yaml")


def _readme_section() -> str:
    text = (REPO / "README.md").read_text()
    return text[text.index("## Deploy on Kubernetes"):text.index("## Layout")]


@pytest.mark.parametrize("profile", PROFILES)
def test_the_readme_section_matches_the_manifests(profile, rendered):
    section = _readme_section()
    files = rendered[profile]
    listed = re.findall(r"^\| `([a-z]+\.yaml)` \|", section, re.M)
    assert sorted(listed) == sorted(files)  # every file described, none invented
    objects = _objects(files)
    names = {o["metadata"]["name"] for o in objects if o["kind"] in ("Service", "PersistentVolumeClaim")}
    service = _rayservice(files)
    names.add(service["spec"]["serveService"]["metadata"]["name"])
    # Secrets the pods read (by secretName or secretKeyRef) are named in the manifests, not created by them.
    names |= set(re.findall(r"(?:secretName|name): (reelserve-[a-z-]+)", "\n".join(files.values())))
    tiny = "path" not in yaml.safe_load((REPO / _source(profile)).read_text())["model"]
    assert ("reelserve-models" in names) != tiny and "(not in `local-cpu`, whose tiny checkpoint each pod builds)" in section
    for mentioned in set(re.findall(r"`(reelserve-[a-z-]+)`", section)) - ({"reelserve-models"} if tiny else set()):
        assert mentioned in names, f"the README names {mentioned}, which {profile} does not have"
    sizes = {o["metadata"]["name"]: o["spec"]["resources"]["requests"]["storage"]
             for o in objects if o["kind"] == "PersistentVolumeClaim"}
    assert f"`reelserve-results` ({sizes['reelserve-results'].replace('Gi', ' Gi')}, ReadWriteMany)" in section
    if "reelserve-models" in sizes:
        assert f"`reelserve-models` ({sizes['reelserve-models'].replace('Gi', ' Gi')}, ReadWriteMany" in section
    assert f"a {sizes['reelserve-redis-data'].replace('Gi', ' Gi')} volume" in section
    cluster = service["spec"]["rayClusterConfig"]
    assert f"({cluster['autoscalerOptions']['idleTimeoutSeconds']} s)" in section
    assert f"`upgradeStrategy: {service['spec']['upgradeStrategy']['type']}`" in section
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert f"`{args['jobs']['redis_url']}`" in section and f"`{args['jobs']['results_dir']}`" in section
    for path in re.findall(r":\d+(/[-/a-z_]+)`", section):  # the probe paths
        assert path in files["rayservice.yaml"], path
