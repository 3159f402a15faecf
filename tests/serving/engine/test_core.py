"""The engine core over a fake step model (no torch model): batching rules, the OOM budget, lone requests."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from serving.engine.core import DiffusionEngine, RequestFinished, StateUntouchedError

TOKENS = 100  # every fake request costs this many tokens a step


@dataclass(frozen=True)
class Request:
    request_id: str
    steps: int = 50


@dataclass
class State:
    request: Request
    done_steps: int = 0


@dataclass
class FakeModel:
    """Runs out of memory for any pass above ``fits`` tokens while ``memory_short``; records every batch."""

    fits: int = 10_000
    memory_short: bool = False
    batchable: bool = True
    batches: list[list[str]] = field(default_factory=list)

    def check(self, request, resume_from):
        pass

    def start(self, request, resume_from):
        return State(request)

    def request_id(self, state):
        return state.request.request_id

    def bucket(self, state):
        return "same"

    def cost(self, state):
        return TOKENS

    def advance(self, states, token_budget):
        chunk = min(token_budget, len(states) * TOKENS)
        if self.memory_short and chunk > self.fits and len(states) > 1:
            raise StateUntouchedError(torch.OutOfMemoryError("CUDA out of memory (fake)"))
        self.batches.append([self.request_id(s) for s in states])
        for state in states:
            state.done_steps += 1

    def progress(self, state):
        return state.done_steps, state.request.steps

    def done(self, state):
        return state.done_steps >= state.request.steps

    def finish(self, state):
        return state.request.request_id

    def checkpoint(self, state):
        return state.done_steps

    def release(self, state):
        pass


def test_the_batch_budget_climbs_back_under_steady_load_after_an_oom():
    """One OOM halves the budget; under load that never lets the engine idle, it returns step by step."""
    model = FakeModel(fits=200, memory_short=True)
    engine = DiffusionEngine(model, max_batch_tokens=400, oom_recovery_steps=4)
    for index in range(4):
        engine.add(Request(f"r{index}"))
    engine.step()  # 4 x 100 tokens > 200: out of memory, retried one by one, budget halved
    assert engine.stats.oom_retries == 1 and engine.token_budget == 200
    model.memory_short = False  # the pressure passes (another process freed its memory); the load goes on
    budgets = []
    for _ in range(3):
        engine.step()
        budgets.append(engine.token_budget)
    assert budgets == [300, 400, 400]  # + max / oom_recovery_steps per step, never above the maximum
    assert model.batches[-1] == ["r0", "r1", "r2", "r3"]  # batching is back: all four in one pass
    assert engine.has_work  # the engine never went idle: the recovery came from the load itself


def test_the_budget_never_climbs_in_a_step_that_ran_out_of_memory():
    model = FakeModel(fits=100, memory_short=True)
    engine = DiffusionEngine(model, max_batch_tokens=400, oom_recovery_steps=4)
    for index in range(2):
        engine.add(Request(f"r{index}"))
    engine.step()
    assert engine.token_budget == 100  # halved below the failed pass (2 x 100), no climb in that step
    engine.step()  # one request per batch at 100 tokens: no OOM, so it climbs
    assert engine.token_budget == 200


def test_a_lone_request_never_shares_a_batch():
    model = FakeModel()
    engine = DiffusionEngine(model, max_batch_tokens=10_000)
    engine.add(Request("a", steps=2))
    engine.add(Request("suspect", steps=2), alone=True)
    engine.add(Request("b", steps=2))
    events = engine.step()
    assert sorted(map(sorted, model.batches)) == [["a", "b"], ["suspect"]]
    events += engine.step()
    assert {e.request_id for e in events if isinstance(e, RequestFinished)} == {"a", "b", "suspect"}
    engine.add(Request("suspect", steps=1))  # the same id later, not alone: batched normally again
    engine.add(Request("c", steps=1))
    model.batches.clear()
    engine.step()
    assert model.batches == [["suspect", "c"]]
