"""The ``reelserve`` command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["main"]

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line and exits 2."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


class UsageError(Exception):
    """Bad input found after parsing; printed as one line, exit code 2."""


def main(argv: list[str] | None = None) -> int:
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
    generate.add_argument("--out", required=True, help="output file, .mp4")
    generate.add_argument("--seconds", help="clip length (default: the model's)")
    generate.add_argument("--size", help="WIDTHxHEIGHT, multiples of the model's size step (default: the model's)")
    generate.add_argument("--fps", help="frames per second (default: the model's)")
    generate.add_argument("--seed", help="random seed (default: random)")
    generate.add_argument("--negative-prompt", help="what to avoid (default: the model's)")
    generate.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    generate.add_argument("--model", help="checkpoint directory or hub id (default: the tiny random checkpoint)")
    generate.add_argument("--quiet", action="store_true", help="no progress bar")
    generate.set_defaults(handler=_generate)
    return parser


def _make_tiny(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from serving.families.ltx2_tiny import build_tiny_ltx2

    path = build_tiny_ltx2(args.directory)
    print(path)
    return 0


def _generate(args: argparse.Namespace) -> int:
    _quiet_libraries()
    out = _check_out_path(args.out)
    image = _read_image_file(args.image) if args.image is not None else None
    config = _model_config(args.model, args.steps)

    from serving.errors import InvalidRequest
    from serving.local import LocalGenerator

    generator = LocalGenerator(config)
    try:
        request = generator.validate(
            prompt=args.prompt,
            seconds=args.seconds,
            size=args.size,
            fps=args.fps,
            seed=args.seed,
            negative_prompt=args.negative_prompt,
            image=image,
            field_names=_CLI_FIELD_NAMES,
        )
    except InvalidRequest as error:
        raise UsageError(str(error)) from None

    plan = request.plan
    mode = "image-to-video" if image is not None else "text-to-video"
    print(
        f"{mode}: {plan.width}x{plan.height}, {plan.output_frames} frames at {plan.fps} fps "
        f"({plan.duration_s:.2f} s), {plan.num_inference_steps} steps, seed {plan.seed}",
        file=sys.stderr,
    )
    with _ProgressBar(disabled=args.quiet) as progress:
        generator.generate(request, out, on_step=progress.update)
    print(out)
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
    from pydantic import ValidationError

    from cluster.config import ModelConfig

    overrides = {} if steps is None else {"num_inference_steps": steps}
    try:
        if model is None:
            return ModelConfig.tiny(**overrides)
        _check_model_location(model)
        from serving.families.ltx2_tiny import is_complete_checkpoint

        if is_complete_checkpoint(model):  # a tiny build: use the settings that suit it
            return ModelConfig.tiny(path=model, **overrides)
        return ModelConfig(path=model, **overrides)
    except ValidationError as error:
        first = error.errors()[0]
        field = "--steps" if first["loc"] and first["loc"][0] == "num_inference_steps" else "--model"
        raise UsageError(f"{field}: {first['msg']}") from None


def _check_model_location(model: str) -> None:
    """A local-looking path must be a diffusers checkpoint folder; anything else is taken as a hub id."""
    looks_local = os.path.exists(model) or model.startswith((".", "/", "~")) or model.count("/") != 1
    if looks_local and not (Path(model).expanduser() / "model_index.json").is_file():
        raise UsageError(f"--model: '{model}' is not a checkpoint folder (no model_index.json in it)")


class _ProgressBar:
    """Denoising progress on stderr."""

    def __init__(self, disabled: bool):
        self._disabled = disabled
        self._bar = None

    def __enter__(self):
        return self

    def update(self, finished: int, total: int) -> None:
        if self._disabled:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc="denoising", unit="step", file=sys.stderr)
        self._bar.update(finished - self._bar.n)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()


def _quiet_libraries() -> None:
    """Keep library progress bars and chatter off the terminal; our own output stays readable."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    raise SystemExit(main())
