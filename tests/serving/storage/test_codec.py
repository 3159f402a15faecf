"""The codec: every hand-off type round-trips exactly; anything else decodes to None, never runs."""

from __future__ import annotations

import dataclasses
import json
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch

from serving.protocol import (
    AudioLatents,
    DenoisedLatents,
    EncodedVideo,
    HostTensor,
    ImageCondition,
    PromptEmbeddings,
    RenderPlan,
    TextEmbeddings,
    VideoFrames,
    VideoLatents,
    Waveform,
)
from serving.storage.codec import FORMAT, Codec, codec


def host(*shape, dtype=torch.float32, seed=0) -> HostTensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype in (torch.int64, torch.int32, torch.uint8):
        return HostTensor.of(torch.randint(0, 100, shape, generator=generator).to(dtype))
    return HostTensor.of(torch.randn(*shape, generator=generator).to(dtype))


def text(seed: int) -> TextEmbeddings:
    return TextEmbeddings(
        video=host(1, 16, 32, dtype=torch.bfloat16, seed=seed),
        audio=host(1, 16, 8, dtype=torch.float16, seed=seed + 1),
        mask=host(1, 16, dtype=torch.int64, seed=seed + 2),
    )


def same(a, b) -> bool:
    """Deep equality that compares arrays by dtype, shape and every bit."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if dataclasses.is_dataclass(a):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


LATENTS = VideoLatents(latents=host(1, 128, 2, 4, 5))
AUDIO = AudioLatents(latents=host(1, 8, 12, 16, seed=3))
EXAMPLES = [
    RenderPlan.build(width=64, height=64, fps=24, seconds=0.5, seed=7, num_inference_steps=8, frame_step=8),
    text(0),
    PromptEmbeddings(prompt=text(0)),
    PromptEmbeddings(prompt=text(0), negative=text(10)),
    ImageCondition(latents=host(1, 128, 1, 2, 2), width=64, height=64),
    LATENTS,
    AUDIO,
    DenoisedLatents(video=LATENTS, audio=AUDIO),
    VideoFrames(pixels=np.arange(9 * 4 * 4 * 3, dtype=np.uint8).reshape(9, 4, 4, 3), fps=24),
    EncodedVideo(data=b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)), num_frames=9, fps=24, width=64, height=64),
    EncodedVideo(data=b"", num_frames=0, fps=24, width=64, height=64),
    Waveform(samples=np.linspace(-1, 1, 2 * 400, dtype=np.float32).reshape(2, 400), sample_rate=16000),
]


@pytest.mark.parametrize("value", EXAMPLES, ids=lambda v: type(v).__name__)
def test_every_protocol_type_round_trips_exactly(value):
    data = codec.encode(value)
    decoded = codec.decode(data, type(value))
    assert same(decoded, value)
    assert same(codec.decode(data), value)  # without naming the type, the file says it


def test_bf16_and_fp16_come_back_as_the_same_torch_tensors():
    original = text(5)
    decoded = codec.decode(codec.encode(original), TextEmbeddings)
    assert decoded.video.dtype == "bfloat16" and decoded.audio.dtype == "float16"
    assert torch.equal(decoded.video.to(), original.video.to()) and decoded.video.to().dtype == torch.bfloat16
    assert torch.equal(decoded.audio.to(), original.audio.to()) and decoded.audio.to().dtype == torch.float16


def test_the_file_is_a_plain_safetensors_file(tmp_path):
    path = tmp_path / "prompt.safetensors"
    path.write_bytes(codec.encode(PromptEmbeddings(prompt=text(0))))
    with safetensors.safe_open(str(path), framework="np") as handle:
        assert set(handle.keys()) == {"prompt.video", "prompt.audio", "prompt.mask"}
        document = json.loads(handle.metadata()["reelserve"])
    assert document["format"] == FORMAT and document["value"]["$type"] == "PromptEmbeddings"


def test_a_family_checkpoint_registers_and_round_trips():
    """The LTX-2 engine's checkpoint: registered by whoever owns it (here the test), not by the codec."""
    from serving.families.ltx2.diffusion import DenoiseCheckpoint  # noqa: PLC0415 - keeps collection of `make check` fast
    from serving.families.ltx2.recipes import Guidance  # noqa: PLC0415 - keeps collection of `make check` fast

    family_codec = Codec()
    with pytest.raises(TypeError, match="Guidance must be registered first"):
        family_codec.register(DenoiseCheckpoint)
    family_codec.register(Guidance)
    family_codec.register(DenoiseCheckpoint)
    checkpoint = DenoiseCheckpoint(
        request_id="video_" + "ab" * 12,
        recipe="distilled",
        phase_index=0,
        step_index=3,
        finished_steps=3,
        total_steps=8,
        video_latents=host(1, 14080, 128, seed=1),  # packed [1, tokens, channels]: 7.2 MB at 1280x704x121
        audio_latents=host(1, 126, 128, seed=2),
        generator_state=HostTensor.of(torch.Generator().manual_seed(3).get_state()),
        sigmas=HostTensor.of(torch.tensor([1.0, 0.99375, 0.9875, 0.0])),
        seed=3,
        width=1280,
        height=704,
        generated_frames=121,
        fps=24,
        guidance=Guidance(guidance_scale=3.0, stg_scale=1.0, stg_blocks=(1, 2)),
    )
    data = family_codec.encode(checkpoint)
    decoded = family_codec.decode(data, DenoiseCheckpoint)
    assert same(decoded, checkpoint)
    assert decoded.guidance.stg_blocks == (1, 2) and type(decoded.guidance.stg_blocks) is tuple
    assert 7_200_000 < len(data) < 7_500_000
    # A codec not told of the family's type refuses it (the shared one knows it once anything in the process,
    # a stage replica or an earlier test, registered the family's types).
    assert Codec().decode(data) is None


