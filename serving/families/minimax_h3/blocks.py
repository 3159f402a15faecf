"""diffusers' MiniMax-H3 blocks, cut at reelserve's stage boundaries.

``MiniMaxH3Blocks().get_workflow(w)`` is the flat list of blocks one workflow
runs (``before_encode``, ``text_encoder``, ``vae_encoder``, ``denoise.*``,
``decode.*``). A stage runs the slice of that list it owns, through diffusers'
own ``MiniMaxH3ModularPipeline``, loading only the components the slice expects:

- text_encoder: ``before_encode`` (keyframes on the canvas, or the references
  normalized) and ``text_encoder`` (Qwen3-VL);
- reference_encoder: ``before_encode`` and ``vae_encoder`` (the VAEs' encoders);
- diffusion: ``denoise.*`` up to ``set_timesteps`` (layout, noise, schedules),
  then reelserve's engine runs the loop, then ``denoise.after_denoise``;
- video_decoder / audio_decoder: ``decode.video`` / ``decode.audio``.

A stage serving several workflows builds one pipeline per workflow over one
set of loaded components.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from diffusers.modular_pipelines import SequentialPipelineBlocks
from diffusers.modular_pipelines.minimax_h3 import (
    MiniMaxH3Blocks,
    MiniMaxH3ModularPipeline,
)

# Imported for its side effect: a tiny checkpoint names the stand-in processor class, which diffusers resolves
# from sys.modules when it loads the checkpoint (real checkpoints name transformers' own class).
from serving.families.minimax_h3 import processor as _stand_in_processor  # noqa: F401

__all__ = ["STAGE_PARTS", "StagePipelines", "workflow_blocks"]

_BLOCKS = MiniMaxH3Blocks()

# Which of a workflow's blocks each part runs (a name, or a prefix ending in "." for the denoise loop's steps).
STAGE_PARTS: dict[str, tuple[str, ...]] = {
    "text_encoder": ("before_encode", "text_encoder"),
    "reference_encoder": ("before_encode", "vae_encoder"),
    "prepare": ("denoise.",),  # up to and including denoise.set_timesteps
    "after_denoise": ("denoise.after_denoise",),
    "video_decoder": ("decode.video",),
    "audio_decoder": ("decode.audio",),
}
_LOOP_AND_AFTER = ("denoise.denoise", "denoise.after_denoise")


def workflow_blocks(workflow: str, part: str) -> SequentialPipelineBlocks | None:
    """The blocks of ``workflow`` that ``part`` runs, in order; None when the workflow has none (t2va encodes no
    references)."""
    wanted = STAGE_PARTS[part]
    chosen = {}
    for name, block in _BLOCKS.get_workflow(workflow).sub_blocks.items():
        if part == "prepare":
            if name.startswith("denoise.") and name not in _LOOP_AND_AFTER:
                chosen[name] = block
        elif name in wanted:
            chosen[name] = block
    if part == "reference_encoder" and "vae_encoder" not in chosen:
        return None
    return SequentialPipelineBlocks.from_blocks_dict(chosen) if chosen else None


class StagePipelines:
    """One ``MiniMaxH3ModularPipeline`` per workflow over ``part``'s blocks, all sharing one set of components
    (each loaded once, in ``dtype``, on ``device``)."""

    def __init__(self, path: str, part: str, workflows: Iterable[str], device: torch.device, dtype: torch.dtype):
        self.part = part
        self.device = device
        self.pipelines: dict[str, MiniMaxH3ModularPipeline] = {}
        self.components: dict[str, Any] = {}  # diffusers and transformers components, by name
        for workflow in workflows:
            blocks = workflow_blocks(workflow, part)
            if blocks is None:
                continue
            pipeline = MiniMaxH3ModularPipeline(blocks=blocks, pretrained_model_name_or_path=path)
            shared = {name: self.components[name] for name in pipeline.pretrained_component_names
                      if name in self.components}
            if shared:
                pipeline.update_components(**shared)
            pipeline.load_components(dtype=dtype)
            for name in pipeline.pretrained_component_names:
                component = getattr(pipeline, name, None)
                if isinstance(component, torch.nn.Module) and name not in self.components:
                    component.to(device).eval()
                self.components.setdefault(name, component)
            pipeline.set_progress_bar_config(disable=True)
            self.pipelines[workflow] = pipeline

    def __getitem__(self, workflow: str) -> MiniMaxH3ModularPipeline:
        try:
            return self.pipelines[workflow]
        except KeyError:
            raise ValueError(
                f"this {self.part} serves the workflows {', '.join(self.pipelines) or 'none'} (model.workflows), "
                f"not {workflow}"
            ) from None

    def run(self, workflow: str, outputs: list[str], **inputs) -> dict:
        """Run ``workflow``'s blocks of this part on ``inputs`` under ``no_grad``; the named outputs."""
        with torch.no_grad():
            return self[workflow](**inputs, output=outputs)
