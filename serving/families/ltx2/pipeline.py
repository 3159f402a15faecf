"""LTX-2's pipeline: one job, top to bottom, over the runner's job context.

Every ``ctx.call`` is durable (kept output, skipped when an earlier attempt
finished it, failure named after its stage, cancelled with the job), so this
reads like the model's own pipeline: encode the prompt and the photo side by
side, denoise video and audio together, decode each on its own, mux.
"""

from __future__ import annotations

from serving.families.ltx2.config import LTX2ModelConfig
from serving.families.ltx2.recipes import recipe_phases
from serving.protocol import JobContext, JobSpec, StoredVideo

__all__ = ["generate", "FIRST_FRAME"]

FIRST_FRAME = "first_frame"  # the role of the one photo LTX-2 animates


async def generate(ctx: JobContext, job: JobSpec, config: LTX2ModelConfig) -> StoredVideo:
    """Photo (optional) + prompt -> MP4 with synchronized audio."""
    plan = job.plan
    prompt = await ctx.rewritten_prompt()

    photo = job.inputs_with(FIRST_FRAME)
    first_phase = recipe_phases(config.diffusion, plan.num_inference_steps)[0]  # two_stage starts at half size
    width, height = plan.width // first_phase.size_divisor, plan.height // first_phase.size_divisor
    embeddings, condition = await ctx.gather(
        ctx.call("text_encoder", "encode", prompt, job.negative_prompt),
        ctx.call("image_conditioner", "condition", ctx.job_input(photo[0].name), width, height) if photo else None,
    )

    video_latents, audio_latents = await ctx.call("diffusion", "denoise", embeddings, condition, plan)

    encoded_video, waveform = await ctx.gather(
        ctx.call("video_decoder", "decode", video_latents, plan),
        ctx.call("audio_decoder", "decode", audio_latents),
        label="decoders",
    )
    return await ctx.call("muxer", "mux", encoded_video, waveform)
