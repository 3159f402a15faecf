"""What the runner needs of tenancy and capacity, as one small picklable object bound into its deployment."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cluster.auth_config import AuthConfig, CallbacksConfig, TenantConfig, load_tenants
from serving.tenancy.webhooks import WebhookSigner

__all__ = ["RunnerTenancy"]

logger = logging.getLogger("ray.serve.reelserve.runner")


@dataclass(frozen=True)
class RunnerTenancy:
    """What the runner needs of tenancy and capacity: shares and caps for fair share, diffusion's slots per
    replica, how callbacks are delivered."""

    auth: AuthConfig | None
    callbacks: CallbacksConfig
    diffusion_slots: int

    def tenants(self) -> dict[str, TenantConfig]:
        return {tenant.name: tenant for tenant in load_tenants(self.auth)} if self.auth else {}

    def signer(self) -> WebhookSigner | None:
        if not self.callbacks.allowed_url_prefixes:
            return None  # callbacks are refused at admission: nothing to sign
        try:
            return WebhookSigner.from_env(self.callbacks)
        except ValueError as error:
            logger.error("callbacks cannot be signed: %s; they will be recorded as undelivered", error)
            return None
