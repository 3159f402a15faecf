"""`reelserve up --detach` / `status` / `generate --address` / `down`, as a user runs them.

A real detached Ray cluster with the embedded SQLite job store; the client is
the CLI itself talking gRPC.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cluster.config import all_stage_names
from cluster.local import _stop_head_processes, head_processes
from cluster.observability import build_dashboard, dashboard_queries
from serving.loadtest.sampler import canonical_name
from serving.metrics import METRICS
from tests.helpers import free_port
from tests.prometheus import OBSERVABILITY, promtool, start_prometheus, substitute_dashboard_variables

pytestmark = pytest.mark.cluster  # starts a Ray cluster: not in `make check`

REPO = Path(__file__).resolve().parents[2]


def _cli(args, env, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "serving.cli", *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint, tmp_path_factory):
    """A detached local cluster started with `reelserve up --detach`; `down` at the end."""
    root = tmp_path_factory.mktemp("local-cluster")
    grpc_port, metrics_port, gcs_port = free_port(), free_port(), free_port()
    config = {
        "model": {"path": str(tiny_checkpoint), "name": "ltx-2-tiny", "num_inference_steps": 4,
                  "stg_blocks": [1], "default_size": "64x64", "default_seconds": 1, "max_prompt_tokens": 256},
        "ingress": {"http_port": free_port(), "grpc_port": grpc_port},
        "jobs": {"backend": "sqlite", "sqlite_path": str(root / "jobs.sqlite3"), "results_dir": str(root / "results")},
        "ray": {"gcs_port": gcs_port, "object_store_memory_mb": 300, "metrics_export_port": metrics_port},
    }
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    # Ray exports metrics every 10 s by default; every second keeps the metrics tests short.
    env = {**os.environ, "REELSERVE_STATE_DIR": str(root / "state"), "RAY_metrics_report_interval_ms": "1000"}
    env.pop("RAY_ADDRESS", None)
    up = _cli(["up", "--config", str(config_path), "--detach"], env)
    assert up.returncode == 0, up.stderr[-3000:]
    yield {
        "env": env, "grpc": f"127.0.0.1:{grpc_port}", "root": root, "up": up, "config": config, "gcs_port": gcs_port,
        "metrics": f"http://127.0.0.1:{metrics_port}/metrics", "metrics_target": f"127.0.0.1:{metrics_port}",
    }
    down = _cli(["down"], env, timeout=120)
    assert down.returncode == 0, down.stderr[-2000:]


def test_up_reports_the_endpoints_and_status_shows_every_stage_healthy(cluster):
    assert "reelserve is up" in cluster["up"].stdout and cluster["grpc"] in cluster["up"].stdout
    result = _cli(["status"], cluster["env"], timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    status = json.loads(result.stdout)
    assert status["status"] == "RUNNING"
    assert set(status["deployments"]) == {
        "ingress", "orchestrator", "prompt_rewriter", "text_encoder", "image_conditioner", "diffusion", "video_decoder",
        "audio_decoder", "muxer",
    }
    assert set(status["deployments"].values()) == {"HEALTHY"}
    assert cluster["metrics"] in cluster["up"].stdout
    assert any(url.endswith(f":{cluster['metrics_target'].split(':')[1]}/metrics") for url in status["metrics"])


def test_generate_over_grpc_shows_progress_and_writes_the_mp4(cluster, photo_files, probe_mp4):
    out = cluster["root"] / "remote.mp4"
    result = _cli(
        ["generate", "--address", cluster["grpc"], "--image", str(photo_files["good"]), "--prompt", "a cat",
         "--seconds", "1", "--size", "96x64", "--out", str(out)],
        cluster["env"], timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(out)
    assert "generating" in result.stderr and "100%" in result.stderr
    info = probe_mp4(out)
    assert (info["video_streams"], info["audio_streams"]) == (1, 1)
    assert (info["width"], info["height"]) == (96, 64)
    assert abs(info["video_duration"] - 1.0) <= 1 / 24 + 1e-6
    assert (cluster["root"] / "jobs.sqlite3").is_file(), "the embedded job store is SQLite"


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--size", "100x100"], "size"),
        (["--seconds", "999"], "seconds"),
        (["--prompt", " "], "prompt"),
    ],
)
def test_generate_over_grpc_refuses_bad_input_in_one_line(cluster, tmp_path, args, flag):
    base = {"--prompt": "a cat", "--seconds": "1", "--size": "64x64"}
    base.update(dict(zip(args[::2], args[1::2])))
    command = ["generate", "--address", cluster["grpc"], "--out", str(tmp_path / "x.mp4")]
    for key, value in base.items():
        command += [key, value]
    result = _cli(command, cluster["env"], timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in result.stderr


def test_up_on_a_running_cluster_applies_the_config_in_place(cluster):
    """`reelserve up --config` on a running cluster applies the config instead of refusing: an application restarts
    only when its own section changed (here none did; a jobs-only change restarting no stage is shown on the
    served cluster, tests/serving/test_served_health.py). What only a new start can change is refused by name."""
    before = json.loads(_cli(["status"], cluster["env"], timeout=120).stdout)["replicas"]
    path = cluster["root"] / "again.yaml"
    path.write_text(yaml.safe_dump(cluster["config"]))
    result = _cli(["up", "--config", str(path), "--detach"], cluster["env"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "restarted nothing" in result.stdout
    after = json.loads(_cli(["status"], cluster["env"], timeout=120).stdout)
    assert after["status"] == "RUNNING" and after["replicas"] == before
    moved = {**cluster["config"], "ingress": {**cluster["config"]["ingress"], "grpc_port": free_port()}}
    path.write_text(yaml.safe_dump(moved))
    refused = _cli(["up", "--config", str(path)], cluster["env"])
    assert refused.returncode == 2 and "ingress.grpc_port: cannot change on a running cluster" in refused.stderr


def test_generate_reports_an_unreachable_server(tmp_path):
    result = _cli(
        ["generate", "--address", f"127.0.0.1:{free_port()}", "--prompt", "a cat", "--out", str(tmp_path / "x.mp4")],
        {**os.environ}, timeout=60,
    )
    assert result.returncode == 1
    assert "cannot reach" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------- load test and metrics
# These run last: the load test drives the cluster while a real Prometheus scrapes it, then the
# metrics tests read what both saw.

# Every reelserve metric and its type, as the issue lists them.
EXPECTED_METRICS = {spec.name: spec.kind for spec in METRICS}
ONLY_WHEN_IT_HAPPENS = {  # counters Ray exports only after a first increment, or GPU-only gauges
    "reelserve_admissions_refused_total", "reelserve_prompt_rewrite_fallbacks_total",
    "reelserve_gpu_memory_allocated_bytes", "reelserve_gpu_memory_peak_bytes", "reelserve_replicas_lost_total",
}
MODEL_STAGES = ("prompt_rewriter", "text_encoder", "image_conditioner", "diffusion", "video_decoder", "audio_decoder")
STAGES = MODEL_STAGES + ("muxer",)

LOAD_MIX = """
- name: i2v
  weight: 1
  size: 64x64
  seconds: 1
  photo: true
