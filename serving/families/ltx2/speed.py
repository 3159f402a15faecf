"""Kernel speed switches for a loaded LTX-2 transformer (``model.speed`` in the config).

Applied once, at replica start, in this order: dtype, FP8 weights, attention
backends, regional compilation (optionally replayed as CUDA graphs), then a
warm-up over the configured shape buckets so no request pays for compiling.
Every switch is off by default or safe on the CPU; one the device cannot
honour is refused with a ``SpeedSettingError`` naming its config field,
before any weight is touched.

Attention backends are chosen per attention layer: the text cross-attention
layers get a mask from the connectors, and the fastest kernels (flash-attn,
SageAttention) take none, so those layers run on the fastest mask-capable
backend while the mask-free ones (self-attention, audio<->video) run on the
fastest of all.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import platformdirs
import torch

from cluster.sizes import parse_shape_bucket
from serving.families.ltx2.config import SpeedConfig
from serving.families.ltx2.reference import random_transformer_inputs

__all__ = [
    "SpeedSettingError",
    "AppliedSpeed",
    "AttentionChoice",
    "check_speed_settings",
    "apply_speed",
    "choose_attention_backends",
    "warm_up",
    "compile_cache_dir",
]

# Fastest first. Hub kernels are left out: they download at start-up.
_AUTO_ORDER = ("_flash_3", "flash", "sage", "_native_cudnn", "_native_flash", "_native_efficient", "native")
_TAKES_MASKS = ("_native_cudnn", "_native_efficient", "native", "_native_math", "xformers", "flex")
_MASKED_LAYERS = ("attn2", "audio_attn2")  # text cross-attention: the only layers handed a mask
_PROBE_TOLERANCE = {"sage": 0.08}  # int8 QK / fp8 PV kernels trade accuracy for speed
_DEFAULT_PROBE_TOLERANCE = 0.03


class SpeedSettingError(ValueError):
    """A ``model.speed`` setting this device or installation cannot honour."""


@dataclass
class AttentionChoice:
    """The backends in use and why the others were passed over."""

    unmasked: str
    masked: str
    probe_seconds: dict[str, float] = field(default_factory=dict)
    passed_over: dict[str, str] = field(default_factory=dict)


@dataclass
class AppliedSpeed:
    """What ``apply_speed`` did, for logs and benchmark reports."""

    device: str
    dtype: str
    attention: AttentionChoice
    fp8: bool = False
    compiled: bool = False
    cuda_graphs: bool = False
    cache_dir: str | None = None
    loaded_cache_artifacts: bool = False
    warmup_seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def check_speed_settings(speed: SpeedConfig, device: torch.device) -> None:
    """Refuse what ``device`` cannot do, naming the field; cheap, so run it before loading weights."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    backend = speed.attention_backend
    if backend != "auto":
        known = _known_backends()
        if backend not in known:
            raise SpeedSettingError(
                f"model.speed.attention_backend: unknown backend '{backend}'; use auto or one of {sorted(known)}"
            )
        if not cuda and backend not in ("native", "_native_math", "flex"):
            raise SpeedSettingError(
                f"model.speed.attention_backend: '{backend}' needs a CUDA device, this one is {device.type}; "
                "use auto or native"
            )
    if speed.fp8:
        if not cuda:
            raise SpeedSettingError(
                f"model.speed.fp8: FP8 matmuls need a CUDA GPU of compute capability 8.9 or newer; this device is {device.type}"
            )
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            raise SpeedSettingError(
                f"model.speed.fp8: this GPU has compute capability {capability[0]}.{capability[1]}; FP8 needs 8.9 or newer"
            )
        _import_torchao()
    if speed.cuda_graphs and not cuda:
        raise SpeedSettingError(f"model.speed.cuda_graphs: CUDA graphs need a CUDA device; this one is {device.type}")


