"""The storage section: the issue's YAML maps onto it; store URLs and endpoints are checked at build time."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from cluster.config import ReelserveConfig
from cluster.plan import format_plan, make_plan
from cluster.storage_config import StorageConfig
from serving.storage.opening import open_storage

ISSUE_YAML = """
storage:
  results_url: s3://videos/reelserve
  artifacts_url: s3://videos/artifacts
  s3_endpoint_url: http://127.0.0.1:9100
  results_ttl_s: 604800
  redirect_downloads: true
"""


def test_the_documented_yaml():
    config = StorageConfig.model_validate(yaml.safe_load(ISSUE_YAML)["storage"])
    assert config.results_url == "s3://videos/reelserve" and config.redirect_downloads
    assert config.client_options()["s3_endpoint_url"] == "http://127.0.0.1:9100"
    assert config.describe("/data/results")[0].startswith("results: s3://videos/reelserve at http://127.0.0.1:9100")


def test_defaults_are_local():
    config = StorageConfig()
    assert config.results_url is None and config.results_ttl_s == 604800
    assert config.describe("/data/results") == [
        "results: /data/results, kept 604800 s, downloads streamed",
        "stage outputs and checkpoints: /data/results (under artifacts/)",
    ]


def test_every_field_is_described():
    assert all(field.description for field in StorageConfig.model_fields.values())


@pytest.mark.parametrize(
    "values",
    [
        {"results_url": "ftp://host/dir"},
        {"results_url": "s3://"},
        {"artifacts_url": "memory://"},
        {"results_url": "redis"},  # videos do not go to Redis
        {"artifacts_url": "data/artifacts"},  # relative: each replica would resolve it elsewhere
        {"results_url": "redis://127.0.0.1:6380/0"},
        {"results_url": "s3://key:secret@bucket/prefix"},
        {"results_url": "s3://bucket/prefix?x=1"},
        {"s3_endpoint_url": "http://127.0.0.1:9100"},  # no s3:// store to use it
        {"results_url": "s3://b/p", "s3_endpoint_url": "127.0.0.1:9100"},
        {"signed_url_ttl_s": 8 * 86400},
        {"results_ttl_s": 10},
        {"unknown": 1},
    ],
)
def test_wrong_settings_are_refused(values):
    with pytest.raises(ValidationError):
        StorageConfig(**values)


def test_the_options_open_a_store(tmp_path):
    config = StorageConfig(results_url=str(tmp_path))
    storage = open_storage(config.results_url, **config.client_options())
    assert storage.backend == "local"


def test_stage_outputs_in_the_job_stores_redis():
    config = StorageConfig(results_url="s3://videos/reelserve", artifacts_url="redis")
    assert config.artifacts_store_url("/data", "redis://:pw@10.0.0.5:6380/0") == "redis://:pw@10.0.0.5:6380/0"
    assert config.describe("/data")[1] == "stage outputs and checkpoints: the job store's Redis"
    with pytest.raises(ValueError, match="jobs.redis_url"):
        config.artifacts_store_url("/data", None)
    config = StorageConfig(artifacts_url="redis://:pw@10.0.0.5:6380/1")
    assert "pw" not in config.describe("/data")[1]
    assert StorageConfig().artifacts_store_url("/data", None) == "/data"


def test_the_older_job_settings_are_the_storage_defaults():
    config = ReelserveConfig.model_validate(
        {"jobs": {"backend": "redis", "redis_url": "redis://r:6380/1", "results_dir": "/shared/reelserve",
                  "artifacts": "redis"}}
    )
    assert (config.storage.results_url, config.storage.artifacts_url) == ("/shared/reelserve", "redis")
    assert ReelserveConfig.model_validate(config.model_dump()).storage == config.storage  # validates again alike
    with pytest.raises(ValidationError, match="disagree"):
        ReelserveConfig.model_validate({"jobs": {"results_dir": "/a"}, "storage": {"results_url": "s3://b/p"}})
    with pytest.raises(ValidationError, match="jobs.redis_url"):
        ReelserveConfig.model_validate({"storage": {"artifacts_url": "redis"}})


def test_plan_prints_where_things_are_stored():
    config = ReelserveConfig.model_validate({"storage": yaml.safe_load(ISSUE_YAML)["storage"]})
    printed = format_plan(make_plan(config))
    assert "storage: results: s3://videos/reelserve at http://127.0.0.1:9100, kept 604800 s, downloads signed-URL redirects" in printed
    assert "storage: stage outputs and checkpoints: s3://videos/artifacts" in printed
