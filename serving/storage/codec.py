"""Hand-offs and checkpoints as bytes and back, without pickle: one safetensors file per object.

The arrays (``HostTensor``, numpy arrays, ``bytes`` as uint8) are the file's
tensors; everything else is JSON in the file's ``__metadata__``, so a kept
object is one key, written atomically, and readable by any safetensors tool.

Only types registered here can be written or read back, and the type name in
the file is only ever looked up in the registry (nothing is imported by name).
``serving.protocol``'s hand-off types are registered below; a family registers
its own checkpoint type (``codec.register(Guidance)``, then
``codec.register(DenoiseCheckpoint)``): this module imports no family.

A registered type is a frozen dataclass whose fields are, by annotation:
``HostTensor``, ``np.ndarray``, ``bytes``, ``str``, ``int``, ``float``,
``bool``, ``None``, ``tuple[...]``, ``list[...]``, ``dict[str, ...]``,
unions of those, or another registered dataclass. Registration checks every
annotation, so an unsupported field fails at import time, not at the first write.

``decode`` checks everything against the annotations: the type name, every
field present with the right kind, each array's recorded dtype and shape, no
tensor left unexplained. Bytes that do not parse (truncated, foreign, a
safetensors header lying about sizes, bad JSON, a pickle) decode to ``None``
with one log line naming what was unreadable: the caller treats the object as
missing and redoes the work.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import struct
import types
import typing
from typing import Any, TypeVar

import numpy as np
import safetensors
import safetensors.numpy

from serving import protocol
from serving.protocol import HostTensor

__all__ = ["FORMAT", "Codec", "codec", "decode", "encode", "register"]

logger = logging.getLogger("ray.serve.reelserve.storage")

T = TypeVar("T")
FORMAT = "reelserve.codec/1"
_METADATA_KEY = "reelserve"
_MAX_HEADER = 16 << 20  # JSON + tensor table; our objects need a few kB

# torch dtype name -> the numpy dtype HostTensor keeps it in (16-bit floats travel as their int16 bits).
_HOST_DTYPES = {
    "float64": np.dtype("float64"),
    "float32": np.dtype("float32"),
    "float16": np.dtype("int16"),
    "bfloat16": np.dtype("int16"),
    "int64": np.dtype("int64"),
    "int32": np.dtype("int32"),
    "int16": np.dtype("int16"),
    "int8": np.dtype("int8"),
    "uint8": np.dtype("uint8"),
    "bool": np.dtype("bool"),
}
# What safetensors can hold (numpy side), by the name we record.
_ARRAY_DTYPES = {
    name: np.dtype(name)
    for name in ("float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool")
}
_SCALARS = (str, int, float, bool, type(None))


class _Unreadable(Exception):
    """Why stored bytes are not a valid object (internal: ``decode`` turns it into ``None``)."""


class Codec:
    """A registry of types and the encoder/decoder for them."""

    def __init__(self) -> None:
        self._by_name: dict[str, type] = {}
        self._names: dict[type, str] = {}
        self._fields: dict[type, dict[str, Any]] = {}

    # -- registry ---------------------------------------------------------------------------------

    def register(self, cls: type[T], name: str | None = None) -> type[T]:
        """Allow ``cls`` (a frozen dataclass) to be encoded and decoded, under ``name`` (default: its class name).

        The name is what the file records: keep it stable when the class moves.
        Nested dataclasses must be registered first. Returns ``cls`` (usable as a decorator).
        """
        name = name or cls.__name__
        if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            raise TypeError(f"{cls.__qualname__} is not a frozen dataclass")
        if self._names.get(cls) == name:
            return cls
        if name in self._by_name or cls in self._names:
            raise ValueError(f"{name!r} / {cls.__qualname__} is already registered")
        hints = typing.get_type_hints(cls)
        fields = {}
        for field in dataclasses.fields(cls):
            if not field.init:
                raise TypeError(f"{cls.__qualname__}.{field.name} is not an __init__ field")
            try:
                self._check_annotation(hints[field.name])
            except TypeError as error:
                raise TypeError(f"{cls.__qualname__}.{field.name}: {error}") from None
            fields[field.name] = hints[field.name]
        self._by_name[name] = cls
        self._names[cls] = name
        self._fields[cls] = fields
        return cls

    def registered(self) -> dict[str, type]:
        """Every registered name and its type."""
        return dict(self._by_name)

    def _check_annotation(self, annotation: Any) -> None:
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if annotation in (HostTensor, np.ndarray, bytes, *_SCALARS) or annotation is None:
            return
        if origin in (typing.Union, types.UnionType):
            for arg in args:
                self._check_annotation(arg)
        elif origin in (tuple, list) and args:
            for arg in args:
                if arg is not Ellipsis:
                    self._check_annotation(arg)
        elif origin is dict and len(args) == 2 and args[0] is str:
            self._check_annotation(args[1])
        elif isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
            if annotation not in self._names:
                raise TypeError(f"{annotation.__qualname__} must be registered first")
        else:
            raise TypeError(f"{annotation!r} cannot be stored (allowed: arrays, bytes, scalars, containers of them)")

    # -- encoding ---------------------------------------------------------------------------------

    def encode(self, value: Any) -> bytes:
        """``value`` (an instance of a registered type) as one safetensors file."""
        if type(value) not in self._names:
            raise TypeError(f"{type(value).__qualname__} is not registered with the codec")
        arrays: dict[str, np.ndarray] = {}
        tree = self._encode(value, type(value), "", arrays)
        document = json.dumps({"format": FORMAT, "value": tree}, separators=(",", ":"))
        return safetensors.numpy.save(arrays, metadata={_METADATA_KEY: document})

    def _encode(self, value: Any, annotation: Any, path: str, arrays: dict[str, np.ndarray]) -> Any:
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin in (typing.Union, types.UnionType):
            for arg in args:
                if _fits(value, arg):
                    return self._encode(value, arg, path, arrays)
            raise TypeError(f"{path or 'value'}: {type(value).__name__} is none of {annotation!r}")
        if not _fits(value, annotation):
            raise TypeError(f"{path or 'value'}: {type(value).__name__} is not {annotation!r}")
        if path in arrays:
            raise TypeError(f"{path}: two values would share this tensor name (a dict key with a dot?)")
        if annotation is HostTensor:
            _check_host(value.array, value.dtype, path)
            arrays[path] = value.array
            return {"$host": path, "dtype": value.dtype, "shape": list(value.array.shape)}
        if annotation is np.ndarray:
            if value.dtype.name not in _ARRAY_DTYPES:
                raise TypeError(f"{path}: arrays of {value.dtype} cannot be stored")
            arrays[path] = np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<"), copy=False)
            return {"$array": path, "dtype": value.dtype.name, "shape": list(value.shape)}
        if annotation is bytes:
            arrays[path] = np.frombuffer(value, dtype=np.uint8)
            return {"$bytes": path, "size": len(value)}
        if annotation in _SCALARS or annotation is None:
            return value
        if origin in (tuple, list):
            items = _item_annotations(annotation, len(value))
            return [self._encode(v, a, f"{path}.{i}", arrays) for i, (v, a) in enumerate(zip(value, items))]
        if origin is dict:
            if not all(type(k) is str for k in value):
                raise TypeError(f"{path}: dict keys must be str")
            return {k: self._encode(v, args[1], f"{path}.{k}", arrays) for k, v in value.items()}
        node = {"$type": self._names[annotation]}
        for name, field_annotation in self._fields[annotation].items():
            node[name] = self._encode(getattr(value, name), field_annotation, f"{path}.{name}".lstrip("."), arrays)
        return node

    # -- decoding ---------------------------------------------------------------------------------

    def decode(self, data: bytes | memoryview, expected: type[T] | None = None, where: str = "stored object") -> T | None:
        """The object ``data`` holds, or ``None`` (logged once, naming ``where``) when it does not parse
        as a registered type (``expected`` when given)."""
        try:
            document, arrays = _read_file(data)
            tree = document.get("value")
            if not isinstance(tree, dict) or tree.get("$type") not in self._by_name:
                raise _Unreadable(f"unknown type {_shown(tree.get('$type') if isinstance(tree, dict) else tree)}")
            cls = self._by_name[tree["$type"]]
            if expected is not None and cls is not expected:
                raise _Unreadable(f"holds a {tree['$type']}, not a {self._names.get(expected, expected.__name__)}")
            used: set[str] = set()
            value = self._decode(tree, cls, "", arrays, used)
            if used != arrays.keys():
                raise _Unreadable(f"unexplained tensors {sorted(arrays.keys() - used)[:3]}")
            return value
        except _Unreadable as error:
            logger.warning("%s is unreadable (%s); treating it as missing", where, error)
        except RecursionError:
            logger.warning("%s is unreadable (nested too deeply); treating it as missing", where)
        except Exception as error:  # noqa: BLE001 - whatever else the bytes provoke, they are not our object
            logger.warning("%s is unreadable (%s); treating it as missing", where, type(error).__name__)
        return None

    def _decode(self, node: Any, annotation: Any, path: str, arrays: dict, used: set) -> Any:
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin in (typing.Union, types.UnionType):
            for arg in args:
                if _shaped_like(node, arg, self._names):
                    return self._decode(node, arg, path, arrays, used)
            raise _Unreadable(f"{path or 'value'} is none of {annotation!r}")
        if annotation is HostTensor:
            array = _tensor(node, "$host", arrays, used, path)
            if node.get("dtype") not in _HOST_DTYPES:
                raise _Unreadable(f"{path}: unknown tensor dtype {_shown(node.get('dtype'))}")
            _expect(array.dtype == _HOST_DTYPES[node["dtype"]], f"{path}: {array.dtype} does not hold {node['dtype']}")
            return HostTensor(array=array, dtype=node["dtype"])
        if annotation is np.ndarray:
            array = _tensor(node, "$array", arrays, used, path)
            _expect(_ARRAY_DTYPES.get(node.get("dtype")) == array.dtype, f"{path}: dtype is not the recorded one")
            return array
        if annotation is bytes:
            array = _tensor(node, "$bytes", arrays, used, path)
            _expect(array.dtype == np.uint8 and array.ndim == 1, f"{path}: not a byte string")
            return array.tobytes()
        if annotation is float:
            _expect(type(node) in (int, float), f"{path}: not a number")
            return float(node)
        if annotation in _SCALARS or annotation is None:
            _expect(type(node) is (annotation or type(None)), f"{path}: expected {getattr(annotation, '__name__', None)}")
            return node
        if origin in (tuple, list):
            _expect(type(node) is list, f"{path}: not a list")
            items = _item_annotations(annotation, len(node), path)
            decoded = [self._decode(v, a, f"{path}.{i}", arrays, used) for i, (v, a) in enumerate(zip(node, items))]
            return tuple(decoded) if origin is tuple else decoded
        if origin is dict:
            _expect(type(node) is dict, f"{path}: not an object")
            return {k: self._decode(v, args[1], f"{path}.{k}", arrays, used) for k, v in node.items()}
        return self._decode_dataclass(node, annotation, path, arrays, used)

    def _decode_dataclass(self, node: Any, cls: type, path: str, arrays: dict, used: set) -> Any:
        _expect(type(node) is dict and node.get("$type") == self._names[cls], f"{path or 'value'}: not a {cls.__name__}")
        fields = self._fields[cls]
        extra = node.keys() - fields.keys() - {"$type"}
        _expect(not extra, f"{path or cls.__name__}: unknown fields {sorted(extra)[:3]}")
        values = {}
        for name, annotation in fields.items():
            _expect(name in node, f"{path or cls.__name__}: field {name!r} is missing")
            values[name] = self._decode(node[name], annotation, f"{path}.{name}".lstrip("."), arrays, used)
        return cls(**values)


def _read_file(data: bytes | memoryview) -> tuple[dict, dict[str, np.ndarray]]:
    """The JSON document and the arrays of a safetensors file; ``_Unreadable`` for anything else."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _Unreadable(f"not bytes but {type(data).__name__}")
    data = bytes(data)
    if len(data) < 8:
        raise _Unreadable(f"{len(data)} bytes: too short for a safetensors header")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > min(_MAX_HEADER, len(data) - 8):
        raise _Unreadable(f"the header claims {header_size} bytes of {len(data) - 8}")
    try:
        header = json.loads(data[8 : 8 + header_size])
        document = json.loads(header["__metadata__"][_METADATA_KEY])
    except (ValueError, KeyError, TypeError) as error:
        raise _Unreadable(f"no reelserve document in the header ({type(error).__name__})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise _Unreadable(f"format {_shown(document.get('format') if isinstance(document, dict) else None)}")
    try:  # the safetensors parser checks every offset, size and dtype against the buffer
        arrays = safetensors.numpy.load(data)
    except (safetensors.SafetensorError, ValueError, TypeError) as error:
        raise _Unreadable(f"bad tensor data ({_shown(str(error))})") from None
    return document, arrays


def _tensor(node: Any, tag: str, arrays: dict[str, np.ndarray], used: set[str], path: str) -> np.ndarray:
    _expect(type(node) is dict and type(node.get(tag)) is str, f"{path}: not a tensor reference")
    name = node[tag]
    _expect(name in arrays and name not in used, f"{path}: tensor {_shown(name)} is missing or used twice")
    array = arrays[name]
    if tag != "$bytes":
        _expect(node.get("shape") == list(array.shape), f"{path}: shape is not the recorded one")
    else:
        _expect(node.get("size") == array.size, f"{path}: size is not the recorded one")
    used.add(name)
    return array


def _check_host(array: Any, dtype: Any, path: str) -> None:
    if not isinstance(array, np.ndarray) or dtype not in _HOST_DTYPES or array.dtype != _HOST_DTYPES[dtype]:
        raise TypeError(f"{path}: HostTensor of {getattr(array, 'dtype', type(array))} cannot hold {dtype!r}")


def _fits(value: Any, annotation: Any) -> bool:
    """Whether ``value`` is of the kind ``annotation`` names (shallow: items are checked as they are encoded)."""
    origin = typing.get_origin(annotation)
    if annotation is None or annotation is type(None):
        return value is None
    if annotation is float:
        return type(value) in (int, float)
    if annotation in (str, int, bool, bytes):
        return type(value) is annotation
    if origin in (tuple, list, dict):
        return type(value) is origin
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(annotation))
    return type(value) is annotation


