"""The real LTX-2 19B + Gemma 3 12B configs, checked on the meta device (no memory, no download)."""

from __future__ import annotations

import pytest
import torch

from serving.families.ltx2 import reference as ref

# 1280x704 x 121 frames at 24 fps: LTX-2's "720p" five-second clip.
WIDTH, HEIGHT, FRAMES, FPS = 1280, 704, 121, 24


@pytest.fixture(scope="module")
def meta_transformer():
    return ref.build_meta("transformer")


def test_transformer_has_19b_parameters(meta_transformer):
    size = ref.component_size("transformer", model=meta_transformer)
    assert size.parameters == pytest.approx(19e9, rel=0.03)
    assert size.bytes == pytest.approx(38e9, rel=0.03)  # bf16 weights: DESIGN.md §4b "~38 GB"
    assert meta_transformer.config.num_layers == 48
    assert meta_transformer.config.rope_type == "split"


def test_gemma3_12b_has_12b_parameters():
    model = ref.build_meta("text_encoder")
    size = ref.component_size("text_encoder", model=model)
    assert size.parameters == pytest.approx(12e9, rel=0.03)
    assert size.bytes == pytest.approx(24e9, rel=0.03)  # DESIGN.md §4b "~24 GB"
    # keras-hub's gemma3_12b_text preset counts 11,765,788,416 with a 262,144-token vocabulary;
    # the Hugging Face vocabulary has 64 more rows of 3840.
    language = sum(p.numel() for p in model.model.language_model.parameters())
    assert language == 11_765_788_416 + 64 * 3840
    assert model.config.text_config.num_hidden_layers == 48
    assert model.config.text_config.hidden_size == 3840


def test_connectors_hand_the_transformer_two_3840_wide_sequences():
    connectors = ref.build_meta("connectors")
    stacked = torch.empty(ref.prompt_embedding_shape(1024), device="meta", dtype=torch.bfloat16)
    assert tuple(stacked.shape) == (1, 1024, 188160)  # 49 Gemma layers x 3840
    assert stacked.numel() * 2 == pytest.approx(385e6, rel=0.01)  # DESIGN.md §4b: 385 MB per prompt in bf16
    mask = torch.ones(1, 1024, device="meta", dtype=torch.long)
    video, audio, _ = connectors(stacked, mask)
    assert tuple(video.shape) == (1, 1024, 3840) == ref.connector_output_shape(1024)
    assert tuple(audio.shape) == (1, 1024, 3840)
    assert video.numel() * 2 * 2 == pytest.approx(16e6, rel=0.02)  # "about 2 x [1, 1024, 3840] bf16 = 16 MB"


def test_video_vae_makes_128_channel_latents_32x_smaller_and_8x_shorter():
    vae = ref.build_meta("vae")
    frames = torch.empty(1, 3, FRAMES, HEIGHT, WIDTH, device="meta", dtype=torch.bfloat16)
    latents = vae.encode(frames).latent_dist.mode()
    assert tuple(latents.shape) == (1, 128, 16, 22, 40) == ref.video_latent_shape(WIDTH, HEIGHT, FRAMES)
    assert latents.numel() * 4 == pytest.approx(7.2e6, rel=0.01)  # fp32 latents: 7.2 MB
    decoded = vae.decode(latents.to(torch.bfloat16)).sample
    assert tuple(decoded.shape) == (1, 3, FRAMES, HEIGHT, WIDTH)
    assert decoded.numel() == 327_106_560  # uint8 frames: 327 MB


