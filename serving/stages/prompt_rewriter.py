"""Prompt rewriter stage: the user's prompt (+ photo) -> a dense LTX-2 prompt, on one vLLM engine.

Many requests run at once (vLLM batches them); a rewrite never fails a job.
"""

from __future__ import annotations

import time
from pathlib import Path

from cluster.config import ModelConfig, RewriterConfig
from serving import metrics
from serving.families import get_family
from serving.metrics import StageStats
from serving.prompting.rewriter import PromptRewriter, Rewrite
from serving.prompting.tiny_rewriter import REWRITER_SUBFOLDER
from serving.stages._base import LoadTimer

__all__ = ["PromptRewriterStage", "rewriter_model_path"]


def rewriter_model_path(rewriter: RewriterConfig, model: ModelConfig) -> str:
    """The configured rewriter checkpoint, or the tiny one that ships inside the tiny video checkpoint."""
    if rewriter.model_path is not None:
        return rewriter.model_path
    video_checkpoint = model.path or get_family(model.family).ensure_tiny_checkpoint()
    folder = Path(video_checkpoint) / REWRITER_SUBFOLDER
    if not folder.is_dir():
        raise ValueError(
            f"rewriter.model_path: unset, and the video checkpoint has no {REWRITER_SUBFOLDER}/ folder; "
            "name a rewriter model"
        )
    return str(folder)


class PromptRewriterStage:
    def __init__(self, rewriter: RewriterConfig, model: ModelConfig):
        with LoadTimer("prompt_rewriter", model.name) as load:
            self._rewriter = PromptRewriter(rewriter, rewriter_model_path(rewriter, model))
        self._stats = StageStats(stage="prompt_rewriter", model=model.name, load_seconds=load.seconds)
        metrics.stage_load(self._stats.stage, self._stats.model, 0, 0)

    async def rewrite(self, prompt: str, seed: int, photo: bytes | None = None) -> Rewrite:
        # vLLM batches requests itself: no replica-side queue, so queue wait is 0 and all are in flight.
        stats = self._stats
        started = time.perf_counter()
        stats.in_flight += 1
        metrics.stage_load(stats.stage, stats.model, stats.in_flight, 0)
        ok = False
        try:
            result = await self._rewriter.rewrite(prompt, seed, photo)
            ok = True  # a fallback is an answer, not a failed request: the job goes on with its prompt
        finally:
            seconds = time.perf_counter() - started
            stats.in_flight -= 1
            stats.record(seconds, ok=ok)
            metrics.stage_request(stats.stage, stats.model, 0.0, seconds, ok)
            metrics.stage_load(stats.stage, stats.model, stats.in_flight, 0)
        stats.bump("tokens_generated_total", result.tokens)
        if result.fallback is not None:
            stats.bump(f"fallbacks_{result.fallback}_total")
            metrics.rewrite_fallback(stats.model, result.fallback)
        return result

    def stats(self) -> dict:
        return self._stats.snapshot()

    def __del__(self):
        rewriter = getattr(self, "_rewriter", None)
        if rewriter is not None:
            rewriter.shutdown()
