"""The rank group's parts without a cluster: its placement options, and a group refused outside a replica.

Two gloo ranks inside a Serve replica, serving whole jobs equal to one rank's output, are tested on the
session's cluster (``tests/serving/test_served_parallel.py``); one sharded pass against the whole transformer in
``tests/serving/families/ltx2/test_parallel.py``.
"""

from __future__ import annotations

import pytest
import torch

from serving.families.ltx2.passes import LoaderPasses, TinyTransformerLoader
from serving.families.ltx2.reference import random_transformer_inputs
from serving.parallel_group import ShardedTransformerGroup, replica_placement


def test_replica_placement_options():
    assert replica_placement(4) == {
        "placement_group_bundles": [{"CPU": 1.0, "GPU": 1.0}] * 4,
        "placement_group_strategy": "STRICT_PACK",
    }
    with pytest.raises(ValueError, match="at least 1"):
        replica_placement(0)


def test_a_group_without_bundles_is_refused():
    # this test process is no replica: it has no placement group
    with pytest.raises(ValueError, match="placement group of 2 bundles"):
        ShardedTransformerGroup.start(LoaderPasses(TinyTransformerLoader()), degree=2, dtype=torch.float32)


def test_a_group_of_one_runs_the_pass_in_this_process():
    group = ShardedTransformerGroup.start(LoaderPasses(TinyTransformerLoader()), degree=1, dtype=torch.float32)
    assert group.degree == 1 and group.alive() and group.placements() == []
    inputs = random_transformer_inputs(group.transformer.config, 64, 64, 9, text_tokens=8, dtype=torch.float32, seed=1,
                                       timestep=500.0)
    with torch.no_grad():
        video, audio = group(**inputs)
        expected, _ = group.transformer(**inputs, return_dict=False)
    assert torch.equal(video, expected) and audio.shape[0] == 1