def test_transformer_pass_at_real_size_keeps_latent_shapes(meta_transformer):
    video_tokens = ref.video_token_count(WIDTH, HEIGHT, FRAMES)
    audio_frames = ref.audio_latent_frames(FRAMES, FPS)
    assert (video_tokens, audio_frames) == (14080, 126)
    meta = dict(device="meta", dtype=torch.bfloat16)
    video, audio = meta_transformer(
        hidden_states=torch.empty(1, video_tokens, 128, **meta),
        audio_hidden_states=torch.empty(1, audio_frames, 128, **meta),
        encoder_hidden_states=torch.empty(1, 1024, 3840, **meta),
        audio_encoder_hidden_states=torch.empty(1, 1024, 3840, **meta),
        timestep=torch.empty(1, device="meta"),
        encoder_attention_mask=torch.ones(1, 1024, device="meta"),
        audio_encoder_attention_mask=torch.ones(1, 1024, device="meta"),
        num_frames=16,
        height=22,
        width=40,
        audio_num_frames=audio_frames,
        return_dict=False,
    )
    assert tuple(video.shape) == (1, 14080, 128)
    assert tuple(audio.shape) == (1, 126, 128)


def test_audio_path_gives_24khz_stereo_for_the_clip_length():
    audio_vae, vocoder = ref.build_meta("audio_vae"), ref.build_meta("vocoder")
    latents = torch.empty(ref.audio_latent_shape(FRAMES, FPS), device="meta", dtype=torch.bfloat16)
    assert tuple(latents.shape) == (1, 8, 126, 16)
    mel = audio_vae.decode(latents).sample
    assert mel.shape[1] == 2 and mel.shape[-1] == 64
    waveform = vocoder(mel)
    assert waveform.shape[1] == 2
    seconds = waveform.shape[-1] / vocoder.config.output_sampling_rate
    assert seconds == pytest.approx(FRAMES / FPS, abs=0.05)  # the audio is about as long as the video


def test_all_component_sizes_and_bad_names():
    sizes = ref.component_sizes()
    assert set(sizes) == set(ref.COMPONENT_NAMES)
    assert sizes["connectors"].parameters == pytest.approx(1.43e9, rel=0.01)
    assert sizes["vae"].parameters == pytest.approx(1.22e9, rel=0.01)
    with pytest.raises(ValueError, match="unknown LTX-2 component 'unet'"):
        ref.component_config("unet")
    # configs are copies: changing one never changes the facts
    ref.component_config("transformer")["num_layers"] = 2
    assert ref.component_config("transformer")["num_layers"] == 48


def test_random_weights_on_a_device_in_a_dtype_are_seeded_and_finite():
    first = ref.build_component("vocoder", device="cpu", dtype=torch.bfloat16, seed=3, overrides={"hidden_channels": 64})
    second = ref.build_component("vocoder", device="cpu", dtype=torch.bfloat16, seed=3, overrides={"hidden_channels": 64})
    weights = dict(first.named_parameters())
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in weights.values())
    assert all(torch.isfinite(p).all() for p in weights.values())
    assert all(torch.equal(p, weights[n]) for n, p in second.named_parameters())
    narrow = dict(num_layers=1, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                  audio_num_attention_heads=2, audio_attention_head_dim=4, audio_cross_attention_dim=8, caption_channels=16)
    small = ref.build_component("transformer", device="cpu", dtype=torch.float32, overrides=narrow)
    assert small.config.num_layers == 1 and small.proj_in.weight.dtype == torch.float32
    assert small.config.rope_type == "split"  # overrides change only what they name


def test_two_stage_upsampler_doubles_half_resolution_latents():
    upsampler = ref.build_meta("latent_upsampler")
    half = torch.empty(ref.video_latent_shape(WIDTH // 2, HEIGHT // 2, FRAMES), device="meta", dtype=torch.bfloat16)
    assert tuple(half.shape) == (1, 128, 16, 11, 20)
    assert tuple(upsampler(half).shape) == ref.video_latent_shape(WIDTH, HEIGHT, FRAMES)


def test_block_memory_bound_at_real_size():
    bound = ref.block_activation_bytes_bound(ref.component_config("transformer"), 14080, 126, 1024)
    # 16 video-width bf16 tensors (14080 x 4096) are 1.85 GB; float32 rotary tables add 0.35 GB
    assert 2.0e9 < bound < 3.0e9
