"""The request mix of a load test: shapes of requests with weights, from a YAML/JSON file.

```yaml
- name: small-i2v
  weight: 3
  size: 256x256
  seconds: 2
  photo: true             # the packaged sample photo; or a path to your own
  enhance_prompt: false   # unset: the server's default
- name: t2v
  weight: 1
  size: 384x256
  seconds: 1
  photo: false
  prompt: "a drone flies over a misty forest at dawn; wind and birdsong"
- name: omni-reference         # a MiniMax-H3 deployment: references in the order the model reads them
  model: minimax-h3
  size: 1344x768
  seconds: 5
  photo: false
  references:
    - {kind: image, path: refs/character.png}
    - {kind: audio, path: refs/voice.wav}
```

`reelserve loadtest --model ID` names the served model for every shape that names none.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from cluster.config import parse_size

__all__ = ["RequestShape", "ReferenceFile", "load_mix", "default_mix", "MixError", "SAMPLE_PHOTO", "pick"]

SAMPLE_PHOTO = Path(__file__).resolve().parents[1] / "assets" / "sample_photo.jpg"
DEFAULT_PROMPT = "The cat looks around, blinks and purrs softly; warm afternoon light, quiet room tone."


class MixError(ValueError):
    """The mix file is unreadable or invalid; the message names the entry and field."""


class ReferenceFile(BaseModel):
    """One reference file sent with each request of a shape."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["image", "video", "audio"] = Field(description="What the file is.")
    path: str = Field(description="The file to send.")


class RequestShape(BaseModel):
    """One kind of request in the mix."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Label of this shape in the report.")
    weight: float = Field(1.0, gt=0, description="Relative share of requests with this shape.")
    size: str | None = Field(None, description="WIDTHxHEIGHT; unset: the server's default size.")
    seconds: float | None = Field(None, gt=0, description="Clip length; unset: the server's default.")
    photo: bool | str = Field(True, description="Send a photo: true (the packaged sample), false, or a file path.")
    enhance_prompt: bool | None = Field(None, description="Ask for prompt rewriting; unset: the server's default.")
    prompt: str = Field(DEFAULT_PROMPT, min_length=1, description="The prompt sent.")
    model: str | None = Field(None, description="The served model id to ask for; unset: --model, else the server's.")
    last_frame: str | None = Field(None, description="An image file the video ends on (families with keyframes).")
    references: list[ReferenceFile] = Field(
        default_factory=list, description="Reference files in the order the model reads them (MiniMax-H3)."
    )

    @field_validator("size")
    @classmethod
    def _size_parses(cls, value: str | None) -> str | None:
        if value is not None:
            parse_size(value)
        return value

    @model_validator(mode="after")
    def _keyframes_or_references(self) -> RequestShape:
        if self.references and (self.photo is not False or self.last_frame):
            raise ValueError("references cannot be sent with a photo or a last frame (set photo: false)")
        return self

    def media_files(self) -> list[tuple[str, str, bytes]]:
        """``(field, kind, bytes)`` of the last frame and the references, in order (the photo apart)."""
        files = [("last_frame", "image", Path(self.last_frame).read_bytes())] if self.last_frame else []
        files += [(f"reference_{item.kind}s", item.kind, Path(item.path).read_bytes()) for item in self.references]
        return files

    def photo_bytes(self) -> bytes | None:
        if self.photo is False:
            return None
        path = SAMPLE_PHOTO if self.photo is True else Path(self.photo)
        return path.read_bytes()


def default_mix() -> list[RequestShape]:
    """Image-to-video at the server's default size and length, with the packaged photo."""
    return [RequestShape(name="default-i2v")]


def load_mix(path: str | Path) -> list[RequestShape]:
    path = Path(path)
    if not path.is_file():
        raise MixError(f"no such file '{path}'")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise MixError(f"'{path}' is not YAML/JSON: {str(error).splitlines()[0]}") from None
    if isinstance(data, dict) and "requests" in data:
        data = data["requests"]
    if not isinstance(data, list) or not data:
        raise MixError("the file must hold a non-empty list of request shapes (or {requests: [...]})")
    try:
        shapes = TypeAdapter(list[RequestShape]).validate_python(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise MixError(f"entry {where}: {first['msg']}") from None
    for shape in shapes:
        if isinstance(shape.photo, str) and not Path(shape.photo).is_file():
            raise MixError(f"entry {shape.name}: photo: no such file '{shape.photo}'")
        for field, name in [("last_frame", shape.last_frame)] + [("references", r.path) for r in shape.references]:
            if name is not None and not Path(name).is_file():
                raise MixError(f"entry {shape.name}: {field}: no such file '{name}'")
    names = [shape.name for shape in shapes]
    if len(names) != len(set(names)):
        raise MixError("entry names must be unique")
    return shapes


def pick(shapes: list[RequestShape], rng: random.Random) -> RequestShape:
    return rng.choices(shapes, weights=[shape.weight for shape in shapes], k=1)[0]
