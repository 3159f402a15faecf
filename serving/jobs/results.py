"""Where job inputs (photos) and results (MP4s) live: a directory, shared by every node in a cluster."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ResultStore", "default_results_dir"]


def default_results_dir() -> str:
    import platformdirs

    return str(Path(platformdirs.user_data_dir("reelserve")) / "results")


class ResultStore:
    def __init__(self, directory: str | None = None):
        self.root = Path(directory or default_results_dir())
        (self.root / "inputs").mkdir(parents=True, exist_ok=True)

    def video_path(self, job_id: str) -> Path:
        return self.root / f"{job_id}.mp4"

    def save_input(self, job_id: str, data: bytes) -> None:
        path = self.root / "inputs" / job_id
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(data)
        os.replace(partial, path)

    def load_input(self, job_id: str) -> bytes:
        return (self.root / "inputs" / job_id).read_bytes()

    def remove(self, job_id: str) -> None:
        for path in (self.video_path(job_id), self.root / "inputs" / job_id):
            path.unlink(missing_ok=True)
