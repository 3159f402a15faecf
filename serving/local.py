"""All stages in one process, one after another: the path of ``reelserve generate`` without a cluster."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from cluster.config import ModelConfig
from serving.families import get_family
from serving.media import load_photo, mux_mp4
from serving.requests import VideoRequest, validate_request

__all__ = ["LocalGenerator"]

StageListener = Callable[[str, float], None]  # (stage name, seconds it took)


class LocalGenerator:
    """Loads a family's stages once and runs requests through them in order."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self.family = get_family(config.family)
        self.limits = self.family.read_limits(config)
        self._count_tokens = self.family.token_counter(config)
        self._stages = None

    def validate(self, **fields) -> VideoRequest:
        return validate_request(config=self.config, limits=self.limits, count_tokens=self._count_tokens, **fields)

    def load(self) -> None:
        """Load every stage's weights (done on first ``generate`` if not called)."""
        if self._stages is None:
            family, config = self.family, self.config
            self._stages = dict(
                text_encoder=family.text_encoder(config),
                image_conditioner=family.image_conditioner(config),
                denoiser=family.denoiser(config),
                video_decoder=family.video_decoder(config),
                audio_decoder=family.audio_decoder(config),
            )

    def generate(
        self,
        request: VideoRequest,
        out_path: str | Path,
        on_step: Callable[[int, int], None] | None = None,
        on_stage: StageListener | None = None,
    ) -> Path:
        self.load()
        stages, plan = self._stages, request.plan

        def timed(name, work):
            started = time.perf_counter()
            result = work()
            if on_stage is not None:
                on_stage(name, time.perf_counter() - started)
            return result

        embeddings = timed("text_encoder", lambda: stages["text_encoder"].encode(request.prompt, request.negative_prompt))
        condition = None
        if request.image is not None:
            photo = load_photo(request.image)
            size = getattr(stages["denoiser"], "condition_size", lambda plan: (plan.width, plan.height))(plan)
            condition = timed("image_conditioner", lambda: stages["image_conditioner"].condition(photo, *size))
        latents = timed("diffusion", lambda: stages["denoiser"].denoise(embeddings, condition, plan, on_step))
        video = timed("video_decoder", lambda: stages["video_decoder"].decode(latents.video, plan))
        waveform = timed("audio_decoder", lambda: stages["audio_decoder"].decode(latents.audio))
        return timed("muxer", lambda: mux_mp4(out_path, video, waveform))