- name: t2v-enhanced
  weight: 1
  size: 96x64
  seconds: 1
  photo: false
  enhance_prompt: true
"""


@pytest.fixture(scope="module")
def prometheus(cluster, tmp_path_factory):
    server = start_prometheus(tmp_path_factory.mktemp("prometheus"), targets=[cluster["metrics_target"]])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def loadtest(cluster, prometheus, tmp_path_factory):
    """`reelserve loadtest` with 20 requests at concurrency 4 while Prometheus scrapes the cluster."""
    out = tmp_path_factory.mktemp("loadtest")
    mix = out / "mix.yaml"
    mix.write_text(LOAD_MIX)
    result = _cli(
        ["loadtest", "--address", cluster["grpc"], "--requests", "20", "--concurrency", "4", "--mix", str(mix),
         "--slo-seconds", "30", "--metrics-url", cluster["metrics"], "--sample-interval", "1", "--out", str(out)],
        cluster["env"], timeout=480,
    )

    time.sleep(4)  # two Ray export intervals and a few scrapes after the last job
    return {"result": result, "out": out}


def test_loadtest_accounts_for_every_job_and_writes_the_report_and_plots(loadtest):
    result, out = loadtest["result"], loadtest["out"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "submitted 20/20" in result.stderr, "progress lines on stderr"
    report = json.loads((out / "report.json").read_text())
    jobs = report["jobs"]
    assert jobs["submitted"] == 20 and jobs["all_accounted_for"]
    assert jobs["completed"] + jobs["failed"] + jobs["rejected"] == 20
    assert jobs["completed"] == 20, report["errors_by_code"]
    assert report["throughput_jobs_per_min"] > 0
    latency = report["latency_seconds"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert report["goodput"]["slo_seconds"] == 30 and report["goodput"]["within_slo"] <= 20
    assert report["first_progress_seconds"]["count"] == 20
    assert {"text_encoder", "diffusion", "video_decoder", "audio_decoder", "muxer"} <= set(report["stage_seconds"])
    assert set(report["by_shape"]) == {"i2v", "t2v-enhanced"}
    assert len(report["traces"]) == 20 and all(t["job_id"] for t in report["traces"])
    samples = report["metrics"]["samples"]
    assert len(samples) >= 2 and report["metrics"]["failed_fetches"] == 0
    assert all(samples[-1]["stages"][stage]["replicas"] == 1 for stage in STAGES)
    # Ray exports a gauge's value at its report interval, so a stage busy a third of the time can be missed by
    # every sample of a one-minute run; the sampler must see some stage at work.
    assert max(sum(stage["queued"] + stage["in_flight"] for stage in s["stages"].values()) for s in samples) >= 1
    for name in ("latency.png", "stage_time.png", "queue_replicas.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def _scrape(cluster) -> str:
    with urllib.request.urlopen(cluster["metrics"], timeout=10) as response:
        return response.read().decode()


def _families(text: str) -> dict:
    """Our metric families by their reelserve_* name (Ray exports them as ray_reelserve_*)."""
    families = {}
    for family in text_string_to_metric_families(text):
        name = canonical_name(family.name)
        if name.startswith("reelserve_"):
            # the parser names a counter family without its _total suffix
            families[name + ("_total" if family.type == "counter" else "")] = family
    return families


def test_every_wired_metric_is_exported_with_its_type_and_counts_for_each_stage(cluster, loadtest):
    families = _families(_scrape(cluster))
    wired = set(EXPECTED_METRICS) - ONLY_WHEN_IT_HAPPENS
    missing = sorted(wired - set(families))
    assert not missing, f"not exported: {missing}"
    for name in set(families) & set(EXPECTED_METRICS):
        assert families[name].type == EXPECTED_METRICS[name], name
    ok_requests = {
        s.labels["stage"]: s.value for s in families["reelserve_stage_requests_total"].samples
        if s.name.endswith("_total") and s.labels["status"] == "ok"
    }
    assert all(ok_requests.get(stage, 0) > 0 for stage in STAGES), ok_requests
    handed = {s.labels["stage"] for s in families["reelserve_stage_handoff_bytes_total"].samples if s.value > 0}
    assert {"text_encoder", "image_conditioner", "diffusion", "video_decoder", "audio_decoder"} <= handed
    loaded = {s.labels["stage"] for s in families["reelserve_model_load_seconds"].samples if s.value > 0}
    assert set(MODEL_STAGES) <= loaded
    jobs = {s.labels["status"] for s in families["reelserve_jobs_total"].samples if s.value > 0}
    assert "completed" in jobs
    steps = sum(s.value for s in families["reelserve_denoise_steps_total"].samples if s.name.endswith("_total"))
    assert steps > 0
    replicas = {s.labels["stage"] for s in families["reelserve_stage_requests_in_flight"].samples}
    assert replicas == set(STAGES)
    assert all("model" in s.labels and not {"job", "job_id"} & set(s.labels) for f in families.values() for s in f.samples)
    assert all("stage" in s.labels for name, f in families.items() if name.startswith("reelserve_stage_")
               for s in f.samples)


def test_promtool_finds_no_problem_in_our_scraped_metrics(cluster, loadtest):
    ours, keep = [], False
    for line in _scrape(cluster).splitlines():
        if line.startswith(("# HELP ", "# TYPE ")):
            keep = line.split()[2].startswith("ray_reelserve_")
        if keep:
            ours.append(line)
    assert len(ours) > 50
    raw = promtool("check", "metrics", input_text="\n".join(ours) + "\n")
    problems = [line for line in (raw.stdout + raw.stderr).splitlines() if line.strip()]
    # Ray adds its own identity labels (WorkerId, NodeAddress, ...) to every metric; they are camelCase.
    assert all("label names should be written in 'snake_case' not 'camelCase'" in p for p in problems), problems[:5]
    renamed = re.sub(r"\b(Component|NodeAddress|SessionName|Version|WorkerId)=",
                     lambda m: re.sub(r"(?<!^)([A-Z])", r"_\1", m.group(1)).lower() + "=", "\n".join(ours))
    clean = promtool("check", "metrics", input_text=renamed + "\n")
    assert clean.returncode == 0 and not (clean.stdout + clean.stderr).strip(), clean.stdout + clean.stderr


def test_prometheus_scrapes_the_cluster_and_every_query_is_valid(cluster, loadtest, prometheus):
    assert [t["scrapeUrl"] for t in prometheus.targets_up()] == [cluster["metrics"]]
    # the relabeling gives our metrics their names back
    stored = prometheus.query('sum by (stage) (reelserve_stage_requests_total{status="ok"})')["data"]["result"]
    assert {r["metric"]["stage"] for r in stored} == set(STAGES)
    assert not prometheus.query("ray_reelserve_stage_requests_total")["data"]["result"]

    rules = [r["expr"] for g in yaml.safe_load((OBSERVABILITY / "alerts.yaml").read_text())["groups"] for r in g["rules"]]
    queries = [substitute_dashboard_variables(q, window="5m") for q in dashboard_queries(build_dashboard())]
    empty = []
    for expr in queries + rules:
        if expr.startswith("label_values("):
            expr = expr[len("label_values("):].split(",")[0]
        answer = prometheus.query(expr)
        assert answer["status"] == "success", f"{expr}: {answer.get('error')}"
        if not answer["data"]["result"]:
            empty.append(expr)
    # A query may be empty only when it reads a metric recorded only when something happens (GPU-only,
    # refusals, fallbacks) or is an alert that should not fire on a healthy cluster.
    # The dashboard has a row for every family's stages; those of other families stay empty in this LTX-2 cluster.
    other_families = {f'{label}="{stage}"' for stage in all_stage_names() if stage not in STAGES
                      for label in ("stage", "deployment")}
    allowed_empty = ONLY_WHEN_IT_HAPPENS | other_families | {"ray_serve_autoscaling_desired_replicas",
                                                             'status="error"', 'status!="completed"'}  # no job failed
    unexplained = [e for e in empty if e not in rules and not any(name in e for name in allowed_empty)]
    assert not unexplained, unexplained
    stage_latency = [q for q in queries if "reelserve_stage_request_seconds" in q
                     and not any(stage in q for stage in other_families)]
    assert stage_latency and all(q not in empty for q in stage_latency)


def test_down_stops_every_process_up_started(cluster, loadtest):
    """Ray's client server (port 10001) included: it is nobody's child once `ray start` exited."""
    running = head_processes(cluster["gcs_port"])
    titles = [" ".join(p.cmdline()) for p in running]
    assert any("ray.util.client.server" in title for title in titles), titles
    assert any("raylet" in title for title in titles) and any("gcs_server" in title for title in titles)
    down = _cli(["down"], cluster["env"], timeout=120)
    assert down.returncode == 0, down.stderr[-2000:]
    deadline = time.monotonic() + 30
    while (left := [p for p in head_processes(cluster["gcs_port"]) if p.is_running() and p.status() != "zombie"]):
        assert time.monotonic() < deadline, [" ".join(p.cmdline()) for p in left]
        time.sleep(0.5)


def test_down_stops_only_the_processes_of_its_own_head(tmp_path):
    """`reelserve down` must not end other Ray clusters on the machine (as `ray stop` would)."""
    ours_port, theirs_port = free_port(), free_port()
    # A stand-in for a raylet of each cluster, each with a child (a worker renamed ray::..., found as a child).
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    ours = subprocess.Popen([sys.executable, "-c", script, f"--gcs-address=10.0.0.1:{ours_port}"])
    theirs = subprocess.Popen([sys.executable, "-c", script, f"--gcs-address=10.0.0.1:{theirs_port}"])
    try:
        deadline = time.monotonic() + 20
        while not (psutil.Process(ours.pid).children() and psutil.Process(theirs.pid).children()):
            assert time.monotonic() < deadline, "the stand-in processes did not start their children"
            time.sleep(0.1)
        our_child = psutil.Process(ours.pid).children()[0]
        their_child = psutil.Process(theirs.pid).children()[0]
        _stop_head_processes(ours_port, grace_s=5)
        assert ours.wait(timeout=10) is not None
        assert not our_child.is_running() or our_child.status() == psutil.STATUS_ZOMBIE
        assert theirs.poll() is None and their_child.is_running()
    finally:
        for process in (ours, theirs):
            if process.poll() is None:
                for child in psutil.Process(process.pid).children():
                    child.kill()
                process.kill()
                process.wait(timeout=10)