def apply_speed(
    transformer: torch.nn.Module,
    speed: SpeedConfig,
    device: str | torch.device,
    dtype: torch.dtype,
    *,
    probe_attention: bool = True,
) -> AppliedSpeed:
    """Move ``transformer`` to ``device``/``dtype`` and apply every switch ``speed`` turns on."""
    device = torch.device(device)
    check_speed_settings(speed, device)
    transformer.to(device=device, dtype=dtype)
    applied = AppliedSpeed(device=str(device), dtype=str(dtype).removeprefix("torch."), attention=AttentionChoice("", ""))
    if speed.fp8:
        _quantize_fp8(transformer)
        applied.fp8 = True
    applied.attention = choose_attention_backends(
        speed.attention_backend, device, dtype, _probe_width(transformer), probe=probe_attention
    )
    _set_attention_backends(transformer, applied.attention)
    if speed.compile:
        applied.cache_dir = str(compile_cache_dir(speed))
        applied.loaded_cache_artifacts = _load_cache_artifacts(speed, device)
        _compile_blocks(transformer, speed)
        applied.compiled, applied.cuda_graphs = True, speed.cuda_graphs
    return applied


# --------------------------------------------------------------------------- attention


def _known_backends() -> set[str]:
    from diffusers.models.attention_dispatch import AttentionBackendName  # noqa: PLC0415 - diffusers only when attention backends are chosen

    return {member.value for member in AttentionBackendName}


