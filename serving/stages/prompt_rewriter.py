"""Prompt rewriter stage: the user's prompt (+ photo) -> a dense LTX-2 prompt, on one vLLM engine.

Many requests run at once (vLLM batches them); a rewrite never fails a job.
"""

from __future__ import annotations

from pathlib import Path

from cluster.config import ModelConfig, RewriterConfig
from serving import metrics
from serving.families import get_family
from serving.prompting.rewriter import PromptRewriter, Rewrite
from serving.prompting.tiny_rewriter import REWRITER_SUBFOLDER
from serving.stages._base import LoadTimer
from serving.stages.ledger import StageLedger

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
        self._ledger = StageLedger("prompt_rewriter", model.name)
        self._stats = self._ledger.stats
        self._stats.load_seconds = load.seconds

    async def rewrite(self, prompt: str, seed: int, photo: bytes | None = None) -> Rewrite:
        # vLLM batches requests itself: no replica-side queue, so every request is in flight at once.
        stats = self._stats
        entry = self._ledger.arrived()
        self._ledger.started(entry)
        ok = False
        try:
            result = await self._rewriter.rewrite(prompt, seed, photo)
            ok = True  # a fallback is an answer, not a failed request: the job goes on with its prompt
        finally:
            self._ledger.left(entry, ok)
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
