"""Where job inputs (photos, references) and results (MP4s) live: a directory, shared by every node in a cluster."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import platformdirs

__all__ = ["ResultStore", "default_results_dir"]

_INPUT_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")  # names the ingress gives inputs: never a path


def default_results_dir() -> str:
    return str(Path(platformdirs.user_data_dir("reelserve")) / "results")


class ResultStore:
    def __init__(self, directory: str | None = None):
        self.root = Path(directory or default_results_dir())
        (self.root / "inputs").mkdir(parents=True, exist_ok=True)

    def video_path(self, job_id: str) -> Path:
        return self.root / f"{job_id}.mp4"

    def _input_path(self, job_id: str, name: str) -> Path:
        if not _INPUT_NAME.fullmatch(name):
            raise ValueError(f"'{name}' is not an input name")
        return self.root / "inputs" / job_id / name

    def save_input(self, job_id: str, name: str, data: bytes) -> None:
        path = self._input_path(job_id, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(data)
        os.replace(partial, path)

    def load_input(self, job_id: str, name: str) -> bytes:
        return self._input_path(job_id, name).read_bytes()

    def remove(self, job_id: str) -> None:
        self.video_path(job_id).unlink(missing_ok=True)
        shutil.rmtree(self.root / "inputs" / job_id, ignore_errors=True)
