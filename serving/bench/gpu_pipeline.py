"""The bare diffusers ``LTX2Pipeline`` on the benchmark's random components: the baseline ours is compared with."""

from __future__ import annotations

from typing import Callable

import torch

from serving.families.ltx2 import reference as ref

__all__ = ["bare_pipeline_seconds"]


def bare_pipeline_seconds(models, profile, shape, *, repeats: int, timed: Callable) -> float:
    """Seconds for one distilled job through ``LTX2Pipeline`` (denoise + decode), prompt embeddings given.

    The pipeline gets the Gemma hidden states directly (no text encoder in
    memory next to the 19B transformer); the caller adds text encoding time.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, LTX2Pipeline  # noqa: PLC0415 - torch and diffusers only when this section runs

    names = ("transformer", "connectors", "vae", "audio_vae", "vocoder")
    parts = {name: models.get(name) for name in names}
    pipeline = LTX2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**ref.scheduler_config()),
        text_encoder=None,
        tokenizer=None,
        **parts,
    )
    pipeline.set_progress_bar_config(disable=True)
    connectors = parts["connectors"].config
    width, height, frames = shape
    device, dtype = models.device, models.dtype
    embeds = torch.randn(
        1, profile.text_tokens, connectors.caption_channels * connectors.text_proj_in_factor, device=device, dtype=dtype
    )
    mask = torch.ones(1, profile.text_tokens, device=device, dtype=torch.long)
    sigmas = list(ref.DISTILLED_SIGMAS[:-1]) if profile.distilled_steps == len(ref.DISTILLED_SIGMAS) - 1 else None
    generator = torch.Generator(device=device).manual_seed(0)

    def one_job():
        return pipeline(
            prompt_embeds=embeds,
            prompt_attention_mask=mask,
            width=width,
            height=height,
            num_frames=frames,
            frame_rate=profile.fps,
            num_inference_steps=profile.distilled_steps,
            sigmas=sigmas,
            guidance_scale=1.0,
            audio_guidance_scale=1.0,
            stg_scale=0.0,
            audio_stg_scale=0.0,
            modality_scale=1.0,
            audio_modality_scale=1.0,
            generator=generator,
            output_type="pt",
            return_dict=False,
        )

    seconds = timed(one_job)
    models.drop(*names)
    return seconds
