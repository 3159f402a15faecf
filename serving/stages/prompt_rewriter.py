"""Prompt rewriter stage: the user's prompt (+ photo) -> a dense LTX-2 prompt, on one vLLM engine.

Many requests run at once (vLLM batches them); a rewrite never fails a job.
"""

from __future__ import annotations

import time

from cluster.config import ModelConfig, RewriterConfig
from serving.metrics import StageStats
from serving.prompting.rewriter import PromptRewriter, Rewrite

__all__ = ["PromptRewriterStage", "rewriter_model_path"]


def rewriter_model_path(rewriter: RewriterConfig, model: ModelConfig) -> str:
    """The configured rewriter checkpoint, or the tiny one that ships inside the tiny video checkpoint."""
    if rewriter.model_path is not None:
        return rewriter.model_path
    from pathlib import Path

    from serving.families.ltx2 import checkpoint_path
    from serving.families.ltx2_tiny import REWRITER_SUBFOLDER

    folder = Path(checkpoint_path(model)) / REWRITER_SUBFOLDER
    if not folder.is_dir():
        raise ValueError(
            f"rewriter.model_path: unset, and the video checkpoint has no {REWRITER_SUBFOLDER}/ folder; "
            "name a rewriter model"
        )
    return str(folder)


class PromptRewriterStage:
    def __init__(self, rewriter: RewriterConfig, model: ModelConfig):
        self._rewriter = PromptRewriter(rewriter, rewriter_model_path(rewriter, model))
        self._stats = StageStats(stage="prompt_rewriter")

    async def rewrite(self, prompt: str, seed: int, photo: bytes | None = None) -> Rewrite:
        started = time.perf_counter()
        result = await self._rewriter.rewrite(prompt, seed, photo)
        self._stats.record(time.perf_counter() - started, ok=result.fallback is None)
        self._stats.bump("tokens_generated_total", result.tokens)
        if result.fallback is not None:
            self._stats.bump(f"fallbacks_{result.fallback}_total")
        return result

    def stats(self) -> dict:
        return self._stats.snapshot()

    def __del__(self):
        rewriter = getattr(self, "_rewriter", None)
        if rewriter is not None:
            rewriter.shutdown()
