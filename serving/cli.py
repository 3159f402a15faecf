"""The ``reelserve`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import yaml
from pydantic import ValidationError

from cluster.config import load_config, parse_model_config, parse_size
from cluster.plan import format_plan, make_plan
from serving.bench.runner import BenchError, command_line, run_bench
from serving.bench.runner import add_arguments as add_bench_arguments
from serving.errors import InvalidRequest
from serving.families import checkpoint_family
from serving.families.base import MediaInput
from serving.loadtest.runner import SettingsError, run_loadtest, settings_from_args
from serving.loadtest.runner import add_arguments as add_loadtest_arguments
from serving.tenancy.auth import new_api_key

__all__ = ["main"]

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line and exits 2."""

    def error(self, message: str) -> NoReturn:  # noqa: D401 - argparse API
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


class UsageError(Exception):
    """Bad input found after parsing; printed as one line, exit code 2."""


_argv: list[str] | None = None  # the command line as given (the bench report quotes it)


def main(argv: list[str] | None = None) -> int:
    global _argv
    _argv = argv
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return args.handler(args)
    except UsageError as error:
        print(f"reelserve {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as error:  # noqa: BLE001 - one line for the user, not a traceback
        from cluster.local import ClusterError  # noqa: PLC0415 - keeps `reelserve --help` fast

        if not isinstance(error, ClusterError):
            raise
        print(f"reelserve {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("reelserve: interrupted", file=sys.stderr)
        return 130


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="reelserve", description="Photo + prompt -> video with synchronized audio.")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)

    tiny = commands.add_parser("make-tiny", help="build the tiny random LTX-2 checkpoint (offline, seconds)")
    tiny.add_argument("directory", help="where to write it (Hugging Face diffusers layout)")
    tiny.set_defaults(handler=_make_tiny)

    generate = commands.add_parser("generate", help="generate one video in this process")
    generate.add_argument("--prompt", required=True, help="what happens in the video")
    generate.add_argument("--image", help="photo to animate (JPEG/PNG/WebP); omit for text-to-video")
    generate.add_argument("--last-frame", help="image the video ends on (families with keyframes: MiniMax-H3)")
    generate.add_argument(
        "--reference", action="append", default=[], metavar="KIND=PATH",
        help="a reference file, KIND image, video or audio, repeated in the order the model reads them "
             "(families with references: MiniMax-H3)",
    )
    generate.add_argument("--out", required=True, help="output file, .mp4")
    generate.add_argument("--seconds", help="clip length (default: the model's)")
    generate.add_argument("--size", help="WIDTHxHEIGHT, multiples of the model's size step (default: the model's)")
    generate.add_argument("--fps", help="frames per second (default: the model's)")
    generate.add_argument("--seed", help="random seed (default: random)")
    generate.add_argument("--negative-prompt", help="what to avoid (default: the model's)")
    generate.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    generate.add_argument("--model", help="checkpoint directory or hub id (default: the tiny random checkpoint)")
    generate.add_argument("--address", help="HOST:PORT of a reelserve gRPC server; omit to run in this process")
    generate.add_argument(
        "--enhance-prompt", action=argparse.BooleanOptionalAction, default=None,
        help="have the server's prompt rewriter expand the prompt first (default: the server's setting; needs --address)",
    )
    generate.add_argument("--quiet", action="store_true", help="no progress bar")
    generate.set_defaults(handler=_generate)

    up = commands.add_parser(
        "up", help="start a local Ray cluster and deploy the app; on a running one, apply the config in place"
    )
    up.add_argument("--config", help="deployment config YAML (default: cluster/profiles/local-cpu.yaml: one node, tiny model, CPU)")
    up.add_argument("--detach", action="store_true", help="return once the app is ready; stop it with `reelserve down`")
    up.set_defaults(handler=_up)

    down = commands.add_parser("down", help="stop the cluster started by `reelserve up --detach`")
    down.set_defaults(handler=_down)

    status = commands.add_parser("status", help="show the deployed app and its stages")
    status.set_defaults(handler=_status)

    plan = commands.add_parser("plan", help="where each stage lands, its memory and hand-offs; refuses configs that cannot fit")
    plan.add_argument("--config", help="deployment config YAML (default: cluster/profiles/local-cpu.yaml)")
    plan.add_argument("--size", help="WIDTHxHEIGHT to size the hand-offs for (default: the model's default size)")
    plan.add_argument("--seconds", help="clip length to size the hand-offs for (default: the model's)")
    plan.set_defaults(handler=_plan)

    k8s = commands.add_parser("k8s", help="Kubernetes (KubeRay) manifests from a deployment config")
    k8s_commands = k8s.add_subparsers(dest="k8s_command", required=True, parser_class=_Parser)
    render = k8s_commands.add_parser("render", help="write a RayService, Redis, storage, Services and a PodMonitor")
    render.add_argument("--config", required=True, help="deployment config YAML, e.g. cluster/profiles/8x-h100.yaml")
    render.add_argument("--out", help="folder to write (default: k8s/<config name>)")
    render.add_argument("--image", help="container image of the Ray pods (default: reelserve:<version>)")
    render.add_argument("--redis-url", help="a managed Redis (redis://HOST:PORT/DB) instead of the in-cluster one")
    render.add_argument("--gcs-redis-url", help="a managed Redis for Ray's GCS state, apart from the jobs' one")
    render.add_argument(
        "--api-keys-secret",
        help="a Secret whose tenants.yaml holds the tenants and their key hashes; mounted in every Ray pod as auth.key_file",
    )
    render.set_defaults(handler=_k8s_render)

    keys = commands.add_parser("keys", help="API keys for tenants")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
    new_key = keys_commands.add_parser("new", help="make an API key; prints it once, and the hash the config holds")
    new_key.add_argument("--tenant", default="my-team", help="the tenant's name, for the config snippet printed")
    new_key.set_defaults(handler=_new_key)

    loadtest = commands.add_parser("loadtest", help="load-test a deployment; JSON report and PNGs")
    add_loadtest_arguments(loadtest)
    loadtest.set_defaults(handler=_loadtest)

    bench = commands.add_parser("bench", help="benchmark the served graph against the bare pipeline; BENCHMARKS.md")
    add_bench_arguments(bench)
    bench.set_defaults(handler=_bench)
    return parser


