"""The diffusion engine on the tiny LTX-2 checkpoint.

Step batching must not change a request's output, whoever it shares passes
with; a checkpoint must resume on a new engine to the uninterrupted output; an
error in one batch must touch only that batch; the engine keeps serving.
"""

from __future__ import annotations

import pickle
from dataclasses import fields

import numpy as np
import pytest
import torch

from serving.engine.core import CheckpointReady, RequestFailed, RequestFinished, StepFinished
from serving.families import get_family
from serving.families.ltx2.diffusion import DenoiseCheckpoint, DenoiseRequest, LTX2Engine
from serving.families.ltx2.recipes import Guidance
from serving.families.ltx2.speed import SpeedSettingError
from serving.protocol import HostTensor, RenderPlan

WIDTH, HEIGHT, FPS = 96, 64, 24
TOLERANCE = 1e-4


def _plan(seed: int, steps: int, width: int = WIDTH, height: int = HEIGHT) -> RenderPlan:
    return RenderPlan.build(
        width=width, height=height, fps=FPS, seconds=0.5, seed=seed, num_inference_steps=steps, frame_step=8
    )


@pytest.fixture(scope="module")
def text_encoder(tiny_config):
    return get_family("ltx2").stage("text_encoder").component(tiny_config)


@pytest.fixture(scope="module")
def embeddings(text_encoder, tiny_config):
    return {
        "cat": text_encoder.encode("a tabby cat looks around", tiny_config.negative_prompt),
        "dog": text_encoder.encode("a dog barks twice", tiny_config.negative_prompt),
    }


@pytest.fixture(scope="module")
def condition(tiny_config, sample_photo):
    return get_family("ltx2").stage("image_conditioner").component(tiny_config).condition(sample_photo.crop((0, 0, 450, 300)), WIDTH, HEIGHT)


@pytest.fixture(scope="module")
def engine(tiny_config):
    return LTX2Engine(tiny_config)


def _drain(engine, events=None) -> dict:
    """Step until idle; the outputs (or errors) by request id."""
    results = {}
    while engine.has_work:
        for event in engine.step():
            if events is not None:
                events.append(event)
            if isinstance(event, RequestFinished):
                results[event.request_id] = event.output
            elif isinstance(event, RequestFailed):
                results[event.request_id] = event.error
    return results


def _alone(engine, request):
    engine.add(request)
    return _drain(engine)[request.request_id]


def _assert_same(a, b, tolerance=TOLERANCE):
    assert float((a.video.latents.to() - b.video.latents.to()).abs().max()) <= tolerance
    assert float((a.audio.latents.to() - b.audio.latents.to()).abs().max()) <= tolerance


# --------------------------------------------------------------------------- step batching


def test_a_request_batched_with_others_equals_it_alone(engine, embeddings, condition):
    other_guidance = Guidance(guidance_scale=2.0, audio_guidance_scale=1.0, modality_scale=2.0, audio_modality_scale=2.0)
    target = DenoiseRequest("target", embeddings["cat"], None, _plan(7, 5))
    early = DenoiseRequest("early", embeddings["dog"], None, _plan(8, 2))  # joins with it, leaves after step 2
    late = DenoiseRequest("late", embeddings["dog"], None, _plan(9, 6), guidance=other_guidance)  # joins at step 3
    photo = DenoiseRequest("photo", embeddings["cat"], condition, _plan(10, 3))  # same shape, other bucket
    alone = {r.request_id: _alone(engine, r) for r in (target, late, photo)}

    forwards_before, stats_before = engine.model.forwards, engine.stats.request_steps
    engine.add(target)
    engine.add(early)
    engine.add(photo)
    results, steps = {}, 0
    while engine.has_work:
        if steps == 2:
            engine.add(late)
        for event in engine.step():
            if isinstance(event, RequestFinished):
                results[event.request_id] = event.output
        steps += 1

    assert set(results) == {"target", "early", "late", "photo"}
    for request_id in ("target", "late", "photo"):
        _assert_same(results[request_id], alone[request_id])
    # Really batched: fewer transformer passes than request-steps (2 buckets: text-only and photo).
    request_steps = engine.stats.request_steps - stats_before
    assert request_steps == 5 + 2 + 6 + 3
    assert engine.model.forwards - forwards_before == steps + 3  # one pass a step, plus the photo bucket's 3
    assert engine.stats.largest_batch >= 2


