"""How far along a job is, as the API's 0-100 ``progress``, from the family's stages.

Each stage declares its share of a job's run time (``StageSpec.progress_share``);
a stage's mark is where its share starts, and the diffusion stage fills its
share step by step. The optional prompt rewriter comes first with a small
share of its own. Every mark is higher than the one before; 100 means done.
"""

from __future__ import annotations

from typing import Sequence

from serving.families.base import StageSpec

__all__ = ["ProgressMarks", "REWRITER_SHARE"]

REWRITER_SHARE = 1.0
_FIRST_MARK, _LAST_MARK = 1, 99  # 0 is a queued job's, 100 only ever a finished one's


class ProgressMarks:
    def __init__(self, stages: Sequence[StageSpec], rewriter_stage: str = "prompt_rewriter"):
        shares = [(rewriter_stage, REWRITER_SHARE)] + [(stage.name, stage.progress_share) for stage in stages]
        total = sum(share for _, share in shares)
        self._start: dict[str, int] = {}
        self._end: dict[str, int] = {}
        done = 0.0
        for name, share in shares:
            self._start[name] = _FIRST_MARK + int((_LAST_MARK - _FIRST_MARK) * done / total)
            done += share
            self._end[name] = _FIRST_MARK + int((_LAST_MARK - _FIRST_MARK) * done / total)

    def start(self, stage: str) -> int:
        """The mark a job reaches when ``stage`` starts."""
        return self._start[stage]

    def within(self, stage: str, finished_steps: int, total_steps: int) -> int:
        """The mark after ``finished_steps`` of ``total_steps`` of ``stage`` (diffusion's steps)."""
        start, end = self._start[stage], self._end[stage]
        return start + ((end - start) * finished_steps) // max(total_steps, 1)
