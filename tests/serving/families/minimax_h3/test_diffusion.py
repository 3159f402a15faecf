"""H3's step model in the engine: checkpoints resume exactly, batching only where the packed layout allows it and
then equal to the single runs, and a replica refuses a workflow whose transformer partition it did not load."""

from __future__ import annotations

import dataclasses
import typing

import numpy as np
import pytest
import torch

from serving.engine.core import DiffusionEngine, RequestFailed, RequestFinished
from serving.families.minimax_h3.config import MiniMaxH3ModelConfig
from serving.families.minimax_h3.diffusion import (
    DenoiseCheckpoint,
    DenoiseRequest,
    MiniMaxH3Diffusion,
    stored_types,
)
from serving.protocol import HostTensor, InputSpec, RenderPlan
from tests.serving.families.minimax_h3.conftest import HEIGHT, PROMPT, WIDTH

STEPS = 5  # four transformer passes: room for a checkpoint in the middle


@pytest.fixture(scope="module")
def diffusion(h3_stages) -> MiniMaxH3Diffusion:
    return h3_stages["diffusion"]


@pytest.fixture(scope="module")
def encode(h3_stages):
    """(prompt, plan, inputs {name: (kind, role, bytes)}) -> the encoders' hand-offs."""

    def run(prompt, plan, inputs=None):
        inputs = inputs or {}
        specs = tuple(InputSpec(name, kind, role) for name, (kind, role, _) in inputs.items())
        media = [data for _, _, data in inputs.values()]
        text = h3_stages["text_encoder"].encode(prompt, plan, specs, *media)
        references = h3_stages["reference_encoder"].encode(plan, specs, *media) if inputs else None
        return text, references

    return run


def plan(seed: int) -> RenderPlan:
    return RenderPlan.build(width=WIDTH, height=HEIGHT, fps=24, seconds=5.0, seed=seed, num_inference_steps=STEPS,
                            frame_step=17, frame_offset=5)


def drain(engine: DiffusionEngine, requests, resume_from=None) -> dict:
    for request in requests:
        engine.add(request, resume_from)
    finished = {}
    while engine.has_work:
        for event in engine.step():
            if isinstance(event, RequestFinished):
                finished[event.request_id] = event.output
    return finished


def equal(first, second) -> bool:
    return all(torch.equal(getattr(first, part).latents.to(), getattr(second, part).latents.to()) for part in ("video", "audio"))


def test_a_checkpoint_taken_mid_denoise_resumes_to_the_same_output(diffusion, encode, media):
    inputs = {"ref-0": ("image", "reference_image", media.reference_png), "ref-1": ("audio", "reference_audio", media.audio_wav)}
    text, references = encode(PROMPT, plan(3), inputs)
    engine = diffusion.engine
    whole = engine.run_alone(DenoiseRequest("whole", text, references, plan(3)))

    engine.add(DenoiseRequest("cut", text, references, plan(3)))
    engine.step()
    engine.step()
    checkpoint = engine.checkpoint("cut")
    engine.abort("cut")
    engine.step()
    assert checkpoint.step_index == checkpoint.finished_steps == 2 and checkpoint.total_steps == STEPS - 1 and checkpoint.workflow == "ref2va"

    resumed = drain(engine, [DenoiseRequest("resumed", text, references, plan(3))], resume_from=checkpoint)["resumed"]
    assert equal(resumed, whole)


def test_a_checkpoint_of_another_layout_is_refused(diffusion, encode):
    engine = diffusion.engine
    text, _ = encode(PROMPT, plan(4))
    engine.add(DenoiseRequest("a", text, None, plan(4)))
    engine.step()
    checkpoint = engine.checkpoint("a")
    engine.abort("a")
    engine.step()
    longer, _ = encode(PROMPT + " softly", plan(4))
    engine.add(DenoiseRequest("b", longer, None, plan(4)), checkpoint)
    (failed,) = engine.step()
    assert isinstance(failed, RequestFailed) and "another packed layout" in str(failed.error)
    with pytest.raises(ValueError, match="seed is 4, the request's is 5"):
        engine.add(DenoiseRequest("c", text, None, plan(5)), checkpoint)


