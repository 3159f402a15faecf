"""The stages decode the job's inputs from bytes within bounds, into what diffusers' blocks take; a file that is
corrupt inside fails with ``InvalidReference`` naming the field the client sent."""

from __future__ import annotations

import numpy as np
import pytest
from diffusers.modular_pipelines.minimax_h3 import MiniMaxH3VideoReference
from diffusers.modular_pipelines.minimax_h3.before_encoder import (
    MiniMaxH3Ref2VASetupStep,
)

from serving.errors import InvalidReference
from serving.families.minimax_h3.decoding import decode_audio, decode_video
from serving.families.minimax_h3.references import ReferenceLimits
from serving.protocol import InputSpec
from tests.serving.families.minimax_h3.conftest import as_files, encode_mp4, encode_wav

LIMITS = ReferenceLimits()


def test_a_truncated_mp4_fails_the_job_naming_the_reference(h3_stages, h3_plan, media):
    truncated = media.video_mp4[: int(len(media.video_mp4) * 0.6)]  # its header still opens: moov comes first
    specs = (InputSpec("ref-0", "image", "reference_image"), InputSpec("ref-1", "audio", "reference_audio"),
             InputSpec("ref-2", "video", "reference_video"))
    for stage in ("reference_encoder", "text_encoder"):
        args = (h3_plan, specs, media.reference_png, media.audio_wav, truncated)
        with pytest.raises(InvalidReference, match=r"references\[2\]: the video") as caught:
            if stage == "text_encoder":
                h3_stages[stage].encode("a prompt", *args)
            else:
                h3_stages[stage].encode(*args)
        assert caught.value.name == "references[2]"


def test_broken_aac_fails_naming_the_reference(h3_stages, h3_plan, media):
    broken = bytearray(media.audio_m4a)
    middle = len(broken) // 2
    broken[middle : middle + 400] = np.random.default_rng(0).integers(0, 255, 400, dtype=np.uint8).tobytes()
    specs = (InputSpec("ref-0", "image", "reference_image"), InputSpec("ref-1", "audio", "reference_audio"))
    with pytest.raises(InvalidReference, match=r"references\[1\]: the audio does not decode") as caught:
        h3_stages["reference_encoder"].encode(h3_plan, specs, media.reference_png, bytes(broken))
    assert caught.value.name == "references[1]"


def test_a_keyframe_that_is_not_an_image_names_it(h3_stages, h3_plan, media):
    specs = (InputSpec("first_frame", "image", "first_frame"),)
    with pytest.raises(InvalidReference, match="first_frame: the image does not decode") as caught:
        h3_stages["reference_encoder"].encode(h3_plan, specs, media.keyframe_png[:200])
    assert caught.value.name == "first_frame"


def test_frames_put_on_24_fps_while_decoding_are_the_blocks_own(media, tmp_path):
    """A 30 fps clip: resampled one frame at a time here, and whole by the setup block; the same frames."""
    ours = decode_video(media.video_mp4, "references[0]", LIMITS, num_frames=124, fps=24, sample_rate=32000)
    theirs = MiniMaxH3VideoReference.from_file(as_files(tmp_path, video_mp4=media.video_mp4).video_mp4)
    assert theirs.fps == 30.0 and ours.fps == 24.0 and len(ours.frames) == 36  # 45 frames at 30 fps = 1.5 s

    def normalized(reference):
        return MiniMaxH3Ref2VASetupStep._normalize_video_condition(reference.frames, reference.fps, 124, 32, 32, 2048, 24.0)

    np.testing.assert_array_equal(normalized(ours), normalized(theirs))
    assert ours.sample_rate == theirs.sample_rate == 32000
    np.testing.assert_array_equal(ours.audio.numpy(), theirs.audio.numpy())


def test_decoding_stops_at_the_generated_length(media):
    long = encode_mp4(3.0, 24, 32, 32, audio_rate=None, seed=3)
    assert len(decode_video(long, "v", LIMITS, num_frames=22, fps=24, sample_rate=32000).frames) == 22
    clip = decode_audio(encode_wav(3.0), "a", LIMITS, seconds=124 / 24, sample_rate=32000)
    assert clip.audio.shape == (1, 96000)  # the whole 3 s: shorter than the clip's 5.17 s
    cut = decode_audio(encode_wav(8.0), "a", LIMITS, seconds=124 / 24, sample_rate=32000)
    assert cut.audio.shape == (1, int(124 / 24 * 32000))  # where the setup block cuts


def test_audio_at_another_rate_is_resampled_here(media):
    """The block's own resampling needs torchaudio; PyAV puts a 16 kHz clip on the audio VAE's 32 kHz instead."""
    clip = decode_audio(encode_wav(1.0, rate=16000, channels=2), "references[0]", LIMITS, seconds=5.0, sample_rate=32000)
    assert clip.sample_rate == 32000 and clip.audio.shape[0] == 2
    assert abs(clip.audio.shape[1] - 32000) <= 64
