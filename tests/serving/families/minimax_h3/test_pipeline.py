"""The stage split equals diffusers' own ``MiniMaxH3Blocks``: the family's pipeline, run through
``InProcessContext`` (its stages and engine), gives the same video and audio as the blocks for the same seed and
inputs, in every workflow."""

from __future__ import annotations

import asyncio

import av
import numpy as np
import pytest
import torch
from diffusers import ModularPipeline
from diffusers.modular_pipelines.minimax_h3 import (
    MiniMaxH3AudioReference,
    MiniMaxH3ImageReference,
    MiniMaxH3VideoReference,
)
from diffusers.utils import load_image

from serving.generate import InProcessContext
from serving.protocol import InputSpec, JobSpec
from tests.serving.families.minimax_h3.conftest import PROMPT, SEED, as_files

TOLERANCE = 1e-4

# (stored input name, kind, role, Media field), per workflow.
WORKFLOW_INPUTS = {
    "t2va": [],
    "fl2va": [("first_frame", "image", "first_frame", "keyframe_png"),
              ("last_frame", "image", "last_frame", "last_keyframe_jpeg")],
    "fl2va_last_only": [("last_frame", "image", "last_frame", "last_keyframe_jpeg")],
    "ref2va": [("ref-0", "image", "reference_image", "reference_png"),
               ("ref-1", "video", "reference_video", "video_mp4"),
               ("ref-2", "audio", "reference_audio", "audio_wav")],
}


class RecordingVideoDecoder:
    """The video decoder stage, keeping the frames it decoded (before they become H.264) for the comparison."""

    def __init__(self, inner):
        self.inner, self.frames = inner, None

    def decode(self, latents, plan):
        self.frames = self.inner.decode_unit_frames(latents)
        return self.inner.decode(latents, plan)


class RecordingAudioDecoder:
    def __init__(self, inner):
        self.inner, self.waveform = inner, None

    def decode(self, latents):
        self.waveform = self.inner.decode(latents)
        return self.waveform


@pytest.fixture(scope="module")
def diffusers_pipelines(h3_checkpoint):
    """diffusers' own MiniMax-H3 pipeline per workflow, loaded from the same tiny checkpoint."""
    pipelines = {}
    for workflow in ("t2va", "fl2va", "ref2va"):
        pipeline = ModularPipeline.from_pretrained(str(h3_checkpoint), workflow=workflow)
        pipeline.load_components(dtype=torch.float32)
        pipeline.set_progress_bar_config(disable=True)
        pipelines[workflow] = pipeline
    return pipelines


def run_ours(family, stages, config, plan, inputs, media, tmp_path):
    """The family's pipeline over an in-process job context; the frames, the waveform and the stored MP4."""
    specs = tuple(InputSpec(name, kind, role) for name, kind, role, _ in inputs)
    video, audio = RecordingVideoDecoder(stages["video_decoder"]), RecordingAudioDecoder(stages["audio_decoder"])
    components = {**stages, "video_decoder": video, "audio_decoder": audio}
    job = JobSpec(job_id="equality", prompt=PROMPT, negative_prompt="", plan=plan, inputs=specs)
    files = {name: getattr(media, field) for name, _, _, field in inputs}
    context = InProcessContext(family, components, job, files, tmp_path / "out.mp4")
    stored = asyncio.run(family.pipeline(context, job, config))
    assert stored.num_bytes == (tmp_path / "out.mp4").stat().st_size
    return video.frames, audio.waveform, tmp_path / "out.mp4"


def run_diffusers(pipelines, workflow, plan, inputs, media, tmp_path):
    files = as_files(tmp_path, **{field: getattr(media, field) for *_, field in inputs})
    kwargs = {}
    if workflow.startswith("fl2va"):
        for name, _, _, field in inputs:
            kwargs["image" if name == "first_frame" else "last_image"] = load_image(getattr(files, field))
    elif workflow == "ref2va":
        kwargs["references"] = [
            MiniMaxH3ImageReference.from_file(files.reference_png),
            MiniMaxH3VideoReference.from_file(files.video_mp4),
            MiniMaxH3AudioReference.from_file(files.audio_wav),
        ]
    out = pipelines[workflow.removesuffix("_last_only")](
        prompt=PROMPT, height=plan.height, width=plan.width, num_frames=plan.generated_frames,
        num_inference_steps=plan.num_inference_steps, generator=torch.Generator().manual_seed(SEED),
        output_type="pt", output=["videos", "audio"], **kwargs,
    )
    return out["videos"][0].permute(0, 2, 3, 1), out["audio"][0].numpy()


@pytest.mark.parametrize("workflow", list(WORKFLOW_INPUTS))
def test_stages_equal_diffusers_blocks(workflow, h3_family, h3_stages, h3_config, h3_plan, media, diffusers_pipelines,
                                       tmp_path):
    inputs = WORKFLOW_INPUTS[workflow]
    frames, waveform, mp4_path = run_ours(h3_family, h3_stages, h3_config, h3_plan, inputs, media, tmp_path)
    expected_frames, expected_audio = run_diffusers(diffusers_pipelines, workflow, h3_plan, inputs, media, tmp_path)

    assert frames.shape == expected_frames.shape == (h3_plan.generated_frames, h3_plan.height, h3_plan.width, 3)
    assert waveform.samples.shape == expected_audio.shape and waveform.sample_rate == 32000
    video_error = float((frames - expected_frames).abs().max())
    audio_error = float(np.abs(waveform.samples - expected_audio).max())
    print(f"{workflow}: max abs difference video {video_error:.3g}, audio {audio_error:.3g}")
    assert video_error <= TOLERANCE and audio_error <= TOLERANCE
    assert float(expected_frames.std()) > 0  # not a trivially equal blank video

    with av.open(str(mp4_path)) as container:  # the muxer's MP4: the H.264 track and the AAC soundtrack
        assert container.streams.video[0].frames == h3_plan.output_frames
        assert container.streams.audio[0].codec_context.name == "aac"


def test_text_only_skips_the_reference_encoder(h3_family, h3_stages, h3_config, h3_plan, tmp_path):
    calls = []

    class Spy:
        def __init__(self, name, inner):
            self.name, self.inner = name, inner

        def __getattr__(self, method):
            calls.append(self.name)
            return getattr(self.inner, method)

    stages = {name: Spy(name, stage) if name != "diffusion" else stage for name, stage in h3_stages.items()}
    job = JobSpec(job_id="t2va", prompt=PROMPT, negative_prompt="", plan=h3_plan)
    asyncio.run(h3_family.pipeline(InProcessContext(h3_family, stages, job, {}, tmp_path / "o.mp4"), job, h3_config))
    assert calls == ["text_encoder", "video_decoder", "audio_decoder"]
