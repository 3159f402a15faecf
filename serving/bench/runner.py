"""``reelserve bench``: run the benchmark sections of one profile, write JSON and markdown, update BENCHMARKS.md.

Each section's block in BENCHMARKS.md sits between two markers naming the section and the
profile, so a new run replaces that block and leaves the others (other sections, other
profiles, other machines' figures) alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

from serving.bench.gpu_profiles import PROFILES as GPU_PROFILES
from serving.bench.profiles import PROFILES, get_profile, machine_info, prepare_checkpoint
from serving.bench.registry import BenchContext, SectionResult, sections

__all__ = ["add_arguments", "run_bench", "update_benchmarks_file", "BENCHMARKS_PATH", "BenchError"]

BENCHMARKS_PATH = Path(__file__).resolve().parents[2] / "BENCHMARKS.md"
_HEADER = "# Benchmarks\n\nFigures written by `reelserve bench`; each block names its machine, date and command.\n"


class BenchError(ValueError):
    """Bad flags; the message starts with the flag."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--profile",
        help=f"workload and model widths: {', '.join(PROFILES)} (default: gpu with a GPU, else cpu-small); or "
        f"{', '.join(GPU_PROFILES)}: the real LTX-2 dims with random weights (serving.bench.gpu; --section picks "
        f"its sections)",
    )
    parser.add_argument("--model", help="checkpoint directory to benchmark (default: the profile's own, built offline)")
    parser.add_argument("--out", default="bench-out", help="folder for bench.json and bench.md (default: bench-out)")
    parser.add_argument("--section", action="append", help="run only this section (repeatable; default: all)")
    parser.add_argument(
        "--benchmarks", default=str(BENCHMARKS_PATH),
        help="markdown file whose sections this run replaces or appends (default: the repository's BENCHMARKS.md)",
    )
    parser.add_argument("--no-benchmarks", action="store_true", help="do not touch the markdown file")


def run_bench(args: argparse.Namespace, command: str, before_work=lambda: None) -> dict:
    from cluster.local import ray_environment  # noqa: PLC0415 - keeps `reelserve --help` fast (the CLI's parser imports this module)

    os.environ.update(ray_environment())  # explicit token auth for our cluster, before anything imports Ray
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "180")  # a busy machine registers the node slowly
    # Cheap checks first: no torch import for a typo.
    if args.profile in GPU_PROFILES:
        before_work()
        return _run_real_dims(args, command)
    if args.profile is not None and args.profile not in PROFILES:
        raise BenchError(
            f"--profile: '{args.profile}' is not a profile; profiles: {', '.join([*PROFILES, *GPU_PROFILES])}"
        )
    if args.model is not None and not Path(args.model, "model_index.json").is_file():
        raise BenchError(f"--model: '{args.model}' is not a checkpoint folder (no model_index.json in it)")
    available = sections()
    chosen = args.section or list(available)
    unknown = [s for s in chosen if s not in available]
    if unknown:
        raise BenchError(f"--section: {unknown[0]} is not a section; sections: {', '.join(available)}")
    before_work()
    import torch  # noqa: PLC0415 - keeps `reelserve --help` fast (the CLI's parser imports this module)

    profile = get_profile(args.profile or ("gpu" if torch.cuda.is_available() else "cpu-small"))
    if profile.device == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--profile: {profile.name} needs a CUDA GPU; none here (use cpu-small)")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731 - progress on stderr
    machine = machine_info()
    log(f"profile {profile.name}: {profile.description}")
    model_path = prepare_checkpoint(profile, args.model, _cache_dir())
    context = BenchContext(profile=profile, model_path=model_path, out_dir=out_dir, machine=machine, log=log)
    results: list[SectionResult] = []
    for section_name in chosen:
        section = available[section_name]
        if section.needs_gpu and not torch.cuda.is_available():
            log(f"section {section_name}: skipped (needs a GPU)")
            continue
        log(f"section {section_name}: {section.title}")
        results.append(section.run(context))
    wall_s = round(time.perf_counter() - started, 1)
    machine["load_average_at_end"] = round(os.getloadavg()[0], 1)
    summary = {
        "command": command, "profile": profile.name, "model": args.model, "machine": machine, "wall_seconds": wall_s,
        "sections": {r.name: {"title": r.title, "data": r.data, "notes": r.notes} for r in results},
    }
    (out_dir / "bench.json").write_text(json.dumps(summary, indent=2) + "\n")
    blocks = [_block(result, profile.name, machine, command, wall_s) for result in results]
    (out_dir / "bench.md").write_text("\n".join(text for _, text in blocks))
    if not args.no_benchmarks:
        update_benchmarks_file(Path(args.benchmarks), blocks)
    for _, text in blocks:
        print(text)
    return summary


