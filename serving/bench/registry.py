"""Benchmark sections: each one measures something and returns a result that renders as JSON and markdown.

A section is a function registered under a name. ``serving.bench.served`` (served vs bare) is
here; ``serving.bench.engine`` (the diffusion engine) and ``serving.bench.gpu`` (GPU figures) plug
in the same way: a module in ``SECTION_MODULES`` that calls ``register_section`` when imported.

```python
@register_section("engine", title="Diffusion engine: step batching")
def engine_section(context: BenchContext) -> SectionResult: ...
```
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "BenchContext", "SectionResult", "Section", "register_section", "sections", "SECTION_MODULES", "markdown_table",
]

# Modules that define sections, in report order; those not present are skipped.
SECTION_MODULES = ("serving.bench.served", "serving.bench.engine", "serving.bench.engine_h3", "serving.bench.gpu")


@dataclass
class BenchContext:
    """What every section gets: the profile, the checkpoint, where to write, the machine."""

    profile: Any  # serving.bench.profiles.BenchProfile
    model_path: str  # checkpoint directory (built for a CPU profile, or --model)
    out_dir: Path
    machine: dict
    log: Callable[[str], None] = print


@dataclass
class SectionResult:
    """One section's outcome: figures as data, a markdown body for BENCHMARKS.md, notes below it."""

    name: str
    title: str
    data: dict
    markdown: str
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Section:
    name: str
    title: str
    run: Callable[[BenchContext], SectionResult]
    needs_gpu: bool = False


_SECTIONS: dict[str, Section] = {}


def register_section(name: str, title: str, needs_gpu: bool = False):
    """Decorator: register ``run(context) -> SectionResult`` as the section ``name``."""

    def decorate(run: Callable[[BenchContext], SectionResult]):
        _SECTIONS[name] = Section(name=name, title=title, run=run, needs_gpu=needs_gpu)
        return run

    return decorate


def sections() -> dict[str, Section]:
    """Every registered section, importing the section modules that exist."""
    for module in SECTION_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
    return dict(_SECTIONS)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """``rows`` as a markdown table; ``columns`` are (key, header) pairs."""
    header = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    lines = [header, rule]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
