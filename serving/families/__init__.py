"""The model families reelserve serves, each a package that declares what it has (see ``base``).

Adding a family is adding its package and one line to ``_PACKAGES``.
Families are imported by name when first asked for, so the registry itself
pulls in nothing heavy, and nothing generic imports a family directly.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from serving.families.base import TINY_MARKER, Family, ModelLimits, StageSpec

__all__ = [
    "get_family", "family_names", "config_classes", "checkpoint_family", "is_tiny_checkpoint", "Family",
    "ModelLimits", "StageSpec",
]

# family name -> its package
_PACKAGES = {
    "ltx2": "serving.families.ltx2",
    "minimax_h3": "serving.families.minimax_h3",
}


def family_names() -> tuple[str, ...]:
    return tuple(_PACKAGES)


def get_family(name: str) -> Family:
    """The family registered under ``name``; raises ``ValueError`` naming the known ones."""
    package = _PACKAGES.get(name)
    if package is None:
        raise ValueError(f"unknown model family '{name}'; known: {', '.join(_PACKAGES)}")
    return importlib.import_module(package).FAMILY


def config_classes() -> tuple[type, ...]:
    """Each family's model config class (pydantic), in registration order: the members of ``ModelConfig``."""
    return tuple(get_family(name).config_class for name in _PACKAGES)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_tiny_checkpoint(path: str | Path) -> bool:
    """True when ``path`` holds a finished tiny build (its marker is written last)."""
    return bool(_read_json(Path(path) / TINY_MARKER).get("tiny"))


def checkpoint_family(path: str | Path) -> str | None:
    """The family of a local checkpoint folder, from its tiny marker or its pipeline index; None when unknown."""
    folder = Path(path)
    family = _read_json(folder / TINY_MARKER).get("family")
    if family in _PACKAGES:
        return family
    for index in ("model_index.json", "modular_model_index.json"):
        class_name = _read_json(folder / index).get("_class_name")
        for name in _PACKAGES:
            if class_name and class_name in get_family(name).pipeline_classes:
                return name
    return None