def _run_real_dims(args: argparse.Namespace, command: str) -> dict:
    """The real-dims benchmark as ``reelserve bench --profile ltx2-19b-random`` (``serving.bench.gpu``) or
    ``--profile minimax-h3-random`` (``serving.bench.gpu_h3``)."""
    from serving.bench import gpu, gpu_h3  # noqa: PLC0415 - torch and diffusers only for the real-dims profiles

    if GPU_PROFILES[args.profile].family == "minimax_h3":
        return _run_h3_real_dims(args, command, gpu_h3)
    if args.model is not None:
        raise BenchError(f"--model: the {args.profile} profile builds its own random weights; leave --model out")
    unknown = [s for s in args.section or () if s not in gpu.SECTIONS]
    if unknown:
        raise BenchError(f"--section: {unknown[0]} is not a section of {args.profile}; sections: {', '.join(gpu.SECTIONS)}")
    chosen = None if not args.section else ["machine", *(s for s in args.section if s != "machine")]
    out_dir = Path(args.out)
    started = time.perf_counter()
    try:
        report = gpu.run(args.profile, out_dir, sections=chosen, command=command)
    except (ValueError, RuntimeError) as error:
        raise BenchError(f"--profile: {error}") from None
    wall_s = round(time.perf_counter() - started, 1)
    markdown = (out_dir / "gpu-bench.md").read_text()
    result = SectionResult(name="gpu", title="GPU speed at real LTX-2 dims, random weights", data=report,
                           markdown=markdown)
    blocks = [_block(result, args.profile, machine_info(), command, wall_s)]
    if not args.no_benchmarks:
        update_benchmarks_file(Path(args.benchmarks), blocks)
    print(markdown)
    return report


def _run_h3_real_dims(args: argparse.Namespace, command: str, gpu_h3) -> dict:
    if args.model is not None:
        raise BenchError(f"--model: the {args.profile} profile builds its own random weights; leave --model out")
    unknown = [s for s in args.section or () if s not in gpu_h3.SECTIONS]
    if unknown:
        raise BenchError(f"--section: {unknown[0]} is not a section of {args.profile}; sections: {', '.join(gpu_h3.SECTIONS)}")
    chosen = None if not args.section else ["machine", *(s for s in args.section if s != "machine")]
    out_dir = Path(args.out)
    started = time.perf_counter()
    try:
        report = gpu_h3.run(args.profile, out_dir, sections=chosen, command=command)
    except (ValueError, RuntimeError) as error:
        raise BenchError(f"--profile: {error}") from None
    markdown = (out_dir / "gpu-bench-h3.md").read_text()
    result = SectionResult(name="gpu_h3", title="GPU speed at real MiniMax-H3 dims, random weights", data=report,
                           markdown=markdown)
    if not args.no_benchmarks:
        update_benchmarks_file(Path(args.benchmarks), [_block(result, args.profile, machine_info(), command,
                                                              round(time.perf_counter() - started, 1))])
    print(markdown)
    return report


def _cache_dir() -> Path:
    import platformdirs  # noqa: PLC0415 - keeps `reelserve --help` fast (the CLI's parser imports this module)

    return Path(platformdirs.user_cache_dir("reelserve")) / "bench"


def _machine_line(machine: dict) -> str:
    gpu = f", GPU {machine['gpu']}" if machine.get("gpu") else ", no GPU"
    threads = ""
    if "bare_torch_threads" in machine:
        threads = (f"; torch threads: bare {machine['bare_torch_threads']}, "
                   f"served diffusion replica {machine.get('served_diffusion_torch_threads')}")
    load = ""
    if "load_average_at_start" in machine:
        load = (f"; 1-min load average {machine['load_average_at_start']} at the start, "
                f"{machine.get('load_average_at_end')} at the end (other work on the machine)")
    return (f"{machine['cpu']} ({machine['cpus']} CPUs), {machine['memory_gib']} GiB{gpu}; Python {machine['python']}, "
            f"torch {machine['torch']}, diffusers {machine['diffusers']}, Ray {machine['ray']}{threads}{load}")


def _block(result: SectionResult, profile: str, machine: dict, command: str, wall_s: float) -> tuple[str, str]:
    key = f"{result.name}:{profile}"
    notes = "".join(f"- {note}\n" for note in result.notes)
    text = (
        f"<!-- bench:{key} -->\n## {result.title} — profile {profile}\n\n"
        f"- Machine: {_machine_line(machine)}\n- Date: {machine['date']}\n- Command: `{command}` "
        f"(whole run {wall_s:g} s)\n\n{result.markdown}\n{notes}<!-- /bench:{key} -->\n"
    )
    return key, text


def _literally(replacement: str) -> Callable[[re.Match[str]], str]:
    """A ``re.sub`` replacement that puts ``replacement`` in as it is (no backslash escapes)."""
    return lambda _: replacement


def update_benchmarks_file(path: Path, blocks: list[tuple[str, str]]) -> None:
    """Replace each block (by its section:profile key) in ``path``, or append it."""
    text = path.read_text() if path.exists() else _HEADER
    for key, block in blocks:
        pattern = re.compile(rf"<!-- bench:{re.escape(key)} -->.*?<!-- /bench:{re.escape(key)} -->\n?", re.S)
        if pattern.search(text):
            text = pattern.sub(_literally(block), text)
        else:
            text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def command_line(argv: list[str] | None) -> str:
    return "reelserve " + shlex.join(argv if argv is not None else sys.argv[1:])