def _make_tiny(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from serving.families.ltx2.tiny import build_tiny_ltx2  # noqa: PLC0415 - torch and diffusers only for this command

    path = build_tiny_ltx2(args.directory)
    print(path)
    return 0


def _generate(args: argparse.Namespace) -> int:
    out = _check_out_path(args.out)  # cheap checks first: no library import for a typo
    image = _read_image_file(args.image) if args.image is not None else None
    media = _read_media(args)
    _quiet_libraries()
    if args.address:
        return _generate_remote(args, out, image, media)
    if args.enhance_prompt:
        raise UsageError("--enhance-prompt: the prompt rewriter runs in a served cluster; add --address HOST:PORT")
    config = _model_config(args.model, args.steps)

    from serving.generate import LocalGenerator  # noqa: PLC0415 - torch and diffusers only for this command

    try:
        generator = LocalGenerator(config)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"--model: cannot load '{config.path or 'the tiny checkpoint'}': {reason}") from None
    try:
        request = generator.validate(
            prompt=args.prompt,
            seconds=args.seconds,
            size=args.size,
            fps=args.fps,
            seed=args.seed,
            negative_prompt=args.negative_prompt,
            image=image if generator.family.admit_inputs is None else None,
            field_names=_CLI_FIELD_NAMES,
        )
        if image is not None:
            media.insert(0, MediaInput("--image", "first_frame", image))
        inputs = generator.admit(media)
    except InvalidRequest as error:
        raise UsageError(str(error)) from None

    plan = request.plan
    roles = [spec.role for spec, _ in inputs]
    mode = ("text-to-video" if not roles else "image-to-video" if roles == ["first_frame"]
            else f"{len(roles)} files ({', '.join(roles)}) to video")
    print(
        f"{mode}: {plan.width}x{plan.height}, {plan.output_frames} frames at {plan.fps} fps "
        f"({plan.duration_s:.2f} s), {plan.num_inference_steps} steps, seed {plan.seed}",
        file=sys.stderr,
    )
    with _ProgressBar(disabled=args.quiet) as progress:
        generator.generate(request, out, on_step=progress.update, inputs=inputs)
    print(out)
    return 0


