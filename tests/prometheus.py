"""A real Prometheus server for tests (Debian's `prometheus` package; `make test` installs it).

``start_prometheus`` writes a config based on the checked-in ``k8s/observability/prometheus.yml``
(so its relabeling is what the tests exercise), points it at the given targets, and waits until
the server answers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.helpers import free_port

__all__ = ["PrometheusServer", "start_prometheus", "OBSERVABILITY", "promtool", "substitute_dashboard_variables"]

OBSERVABILITY = Path(__file__).resolve().parents[1] / "k8s" / "observability"


def promtool(*args: str, cwd: Path | None = None, input_text: str | None = None) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool") or "/usr/bin/promtool"
    return subprocess.run([binary, *args], cwd=cwd, input=input_text, capture_output=True, text=True, timeout=120)


def substitute_dashboard_variables(expr: str, window: str = "1m") -> str:
    """A dashboard query as Prometheus takes it: every model, a fixed rate window."""
    return expr.replace("$__rate_interval", window).replace("$model", ".*")


@dataclass
class PrometheusServer:
    url: str
    process: subprocess.Popen
    workdir: Path

    def api(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:  # bad queries answer 400 with a JSON error body
            return json.loads(error.read())

    def query(self, expr: str) -> dict:
        return self.api("query", query=expr)

    def targets_up(self) -> list[dict]:
        return [t for t in self.api("targets")["data"]["activeTargets"] if t["health"] == "up"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def start_prometheus(workdir: Path, targets: list[str], scrape_interval: str = "1s") -> PrometheusServer:
    """Prometheus on a free port scraping ``targets`` (HOST:PORT) with our relabeling and alert rules."""
    config = yaml.safe_load((OBSERVABILITY / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval}
    config["rule_files"] = [str(OBSERVABILITY / "alerts.yaml")]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": targets}] if targets else []
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    log = open(workdir / "prometheus.log", "wb")
    process = subprocess.Popen(
        [binary, f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    server = PrometheusServer(url=f"http://127.0.0.1:{port}", process=process, workdir=workdir)
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {process.returncode}: {(workdir / 'prometheus.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError("prometheus did not become ready within 30 s")
        time.sleep(0.2)
