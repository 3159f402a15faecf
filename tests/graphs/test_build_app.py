"""build_app: validates the config and binds the deployment graph without starting Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
from pydantic import ValidationError
from ray.serve import Application

from cluster.config import load_config, stage_names
from graphs import build_app

EMBEDDED = Path(__file__).resolve().parents[2] / "cluster" / "profiles" / "local-cpu.yaml"


def _deployments(app: Application) -> dict:
    """Every deployment of the graph, by name: the ingress and what is bound into it, recursively."""
    deployment = app._bound_deployment
    found = {deployment.name: deployment}
    for argument in _nested(deployment.init_args):
        if isinstance(argument, Application):
            found.update(_deployments(argument))
    return found


def _nested(values):
    """Every value inside ``values``, through lists, tuples and dicts (the runner gets its stages in a dict)."""
    for value in values:
        if isinstance(value, dict):
            yield from _nested(value.values())
        elif isinstance(value, (list, tuple)):
            yield from _nested(value)
        else:
            yield value


def test_build_app_defaults_without_starting_ray():
    app = build_app({})
    assert isinstance(app, Application)
    assert not ray.is_initialized()
    deployments = _deployments(app)
    assert set(deployments) == {"ingress", "orchestrator", *stage_names("ltx2")}
    # the ingress holds no stage: only the orchestrator, to wake it
    ingress_args = [a for a in deployments["ingress"].init_args if isinstance(a, Application)]
    assert [a._bound_deployment.name for a in ingress_args] == ["orchestrator"]
    # the ingress and the orchestrator get only the config sections they use, so scaling a stage restarts neither
    config = load_config({})
    assert deployments["ingress"].init_args[:3] == (config.model, config.jobs, config.rewriter)
    assert deployments["ingress"].init_args[4].diffusion_replicas == 1  # admission sizes capacity by diffusion
    assert deployments["orchestrator"].init_args[:4] == (config.orchestrator, config.model, config.jobs, config.rewriter)
    scaled = build_app({"stages": {"text_encoder": {"num_replicas": 3}, "muxer": {"num_replicas": 2}}})
    for name in ("ingress", "orchestrator", "text_encoder"):
        before, after = deployments[name].init_args, _deployments(scaled)[name].init_args
        assert [a for a in _nested(before) if not isinstance(a, Application)] == [
            a for a in _nested(after) if not isinstance(a, Application)
        ]


def test_build_app_refuses_a_config_that_cannot_fit():
    profile = load_config(str(EMBEDDED.parent / "1x-h100.yaml")).model_dump()
    profile["stages"]["diffusion"]["gpu_memory_gb"] = 30  # the 19B transformer alone is 38 GB
    with pytest.raises(ValueError, match="stages.diffusion.gpu_memory_gb"):
        build_app(profile)
    assert not ray.is_initialized()


def test_build_app_refuses_multi_gpu_replicas_it_cannot_use_yet():
    profile = load_config(str(EMBEDDED.parent / "8x-h100.yaml")).model_dump()
    profile["stages"]["diffusion"]["num_gpus"] = 2
    with pytest.raises(ValueError, match="stages.diffusion.num_gpus: 2 GPUs per replica is not served yet"):
        build_app(profile)
    assert not ray.is_initialized()


def test_build_app_from_embedded_profile():
    config = load_config(str(EMBEDDED))
    for args in (config, config.model_dump()):
        app = build_app(args)
        assert isinstance(app, Application)
        deployments = _deployments(app)
        assert deployments["diffusion"].max_ongoing_requests == 2
        assert deployments["diffusion"].max_queued_requests == 16
        assert deployments["ingress"].init_args[0].name == "ltx-2-tiny"
    assert build_app(None) is not None
    assert not ray.is_initialized()


def test_build_app_applies_stage_resources():
    app = build_app({"stages": {"video_decoder": {"num_cpus": 2, "memory_gb": 2.0}}, "ingress": {"num_cpus": 0.5}})
    deployments = _deployments(app)
    assert deployments["video_decoder"].ray_actor_options == {"num_cpus": 2.0, "num_gpus": 0.0, "memory": 2 * 1024**3}
    assert deployments["ingress"].ray_actor_options == {"num_cpus": 0.5}
    assert not ray.is_initialized()


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"stages": {"diffusion": {"num_gpus": -1}}}, "stages.diffusion.num_gpus"),
        ({"jobs": {"backend": "mongo"}}, "jobs.backend"),
        ({"model": {"default_size": "wide"}}, "model.default_size"),
        ({"ingres": {}}, "ingres"),
    ],
)
def test_build_app_bad_dict_names_the_field(args, field):
    with pytest.raises(ValidationError) as caught:
        build_app(args)
    assert field in str(caught.value)
    assert not ray.is_initialized()


def test_the_rewriter_stage_is_bound_only_when_enabled():
    assert "prompt_rewriter" in _deployments(build_app({"rewriter": {"enabled": True}}))
    assert "prompt_rewriter" not in _deployments(build_app({"rewriter": {"enabled": False}}))
    assert _deployments(build_app({}))["prompt_rewriter"].max_ongoing_requests == 64  # vLLM batches