def test_guidance_passes_are_one_batch_and_the_token_budget_splits_them(tiny_config, engine, embeddings):
    request = DenoiseRequest("rows", embeddings["cat"], None, _plan(7, 2))
    job_rows = engine.model._rows(Guidance.from_config(tiny_config))
    assert job_rows == ("conditional", "unconditional", "spatio_temporal", "isolated")
    before = engine.model.forwards
    whole = _alone(engine, request)
    assert engine.model.forwards - before == 2  # all four guidance passes in one transformer call a step

    one_row = tiny_config.model_copy(
        update={"diffusion": tiny_config.diffusion.model_copy(update={"max_batch_tokens": 1})}
    )
    split_engine = LTX2Engine(one_row)
    split = _alone(split_engine, request)
    assert split_engine.model.forwards == 2 * 4  # a pass per row: the budget holds one row
    _assert_same(split, whole)


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    ("recipe", "interrupt_after"),
    [("dev", 2), ("two_stage", 2), ("two_stage", 4)],  # two_stage 4: inside the refine phase
)
def test_a_checkpoint_resumes_on_a_new_engine(recipe, interrupt_after, tiny_config, embeddings, condition):
    config = tiny_config.model_copy(
        update={"diffusion": tiny_config.diffusion.model_copy(update={"recipe": recipe})}
    )
    width, height = (128, 128) if recipe == "two_stage" else (WIDTH, HEIGHT)
    first = LTX2Engine(config)
    request = DenoiseRequest("job-1", embeddings["cat"], None, _plan(7, 3, width, height))
    uninterrupted = _alone(first, request)

    first.add(request)
    for _ in range(interrupt_after):
        first.step()
    checkpoint = first.checkpoint("job-1")
    first.abort("job-1")
    first.step()
    assert not first.has_work

    # Plain data: host arrays, numbers, strings; it survives pickling (the store's format).
    for field in fields(DenoiseCheckpoint):
        value = getattr(checkpoint, field.name)
        assert isinstance(value, (HostTensor, int, str, Guidance)), field.name
    restored = pickle.loads(pickle.dumps(checkpoint))
    assert restored.finished_steps == interrupt_after

    second = LTX2Engine(config)
    second.add(request, resume_from=restored)
    events = []
    resumed = _drain(second, events)["job-1"]
    steps = [e.finished_steps for e in events if isinstance(e, StepFinished)]
    assert steps == list(range(interrupt_after + 1, checkpoint.total_steps + 1))  # no step redone
    _assert_same(resumed, uninterrupted)


def test_checkpoints_come_every_n_steps_and_are_cheap(tiny_config, embeddings):
    config = tiny_config.model_copy(
        update={"diffusion": tiny_config.diffusion.model_copy(update={"checkpoint_every_steps": 2})}
    )
    engine = LTX2Engine(config)
    events = []
    engine.add(DenoiseRequest("job", embeddings["cat"], None, _plan(7, 5)))
    _drain(engine, events)
    taken = [e for e in events if isinstance(e, CheckpointReady)]
    assert [e.finished_steps for e in taken] == [2, 4]  # not after the last step: the output follows
    assert all(e.checkpoint.finished_steps == e.finished_steps for e in taken)
    # The latents are copies: the request moved on, the checkpoint did not.
    assert not np.array_equal(taken[0].checkpoint.video_latents.array, taken[1].checkpoint.video_latents.array)


def test_a_checkpoint_of_another_plan_is_refused(engine, embeddings):
    engine.add(DenoiseRequest("job", embeddings["cat"], None, _plan(7, 4)))
    engine.step()
    checkpoint = engine.checkpoint("job")
    engine.abort("job")
    engine.step()
    with pytest.raises(ValueError, match="seed is 7, the request's is 8"):
        engine.add(DenoiseRequest("job", embeddings["cat"], None, _plan(8, 4)), resume_from=checkpoint)
    with pytest.raises(ValueError, match="total_steps is 4, the request's is 5"):
        engine.add(DenoiseRequest("job", embeddings["cat"], None, _plan(7, 5)), resume_from=checkpoint)


# --------------------------------------------------------------------------- failures, aborts, bad input


class _FailingPasses:
    """A forward hook on the transformer that raises ``error`` for passes ``when(rows)`` selects."""

    def __init__(self, engine, error, when):
        self.engine, self.error, self.when, self.raised = engine, error, when, 0

    def __enter__(self):
        def hook(module, args, kwargs):
            if self.when(kwargs["hidden_states"]):
                self.raised += 1
                raise self.error

        self._handle = self.engine.model.transformer.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def test_out_of_memory_in_a_batch_retries_its_requests_one_by_one(engine, embeddings):
    requests = [DenoiseRequest(f"job-{i}", embeddings["cat"], None, _plan(20 + i, 3)) for i in range(2)]
    alone = {r.request_id: _alone(engine, r) for r in requests}
    retries = engine.stats.oom_retries
    rows_of_one = 4
    out_of_memory = torch.OutOfMemoryError("CUDA out of memory (injected)")
    # A passing shortage (the first batched pass only): under steady load the budget climbs back afterwards.
    with _FailingPasses(engine, out_of_memory, lambda hidden: hidden.shape[0] > rows_of_one and not failing.raised) as failing:
        for request in requests:
            engine.add(request)
        events = []
        engine.step()
        assert engine.token_budget < engine.max_batch_tokens  # halved below the failed batch
        results = _drain(engine, events)
    assert failing.raised == 1
    assert engine.stats.oom_retries == retries + 1
    assert not any(isinstance(e, RequestFailed) for e in events)
    for request in requests:
        _assert_same(results[request.request_id], alone[request.request_id])
    assert engine.token_budget == engine.max_batch_tokens  # idle again: the shrink is forgotten