# -- registration and encoding refuse what they cannot keep ------------------------------------------


def test_registration_checks_every_field():
    fresh = Codec()

    @dataclasses.dataclass
    class Mutable:
        x: int

    @dataclasses.dataclass(frozen=True)
    class Opaque:
        ref: object

    @dataclasses.dataclass(frozen=True)
    class Derived:
        x: int
        y: int = dataclasses.field(init=False, default=0)

    with pytest.raises(TypeError, match="frozen"):
        fresh.register(Mutable)
    with pytest.raises(TypeError, match="cannot be stored"):
        fresh.register(Opaque)
    with pytest.raises(TypeError, match="__init__"):
        fresh.register(Derived)
    fresh.register(VideoLatents)
    fresh.register(VideoLatents)  # again under the same name: no-op
    with pytest.raises(ValueError, match="already registered"):
        fresh.register(AudioLatents, name="VideoLatents")


def test_encoding_refuses_unregistered_types_and_wrong_fields():
    with pytest.raises(TypeError, match="not registered"):
        codec.encode({"latents": 1})
    with pytest.raises(TypeError):
        codec.encode(ImageCondition(latents=host(1, 2), width="64", height=64))
    with pytest.raises(TypeError):
        codec.encode(VideoLatents(latents=HostTensor(array=np.zeros(3, np.float32), dtype="bfloat16")))
    with pytest.raises(TypeError):
        codec.encode(Waveform(samples=np.zeros(3, np.complex64), sample_rate=16000))


# -- decoding: anything that is not our object is None, with one log line ----------------------------


def crafted(document: object, arrays: dict[str, np.ndarray] | None = None) -> bytes:
    """A well-formed safetensors file carrying ``document`` as our metadata (to forge everything else)."""
    return safetensors.numpy.save(arrays or {}, metadata={"reelserve": json.dumps(document)})


def latents_document(**node) -> dict:
    base = {"$host": "latents", "dtype": "float32", "shape": [2, 3]}
    return {"format": FORMAT, "value": {"$type": "VideoLatents", "latents": {**base, **node}}}


F32 = {"latents": np.zeros((2, 3), np.float32)}
VALID = codec.encode(LATENTS)
PICKLE_PAYLOAD = b"cbuiltins\nexec\n(Vopen('/tmp/reelserve-codec-pwned','w').write('x')\ntR."  # protocol 0, hand-written

