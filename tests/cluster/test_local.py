"""`reelserve up --detach` / `status` / `generate --address` / `down`, as a user runs them.

A real detached Ray cluster with the embedded SQLite job store; the client is
the CLI itself talking gRPC.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import free_port

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
    grpc_port = free_port()
    config = {
        "model": {"path": str(tiny_checkpoint), "name": "ltx-2-tiny", "num_inference_steps": 4,
                  "stg_blocks": [1], "default_size": "64x64", "default_seconds": 1, "max_prompt_tokens": 256},
        "ingress": {"http_port": free_port(), "grpc_port": grpc_port},
        "jobs": {"backend": "sqlite", "sqlite_path": str(root / "jobs.sqlite3"), "results_dir": str(root / "results")},
        "ray": {"gcs_port": free_port(), "object_store_memory_mb": 300},
    }
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "REELSERVE_STATE_DIR": str(root / "state")}
    env.pop("RAY_ADDRESS", None)
    up = _cli(["up", "--config", str(config_path), "--detach"], env)
    assert up.returncode == 0, up.stderr[-3000:]
    yield {"env": env, "grpc": f"127.0.0.1:{grpc_port}", "root": root, "up": up}
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


def test_generate_reports_an_unreachable_server(tmp_path):
    result = _cli(
        ["generate", "--address", f"127.0.0.1:{free_port()}", "--prompt", "a cat", "--out", str(tmp_path / "x.mp4")],
        {**os.environ}, timeout=60,
    )
    assert result.returncode == 1
    assert "cannot reach" in result.stderr and "Traceback" not in result.stderr
