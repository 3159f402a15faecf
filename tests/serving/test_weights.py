"""Cold start: the node-local copy of a checkpoint, weights onto the device, per-component load times, the
memory cap of a shared GPU, the warm-up."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from cluster.startup_config import CUDA_CONTEXT_GB, StageRuntime, StartupConfig
from serving.families import get_family
from serving.families.ltx2.config import LTX2ModelConfig
from serving.jobs.faults import FaultInjector
from serving.metrics import RecordingExporter, set_exporter
from serving.stages import startup
from serving.weights import checkpoint_bytes, device_map, local_copy


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()
            and not p.name.startswith(".")}


def test_the_node_local_copy_holds_the_small_files_and_only_the_named_parts(tiny_checkpoint, tmp_path):
    copied = Path(local_copy(str(tiny_checkpoint), str(tmp_path / "cache"), ["transformer"]))
    source, target = _tree(tiny_checkpoint), _tree(copied)
    weights = {name for name in source if name.endswith(".safetensors")}
    assert {name for name in target if name.endswith(".safetensors")} == {n for n in weights if n.startswith("transformer/")}
    assert {name for name in source if name not in weights} <= set(target)  # every config, tokenizer, index
    assert all(target[name] == source[name] for name in target)
    again = local_copy(str(tiny_checkpoint), str(tmp_path / "cache"), ["transformer", "vae"])
    assert again == str(copied) and any(n.startswith("vae/") and n.endswith(".safetensors") for n in _tree(copied))
    assert checkpoint_bytes(copied, ["transformer"]) == checkpoint_bytes(tiny_checkpoint, ["transformer"]) > 0
    assert local_copy("Lightricks/LTX-2", str(tmp_path / "cache"), ["transformer"]) == "Lightricks/LTX-2"  # a hub id


def test_replicas_starting_together_on_a_node_copy_once(tiny_checkpoint, tmp_path):
    results = []
    threads = [threading.Thread(target=lambda: results.append(local_copy(str(tiny_checkpoint), str(tmp_path), ["vae"])))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1
    marks = list(Path(results[0]).glob(".complete-*"))
    assert sorted(m.name for m in marks) == [".complete-_small_files", ".complete-vae"]
    assert not list(Path(results[0]).rglob("*.tmp"))


def test_a_stage_loads_from_the_node_local_copy_and_reports_each_component(tiny_checkpoint, tmp_path):
    model = LTX2ModelConfig.tiny(path=str(tiny_checkpoint), default_size="64x64", default_seconds=1, device="cpu")
    spec = get_family("ltx2").stage("audio_decoder")
    runtime = StageRuntime(startup=StartupConfig(weights_cache_dir=str(tmp_path / "nvme")))
    local = startup.local_weights(model, spec, runtime)
    assert local.path.startswith(str(tmp_path / "nvme"))
    component = spec.component(local)
    assert set(component.loaded.seconds) == {"audio_vae", "vocoder"}
    assert next(component.vocoder.parameters()).device == torch.device("cpu")
    assert startup.local_weights(model, spec, StageRuntime()) is model  # no cache configured: model.path itself


def test_device_map_puts_every_module_on_the_device():
    assert device_map("cpu") == {"": "cpu"}
    assert device_map(torch.device("cuda", 1)) == {"": "cuda:1"}


def test_a_shared_gpu_is_capped_at_its_share_less_the_cuda_context(monkeypatch):
    applied = {}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"total_memory": 80e9})())
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: applied.update(fraction=f, device=d))
    fraction = startup.cap_memory("cuda:0", 0.25)
    assert fraction == pytest.approx(0.25 - CUDA_CONTEXT_GB / 80)
    assert applied["fraction"] == fraction
    assert startup.cap_memory("cuda:0", None) is None and startup.cap_memory("cuda:0", 1.0) is None
    assert startup.cap_memory("cpu", 0.25) is None  # nothing to cap on the CPU


def test_the_warm_up_is_timed_and_can_be_turned_off(monkeypatch):
    recorded = RecordingExporter()
    previous = set_exporter(recorded)
    try:
        ran = []
        faults = FaultInjector("video_decoder", [], None)
        seconds = startup.warm_up("video_decoder", "m", lambda: ran.append(1), StageRuntime(), faults)
        assert ran == [1] and seconds >= 0
        assert [m.metric for m in recorded.measurements] == ["reelserve_model_warmup_seconds"]
        off = StageRuntime(startup=StartupConfig(warmup=False))
        assert startup.warm_up("video_decoder", "m", lambda: ran.append(2), off, faults) is None and ran == [1]
    finally:
        set_exporter(previous)
