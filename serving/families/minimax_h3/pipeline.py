"""MiniMax-H3's pipeline: one job, top to bottom, over the runner's job context.

Every ``ctx.call`` is durable (kept output, skipped when an earlier attempt
finished it, failure named after its stage, cancelled with the job). The
workflow follows from the job's inputs; the text encoder and the reference
encoder read the same inputs side by side, the transformer denoises video and
audio together, and each is decoded on its own before the muxer joins them.
"""

from __future__ import annotations

from serving.families.minimax_h3.config import MiniMaxH3ModelConfig
from serving.families.minimax_h3.references import workflow_of
from serving.protocol import JobContext, JobSpec, StoredVideo

__all__ = ["generate"]


async def generate(ctx: JobContext, job: JobSpec, config: MiniMaxH3ModelConfig) -> StoredVideo:
    """Prompt (+ first/last frame, or up to 12 references) -> MP4 with synchronized audio."""
    plan = job.plan
    workflow = workflow_of(job.inputs)  # t2va, fl2va or ref2va
    prompt = await ctx.rewritten_prompt()

    # Both encoders read the job's own inputs, by name: the conditioner sees keyframes and references as vision
    # blocks, the VAEs encode them into the rows the transformer is conditioned on.
    media = [ctx.job_input(spec.name) for spec in job.inputs]
    text, references = await ctx.gather(
        ctx.call("text_encoder", "encode", prompt, plan, job.inputs, *media),
        ctx.call("reference_encoder", "encode", plan, job.inputs, *media) if workflow != "t2va" else None,
    )

    video_latents, audio_latents = await ctx.call("diffusion", "denoise", text, references, plan)

    encoded_video, waveform = await ctx.gather(
        ctx.call("video_decoder", "decode", video_latents, plan),
        ctx.call("audio_decoder", "decode", audio_latents),
        label="decoders",
    )
    return await ctx.call("muxer", "mux", encoded_video, waveform)
