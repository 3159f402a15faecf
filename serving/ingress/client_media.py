"""The files a create request carries (first frame, last frame, references) in every form clients send them.

- JSON: a ``data:`` URL (base64), an ``http(s)`` URL, or OpenAI's later shape
  ``{"image_url": "..."}`` / ``{"image_url": {"url": "..."}}``; references as
  ``[{"type": "image"|"video"|"audio", "url": "..."}]``.
- multipart: file parts ``input_reference``, ``last_frame`` and repeated
  ``reference_images``, ``reference_videos``, ``reference_audios``.
- gRPC: bytes.

A ``data:`` URL is decoded here (its size is bounded by the body limit). Any
other URL is fetched only from hosts the config allows
(``references.allowed_url_prefixes``, empty by default), never from a private
address unless allowed, within a size and time limit. What a file *is* (its
format, pixels, duration) the family checks on the header afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from dataclasses import dataclass, replace
from typing import Any

import httpx

from cluster.config import ReferencesConfig
from serving.errors import InvalidRequest
from serving.families.base import MEDIA_ROLES, MediaInput
from serving.tenancy.webhooks import check_url_prefix, is_public_address, pinned_url, resolve_addresses

__all__ = ["ClientMedia", "MediaFetcher", "REFERENCE_FILE_FIELDS", "json_media", "json_references"]

_KIND_ROLES = {"image": "reference_image", "video": "reference_video", "audio": "reference_audio"}
# multipart file fields of references, each repeated as often as the client has files of that kind
REFERENCE_FILE_FIELDS = {"reference_images": "reference_image", "reference_videos": "reference_video",
                         "reference_audios": "reference_audio"}
_DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.ASCII)
_MAX_URL_CHARS = 2048


@dataclass(frozen=True)
class ClientMedia:
    """One file as the client sent it: its bytes, or a URL still to fetch."""

    field: str  # as the client named it: input_reference, last_frame, references[2]
    role: str  # one of MEDIA_ROLES
    data: bytes | None = None
    url: str | None = None

    def as_input(self) -> MediaInput:
        assert self.data is not None, "fetch URLs first"
        return MediaInput(self.field, self.role, self.data)


def json_media(value: Any, field: str, role: str) -> ClientMedia:
    """A file in JSON: a URL string, ``{"image_url": URL}``, ``{"image_url": {"url": URL}}`` or ``{"url": URL}``."""
    url = value
    if isinstance(value, dict):
        keys = [key for key in ("image_url", "video_url", "audio_url", "url") if key in value]
        if len(keys) != 1 or set(value) - {keys[0], "detail"}:
            raise InvalidRequest(field, 'must be a URL, {"image_url": URL} or {"image_url": {"url": URL}}')
        url = value[keys[0]]
        if isinstance(url, dict):
            url = url.get("url")
    if not isinstance(url, str) or not url:
        raise InvalidRequest(field, "must be a data: URL (base64) or an http(s) URL")
    return _media_of_url(url, field, role)


def json_references(value: Any, field: str = "references") -> list[ClientMedia]:
    """``[{"type": "image"|"video"|"audio", "url": URL}, ...]`` in the order the model reads them."""
    if not isinstance(value, list):
        raise InvalidRequest(field, 'must be a list of {"type": "image"|"video"|"audio", "url": "data:...;base64,..."}')
    media = []
    for index, item in enumerate(value):
        item_field = f"{field}[{index}]"
        if not isinstance(item, dict) or set(item) - {"type", "url"} or "type" not in item or "url" not in item:
            raise InvalidRequest(item_field, 'must be {"type": "image"|"video"|"audio", "url": URL}')
        role = _KIND_ROLES.get(item["type"]) if isinstance(item["type"], str) else None
        if role is None:
            raise InvalidRequest(f"{item_field}.type", f"'{item['type']}' is not a reference type; allowed: image, "
                                                       "video, audio")
        media.append(json_media(item["url"], item_field, role))
    return media


def _media_of_url(url: str, field: str, role: str) -> ClientMedia:
    if role not in MEDIA_ROLES:
        raise InvalidRequest(field, f"unknown role '{role}'; allowed: {', '.join(MEDIA_ROLES)}")
    if url.startswith("data:"):
        return ClientMedia(field, role, data=decode_data_url(url, field))
    if len(url) > _MAX_URL_CHARS or not url.isascii() or not url.isprintable() or "\\" in url or " " in url:
        raise InvalidRequest(field, f"must be a data: URL or an http(s) URL of printable ASCII, at most "
                                    f"{_MAX_URL_CHARS} characters")
    if not url.startswith(("https://", "http://")):
        raise InvalidRequest(field, "must be a data: URL (base64) or an http(s) URL")
    return ClientMedia(field, role, url=url)


def decode_data_url(url: str, field: str) -> bytes:
    """The bytes of a ``data:[type];base64,...`` URL; anything else is a 400 naming ``field``."""
    match = _DATA_URL.match(url)
    if match is None or not match.group("b64"):
        raise InvalidRequest(field, "a data: URL must be base64: data:<type>;base64,<data>")
    try:
        data = base64.b64decode(url[match.end():], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(field, "the data: URL's base64 does not decode") from None
    if not data:
        raise InvalidRequest(field, "the data: URL holds no bytes")
    return data


class MediaFetcher:
    """Fetches a request's URL media from allowed hosts, within the config's size and time limits."""

    def __init__(self, config: ReferencesConfig):
        self.config = config

    async def fetch_all(self, media: list[ClientMedia]) -> list[ClientMedia]:
        """Every URL of one request, within one time limit and one byte budget for all of them together."""
        fetched, budget = [], self.config.max_fetch_bytes
        try:
            async with asyncio.timeout(self.config.fetch_timeout_s):
                for item in media:
                    if item.data is None:
                        item = await self.fetch(item, budget)
                        budget -= len(item.data or b"")
                    fetched.append(item)
        except TimeoutError:
            field = next((item.field for item in media if item.data is None), "references")
            raise InvalidRequest(field, f"fetching the request's URLs took over {self.config.fetch_timeout_s:g} s "
                                        "(references.fetch_timeout_s)") from None
        return fetched

    async def fetch(self, item: ClientMedia, budget: int | None = None) -> ClientMedia:
        """One URL's bytes, at most ``budget`` (default: ``references.max_fetch_bytes``)."""
        config, url, field = self.config, item.url or "", item.field
        if not config.allowed_url_prefixes:
            raise InvalidRequest(field, "this server fetches no URLs (references.allowed_url_prefixes is empty); "
                                        "send the file as a data: URL or a file upload")
        check_url_prefix(url, config.allowed_url_prefixes, field)
        headers: dict = {}
        extensions: dict = {}
        target = url
        if config.refuse_private_addresses:
            target, headers, extensions = await self._pinned_public(url, field)
        limit = config.max_fetch_bytes if budget is None else budget
        try:  # the whole fetch, however slowly the server sends (httpx's timeout bounds each read)
            data = await asyncio.wait_for(self._download(target, headers, extensions, field, limit),
                                          timeout=config.fetch_timeout_s)
        except asyncio.TimeoutError:
            raise InvalidRequest(field, f"fetching the URL took over {config.fetch_timeout_s:g} s "
                                        "(references.fetch_timeout_s)") from None
        return replace(item, data=data, url=None)

    async def _pinned_public(self, url: str, field: str) -> tuple[str, dict, dict]:
        parts = httpx.URL(url)
        try:
            addresses = await resolve_addresses(parts.host, parts.port or (443 if parts.scheme == "https" else 80))
        except OSError:
            raise InvalidRequest(field, f"the host '{parts.host}' does not resolve") from None
        if not addresses or not all(is_public_address(address) for address in addresses):
            raise InvalidRequest(field, "the URL's host resolves to a private or otherwise non-public address")
        return pinned_url(url, addresses[0])

    async def _download(self, url: str, headers: dict, extensions: dict, field: str, limit: int) -> bytes:
        try:
            async with httpx.AsyncClient(timeout=self.config.fetch_timeout_s, follow_redirects=False,
                                         trust_env=False) as client:  # no proxy around the pinned address
                async with client.stream("GET", url, headers=headers, extensions=extensions) as response:
                    if response.status_code != 200:
                        raise InvalidRequest(field, f"fetching the URL answered HTTP {response.status_code}")
                    chunks, size = [], 0
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > limit:
                            raise InvalidRequest(field, f"the request's files from URLs are over "
                                                        f"{self.config.max_fetch_bytes} bytes in all "
                                                        "(references.max_fetch_bytes)")
                        chunks.append(chunk)
        except httpx.TimeoutException:
            raise InvalidRequest(field, f"fetching the URL took over {self.config.fetch_timeout_s:g} s "
                                        "(references.fetch_timeout_s)") from None
        except httpx.HTTPError as error:
            raise InvalidRequest(field, f"the URL could not be fetched ({type(error).__name__})") from None
        return b"".join(chunks)
