"""The runner deployment (Serve name ``orchestrator``): replicas that pull jobs from the store and run each
one's family pipeline over the stages.

Thin: the durable logic is ``serving.jobs.runner.JobRunner``; the family comes
from the registry by name and the stage handles arrive by stage name, so this
knows no model. On shutdown a replica hands its jobs back (leases released,
artifacts and checkpoints kept), so a redeploy or a scale-down costs a
successor's claim, not the work.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from cluster.auth_config import CallbacksConfig
from cluster.config import JobsConfig, ModelConfig, OrchestratorConfig, RewriterConfig, StorageConfig
from serving.errors import StageDead
from serving.families import get_family
from serving.jobs.backends import open_store
from serving.jobs.context import RunnerServices
from serving.jobs.events import JobEvents
from serving.jobs.job_storage import JobStorage
from serving.jobs.progress import ProgressMarks
from serving.jobs.runner import JobRunner
from serving.jobs.runner_tenancy import RunnerTenancy
from serving.metrics import StageStats

__all__ = ["JobRunnerDeployment"]

logger = logging.getLogger("ray.serve.reelserve.runner")


class JobRunnerDeployment:
    def __init__(
        self, settings: OrchestratorConfig, model: ModelConfig, jobs: JobsConfig, rewriter: RewriterConfig,
        stage_handles: dict[str, Any], tenancy: RunnerTenancy | None = None, storage: StorageConfig | None = None,
    ):
        # Only the config sections it uses: scaling a stage changes none of them, so it never restarts this.
        family = get_family(model.family)
        limits = family.read_limits(model)
        count_tokens = family.token_counter(model)
        store = open_store(jobs.backend, sqlite_path=jobs.sqlite_path, redis_url=jobs.redis_url)
        self._io_pool = JobRunner.io_pool()

        async def io(method, *args, **kwargs):
            return await asyncio.get_running_loop().run_in_executor(self._io_pool, lambda: method(*args, **kwargs))

        services = RunnerServices(
            store=store,
            events=JobEvents(store),
            storage=JobStorage(storage or StorageConfig().with_job_defaults(jobs.results_dir, jobs.artifacts),
                               jobs.redis_url),
            io=io,
            family=family,
            handles=dict(stage_handles),
            marks=ProgressMarks(family.stages),
            jobs=jobs,
            rewriter=rewriter,
            prompt_fits=lambda text: count_tokens(text) <= limits.max_prompt_tokens,
            model_name=model.name,
            stats=StageStats(stage="orchestrator", model=model.name),
            tenants=tenancy.tenants() if tenancy else {},
            diffusion_slots=tenancy.diffusion_slots if tenancy else 1,
            callbacks=tenancy.callbacks if tenancy else CallbacksConfig(),
            signer=tenancy.signer() if tenancy else None,
        )
        self.runner = JobRunner(
            services, model, jobs, settings,
            frame_rule=(limits.frames_step, limits.frame_offset), owner=_replica_name(),
        )
        self._started = False

    def _ensure_started(self) -> None:
        # The job loop needs the replica's event loop, which __init__ may not run on.
        if not self._started:
            self.runner.start()
            self._started = True

    async def check_health(self) -> None:
        """Healthy while its job loop runs: a store outage is not this replica's fault."""
        self._ensure_started()
        if not self.runner.healthy:
            raise StageDead("the orchestrator's job loop has stopped")

    async def wake(self) -> None:
        """A job was accepted: look for it now instead of at the next poll."""
        self._ensure_started()
        self.runner.wake()

    def stats(self) -> dict:
        return self.runner.stats.snapshot()

    async def __del__(self):
        await self.runner.stop()
        self._io_pool.shutdown(wait=False, cancel_futures=True)


def _replica_name() -> str | None:
    """The job owner's name: this replica's id, so an operator can tell which replica holds a job."""
    try:
        from ray import serve  # noqa: PLC0415 - Ray only inside a replica

        return f"orchestrator-{serve.get_replica_context().replica_id.unique_id}"
    except Exception:  # noqa: BLE001 - outside a Serve replica: a random name
        return None
