"""The ``reelserve`` command, run as a subprocess exactly as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from serving.cli import main
from serving.families.minimax_h3.tiny import build_tiny_minimax_h3
from tests.conftest import REPO_ROOT, SAMPLE_PHOTO
from tests.serving.families.minimax_h3.conftest import encode_image, encode_wav

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory) -> Path:
    """An empty XDG cache for every subprocess, so no test touches (or reuses) the user's cache."""
    return tmp_path_factory.mktemp("xdg-cache")


def _run(args: list[str], cache_home: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(XDG_CACHE_HOME=str(cache_home), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-m", "serving.cli", *map(str, args)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _assert_video(probe_mp4, path: Path, seconds: float, fps: int, width: int, height: int) -> dict:
    info = probe_mp4(path)
    one_frame = 1.0 / fps
    assert (info["num_streams"], info["video_streams"], info["audio_streams"]) == (2, 1, 1)
    assert info["video_codec"] == "h264"
    assert info["pix_fmt"] == "yuv420p"
    assert info["audio_codec"] == "aac"
    assert (info["width"], info["height"]) == (width, height)
    assert info["decoded_frames"] == round(seconds * fps)
    assert abs(info["video_duration"] - seconds) <= one_frame
    assert abs(info["audio_duration"] - seconds) <= one_frame
    assert info["channels"] == 2
    assert info["sample_rate"] == 16000
    assert info["first_frame"].std() > 1  # noise from random weights, not a blank frame
    return info


# --------------------------------------------------------------------------- generate


def test_generate_image_to_video(tmp_path, cache_home, tiny_checkpoint, probe_mp4):
    out = tmp_path / "clip.mp4"
    result = _run(
        ["generate", "--model", tiny_checkpoint, "--image", SAMPLE_PHOTO, "--out", out, "--prompt", "a cat looks around",
         "--seconds", "1", "--size", "96x64", "--fps", "24", "--seed", "3", "--steps", "2"],
        cache_home,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.strip() == str(out)
    assert "image-to-video: 96x64, 24 frames at 24 fps (1.00 s), 2 steps, seed 3" in result.stderr
    assert "denoising" in result.stderr  # the progress bar (not --quiet)
    _assert_video(probe_mp4, out, seconds=1.0, fps=24, width=96, height=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]  # no .partial left


def test_generate_text_to_video(tmp_path, cache_home, tiny_checkpoint, probe_mp4):
    out = tmp_path / "t2v.mp4"
    result = _run(
        ["generate", "--model", tiny_checkpoint, "--out", out, "--prompt", "rain on a window", "--seconds", "0.5",
         "--size", "64x96", "--fps", "30", "--seed", "5", "--steps", "2", "--quiet"],
        cache_home,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert "text-to-video: 64x96, 15 frames at 30 fps" in result.stderr
    assert "denoising" not in result.stderr  # --quiet
    _assert_video(probe_mp4, out, seconds=0.5, fps=30, width=64, height=96)


def test_generate_without_model_uses_tiny_checkpoint_in_user_cache(tmp_path, tmp_path_factory, probe_mp4):
    from serving.families.ltx2.tiny import default_tiny_dir, is_complete_checkpoint  # noqa: PLC0415 - keeps collection of `make check` fast

    cache = tmp_path_factory.mktemp("fresh-cache")
    out = tmp_path / "default.mp4"
    result = _run(
        ["generate", "--image", SAMPLE_PHOTO, "--out", out, "--prompt", "a cat", "--seconds", "1", "--size", "64x64",
         "--fps", "8", "--seed", "1", "--steps", "2", "--quiet"],
        cache,
    )
    assert result.returncode == 0, result.stderr
    built = cache / "reelserve" / default_tiny_dir().name  # tiny-ltx2-<version>
    assert is_complete_checkpoint(built)
    assert (built / "model_index.json").is_file()
    assert [p.name for p in (cache / "reelserve").iterdir()] == [built.name]  # no scratch folders left
    _assert_video(probe_mp4, out, seconds=1.0, fps=8, width=64, height=64)


# --------------------------------------------------------------------------- make-tiny


def test_make_tiny(tmp_path, cache_home, tiny_checkpoint):
    target = tmp_path / "made" / "tiny"
    result = _run(["make-tiny", target], cache_home)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(target)
    index = json.loads((target / "model_index.json").read_text())
    for name in ("scheduler", "vae", "audio_vae", "text_encoder", "tokenizer", "connectors", "transformer", "vocoder"):
        assert name in index, name
        assert (target / name).is_dir(), name
        assert any((target / name).iterdir()), name
    assert (target / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (target / "text_encoder" / "model.safetensors").is_file()
    assert (target / "scheduler" / "scheduler_config.json").is_file()
    assert (target / "tokenizer" / "tokenizer.json").is_file()
    # Deterministic: the same weights as the checkpoint this session built in-process.
    weights = "transformer/diffusion_pytorch_model.safetensors"
    made, reference = load_file(target / weights), load_file(tiny_checkpoint / weights)
    assert made.keys() == reference.keys()
    assert all(torch.equal(made[k], reference[k]) for k in made)


# --------------------------------------------------------------------------- bad input

GOOD = ["--prompt", "a cat looks around", "--seconds", "1", "--size", "96x64"]


def _with(args: list[str], **replace: str) -> list[str]:
    """``GOOD`` with some flags replaced (value ``None`` drops the flag)."""
    args = list(args)
    for flag, value in replace.items():
        flag = "--" + flag.replace("_", "-")
        if flag in args:
            at = args.index(flag)
            del args[at : at + 2]
        if value is not None:
            args += [flag, value]
    return args


# name -> (builder(ctx) -> argv after "generate", the flag the error must name).
# Each runs as its own process (about 6 s of imports each on 2 cores), so this list
# holds the cases a user hits most; the rarer ones below run ``main()`` in-process.
BAD_INPUT = {
    "missing_image": (lambda c: ["--image", c["tmp"] / "no-such-photo.jpg", *c["base"]], "--image"),
    "empty_image": (lambda c: ["--image", c["photos"]["empty"], *c["base"]], "--image"),
    "corrupt_image": (lambda c: ["--image", c["photos"]["truncated_jpeg"], *c["base"]], "--image"),
    "non_image_file": (lambda c: ["--image", c["photos"]["text"], *c["base"]], "--image"),
    "size_unreadable": (lambda c: _with(c["base"], size="big"), "--size"),
    "size_not_multiple_of_32": (lambda c: _with(c["base"], size="100x100"), "--size"),
    "seconds_zero": (lambda c: _with(c["base"], seconds="0"), "--seconds"),
    "seconds_negative": (lambda c: _with(c["base"], seconds="-1"), "--seconds"),
    "seconds_over_max": (lambda c: _with(c["base"], seconds="999"), "--seconds"),
    "prompt_empty": (lambda c: _with(c["base"], prompt=""), "--prompt"),
    "prompt_whitespace": (lambda c: _with(c["base"], prompt="   "), "--prompt"),
    "out_not_mp4": (lambda c: _with(c["base"], out=str(c["tmp"] / "clip.mov")), "--out"),
    "model_not_a_checkpoint": (lambda c: _with(c["base"], model=str(c["tmp"])), "--model"),
    # argparse's own errors (no imports, a fraction of a second each)
    "prompt_missing": (lambda c: _with(c["base"], prompt=None), "--prompt"),
    "steps_not_a_number": (lambda c: _with(c["base"], steps="many"), "--steps"),
}

# Rarer bad input: the same ``main()`` the command runs, called in this process.
MORE_BAD_INPUT = {
    "image_is_a_folder": (lambda c: ["--image", c["tmp"], *c["base"]], "--image"),
    "decompression_bomb": (lambda c: ["--image", c["photos"]["bomb_png"], *c["base"]], "--image"),
    "image_too_small": (lambda c: ["--image", c["photos"]["too_small_png"], *c["base"]], "--image"),
    "size_over_max": (lambda c: _with(c["base"], size="4096x4096"), "--size"),
    "size_zero": (lambda c: _with(c["base"], size="0x64"), "--size"),
    "seconds_not_a_number": (lambda c: _with(c["base"], seconds="ten"), "--seconds"),
    "fps_zero": (lambda c: _with(c["base"], fps="0"), "--fps"),
    "fps_fractional": (lambda c: _with(c["base"], fps="23.5"), "--fps"),
    "seed_negative": (lambda c: _with(c["base"], seed="-5"), "--seed"),
    "steps_zero": (lambda c: _with(c["base"], steps="0"), "--steps"),
    "prompt_too_many_tokens": (lambda c: _with(c["base"], prompt="a" * 300), "--prompt"),
    "out_folder_missing": (lambda c: _with(c["base"], out=str(c["tmp"] / "nowhere" / "clip.mp4")), "--out"),
    "out_is_a_folder": (lambda c: _with(c["base"], out=str(c["out_folder"])), "--out"),
    "steps_one": (lambda c: _with(c["base"], steps="1"), "--steps"),
    "seconds_absurdly_large": (lambda c: _with(c["base"], seconds="1" + "0" * 400), "--seconds"),
    "model_index_without_components": (lambda c: _with(c["base"], model=str(c["empty_checkpoint"])), "--model"),
}


def _context(tmp: Path, tiny_checkpoint: Path, photo_files: dict) -> dict:
    out_folder = tmp / "folder.mp4"
    out_folder.mkdir(exist_ok=True)
    empty_checkpoint = tmp / "empty-checkpoint"
    empty_checkpoint.mkdir(exist_ok=True)
    (empty_checkpoint / "model_index.json").write_text("{}")
    base = [*GOOD, "--out", str(tmp / "never.mp4"), "--model", str(tiny_checkpoint)]
    return {"tmp": tmp, "photos": photo_files, "base": base, "out_folder": out_folder,
            "empty_checkpoint": empty_checkpoint}


def _assert_refused(returncode, stdout: str, stderr: str, flag: str, tmp: Path) -> None:
    lines = stderr.strip().splitlines()
    assert returncode == 2, (returncode, stderr)
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("reelserve generate: error: "), lines[0]
    assert flag in lines[0], lines[0]
    assert stdout == ""
    assert not (tmp / "never.mp4").exists()


@pytest.fixture(scope="module")
def bad_input_results(tmp_path_factory, cache_home, tiny_checkpoint, photo_files):
    """Every ``BAD_INPUT`` case as a real process, two at a time (each loads no weights)."""
    tmp = tmp_path_factory.mktemp("bad-input")
    context = _context(tmp, tiny_checkpoint, photo_files)
    argvs = {name: ["generate", *build(context)] for name, (build, _) in BAD_INPUT.items()}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run, argv, cache_home, 120) for name, argv in argvs.items()}
        results = {name: future.result() for name, future in futures.items()}
    return {"results": results, "tmp": tmp}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_2_with_one_line(case, bad_input_results):
    result = bad_input_results["results"][case]
    _assert_refused(result.returncode, result.stdout, result.stderr, BAD_INPUT[case][1], bad_input_results["tmp"])


@pytest.mark.parametrize("case", list(MORE_BAD_INPUT))
def test_more_bad_input_exits_2_with_one_line(case, tmp_path, tiny_checkpoint, photo_files, capsys):
    build, flag = MORE_BAD_INPUT[case]
    argv = ["generate", *map(str, build(_context(tmp_path, tiny_checkpoint, photo_files)))]
    capsys.readouterr()
    try:
        returncode = main(argv)
    except SystemExit as exit_:  # argparse's errors leave this way
        returncode = exit_.code
    captured = capsys.readouterr()
    _assert_refused(returncode, captured.out, captured.err, flag, tmp_path)


def test_bad_input_never_builds_a_checkpoint(bad_input_results, cache_home):
    """Bad input is refused before any model is built or loaded: the cache stays empty."""
    assert len(bad_input_results["results"]) == len(BAD_INPUT)
    assert not (cache_home / "reelserve").exists()


def test_no_command_prints_help_and_exits_2(cache_home):
    result = _run([], cache_home)
    assert result.returncode == 2
    assert "generate" in result.stderr and "make-tiny" in result.stderr


@pytest.mark.slow
def test_generate_with_references_and_a_last_frame_on_minimax_h3(tmp_path, cache_home, probe_mp4):
    """The H3 family in one process: references and keyframes from files, checked by the family first."""
    checkpoint = build_tiny_minimax_h3(tmp_path / "h3")
    image, audio = tmp_path / "ref.png", tmp_path / "ref.wav"
    image.write_bytes(encode_image(np.random.default_rng(1).integers(0, 255, (32, 64, 3), dtype=np.uint8)))
    audio.write_bytes(encode_wav(1.0))
    out = tmp_path / "h3.mp4"
    result = _run(["generate", "--model", checkpoint, "--prompt", "a cat purrs", "--reference", f"image={image}",
                   "--reference", f"audio={audio}", "--out", out, "--seed", "2", "--quiet"], cache_home)
    assert result.returncode == 0, result.stderr
    assert "2 files (reference_image, reference_audio) to video: 64x32" in result.stderr
    info = probe_mp4(out)
    assert (info["video_streams"], info["audio_streams"], info["width"], info["height"]) == (1, 1, 64, 32)

    mixed = _run(["generate", "--model", checkpoint, "--prompt", "x", "--image", image, "--reference",
                  f"image={image}", "--out", tmp_path / "no.mp4"], cache_home)
    assert mixed.returncode == 2 and "--image: a first or last frame cannot be combined" in mixed.stderr
    alone = _run(["generate", "--model", checkpoint, "--prompt", "x", "--reference", f"audio={audio}",
                  "--out", tmp_path / "no.mp4"], cache_home)
    assert alone.returncode == 2 and "audio references need" in alone.stderr
    ltx = _run(["generate", "--prompt", "x", "--last-frame", image, "--out", tmp_path / "no.mp4"], cache_home)
    assert ltx.returncode == 2 and "--last-frame: model 'ltx-2-tiny' animates one first frame" in ltx.stderr
    bad = _run(["generate", "--prompt", "x", "--reference", "picture=a.png", "--out", tmp_path / "no.mp4"],
               cache_home)
    assert bad.returncode == 2 and "--reference: 'picture=a.png' is not KIND=PATH" in bad.stderr
