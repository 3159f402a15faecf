"""Photo checks before any decode, and decodes bounded by memory instead of by threads.

``check_photo`` reads only headers: the format from the first bytes (JPEG, PNG and WebP
are accepted; TIFF, BMP, GIF, HEIF/AVIF and others are refused by name), the size from
PNG's IHDR, WebP's VP8/VP8L/VP8X header or JPEG's frame header (found by jumping from
segment to segment). So a PNG whose header claims 50,000 x 50,000 is refused in
microseconds and no pixel is ever decoded.

``DecodeBudget`` admits a decode only while the estimated memory of the decodes in
flight stays under a budget (first come, first served, so a large photo is not starved
by small ones). The estimate per pixel was measured on Pillow 13 through
``serving.media.load_photo`` (decode, orientation, RGB conversion): about 12 bytes
for JPEG and PNG, 20 for WebP.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from dataclasses import dataclass

from PIL import Image

from serving.errors import InvalidRequest, Overloaded

__all__ = [
    "ALLOWED_PHOTO_FORMATS",
    "DECODE_BYTES_PER_PIXEL",
    "PhotoHeader",
    "sniff_photo",
    "check_photo",
    "DecodeBudget",
    "decode_photo",
]

ALLOWED_PHOTO_FORMATS = ("JPEG", "PNG", "WEBP")
_ALLOWED = "allowed: JPEG, PNG, WebP"
# Peak bytes per pixel of load_photo (measured: 6000x4000, Pillow 13): width x height x 4 x 3 (JPEG, PNG), x 5 (WebP).
DECODE_BYTES_PER_PIXEL = {"JPEG": 12, "PNG": 12, "WEBP": 20}
_JPEG_FRAME_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_REFUSED_MAGIC = (  # formats Pillow would open but we do not take: named in the refusal
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "PSD"), (b"\xff\x0a", "JPEG XL"), (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
    (b"%PDF", "PDF"), (b"\x97JB2", "JBIG2"), (b"qoif", "QOI"),
)


@dataclass(frozen=True)
class PhotoHeader:
    format: str  # JPEG | PNG | WEBP
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def sniff_photo(data: bytes | memoryview, field: str = "image") -> PhotoHeader:
    """Format and size from the headers alone; ``InvalidRequest`` naming ``field`` for anything else."""
    head = bytes(data[:32])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png(head, field)
    if head.startswith(b"\xff\xd8\xff"):
        return _jpeg(data, field)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _webp(head, field)
    if head[4:8] == b"ftyp":
        raise InvalidRequest(field, f"HEIF/AVIF images are not accepted; {_ALLOWED}")
    for magic, name in _REFUSED_MAGIC:
        if head.startswith(magic):
            raise InvalidRequest(field, f"{name} images are not accepted; {_ALLOWED}")
    raise InvalidRequest(field, f"not a JPEG, PNG or WebP image; {_ALLOWED}")


def check_photo(data: bytes | memoryview, *, max_bytes: int, max_pixels: int, min_side: int = 2,
                field: str = "image") -> PhotoHeader:
    """Byte cap, format and pixel caps, all before any decode."""
    if len(data) == 0:
        raise InvalidRequest(field, f"the file is empty; send a photo ({_ALLOWED})")
    if len(data) > max_bytes:
        raise InvalidRequest(field, f"the file is {len(data)} bytes; at most {max_bytes} bytes are allowed")
    header = sniff_photo(data, field)
    if header.pixels > max_pixels:
        raise InvalidRequest(
            field, f"the image is {header.width}x{header.height} ({header.pixels} pixels); at most {max_pixels} pixels are allowed"
        )
    if min(header.width, header.height) < min_side:
        raise InvalidRequest(field, f"the image is {header.width}x{header.height}; it must be at least {min_side}x{min_side} pixels")
    return header


def _png(head: bytes, field: str) -> PhotoHeader:
    if len(head) < 24 or head[12:16] != b"IHDR":
        raise InvalidRequest(field, "the PNG header is truncated or corrupt")
    return PhotoHeader("PNG", int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big"))


def _webp(head: bytes, field: str) -> PhotoHeader:
    chunk = head[12:16]
    if chunk == b"VP8 " and len(head) >= 30 and head[23:26] == b"\x9d\x01\x2a":
        width, height = int.from_bytes(head[26:28], "little") & 0x3FFF, int.from_bytes(head[28:30], "little") & 0x3FFF
    elif chunk == b"VP8L" and len(head) >= 25 and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    elif chunk == b"VP8X" and len(head) >= 30:
        width, height = int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    else:
        raise InvalidRequest(field, "the WebP header is truncated or corrupt")
    return PhotoHeader("WEBP", width, height)


def _jpeg(data: bytes | memoryview, field: str) -> PhotoHeader:
    """Walk the segments (each names its length) to the frame header, reading 4 bytes per segment."""
    position, end = 2, len(data)
    while position + 4 <= end:
        if data[position] != 0xFF:
            break
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            position += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or pixels before any frame header
            break
        length = int.from_bytes(bytes(data[position + 2:position + 4]), "big")
        if length < 2:
            break
        if marker in _JPEG_FRAME_MARKERS and position + 9 <= end:
            height = int.from_bytes(bytes(data[position + 5:position + 7]), "big")
            width = int.from_bytes(bytes(data[position + 7:position + 9]), "big")
            return PhotoHeader("JPEG", width, height)
        position += 2 + length
    raise InvalidRequest(field, "the JPEG has no readable frame header (truncated or corrupt)")


# ------------------------------------------------------------------ decodes bounded by memory


class DecodeBudget:
    """Admits decodes while their estimated memory fits ``budget_bytes`` (one per event loop: an ingress replica)."""

    def __init__(self, budget_bytes: int, max_waiting: int | None = None, retry_after_s: int = 2):
        if budget_bytes < 1:
            raise ValueError(f"budget_bytes: {budget_bytes}; must be at least 1")
        self.budget_bytes = budget_bytes
        self.max_waiting = max_waiting
        self.retry_after_s = retry_after_s
        self.in_use_bytes = 0
        self.peak_bytes = 0  # the most ever admitted at once (for tests and metrics)
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    @staticmethod
    def estimate(header: PhotoHeader) -> int:
        """Peak bytes a decode of this photo takes (its pixels x the measured bytes per pixel of its format)."""
        return header.pixels * DECODE_BYTES_PER_PIXEL[header.format]

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def reserve(self, nbytes: int) -> AsyncIterator[None]:
        """Hold ``nbytes`` of the budget for the block (a decode larger than the budget runs alone)."""
        nbytes = min(nbytes, self.budget_bytes)
        if not self._waiters and self.in_use_bytes + nbytes <= self.budget_bytes:
            self._take(nbytes)
        else:
            if self.max_waiting is not None and len(self._waiters) >= self.max_waiting:
                raise Overloaded("too many photos are waiting to be decoded; retry shortly", self.retry_after_s)
            granted = asyncio.get_running_loop().create_future()
            self._waiters.append((nbytes, granted))
            try:
                await granted
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():
                    self._give_back(nbytes)  # granted just as we were cancelled
                else:
                    try:
                        self._waiters.remove((nbytes, granted))
                    except ValueError:
                        pass  # already dropped from the head by _wake
                    self._wake()
                raise
        try:
            yield
        finally:
            self._give_back(nbytes)

    def _take(self, nbytes: int) -> None:
        self.in_use_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.in_use_bytes)

    def _give_back(self, nbytes: int) -> None:
        self.in_use_bytes -= nbytes
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_use_bytes + self._waiters[0][0] <= self.budget_bytes:
            nbytes, granted = self._waiters.popleft()
            if granted.done():  # cancelled while waiting
                continue
            self._take(nbytes)
            granted.set_result(None)


async def decode_photo(data: bytes, budget: DecodeBudget, *, max_bytes: int, max_pixels: int, field: str = "image",
                       executor: Executor | None = None) -> Image.Image:
    """Check the headers, wait for room in the budget, then decode to RGB in a thread (``serving.media.load_photo``)."""
    from serving.media import load_photo  # noqa: PLC0415 - serving.media brings torch; the header checks here need none

    header = check_photo(data, max_bytes=max_bytes, max_pixels=max_pixels, field=field)
    async with budget.reserve(budget.estimate(header)):
        return await asyncio.get_running_loop().run_in_executor(executor, load_photo, data, field)