def _read_media(args: argparse.Namespace) -> list:
    """``--last-frame`` and each ``--reference KIND=PATH``, read, in the order given (checked by the model later)."""
    media = []
    if args.last_frame is not None:
        media.append(MediaInput("--last-frame", "last_frame", _read_file(args.last_frame, "--last-frame")))
    for value in args.reference:
        kind, separator, name = value.partition("=")
        if not separator or kind not in _REFERENCE_KINDS:
            raise UsageError(f"--reference: '{value}' is not KIND=PATH with KIND image, video or audio")
        media.append(MediaInput(f"--reference {value}", _REFERENCE_KINDS[kind], _read_file(name, "--reference")))
    return media


_REFERENCE_KINDS = {"image": "reference_image", "video": "reference_video", "audio": "reference_audio"}
_PROTO_KINDS = {"reference_image": 1, "reference_video": 2, "reference_audio": 3}  # video_pb2.Reference.Kind


def _read_file(name: str, flag: str) -> bytes:
    path = Path(name)
    if not path.is_file():
        raise UsageError(f"{flag}: no file '{name}'")
    return path.read_bytes()


def _generate_remote(args: argparse.Namespace, out: Path, image: bytes | None, media: list) -> int:
    """Submit over gRPC, follow WatchVideo with a progress bar, download the MP4."""
    import grpc  # noqa: PLC0415 - keeps `reelserve --help` fast (grpc and protobuf only for --address)

    from serving.client import RemoteError, RemoteGenerator  # noqa: PLC0415 - keeps `reelserve --help` fast (grpc and protobuf only for --address)
    from serving.proto import video_pb2  # noqa: PLC0415 - keeps `reelserve --help` fast (grpc and protobuf only for --address)

    if args.model and "/" in args.model:
        raise UsageError("--model: with --address, name the served model id, not a path")
    if args.steps is not None:
        raise UsageError("--steps: the server's config sets the steps; drop --steps with --address")
    seconds = _float_or_none(args.seconds, "--seconds")
    fps = _int_in_range(args.fps, "--fps", 1, 2**31 - 1)  # proto int32; 0 would mean "the default"
    seed = _int_in_range(args.seed, "--seed", 0, 2**63 - 1)
    client = RemoteGenerator(args.address)
    try:
        client.wait_ready()
        video = client.create(
            prompt=args.prompt, image=image, seconds=seconds, size=args.size, fps=fps, seed=seed,
            negative_prompt=args.negative_prompt, model=args.model, enhance_prompt=args.enhance_prompt,
            last_frame=next((item.data for item in media if item.role == "last_frame"), None),
            references=[video_pb2.Reference(kind=_PROTO_KINDS[item.role], data=item.data)
                        for item in media if item.role in _PROTO_KINDS],
        )
        print(f"job {video.id}: {video.size}, {video.seconds:g} s at {video.fps} fps, seed {video.seed}", file=sys.stderr)
        with _ProgressBar(disabled=args.quiet, desc="generating", unit="%") as progress:
            final = client.watch(video.id, lambda v: progress.update(v.progress, 100))
        if final.status != video_pb2.COMPLETED:
            status = video_pb2.VideoStatus.Name(final.status).lower()
            print(f"reelserve generate: job {video.id} {status}: {final.error.message}", file=sys.stderr)
            return 1
        if final.enhance_prompt:
            if final.revised_prompt:
                print(f"revised prompt: {final.revised_prompt}", file=sys.stderr)
            else:
                print(f"prompt not rewritten ({final.prompt_rewrite_fallback}); used as given", file=sys.stderr)
        client.download(video.id, out)
    except RemoteError as error:
        if error.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
            raise UsageError(str(error)) from None
        print(f"reelserve generate: error: {error}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(out)
    return 0


def _float_or_none(text: str | None, flag: str) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{flag}: '{text}' is not a number") from None
    if value <= 0:
        raise UsageError(f"{flag}: {value:g} is out of range; it must be more than 0")
    return value


def _int_in_range(text: str | None, flag: str, low: int, high: int) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{flag}: '{text}' is not a whole number") from None
    if not low <= value <= high:
        raise UsageError(f"{flag}: {value} is out of range; allowed: {low} to {high}")
    return value


def _load_cluster_config(path: str | None):
    from cluster.local import default_config_path  # noqa: PLC0415 - keeps `reelserve --help` fast

    source = path or str(default_config_path())
    if not Path(source).is_file():
        raise UsageError(f"--config: no such file '{source}'")
    try:
        return load_config(source)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "config"
        raise UsageError(f"--config: {where}: {first['msg']}") from None
    except Exception as error:  # noqa: BLE001 - unreadable YAML
        raise UsageError(f"--config: cannot read '{source}': {error}") from None


def _up(args: argparse.Namespace) -> int:
    from cluster import local  # noqa: PLC0415 - keeps `reelserve --help` fast

    config = _load_cluster_config(args.config)
    raw = yaml.safe_load(Path(args.config or local.default_config_path()).read_text()) or {}
    state = local.read_state()
    if state is not None:  # a running cluster: the new config applies in place
        print("applying the config to the running cluster...", file=sys.stderr)
        try:
            restarted = local.update(state, config, raw)
        except local.ClusterError as error:
            raise UsageError(str(error)) from None
        print(f"reelserve is updated: restarted {', '.join(restarted) or 'nothing'}; every other application kept "
              "its replicas")
        return 0
    print("starting the cluster and deploying (first start loads every stage; this takes a minute)...", file=sys.stderr)
    if config.auth is None:
        print("note: no `auth:` in the config: the API is open (no keys; every job is the tenant default's)",
              file=sys.stderr)
    if args.detach:
        state = local.start_detached(config, raw)
        metrics = f"  metrics {state.metrics_url}" if state.metrics_url else ""
        print(f"reelserve is up: HTTP {state.http_url}/v1  gRPC {state.grpc_address}{metrics}")
        return 0
    local.serve_app(config, config.ray.address, raw)
    print(
        f"reelserve is up: HTTP http://{config.ingress.host}:{config.ingress.http_port}/v1  "
        f"gRPC 127.0.0.1:{config.ingress.grpc_port}"
        + ("" if config.ray.address else f"  metrics {local.metrics_url(config)}")
        + "  (Ctrl-C stops it)"
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve  # noqa: PLC0415 - Ray only where a cluster is reached

        serve.shutdown()
    return 0


def _down(args: argparse.Namespace) -> int:
    from cluster import local  # noqa: PLC0415 - keeps `reelserve --help` fast

    state = local.read_state()
    if state is None:
        print("no cluster started by `reelserve up --detach` is running", file=sys.stderr)
        return 0
    local.stop(state)
    print("reelserve is down")
    return 0


def _status(args: argparse.Namespace) -> int:
    from cluster import local  # noqa: PLC0415 - keeps `reelserve --help` fast

    state = local.read_state()
    if state is None:
        print("no cluster started by `reelserve up --detach` is running")
        return 1
    print(json.dumps(local.status(state), indent=2))
    return 0


def _plan(args: argparse.Namespace) -> int:
    config = _load_cluster_config(args.config)
    if args.size is not None:
        try:
            parse_size(args.size)
        except ValueError as error:
            raise UsageError(f"--size: {error}") from None
    seconds = _float_or_none(args.seconds, "--seconds")
    _quiet_libraries()
    plan = make_plan(config, size=args.size, seconds=seconds)
    print(format_plan(plan))
    return 0 if plan.fits else EXIT_BAD_INPUT


def _new_key(args: argparse.Namespace) -> int:
    key, digest = new_api_key()
    print(f"API key (give it to the tenant; it is not stored anywhere): {key}")
    print("config (auth.tenants, or the key file):")
    print(f"  - name: {args.tenant}\n    key_sha256: {digest}")
    return 0


def _k8s_render(args: argparse.Namespace) -> int:
    from cluster.k8s import DEFAULT_IMAGE, RenderError, render, write  # noqa: PLC0415 - keeps `reelserve --help` fast

    _load_cluster_config(args.config)  # names the field of a config that does not validate
    raw = yaml.safe_load(Path(args.config).read_text()) or {}
    try:
        files = render(raw, args.config, image=args.image or DEFAULT_IMAGE, redis_url=args.redis_url,
                       gcs_redis_url=args.gcs_redis_url, api_keys_secret=args.api_keys_secret)
    except RenderError as error:
        raise UsageError(str(error)) from None
    out = Path(args.out) if args.out else Path("k8s") / Path(args.config).stem
    for path in write(files, out):
        print(path)
    return 0


def _loadtest(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except SettingsError as error:
        raise UsageError(str(error)) from None
    report = run_loadtest(settings)
    jobs = report["jobs"]
    print(
        f"{jobs['submitted']} submitted: {jobs['completed']} completed, {jobs['failed']} failed, "
        f"{jobs['rejected']} rejected; {report['throughput_jobs_per_min']:g} jobs/min; "
        f"p50 {report['latency_seconds']['p50']} s; report {settings.out_dir / 'report.json'}"
    )
    return 0 if jobs["all_accounted_for"] else 1


def _bench(args: argparse.Namespace) -> int:
    try:
        run_bench(args, command_line(_argv), before_work=_quiet_libraries)
    except BenchError as error:
        raise UsageError(str(error)) from None
    return 0


_CLI_FIELD_NAMES = {
    "prompt": "--prompt",
    "seconds": "--seconds",
    "size": "--size",
    "fps": "--fps",
    "seed": "--seed",
    "negative_prompt": "--negative-prompt",
    "image": "--image",
    "model": "--model",
}


def _check_out_path(out: str) -> Path:
    path = Path(out)
    if path.suffix.lower() != ".mp4":
        raise UsageError(f"--out: '{out}' must end in .mp4")
    if not path.parent.resolve().is_dir():
        raise UsageError(f"--out: the folder '{path.parent}' does not exist")
    if path.is_dir():
        raise UsageError(f"--out: '{out}' is a folder; give a file name ending in .mp4")
    return path


def _read_image_file(name: str) -> bytes:
    path = Path(name)
    if not path.exists():
        raise UsageError(f"--image: no such file '{name}'")
    if not path.is_file():
        raise UsageError(f"--image: '{name}' is not a file")
    try:
        return path.read_bytes()
    except OSError as error:
        raise UsageError(f"--image: cannot read '{name}': {error.strerror}") from None


def _model_config(model: str | None, steps: int | None):
    overrides = {} if steps is None else {"num_inference_steps": steps}
    try:
        if model is None:
            return parse_model_config(overrides)
        _check_model_location(model)
        family = checkpoint_family(model) or "ltx2"  # a hub id or an unknown folder: the default family
        return parse_model_config({"family": family, "path": model, **overrides})
    except ValidationError as error:
        first = error.errors()[0]
        field = "--steps" if first["loc"] and first["loc"][0] == "num_inference_steps" else "--model"
        raise UsageError(f"{field}: {first['msg']}") from None


def _check_model_location(model: str) -> None:
    """A local-looking path must be a diffusers checkpoint folder; anything else is taken as a hub id."""
    looks_local = os.path.exists(model) or model.startswith((".", "/", "~")) or model.count("/") != 1
    folder = Path(model).expanduser()
    indexes = ("model_index.json", "modular_model_index.json")  # a pipeline's, or modular blocks' (MiniMax-H3)
    if looks_local and not any((folder / index).is_file() for index in indexes):
        raise UsageError(f"--model: '{model}' is not a checkpoint folder (no model_index.json or "
                         "modular_model_index.json in it)")


class _ProgressBar:
    """Progress on stderr."""

    def __init__(self, disabled: bool, desc: str = "denoising", unit: str = "step"):
        self._disabled = disabled
        self._desc, self._unit = desc, unit
        self._bar: Any = None  # a tqdm bar, made on the first update

    def __enter__(self):
        return self

    def update(self, finished: int, total: int) -> None:
        if self._disabled:
            return
        if self._bar is None:
            from tqdm import tqdm  # noqa: PLC0415 - keeps `reelserve --help` fast

            self._bar = tqdm(total=total, desc=self._desc, unit=self._unit, file=sys.stderr)
        self._bar.update(finished - self._bar.n)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()


def _quiet_libraries() -> None:
    """Keep library progress bars and chatter off the terminal; our own output stays readable."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import diffusers  # noqa: PLC0415 - after the variables above, and only for the commands that load a model
    import transformers  # noqa: PLC0415 - after the variables above, and only for the commands that load a model

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    raise SystemExit(main())