def test_an_error_fails_only_its_batch_and_the_engine_keeps_serving(engine, embeddings, condition):
    text_only = DenoiseRequest("text", embeddings["cat"], None, _plan(7, 3))
    photos = [DenoiseRequest(f"photo-{i}", embeddings["cat"], condition, _plan(40 + i, 3)) for i in range(2)]
    expected = _alone(engine, text_only)
    photo_tokens = engine.model.latents.geometry(WIDTH, HEIGHT, _plan(1, 1).generated_frames, FPS).video_tokens
    broken = RuntimeError("kernel failure (injected)")

    # Photo requests form their own bucket; make every pass that carries them fail.
    def carries_photo_rows(hidden_states):
        return hidden_states.shape[0] == 4 * len(photos)

    with _FailingPasses(engine, broken, carries_photo_rows):
        for request in [*photos, text_only]:
            engine.add(request)
        results = _drain(engine)
    assert photo_tokens > 0
    assert all(results[p.request_id] is broken for p in photos)
    _assert_same(results["text"], expected)
    assert engine.active_requests == []
    # And the next request runs correctly.
    _assert_same(_alone(engine, DenoiseRequest("after", embeddings["cat"], None, _plan(7, 3))), expected)


def test_abort_stops_one_request_between_steps(engine, embeddings):
    keep = DenoiseRequest("keep", embeddings["cat"], None, _plan(7, 4))
    expected = _alone(engine, keep)
    engine.add(keep)
    engine.add(DenoiseRequest("stop", embeddings["dog"], None, _plan(8, 4)))
    engine.step()
    assert engine.abort("stop") is True
    assert engine.abort("nobody") is False
    events = []
    results = _drain(engine, events)
    assert [e for e in events if e.request_id == "stop"] == []
    _assert_same(results["keep"], expected)


def test_bad_requests_are_refused_when_added(engine, embeddings, condition, tiny_config):
    with pytest.raises(ValueError, match="image condition is 96x64 but the plan is 128x64"):
        engine.add(DenoiseRequest("x", embeddings["cat"], condition, _plan(7, 2, width=128)))
    no_negative = embeddings["cat"].__class__(prompt=embeddings["cat"].prompt, negative=None)
    with pytest.raises(ValueError, match="no negative prompt"):
        engine.add(DenoiseRequest("x", no_negative, None, _plan(7, 2)))
    with pytest.raises(ValueError, match=r"guidance.stg_blocks: blocks \[5\] do not exist"):
        engine.add(DenoiseRequest("x", embeddings["cat"], None, _plan(7, 2), guidance=Guidance(stg_scale=1.0, stg_blocks=(5,))))
    engine.add(DenoiseRequest("dup", embeddings["cat"], None, _plan(7, 2)))
    with pytest.raises(ValueError, match="already queued or running"):
        engine.add(DenoiseRequest("dup", embeddings["cat"], None, _plan(7, 2)))
    _drain(engine)


def test_the_engine_applies_model_speed_at_start(tiny_config):
    """``model.speed`` reaches the served engine: refused before loading when the device cannot honour it,
    and its shape buckets warmed up at start so no request pays for them."""
    def with_speed(**speed):
        return tiny_config.model_copy(update={"speed": tiny_config.speed.model_copy(update=speed)})

    with pytest.raises(SpeedSettingError, match="model.speed.fp8"):
        LTX2Engine(with_speed(fp8=True))
    stepped = tiny_config.model_copy(update={
        "speed": tiny_config.speed.model_copy(update={"compile": True}),
        "diffusion": tiny_config.diffusion.model_copy(update={"step_cache": "taylorseer"}),
    })
    with pytest.raises(SpeedSettingError, match="model.speed.compile: not with a step cache"):
        LTX2Engine(stepped)

    warmed = LTX2Engine(with_speed(attention_backend="native", shape_buckets=[f"{WIDTH}x{HEIGHT}x9"]))
    applied = warmed.model.speed
    assert (applied.attention.unmasked, applied.attention.masked) == ("native", "native")
    assert [key.split("/")[0] for key in applied.warmup_seconds] == [f"{WIDTH}x{HEIGHT}x9"] * len(applied.warmup_seconds)
    assert all(seconds > 0 for seconds in applied.warmup_seconds.values())
