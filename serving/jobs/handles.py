"""The runner's handles to the stages, by stage name, each stage in a Serve application of its own.

Every stage deployment lives in its own application (``<app>-<stage>``), so a
config change that does not touch a stage never restarts it (Serve rebuilds
an application when its ``args`` change, and only then). The runner reaches a
stage by name; the handle is made on first use, inside the runner's replica.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["StageHandles", "stage_app_name"]


def stage_app_name(app_name: str, stage: str) -> str:
    """The Serve application that holds the deployment of ``stage``."""
    return f"{app_name}-{stage}"


class StageHandles(Mapping):
    """``handles[stage]``: a deployment handle to the stage's deployment (picklable: only names travel)."""

    def __init__(self, app_name: str, stages: tuple[str, ...]):
        self.app_name, self.stages = app_name, tuple(stages)
        self._handles: dict[str, Any] = {}

    def __getitem__(self, stage: str):
        if stage not in self.stages:
            raise KeyError(stage)
        handle = self._handles.get(stage)
        if handle is None:
            from ray import serve  # noqa: PLC0415 - inside a replica only

            # Not checked against the controller: a stage application deployed in the same config may still be
            # building; calls wait in the handle until its replicas are up.
            handle = serve.get_deployment_handle(stage, stage_app_name(self.app_name, stage), _check_exists=False)
            self._handles[stage] = handle
        return handle

    def __iter__(self) -> Iterator[str]:
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    def __reduce__(self):
        return (StageHandles, (self.app_name, self.stages))
