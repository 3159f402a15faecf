"""Callbacks: a job's terminal state POSTed to its ``callback_url``, signed, at least once.

A delivery is leased in the job record (``lease_webhook``), so one runner
delivers it at a time; its outcome is recorded there (``record_webhook``).
A runner that dies mid-delivery leaves the lease to lapse and the job in the
store's pending set, where the next runner's poll finds it: the receiver may
see a message twice (the same ``webhook-id``), never not at all while the
bounds last. A receiver that is down never blocks or fails the job: delivery
runs beside everything else, after the job ended.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, Iterable

from serving.tenancy.webhooks import deliver_webhook, webhook_message_id
from serving.views import video_object

__all__ = ["WebhookSender"]

logger = logging.getLogger("ray.serve.reelserve.webhooks")

_LEASE_MARGIN_S = 30.0


class WebhookSender:
    def __init__(self, services: Any, owner: str):
        self.services, self.owner = services, owner
        self._delivering: dict[str, asyncio.Task] = {}

    def deliver_pending(self, job_ids: Iterable[str]) -> None:
        """Start delivering each job's callback unless this runner already is."""
        for job_id in job_ids:
            if job_id not in self._delivering:
                task = asyncio.get_running_loop().create_task(self._deliver(job_id))
                self._delivering[job_id] = task
                task.add_done_callback(functools.partial(self._delivered, job_id))

    def _delivered(self, job_id: str, _task: asyncio.Task) -> None:
        self._delivering.pop(job_id, None)

    async def stop(self) -> None:
        """Leave unfinished deliveries to their lease: another runner takes them over when it lapses."""
        for task in list(self._delivering.values()):
            task.cancel()
        await asyncio.gather(*self._delivering.values(), return_exceptions=True)

    async def _deliver(self, job_id: str) -> None:
        services, config = self.services, self.services.callbacks
        lease_s = config.max_elapsed_s + config.timeout_s + _LEASE_MARGIN_S
        try:
            record = await services.io(services.store.lease_webhook, job_id, self.owner, lease_s)
            if record is None:
                return  # delivered already, or someone else is delivering it
            message_id = webhook_message_id(record.id, record.status.api_name)
            if services.signer is None:
                outcome = {"message_id": message_id, "delivered": False, "attempts": 0,
                           "last_error": f"no signing secret ({config.signing_secret_env} is not set)"}
            else:
                delivered = await deliver_webhook(record.callback_url, video_object(record), signer=services.signer,
                                                  config=config, message_id=message_id)
                outcome = delivered.to_dict()
            await services.io(services.store.record_webhook, job_id, self.owner, {**outcome, "done": True})
            logger.info("job %s: callback %s after %d attempt(s)", job_id,
                        "delivered" if outcome.get("delivered") else "given up", outcome.get("attempts", 0))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - the lease lapses and a later poll tries again
            logger.warning("job %s: delivering its callback failed: %r", job_id, error)
