"""The event wait the orchestrator's writer and poller sleep on."""

import asyncio

import pytest

from serving.jobs.events import wait_for_event


def test_a_cancel_arriving_as_the_event_is_set_stops_the_waiter():
    # The orchestrator notes a write (sets the event) and stops the writer in the same breath;
    # asyncio.wait_for on Python 3.11 would return True there and the writer would run on forever.
    async def scenario():
        event = asyncio.Event()
        rounds = 0

        async def writer():
            nonlocal rounds
            while True:
                await wait_for_event(event, 10.0)
                event.clear()
                rounds += 1

        task = asyncio.ensure_future(writer())
        await asyncio.sleep(0)  # the writer is waiting
        event.set()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 2.0)
        return rounds

    assert asyncio.run(scenario()) == 0


def test_the_wait_reports_set_and_timed_out():
    async def scenario():
        event = asyncio.Event()
        timed_out = await wait_for_event(event, 0.05)
        asyncio.get_running_loop().call_later(0.01, event.set)
        woken = await wait_for_event(event, 5.0)
        return timed_out, woken, await wait_for_event(event, 0.0)

    assert asyncio.run(scenario()) == (False, True, True)
