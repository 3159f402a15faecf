"""Photo checks on headers only, and decodes bounded by a memory budget."""

from __future__ import annotations

import asyncio
import io
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from serving.errors import InvalidRequest, Overloaded
from serving.ingress.photo_limits import DecodeBudget, PhotoHeader, check_photo, decode_photo, sniff_photo
from tests.conftest import png_with_claimed_size

CAPS = {"max_bytes": 25 * 1024 * 1024, "max_pixels": 50_000_000}


def _encode(size: tuple[int, int], fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (120, 60, 200)).save(buffer, format=fmt, **options)
    return buffer.getvalue()


ENCODINGS = {
    "JPEG": {"format": "JPEG", "quality": 85},
    "JPEG-progressive": {"format": "JPEG", "progressive": True},
    "PNG": {"format": "PNG"},
    "WEBP-lossy": {"format": "WEBP"},
    "WEBP-lossless": {"format": "WEBP", "lossless": True},
    "WEBP-extended": {"format": "WEBP", "exif": b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x00\x00"},
}


@settings(max_examples=60, deadline=None)
@given(width=st.integers(1, 700), height=st.integers(1, 700), encoding=st.sampled_from(sorted(ENCODINGS)))
def test_header_sizes_agree_with_pillow_for_every_accepted_encoding(width, height, encoding):
    options = dict(ENCODINGS[encoding])
    data = _encode((width, height), options.pop("format"), **options)
    header = sniff_photo(data)
    with Image.open(io.BytesIO(data)) as image:
        assert (header.format, header.width, header.height) == (image.format, width, height)


def test_the_webp_variants_really_are_the_three_header_kinds():
    chunks = {name: _encode((20, 10), o["format"], **{k: v for k, v in o.items() if k != "format"})[12:16]
              for name, o in ENCODINGS.items() if name.startswith("WEBP")}
    assert chunks == {"WEBP-lossy": b"VP8 ", "WEBP-lossless": b"VP8L", "WEBP-extended": b"VP8X"}


def test_a_jpeg_with_large_metadata_before_its_frame_header_is_read_by_jumping_segments():
    jpeg = _encode((321, 123), "JPEG")
    app_segment = b"\xff\xe1" + struct.pack(">H", 60_002) + b"Exif\x00\x00" + b"\x00" * 59_994
    comment = b"\xff\xfe" + struct.pack(">H", 30_002) + b"c" * 30_000
    data = jpeg[:2] + app_segment + b"\xff\xff" + comment + jpeg[2:]  # a fill byte too
    assert sniff_photo(data) == PhotoHeader("JPEG", 321, 123)
    with pytest.raises(InvalidRequest, match="the JPEG has no readable frame header"):
        sniff_photo(data[:40_000])


@pytest.mark.parametrize("fmt, name", [("GIF", "GIF"), ("BMP", "BMP"), ("TIFF", "TIFF"), ("ICO", "ICO"), ("PDF", "PDF")])
def test_formats_pillow_would_open_are_refused_by_name(fmt, name):
    data = _encode((32, 32), fmt)
    with pytest.raises(InvalidRequest) as caught:
        check_photo(data, **CAPS)
    assert str(caught.value) == f"image: {name} images are not accepted; allowed: JPEG, PNG, WebP"


def test_heif_and_unknown_bytes_are_refused():
    with pytest.raises(InvalidRequest, match="HEIF/AVIF images are not accepted; allowed: JPEG, PNG, WebP"):
        sniff_photo(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 20)
    with pytest.raises(InvalidRequest, match="^input_reference: not a JPEG, PNG or WebP image"):
        sniff_photo(b"<svg xmlns='http://www.w3.org/2000/svg'/>", field="input_reference")
    with pytest.raises(InvalidRequest, match="the PNG header is truncated or corrupt"):
        sniff_photo(b"\x89PNG\r\n\x1a\n\x00\x00")


def _claimed_jpeg(width: int, height: int) -> bytes:
    data = bytearray(_encode((8, 8), "JPEG"))
    frame = data.index(b"\xff\xc0")
    data[frame + 5:frame + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _claimed_webp(width: int, height: int) -> bytes:
    data = bytearray(_encode((8, 8), "WEBP", exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x00\x00"))
    data[24:27], data[27:30] = (width - 1).to_bytes(3, "little"), (height - 1).to_bytes(3, "little")
    return bytes(data)


@pytest.mark.parametrize("bomb", [png_with_claimed_size(50_000, 50_000), _claimed_jpeg(60_000, 60_000),
                                  _claimed_webp(16_000, 16_000)])
def test_a_header_claiming_billions_of_pixels_is_refused_without_decoding(bomb):
    started = time.perf_counter()
    with pytest.raises(InvalidRequest, match=r"the image is \d+x\d+ \(\d+ pixels\); at most 50000000 pixels"):
        check_photo(bomb, **CAPS)
    assert time.perf_counter() - started < 0.01


def test_byte_cap_empty_and_tiny_photos_are_refused_naming_the_field():
    with pytest.raises(InvalidRequest, match="^image: the file is 2001 bytes; at most 2000 bytes are allowed"):
        check_photo(b"\xff\xd8\xff" + b"\x00" * 1998, max_bytes=2000, max_pixels=100)
    with pytest.raises(InvalidRequest, match="the file is empty"):
        check_photo(b"", **CAPS)
    with pytest.raises(InvalidRequest, match="the image is 1x5; it must be at least 2x2 pixels"):
        check_photo(_encode((1, 5), "PNG"), **CAPS)
    assert check_photo(memoryview(_encode((64, 48), "PNG")), **CAPS) == PhotoHeader("PNG", 64, 48)


# ------------------------------------------------------------------ the decode budget


@pytest.fixture(scope="module")
def photo_1500x1000() -> bytes:
    return _encode((1500, 1000), "JPEG")


def test_decodes_never_hold_more_than_the_budget_and_all_finish(photo_1500x1000):
    estimate = DecodeBudget.estimate(sniff_photo(photo_1500x1000))
    assert estimate == 1500 * 1000 * 12
    budget = DecodeBudget(budget_bytes=3 * estimate)

    async def burst():
        return await asyncio.gather(*(decode_photo(photo_1500x1000, budget, **CAPS) for _ in range(40)))

    images = asyncio.run(burst())
    assert len(images) == 40 and all(image.size == (1500, 1000) and image.mode == "RGB" for image in images)
    assert budget.peak_bytes == 3 * estimate and budget.in_use_bytes == 0 and budget.waiting == 0


def test_the_budget_is_first_come_first_served_so_a_large_photo_is_not_starved():
    order = []

    async def use(budget, name, nbytes, hold_s):
        async with budget.reserve(nbytes):
            order.append(name)
            await asyncio.sleep(hold_s)

    async def run():
        budget = DecodeBudget(budget_bytes=100)
        first = asyncio.create_task(use(budget, "small-1", 60, 0.05))
        await asyncio.sleep(0)
        tasks = [asyncio.create_task(use(budget, "large", 100, 0.01))]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(use(budget, f"small-{i}", 30, 0.01)) for i in (2, 3)]
        await asyncio.gather(first, *tasks)
        return budget

    budget = asyncio.run(run())
    assert order == ["small-1", "large", "small-2", "small-3"]  # small-2 would have fit beside small-1, but waits its turn
    assert budget.peak_bytes == 100 and budget.in_use_bytes == 0


def test_a_cancelled_waiter_gives_its_place_back_and_a_full_queue_answers_429():
    async def run():
        budget = DecodeBudget(budget_bytes=10, max_waiting=1)
        hold = asyncio.Event()

        async def holder():
            async with budget.reserve(10):
                await hold.wait()

        async def waiter():
            async with budget.reserve(5):
                return "ran"

        first = asyncio.create_task(holder())
        await asyncio.sleep(0)
        cancelled = asyncio.create_task(waiter())
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="too many photos are waiting to be decoded"):
            async with budget.reserve(5):
                pass
        cancelled.cancel()
        await asyncio.sleep(0)
        assert budget.waiting == 0
        later = asyncio.create_task(waiter())
        await asyncio.sleep(0)
        hold.set()
        assert await later == "ran"
        await first
        return budget

    budget = asyncio.run(run())
    assert budget.in_use_bytes == 0 and budget.peak_bytes == 10


def test_a_photo_larger_than_the_budget_runs_alone_instead_of_never():
    async def run():
        budget = DecodeBudget(budget_bytes=10)
        async with budget.reserve(50):
            return budget.in_use_bytes

    assert asyncio.run(run()) == 10


def test_a_refused_photo_takes_no_budget(photos):
    budget = DecodeBudget(budget_bytes=1000)
    with pytest.raises(InvalidRequest, match="at most 50000000 pixels"):
        asyncio.run(decode_photo(photos.bomb_png, budget, **CAPS))
    assert budget.peak_bytes == 0