def choose_attention_backends(
    setting: str,
    device: torch.device,
    dtype: torch.dtype,
    heads_and_dim: tuple[int, int],
    *,
    probe: bool = True,
    probe_tokens: int = 4096,
) -> AttentionChoice:
    """Resolve ``model.speed.attention_backend`` into a backend for mask-free and for masked layers.

    ``auto`` on a GPU: every installed backend computes a probe attention
    (``heads_and_dim`` of the model, ``probe_tokens`` long) that must match
    PyTorch's math kernel, and the fastest that does wins. On the CPU: native.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return AttentionChoice(unmasked="native" if setting == "auto" else setting, masked="native")
    candidates = _AUTO_ORDER if setting == "auto" else (setting,)
    choice = AttentionChoice("", "")
    usable: list[str] = []
    masked: list[str] = []
    for name in candidates:
        reason = _unusable_reason(name)
        if reason is None and probe:
            reason, seconds = _probe(name, device, dtype, heads_and_dim, probe_tokens)
            if seconds is not None:
                choice.probe_seconds[name] = seconds
        if reason is not None:
            choice.passed_over[name] = reason
            continue
        usable.append(name)
        if name in _TAKES_MASKS:
            # text cross-attention hands a [batch, heads, 1, text tokens] bias: it must work with that too
            masked_reason = _probe(name, device, dtype, heads_and_dim, probe_tokens, masked=True)[0] if probe else None
            if masked_reason is None:
                masked.append(name)
            else:
                choice.passed_over[f"{name} (masked)"] = masked_reason
    if not usable:
        field_hint = "model.speed.attention_backend"
        raise SpeedSettingError(f"{field_hint}: no usable attention backend among {list(candidates)}: {choice.passed_over}")
    if probe:
        usable.sort(key=lambda name: choice.probe_seconds.get(name, float("inf")))
        masked.sort(key=lambda name: choice.probe_seconds.get(name, float("inf")))
    choice.unmasked = usable[0]
    choice.masked = masked[0] if masked else "native"  # PyTorch's SDPA takes any mask
    return choice


def _unusable_reason(name: str) -> str | None:
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements  # noqa: PLC0415 - diffusers only when attention backends are chosen

    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except (RuntimeError, ValueError, ImportError) as error:
        return str(error).splitlines()[0]
    return None


def _probe(
    name: str, device, dtype, heads_and_dim, tokens: int, masked: bool = False
) -> tuple[str | None, float | None]:
    """Run the backend on one attention of the model's width; check it against math, then time it.

    ``masked``: text cross-attention's layout instead (1024 keys, half of them masked out by a bias).
    """
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn  # noqa: PLC0415 - diffusers only when attention backends are chosen

    heads, head_dim = heads_and_dim
    keys = 1024 if masked else tokens
    generator = torch.Generator(device=device).manual_seed(0)
    query = torch.randn(1, tokens, heads, head_dim, device=device, dtype=dtype, generator=generator)
    key, value = (torch.randn(1, keys, heads, head_dim, device=device, dtype=dtype, generator=generator) for _ in range(2))
    mask = None
    if masked:
        mask = torch.zeros(1, heads, 1, keys, device=device, dtype=dtype)
        mask[..., keys // 2 :] = -10000.0
    backend = AttentionBackendName(name)
    try:
        out = dispatch_attention_fn(query, key, value, attn_mask=mask, backend=backend)
        _synchronize(device)
    except Exception as error:  # noqa: BLE001 - any kernel failure means "not this one"
        return f"failed on a probe: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}", None
    math_query, math_key, math_value = (t.transpose(1, 2).float() for t in (query, key, value))
    reference = torch.nn.functional.scaled_dot_product_attention(
        math_query, math_key, math_value, attn_mask=None if mask is None else mask.float()
    ).transpose(1, 2)
    deviation = (out.float() - reference).abs().max().item() / reference.abs().max().item()
    tolerance = _PROBE_TOLERANCE.get(name, _DEFAULT_PROBE_TOLERANCE)
    if not deviation <= tolerance:
        return f"probe differs from math attention by {deviation:.3g} (allowed {tolerance})", None
    return None, _time(lambda: dispatch_attention_fn(query, key, value, attn_mask=mask, backend=backend), device)


def _time(run, device, repeats: int = 5) -> float:
    run()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    _synchronize(device)
    return (time.perf_counter() - start) / repeats


def _synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _probe_width(transformer) -> tuple[int, int]:
    config = transformer.config
    return int(config.num_attention_heads), int(config.attention_head_dim)


def _set_attention_backends(transformer: torch.nn.Module, choice: AttentionChoice) -> None:
    """Each attention processor gets its own backend: masked text cross-attention may need another kernel."""
    from diffusers.models.attention_dispatch import AttentionBackendName  # noqa: PLC0415 - diffusers only when attention backends are chosen

    for name, module in transformer.named_modules():
        processor = getattr(module, "processor", None)
        if processor is None or not hasattr(processor, "_attention_backend"):
            continue
        masked = name.rsplit(".", 1)[-1] in _MASKED_LAYERS
        # Enum members, not strings: torch.compile traces them without a lookup in the graph.
        processor._attention_backend = AttentionBackendName(choice.masked if masked else choice.unmasked)


# --------------------------------------------------------------------------- FP8


def _import_torchao():
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_  # noqa: PLC0415 - torchao is optional (the gpu extra)
    except ImportError as error:
        raise SpeedSettingError(
            "model.speed.fp8 needs torchao: install the GPU extra (pip install 'reelserve[gpu]')"
        ) from error
    return quantize_, Float8DynamicActivationFloat8WeightConfig, PerRow


def _quantize_fp8(transformer: torch.nn.Module) -> None:
    """FP8 e4m3 weights with per-row scales and dynamically quantised activations, in the blocks' linears.

    The blocks hold over 99% of the FLOPs; the patch, caption and timestep
    projections stay bf16 (small, and sensitive).
    """
    quantize_, Float8Config, PerRow = _import_torchao()

    def eligible(module: torch.nn.Module, _name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0

    quantize_(transformer.transformer_blocks, Float8Config(granularity=PerRow()), filter_fn=eligible)


# --------------------------------------------------------------------------- compilation


def compile_cache_dir(speed: SpeedConfig) -> Path:
    if speed.compile_cache_dir:
        return Path(speed.compile_cache_dir)

    return Path(platformdirs.user_cache_dir("reelserve")) / "compile"


def _compile_blocks(transformer: Any, speed: SpeedConfig) -> None:  # a diffusers transformer
    """Compile the repeated block once; every block instance reuses it (its weights are graph inputs)."""
    directory = compile_cache_dir(speed)
    directory.mkdir(parents=True, exist_ok=True)
    # Inductor and Triton read these when they first compile, so kernels land (and are found again) here.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory / "inductor")
    os.environ.setdefault("TRITON_CACHE_DIR", str(directory / "triton"))
    shapes = max(1, len(speed.shape_buckets)) * len(speed.warmup_batch_sizes)
    limit_name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit_name, max(getattr(torch._dynamo.config, limit_name), 4 * shapes + 8))
    mode = "reduce-overhead" if speed.cuda_graphs else (None if speed.compile_mode == "default" else speed.compile_mode)
    transformer.compile_repeated_blocks(fullgraph=True, dynamic=False, mode=mode)


def _artifacts_path(speed: SpeedConfig, device: torch.device) -> Path:
    """Portable compile artifacts, keyed by what makes kernels differ: torch, device, mode."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    key = f"{torch.__version__}|{name}|{speed.compile_mode}|{speed.cuda_graphs}|{speed.fp8}"
    return compile_cache_dir(speed) / f"artifacts-{hashlib.sha256(key.encode()).hexdigest()[:16]}.bin"