def test_same_layout_requests_batch_and_equal_their_single_runs(diffusion, encode):
    engine = diffusion.engine
    first, _ = encode(PROMPT, plan(11))
    second, _ = encode(PROMPT.replace("cat", "dog"), plan(12))  # the same length: the same packed layout
    assert first.tokens == second.tokens
    alone = {
        "one": engine.run_alone(DenoiseRequest("one-alone", first, None, plan(11))),
        "two": engine.run_alone(DenoiseRequest("two-alone", second, None, plan(12))),
    }
    before = dict(engine.stats.batch_sizes)
    together = drain(engine, [DenoiseRequest("one", first, None, plan(11)), DenoiseRequest("two", second, None, plan(12))])
    assert engine.stats.batch_sizes.get(2, 0) - before.get(2, 0) == STEPS - 1  # every pass carried both
    for name in ("one", "two"):
        assert equal(together[name], alone[name])


def test_different_layouts_are_not_batched(diffusion, encode, media):
    engine = diffusion.engine
    short, _ = encode(PROMPT, plan(21))
    long, _ = encode(PROMPT + " in the sun", plan(22))  # another text length
    keyframed = encode(PROMPT, plan(23), {"first_frame": ("image", "first_frame", media.keyframe_png)})
    requests = [DenoiseRequest("short", short, None, plan(21)), DenoiseRequest("long", long, None, plan(22)),
                DenoiseRequest("keyframed", *keyframed, plan(23))]
    before = dict(engine.stats.batch_sizes)
    drain(engine, requests)
    after = engine.stats.batch_sizes
    assert after[1] - before.get(1, 0) == 3 * (STEPS - 1)  # every pass carried one request
    assert all(after[size] == before.get(size, 0) for size in after if size > 1)
    buckets = {engine.model.bucket(engine.model.start(r, None)) for r in requests}
    assert len(buckets) == 3


def test_a_replica_loads_only_its_partitions_and_refuses_other_workflows(h3_config, encode, media):
    t2va_only = MiniMaxH3Diffusion(h3_config.model_copy(update={"workflows": ["t2va", "fl2va"]}))
    assert list(t2va_only.engine.model.transformers) == ["transformer"]
    text, references = encode(PROMPT, plan(1), {"ref-0": ("image", "reference_image", media.reference_png)})
    with pytest.raises(ValueError, match=r"did not load transformer_ref/, which ref2va needs \(model.workflows\)"):
        t2va_only.engine.add(DenoiseRequest("ref", text, references, plan(1)))
    ref_only = MiniMaxH3Diffusion(h3_config.model_copy(update={"workflows": ["ref2va"]}))
    assert list(ref_only.engine.model.transformers) == ["transformer_ref"]


def test_what_diffusion_keeps_is_plain_data(diffusion, encode, media):
    """Hand-offs and checkpoints hold host arrays and plain values only: they are kept as safetensors + JSON."""
    allowed = (HostTensor, str, int, float, bool, type(None), np.ndarray, bytes)
    for cls in stored_types():
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
        for name, hint in typing.get_type_hints(cls).items():
            leaves = typing.get_args(hint) or (hint,)
            assert all(leaf is Ellipsis or leaf in allowed for leaf in leaves), (cls.__name__, name, hint)
    text, references = encode(PROMPT, plan(2), {"ref-0": ("video", "reference_video", media.video_mp4)})
    engine = diffusion.engine
    engine.add(DenoiseRequest("kept", text, references, plan(2)))
    engine.step()
    checkpoint = engine.checkpoint("kept")
    engine.abort("kept")
    engine.step()
    assert isinstance(checkpoint, DenoiseCheckpoint) and checkpoint.video_rows.dtype == "float32"
    assert references.kinds == ("video",) and references.has_audio == (True,) and len(references.audio_rows) == 1


def test_total_steps_and_cost(diffusion, encode):
    text, _ = encode(PROMPT, plan(1))
    request = DenoiseRequest("r", text, None, plan(1))
    assert diffusion.total_steps(request) == STEPS - 1
    state = diffusion.engine.model.start(request, None)
    config: MiniMaxH3ModelConfig = diffusion.config
    assert diffusion.engine.model.cost(state) == config.sequence_tokens(WIDTH, HEIGHT, 124, text.tokens)
    assert diffusion.latent_tokens(request) == config.latent_tokens(WIDTH, HEIGHT, 5.0, 24) == 37 * 1 * 2