UNREADABLE = {
    "empty": b"",
    "seven bytes": b"\x00" * 7,
    "truncated header": VALID[:40],
    "truncated data": VALID[:-1],
    "one byte more": VALID + b"\x00",
    "random": bytes(range(256)) * 10,
    "pickle": PICKLE_PAYLOAD,
    "pickle behind a length": struct.pack("<Q", len(PICKLE_PAYLOAD)) + PICKLE_PAYLOAD,
    "png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
    "json": json.dumps({"$type": "VideoLatents"}).encode(),
    "a foreign safetensors file": safetensors.numpy.save(F32),
    "header longer than the file": struct.pack("<Q", 1 << 40) + b"{}",
    "header size lies": struct.pack("<Q", 2) + VALID[8:],
    "header is not json": struct.pack("<Q", 9) + b"{not json",
    "document is a string": crafted("{not json"),
    "our key is not json": safetensors.numpy.save({}, metadata={"reelserve": "{not json"}),
    "another format": crafted({"format": "reelserve.codec/99", "value": {}}),
    "unregistered type": crafted({"format": FORMAT, "value": {"$type": "os.system", "command": "rm -rf /"}}),
    "no type": crafted({"format": FORMAT, "value": [1, 2]}),
    "missing field": crafted({"format": FORMAT, "value": {"$type": "VideoLatents"}}),
    "extra field": crafted({**latents_document(), "value": {**latents_document()["value"], "x": 1}}, F32),
    "wrong kind": crafted({"format": FORMAT, "value": {"$type": "VideoLatents", "latents": 3}}),
    "missing tensor": crafted(latents_document()),
    "shape lies": crafted(latents_document(shape=[3, 2]), F32),
    "dtype lies": crafted(latents_document(dtype="bfloat16"), F32),
    "unknown dtype": crafted(latents_document(dtype="complex64"), F32),
    "unexplained tensor": crafted(latents_document(), {**F32, "extra": np.zeros(1, np.uint8)}),
    "deep nesting": safetensors.numpy.save(
        {}, metadata={"reelserve": f'{{"format": "{FORMAT}", "value": {{"$type": "VideoLatents", "latents": {"[" * 5000 + "]" * 5000}}}}}'}
    ),
    "int where a str is": crafted(
        {"format": FORMAT, "value": {"$type": "Waveform", "samples": {"$array": "s", "dtype": "float32", "shape": [1]}, "sample_rate": "16000"}},
        {"s": np.zeros(1, np.float32)},
    ),
}


def lying_offsets() -> bytes:
    """A safetensors header whose tensor claims more bytes than the file has."""
    header = json.dumps(
        {
            "__metadata__": {"reelserve": json.dumps(latents_document())},
            "latents": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 4000]},
        }
    ).encode()
    return struct.pack("<Q", len(header)) + header + b"\x00" * 24


def overlapping_offsets() -> bytes:
    header = json.dumps(
        {
            "__metadata__": {"reelserve": json.dumps(latents_document())},
            "latents": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "other": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        }
    ).encode()
    return struct.pack("<Q", len(header)) + header + b"\x00" * 24


UNREADABLE["tensor bigger than the file"] = lying_offsets()
UNREADABLE["overlapping tensors"] = overlapping_offsets()


@pytest.mark.parametrize("name", UNREADABLE)
def test_unreadable_bytes_decode_to_none_with_one_log_line(name, caplog, tmp_path):
    with caplog.at_level(logging.WARNING, logger="ray.serve.reelserve.storage"):
        assert codec.decode(UNREADABLE[name], where="artifacts/x/1/video_latents.safetensors") is None
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1
    assert lines[0].startswith("artifacts/x/1/video_latents.safetensors is unreadable (")
    assert lines[0].endswith("treating it as missing")


def test_a_pickle_payload_is_never_run(tmp_path):
    marker = Path("/tmp/reelserve-codec-pwned")
    marker.unlink(missing_ok=True)
    for data in (PICKLE_PAYLOAD, UNREADABLE["pickle behind a length"]):
        assert codec.decode(data) is None
        assert codec.decode(data, VideoLatents) is None
    assert not marker.exists()


def test_a_valid_object_of_another_type_is_none():
    assert codec.decode(VALID, AudioLatents) is None
    assert codec.decode(VALID, VideoLatents) is not None


def test_decoding_non_bytes_is_none():
    assert codec.decode("a string") is None  # type: ignore[arg-type]
    assert codec.decode(memoryview(VALID), VideoLatents) is not None