def _shaped_like(node: Any, annotation: Any, names: dict[type, str]) -> bool:
    """Whether a stored ``node`` could be of ``annotation`` (to pick the arm of a union)."""
    origin = typing.get_origin(annotation)
    if annotation is None or annotation is type(None):
        return node is None
    if annotation is HostTensor:
        return type(node) is dict and "$host" in node
    if annotation is np.ndarray:
        return type(node) is dict and "$array" in node
    if annotation is bytes:
        return type(node) is dict and "$bytes" in node
    if annotation is float:
        return type(node) in (int, float)
    if annotation in (str, int, bool):
        return type(node) is annotation
    if origin in (tuple, list):
        return type(node) is list
    if origin is dict:
        return type(node) is dict and not any(key.startswith("$") for key in node)
    return type(node) is dict and node.get("$type") == names.get(annotation)


def _item_annotations(annotation: Any, count: int, path: str | None = None) -> list[Any]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        if len(args) != count:
            message = f"{path}: {count} items where {len(args)} are expected"
            raise _Unreadable(message) if path is not None else TypeError(message)
        return list(args)
    return [args[0]] * count


def _expect(condition: bool, reason: str) -> None:
    if not condition:
        raise _Unreadable(reason)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


codec = Codec()
register = codec.register
encode = codec.encode
decode = codec.decode

for _type in (
    protocol.RenderPlan,
    protocol.TextEmbeddings,
    protocol.PromptEmbeddings,
    protocol.ImageCondition,
    protocol.VideoLatents,
    protocol.AudioLatents,
    protocol.DenoisedLatents,
    protocol.VideoFrames,
    protocol.EncodedVideo,
    protocol.Waveform,
):
    register(_type)
del _type
