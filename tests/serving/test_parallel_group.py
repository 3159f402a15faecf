"""A Serve replica spanning 2 ranks (CPU, gloo): placement bundles, a worker actor, one sharded pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serving.parallel_group import ShardedTransformerGroup, TinyTransformerLoader, replica_placement
from tests.helpers import free_port

pytestmark = pytest.mark.cluster  # starts a Ray cluster: not in `make check`

SHAPE = dict(width=128, height=64, frames=17, text_tokens=16)


def _inputs(config, seed: int) -> dict:
    from serving.families.ltx2.reference import random_transformer_inputs

    return random_transformer_inputs(
        config, SHAPE["width"], SHAPE["height"], SHAPE["frames"], text_tokens=SHAPE["text_tokens"],
        dtype=torch.float32, seed=seed, timestep=500.0,
    )


class ShardedDiffusion:
    """Stands in for the diffusion stage: rank 0 of a 2-rank group, calling a sharded transformer pass."""

    def __init__(self):
        torch.set_num_threads(1)
        self.group = ShardedTransformerGroup.start(TinyTransformerLoader(), degree=2, dtype=torch.float32, timeout_s=120)

    def __call__(self, seed: int) -> dict:
        video, audio = self.group(**_inputs(self.group.sharded.config, seed))
        return {"video": video.numpy(), "audio": audio.numpy(), "degree": self.group.degree}


@pytest.fixture(scope="module")
def sharded_replica():
    import ray
    from ray import serve

    # "local": always a cluster of our own, even while another one runs on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    deployment = serve.deployment(
        ShardedDiffusion, name="diffusion", ray_actor_options={"num_cpus": 1},
        **replica_placement(2, num_cpus_per_rank=1, num_gpus_per_rank=0),
    )
    handle = serve.run(deployment.bind(), name="sharded", route_prefix=None)
    yield handle
    serve.shutdown()
    ray.shutdown()


def test_replica_placement_options():
    assert replica_placement(4) == {
        "placement_group_bundles": [{"CPU": 1.0, "GPU": 1.0}] * 4,
        "placement_group_strategy": "STRICT_PACK",
    }
    with pytest.raises(ValueError, match="at least 1"):
        replica_placement(0)


def test_sharded_pass_in_a_serve_replica_equals_one_process(sharded_replica):
    transformer = TinyTransformerLoader()(torch.device("cpu"), torch.float32)
    for seed in (1, 2):  # two passes: the group is reused
        result = sharded_replica.remote(seed).result(timeout_s=120)
        with torch.no_grad():
            video, audio = transformer(**_inputs(transformer.config, seed), return_dict=False)
        assert result["degree"] == 2
        assert np.abs(result["video"] - video.numpy()).max() <= 1e-4
        assert np.abs(result["audio"] - audio.numpy()).max() <= 1e-4


def test_a_replica_without_bundles_is_refused(sharded_replica):
    # this test process is no replica: it has no placement group
    with pytest.raises(ValueError, match="placement group of 2 bundles"):
        ShardedTransformerGroup.start(TinyTransformerLoader(), degree=2, dtype=torch.float32)
