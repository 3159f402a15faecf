"""Model families: Ray-free model code behind one small interface (see ``base``)."""

from __future__ import annotations

from serving.families.base import Family, ModelLimits

__all__ = ["get_family", "Family", "ModelLimits"]


def get_family(name: str) -> Family:
    """The family registered under ``name``; raises ``ValueError`` naming the known ones."""
    if name == "ltx2":
        from serving.families.ltx2 import LTX2_FAMILY

        return LTX2_FAMILY
    raise ValueError(f"unknown model family '{name}'; known: ltx2")
