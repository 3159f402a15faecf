"""Sequence parallelism on the CPU: 2 processes (gloo) give the single-process transformer's output."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from serving.engine.pass_inputs import broadcast_pass_inputs, describe_pass_inputs
from serving.families.ltx2.parallel import SequenceParallelTransformer
from serving.families.ltx2.reference import random_transformer_inputs
from tests.helpers import free_port

WORLD = 2
TOLERANCE = 1e-4


def _tiny_transformer(perturbed_attn: bool = False):
    from diffusers import LTX2VideoTransformer3DModel  # noqa: PLC0415 - keeps collection of `make check` fast

    from serving.families.ltx2.tiny import tiny_ltx2_components  # noqa: PLC0415 - keeps collection of `make check` fast

    tiny = tiny_ltx2_components()["transformer"]
    if not perturbed_attn:
        return tiny.eval()
    torch.manual_seed(0)  # the same weights on every rank
    config = {key: value for key, value in tiny.config.items() if not key.startswith("_")}  # "_use_default_values" would win
    config["perturbed_attn"] = True
    return LTX2VideoTransformer3DModel.from_config(config).eval()


def _cases(transformer):
    """(name, kwargs) of each pass compared: text-to-video, a batch, per-token timesteps, guidance passes."""
    base = random_transformer_inputs(
        transformer.config, 128, 64, 17, text_tokens=16, dtype=torch.float32, seed=3, timestep=640.0
    )
    batch = random_transformer_inputs(
        transformer.config, 128, 64, 17, text_tokens=16, batch=2, dtype=torch.float32, seed=4, timestep=300.0
    )
    per_token = dict(base, timestep=torch.linspace(0, 900, base["hidden_states"].shape[1]).unsqueeze(0),
                     audio_timestep=torch.tensor([900.0]))
    # as the diffusion engine calls it: coordinates given, per-row STG in a mixed batch, cross timesteps
    coords = transformer.rope.prepare_video_coords(2, batch["num_frames"], batch["height"], batch["width"], "cpu")
    engine_style = dict(
        batch, video_coords=coords, spatio_temporal_guidance_blocks=[1], perturbation_mask=torch.tensor([1.0, 0.0]),
        sigma=batch["timestep"] / 1000, use_cross_timestep=True,
    )
    return [
        ("engine-style", engine_style),
        ("text-to-video", base),
        ("batch-of-2", batch),
        ("per-token-timesteps", per_token),
        ("modality-isolated", dict(base, isolate_modalities=True)),
        ("stg", dict(base, spatio_temporal_guidance_blocks=[1])),
    ]


def _rank(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {"single": {}, "sharded": {}}
        for perturbed in (False, True):
            transformer = _tiny_transformer(perturbed)
            cases = _cases(transformer)
            with torch.no_grad():
                for name, kwargs in cases:
                    results["single"][f"{name}/perturbed={perturbed}"] = transformer(**kwargs, return_dict=False)
            sharded = SequenceParallelTransformer(transformer)
            for name, kwargs in cases:
                # inputs travel from rank 0 as the worker group sends them; other ranks start from nothing
                spec = describe_pass_inputs(kwargs)
                inputs = broadcast_pass_inputs(spec, kwargs if rank == 0 else None, torch.device("cpu"))
                results["sharded"][f"{name}/perturbed={perturbed}"] = sharded(**inputs)
        odd = dict(cases[1][1], hidden_states=cases[1][1]["hidden_states"][:, :3], num_frames=1, height=1, width=3)
        try:
            sharded(**odd)
        except ValueError as error:  # refused before any rank sends anything: nobody hangs
            results["refusal"] = str(error)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sequence-parallel")
    mp.spawn(_rank, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)]


def test_two_ranks_equal_one_process(two_rank_results):
    rank0 = two_rank_results[0]
    assert len(rank0["sharded"]) == 12
    for case, (video, audio) in rank0["sharded"].items():
        expected_video, expected_audio = rank0["single"][case]
        assert video.shape == expected_video.shape and audio.shape == expected_audio.shape, case
        assert (video - expected_video).abs().max().item() <= TOLERANCE, case
        assert (audio - expected_audio).abs().max().item() <= TOLERANCE, case
    # the STG pass of a checkpoint built with perturbed attention really differs from the plain pass
    stg, plain = rank0["sharded"]["stg/perturbed=True"][0], rank0["sharded"]["text-to-video/perturbed=True"][0]
    assert (stg - plain).abs().max().item() > 1e-3


def test_every_rank_ends_with_the_same_whole_output(two_rank_results):
    rank0, rank1 = two_rank_results
    for case, (video, audio) in rank1["sharded"].items():
        assert torch.equal(video, rank0["sharded"][case][0]), case
        assert torch.equal(audio, rank0["sharded"][case][1]), case


def test_shapes_that_do_not_split_are_refused(two_rank_results):
    for rank in two_rank_results:
        assert rank["refusal"].startswith("3 video tokens do not split over 2 ranks")