def _load_cache_artifacts(speed: SpeedConfig, device: torch.device) -> bool:
    path = _artifacts_path(speed, device)
    if not path.is_file():
        return False
    return torch.compiler.load_cache_artifacts(path.read_bytes()) is not None


def _save_cache_artifacts(speed: SpeedConfig, device: torch.device) -> None:
    saved = torch.compiler.save_cache_artifacts()
    if saved is not None:
        path = _artifacts_path(speed, device)
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_suffix(f".{os.getpid()}.tmp")
        scratch.write_bytes(saved[0])
        os.replace(scratch, path)


@torch.no_grad()
def warm_up(
    transformer: torch.nn.Module,
    speed: SpeedConfig,
    applied: AppliedSpeed,
    *,
    fps: float = 24.0,
    stg_blocks: list[int] | None = None,
    run_pass=None,
) -> dict[str, float]:
    """Run each shape bucket x batch size once (twice with CUDA graphs: record, then replay) at replica start.

    With ``stg_blocks`` (the model's spatio-temporal guidance blocks) the
    guidance passes are warmed up too: the STG pass and the modality-isolated
    pass take other branches through the blocks, so each is its own compiled
    graph. Returns seconds per ``WxHxF/bB/pass`` key and records them on
    ``applied``. Compiled kernels are then saved for the next start.
    ``run_pass``: what runs a pass (a replica's rank group, so every rank warms
    up); unset, the transformer itself.
    """
    device = torch.device(applied.device)
    dtype = getattr(torch, applied.dtype)
    passes: dict[str, dict[str, Any]] = {"plain": {}}
    if stg_blocks:
        passes |= {"stg": {"spatio_temporal_guidance_blocks": list(stg_blocks)}, "isolated": {"isolate_modalities": True}}
    for bucket in speed.shape_buckets:
        width, height, frames = parse_shape_bucket(bucket)
        for batch in speed.warmup_batch_sizes:
            inputs = random_transformer_inputs(
                transformer.config, width, height, frames, fps=fps, text_tokens=speed.text_tokens,
                batch=batch, device=device, dtype=dtype,
            )
            for name, extra in passes.items():
                start = time.perf_counter()
                for _ in range(2 if speed.cuda_graphs else 1):
                    (run_pass or transformer)(**inputs, **extra)
                _synchronize(device)
                applied.warmup_seconds[f"{bucket}/b{batch}/{name}"] = time.perf_counter() - start
    if speed.compile and speed.shape_buckets:
        _save_cache_artifacts(speed, device)
    return dict(applied.warmup_seconds)
