"""build_app and build_stage_app: validate the config and bind the applications without starting Ray.

``cluster.apps.serve_applications`` lists the applications of a config: the front (ingress + orchestrator,
``graphs:build_app``) and one per stage (``graphs:build_stage_app``), each stage with exactly its own section.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import ray
from pydantic import ValidationError
from ray.serve import Application

from cluster.apps import serve_applications
from cluster.config import load_config, stage_names
from graphs import build_app, build_stage_app
from serving.jobs.handles import StageHandles

EMBEDDED = Path(__file__).resolve().parents[2] / "cluster" / "profiles" / "local-cpu.yaml"


def _deployments(app: Application) -> dict:
    """Every deployment of an application, by name: its ingress and what is bound into it, recursively."""
    deployment = app._bound_deployment
    found = {deployment.name: deployment}
    for argument in _nested(deployment.init_args):
        if isinstance(argument, Application):
            found.update(_deployments(argument))
    return found


def _nested(values):
    for value in values:
        if isinstance(value, dict):
            yield from _nested(value.values())
        elif isinstance(value, (list, tuple)):
            yield from _nested(value)
        else:
            yield value


def _stage_apps(args) -> dict[str, dict]:
    """The stage applications of a config, by stage name."""
    return {app["args"]["stage"]: app for app in serve_applications(args)[1:]}


def test_the_front_holds_the_ingress_and_the_orchestrator_and_reaches_the_stages_by_name():
    app = build_app({})
    assert isinstance(app, Application)
    assert not ray.is_initialized()
    deployments = _deployments(app)
    assert set(deployments) == {"ingress", "orchestrator"}
    ingress_args = [a for a in deployments["ingress"].init_args if isinstance(a, Application)]
    assert [a._bound_deployment.name for a in ingress_args] == ["orchestrator"]
    config = load_config({})
    assert deployments["ingress"].init_args[:3] == (config.model, config.jobs, config.rewriter)
    assert deployments["ingress"].init_args[4].diffusion_replicas == 1  # admission sizes capacity by diffusion
    assert deployments["orchestrator"].init_args[:4] == (config.orchestrator, config.model, config.jobs, config.rewriter)
    handles = deployments["orchestrator"].init_args[4]
    assert isinstance(handles, StageHandles) and handles.stages == config.stage_names
    assert handles.app_name == "reelserve"


def test_every_stage_is_an_application_of_its_own_built_from_its_section():
    applications = serve_applications({})
    front, *stages = applications
    assert (front["name"], front["import_path"], front["route_prefix"]) == ("reelserve", "graphs:build_app", "/")
    assert [app["args"]["stage"] for app in stages] == list(stage_names("ltx2"))
    for app in stages:
        assert app["name"] == f"reelserve-{app['args']['stage']}" and app["route_prefix"] is None
        (deployment,) = _deployments(build_stage_app(app["args"])).values()
        assert deployment.name == app["args"]["stage"] == app["deployments"][0]["name"]
    assert not ray.is_initialized()


def test_a_change_that_does_not_touch_a_stage_leaves_its_args_unchanged():
    """What Serve compares to decide a restart: a jobs-only change rebuilds the front only."""
    base = {"jobs": {"max_active_jobs": 16, "retry_after_s": 5}}
    changed = copy.deepcopy(base)
    changed["jobs"].update(max_active_jobs=12, retry_after_s=9, lease_s=30, job_timeout_s=300, stage_retries=1)
    before, after = _stage_apps(base), _stage_apps(changed)
    assert all(before[stage]["args"] == after[stage]["args"] for stage in before)
    assert serve_applications(base)[0]["args"] != serve_applications(changed)[0]["args"]
    # A drain time that follows job_timeout_s changes only the stages' options, applied in place.
    assert before["diffusion"]["deployments"] != after["diffusion"]["deployments"]

    # Where the stages keep their outputs is theirs: every stage restarts.
    moved = {**base, "jobs": {**base["jobs"], "results_dir": "/elsewhere"}}
    assert all(before[stage]["args"] != _stage_apps(moved)[stage]["args"] for stage in before)

    # One stage's settings: that stage only.
    one = {**base, "stages": {"video_decoder": {"dtype": "float32"}}}
    changed_stages = [stage for stage, app in _stage_apps(one).items() if app["args"] != before[stage]["args"]]
    assert changed_stages == ["video_decoder"]
    # Its scaling: no stage's args change (replicas are options).
    scaled = {**base, "stages": {"video_decoder": {"num_replicas": 3}}}
    assert all(app["args"] == before[stage]["args"] for stage, app in _stage_apps(scaled).items())
    assert _stage_apps(scaled)["video_decoder"]["deployments"][0]["num_replicas"] == 3


def test_build_app_refuses_a_config_that_cannot_fit():
    profile = load_config(str(EMBEDDED.parent / "1x-h100.yaml")).model_dump()
    profile["stages"]["diffusion"]["gpu_memory_gb"] = 30  # the 19B transformer alone is 38 GB
    with pytest.raises(ValueError, match="stages.diffusion.gpu_memory_gb"):
        build_app(profile)
    assert not ray.is_initialized()


def test_only_diffusion_spans_several_gpus_and_never_more_than_a_node_has():
    profile = load_config(str(EMBEDDED.parent / "8x-h100.yaml")).model_dump()
    profile["stages"]["diffusion"]["num_gpus"] = 2
    assert _stage_apps(profile)["diffusion"]["args"]["runtime"]["ranks"] == 2
    build_app(profile)  # served: a sequence-parallel replica over 2 GPUs
    profile["stages"]["diffusion"]["num_gpus"] = 16
    with pytest.raises(ValueError, match="stages.diffusion.num_gpus: a replica spans 16 GPUs but the largest node has 8"):
        build_app(profile)
    profile["stages"]["diffusion"]["num_gpus"] = 1
    profile["stages"]["video_decoder"] = {**profile["stages"]["video_decoder"], "gpu_memory_gb": None, "num_gpus": 2}
    with pytest.raises(ValueError, match="stages.video_decoder.num_gpus: only diffusion spans several GPUs"):
        build_app(profile)
    assert not ray.is_initialized()


def test_the_embedded_profile_builds_with_its_options():
    config = load_config(str(EMBEDDED))
    for args in (config, config.model_dump()):
        assert isinstance(build_app(args), Application)
        diffusion = _stage_apps(args)["diffusion"]["deployments"][0]
        assert (diffusion["max_ongoing_requests"], diffusion["max_queued_requests"]) == (2, 16)
        assert diffusion["autoscaling_config"]["policy"]["policy_function"] == "cluster.autoscaling:DiffusionBacklogPolicy"
        assert _stage_apps(args)["diffusion"]["args"]["model"]["name"] == "ltx-2-tiny"
    assert build_app(None) is not None
    assert not ray.is_initialized()


def test_stage_resources_are_the_stages_options():
    (decoder,) = _stage_apps({"stages": {"video_decoder": {"num_cpus": 2, "memory_gb": 2.0}}})["video_decoder"]["deployments"]
    assert decoder["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0.0, "memory": 2 * 1024**3}
    front = _deployments(build_app({"ingress": {"num_cpus": 0.5}}))
    assert front["ingress"].ray_actor_options == {"num_cpus": 0.5}
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


def test_the_rewriter_stage_is_deployed_only_when_enabled():
    assert "prompt_rewriter" in _stage_apps({"rewriter": {"enabled": True}})
    assert "prompt_rewriter" not in _stage_apps({"rewriter": {"enabled": False}})
    rewriter = _stage_apps({"rewriter": {"enabled": True}})["prompt_rewriter"]
    assert rewriter["deployments"][0]["max_ongoing_requests"] == 64  # vLLM batches
    assert rewriter["args"]["rewriter"]["enabled"] is True and rewriter["args"]["kind"] == "rewriter"
