"""Benchmark profiles: the model, the workload (sizes, steps, seeds) and the cluster settings of one run.

``cpu-small`` is the LTX-2 architecture at widths where one denoising step takes about half a
second to a second on a 2-core CPU, so the serving overhead is measured against real work. It is
built with the tiny checkpoint's code (random weights: its output is noise). ``gpu`` runs a real
checkpoint given with ``--model``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["BenchProfile", "PROFILES", "get_profile", "machine_info", "prepare_checkpoint"]


@dataclass(frozen=True)
class BenchProfile:
    name: str
    description: str
    transformer: dict | None  # TransformerWidths fields of a built checkpoint; None: a real one from --model
    size: str
    seconds: float
    fps: int
    steps: int
    concurrencies: tuple[int, ...] = (1, 2, 4)
    jobs_per_level: dict[int, int] = field(default_factory=lambda: {1: 4, 2: 4, 4: 4})
    warmup_jobs: int = 1
    seed: int = 1234
    prompt: str = "The cat looks around, blinks and purrs softly; warm afternoon light, quiet room tone."
    # Served cluster: logical CPUs offered and the diffusion stage's share (its torch threads follow it).
    cluster_cpus: int = 4
    diffusion_cpus: float = 2.0
    device: str = "cpu"

    @property
    def widths(self):
        """The ``TransformerWidths`` of the checkpoint this profile builds (imported late: it pulls in torch)."""
        if self.transformer is None:
            return None
        from serving.families.ltx2.tiny import TransformerWidths  # noqa: PLC0415 - keeps `reelserve --help` fast (the CLI's parser imports this module)

        return TransformerWidths(**self.transformer)

    def model_overrides(self) -> dict:
        """ModelConfig fields of this profile (the same for the served and the bare run)."""
        settings = {"num_inference_steps": self.steps, "default_size": self.size, "default_seconds": self.seconds,
                    "default_fps": self.fps, "device": self.device}
        if self.transformer is not None:
            settings.update(stg_blocks=[1], max_prompt_tokens=256, max_width=1024, max_height=1024)
        return settings


PROFILES: dict[str, BenchProfile] = {
    "cpu-small": BenchProfile(
        name="cpu-small",
        description="LTX-2 architecture, 8 transformer blocks of width 512 (audio 128), random weights, CPU",
        transformer=dict(num_layers=8, video_heads=8, video_head_dim=64, audio_heads=4, audio_head_dim=32),
        size="256x192",
        seconds=1.0,
        fps=24,
        steps=6,
    ),
    "gpu": BenchProfile(
        name="gpu",
        description="a real checkpoint from --model on one GPU, 768x512, 2 s",
        transformer=None,
        size="768x512",
        seconds=2.0,
        fps=24,
        steps=30,
        jobs_per_level={1: 4, 2: 8, 4: 16},
        cluster_cpus=8,
        diffusion_cpus=1.0,
        device="cuda",
    ),
}


def get_profile(name: str) -> BenchProfile:
    if name not in PROFILES:
        raise KeyError(f"--profile: '{name}' is not a profile; profiles: {', '.join(PROFILES)}")
    return PROFILES[name]


def prepare_checkpoint(profile: BenchProfile, model: str | None, cache_dir: Path) -> str:
    """The checkpoint to benchmark: ``--model``, or the profile's built once under ``cache_dir``."""
    if model is not None:
        return model
    if profile.widths is None:
        raise ValueError(f"--model: the {profile.name} profile needs a checkpoint; give --model PATH")

    from serving.families.ltx2.tiny import _TINY_VERSION, ensure_tiny_ltx2  # noqa: PLC0415 - keeps `reelserve --help` fast (the CLI's parser imports this module)

    key = hashlib.sha1(json.dumps([_TINY_VERSION, asdict(profile.widths)]).encode()).hexdigest()[:8]
    return str(ensure_tiny_ltx2(cache_dir / f"ltx2-{profile.name}-{key}", profile.widths))


def machine_info() -> dict:
    """The machine a run measured, for BENCHMARKS.md."""
    import torch  # noqa: PLC0415 - keeps `reelserve --help` fast (the CLI's parser imports this module)

    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_name(),
        "cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # Other work on the machine skews every figure: the 1-minute load average when the run began.
        "load_average_at_start": round(os.getloadavg()[0], 1),
    }
    import diffusers  # noqa: PLC0415 - keeps `reelserve --help` fast (the CLI's parser imports this module)
    import ray  # noqa: PLC0415 - keeps `reelserve --help` fast (the CLI's parser imports this module)

    info.update(ray=ray.__version__, diffusers=diffusers.__version__)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
