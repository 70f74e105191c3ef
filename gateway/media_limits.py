"""Multimodal parts of a chat, checked before the engine loads them.

vLLM reads media from the content parts of `messages`: `image_url`, `input_image`,
`audio_url`, `video_url` (a URL each), `input_audio` (inline base64) and the `*_embeds` parts
(inline base64 tensors). A URL is `data:` (inline), http(s) (the engine fetches it itself, from
inside the pod: a client could make it call addresses on the pod's network), or `file:` (the
engine's own disk, behind --allowed-local-media-path).

- crash class: `file:` and any scheme but data: and http(s), always; http(s) unless
  `limits.remote_media` opens it (to an allow-list of hosts, or to any); an inline image with a
  side under `min_image_side` (a 1x1 image crashed vLLM, CVE-2026-22773);
- cost class: media parts per request, decoded bytes of one inline item, an inline image's
  sides and pixels.

Image dimensions come from the image's header (Pillow's `Image.open`, which reads the header
and decodes no pixels), from the first `HEADER_BYTES` of the data first. Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

from PIL import Image, UnidentifiedImageError

from gateway.config import Limits, RemoteMedia
from gateway.limit_names import Finding, Limit

URL_PARTS: Mapping[str, str] = {
    "image_url": "image_url",
    "input_image": "image_url",
    "audio_url": "audio_url",
    "video_url": "video_url",
}
"""Part type -> the key that holds its URL (an object with `url`, or the URL itself)."""
INLINE_PARTS = ("input_audio", "image_embeds", "audio_embeds", "video_embeds")
"""Part types whose media is inline base64 (in the key of the same name)."""
IMAGE_PARTS = frozenset({"image_url", "input_image"})

HEADER_BYTES = 65536
"""Decoded bytes of an inline image read first for its header (a JPEG's size can follow
large metadata: past this, the whole image is decoded from base64, never its pixels)."""
_BOMB_PIXELS = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)


def has_media(messages: object) -> bool:
    """Whether any message has a list of content parts (only those can carry media)."""
    if not isinstance(messages, list):
        return False
    return any(isinstance(m, dict) and isinstance(m.get("content"), list) for m in messages)


def media_findings(messages: object, limits: Limits) -> Iterator[Finding]:
    """Findings about the media parts of `messages` (param `messages`)."""
    count = 0
    for index, part in _parts(messages):
        kind = part.get("type")
        if not isinstance(kind, str):
            continue
        if kind in URL_PARTS:
            count += 1
            holder = part.get(URL_PARTS[kind])
            url = holder.get("url") if isinstance(holder, Mapping) else holder
            if isinstance(url, str):
                yield from _url_findings(url, kind in IMAGE_PARTS, f"messages[{index}]", limits)
        elif kind in INLINE_PARTS:
            count += 1
            yield from _inline_findings(part.get(kind), f"messages[{index}]", limits)
        if count == limits.max_media_parts + 1:
            yield Finding(
                Limit.MAX_MEDIA_PARTS,
                "messages",
                f"The request has more than {limits.max_media_parts} image, audio or video "
                f"parts; this server accepts at most {limits.max_media_parts} for this model "
                "(its limits.max_media_parts policy).",
            )


def _parts(messages: object) -> Iterator[tuple[int, Mapping[str, Any]]]:
    if not isinstance(messages, list):
        return
    for index, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for part in content:
                if isinstance(part, Mapping):
                    yield index, part


def _url_findings(url: str, image: bool, where: str, limits: Limits) -> Iterator[Finding]:
    head = url[:16].lower()
    if head.startswith("data:"):
        yield from _data_url_findings(url, image, where, limits)
        return
    try:
        parts = urlsplit(url.strip())
        host = (parts.hostname or "").lower()
    except ValueError:
        parts, host = None, ""
    scheme = parts.scheme.lower() if parts is not None else ""
    if scheme in ("http", "https"):
        if limits.remote_media is RemoteMedia.ANY:
            return
        if limits.remote_media is RemoteMedia.ALLOW_LIST and host in limits.media_hosts:
            return
        allowed = (
            "only from " + ", ".join(sorted(limits.media_hosts))
            if limits.remote_media is RemoteMedia.ALLOW_LIST and limits.media_hosts
            else "none"
        )
        yield Finding(
            Limit.REMOTE_MEDIA,
            "messages",
            f"{where} asks the engine to fetch media from a URL; this server accepts remote "
            f"media {allowed} for this model (its limits.remote_media policy). Send the "
            "media inline as a data: URL.",
        )
        return
    yield Finding(
        Limit.MEDIA_SCHEME,
        "messages",
        f"{where} has a media URL of scheme {scheme[:20] or '(none)'!r}; this server "
        "accepts data: URLs (and http(s) where its policy allows them), never file: or "
        "other schemes.",
    )


def _data_url_findings(url: str, image: bool, where: str, limits: Limits) -> Iterator[Finding]:
    meta, sep, payload = url.partition(",")
    if not sep:
        return  # not a data URL the engine can read either: its own 400
    is_base64 = meta.lower().endswith(";base64")
    size = _decoded_size(payload) if is_base64 else len(payload)
    if size > limits.max_media_bytes:
        yield _too_big(where, size, limits)
        return
    if image:
        yield from _image_findings(payload, is_base64, where, limits)


def _inline_findings(value: object, where: str, limits: Limits) -> Iterator[Finding]:
    """`input_audio` ({"data": base64}) and the `*_embeds` parts (base64, or a map of it)."""
    if isinstance(value, Mapping):
        data = value.get("data")
        items = (
            [data] if isinstance(data, str) else [v for v in value.values() if isinstance(v, str)]
        )
    else:
        items = [value] if isinstance(value, str) else []
    for item in items:
        size = _decoded_size(item)
        if size > limits.max_media_bytes:
            yield _too_big(where, size, limits)
            return


def _decoded_size(payload: str) -> int:
    """Bytes that base64 text decodes to, without decoding it."""
    n = len(payload)
    return n * 3 // 4 - (2 if payload.endswith("==") else 1 if payload.endswith("=") else 0)


def _too_big(where: str, size: int, limits: Limits) -> Finding:
    return Finding(
        Limit.MAX_MEDIA_BYTES,
        "messages",
        f"{where} carries {size} bytes of inline media; this server accepts at most "
        f"{limits.max_media_bytes} per item for this model (its limits.max_media_bytes "
        "policy).",
    )


def _image_findings(payload: str, is_base64: bool, where: str, limits: Limits) -> Iterator[Finding]:
    size = _image_size(payload, is_base64)
    if size is None:
        return  # not an image Pillow knows: the engine answers for it
    width, height = size
    if width < 0:
        yield Finding(
            Limit.MAX_IMAGE_PIXELS,
            "messages",
            f"{where} has an image of more than {_BOMB_PIXELS} pixels; this server accepts at "
            f"most {limits.max_image_pixels} for this model (its limits.max_image_pixels "
            "policy).",
        )
        return
    if min(width, height) < limits.min_image_side:
        yield Finding(
            Limit.MIN_IMAGE_SIDE,
            "messages",
            f"{where} has an image of {width}x{height} pixels; this server accepts images of "
            f"at least {limits.min_image_side} pixels a side (a 1x1 image crashed vLLM; its "
            "limits.min_image_side policy).",
        )
    if max(width, height) > limits.max_image_side:
        yield Finding(
            Limit.MAX_IMAGE_SIDE,
            "messages",
            f"{where} has an image of {width}x{height} pixels; this server accepts at most "
            f"{limits.max_image_side} pixels a side for this model (its "
            "limits.max_image_side policy).",
        )
    elif width * height > limits.max_image_pixels:
        yield Finding(
            Limit.MAX_IMAGE_PIXELS,
            "messages",
            f"{where} has an image of {width}x{height} = {width * height} pixels; this server "
            f"accepts at most {limits.max_image_pixels} for this model (its "
            "limits.max_image_pixels policy).",
        )


def _image_size(payload: str, is_base64: bool) -> tuple[int, int] | None:
    """An inline image's (width, height) from its header; None when it is not an image."""
    if not is_base64:
        return _size_of(unquote_to_bytes(payload))
    head = payload[: HEADER_BYTES // 3 * 4]
    size = _size_of(_b64(head))
    if size is None and len(head) < len(payload):
        size = _size_of(_b64(payload))
    return size


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return b""


def _size_of(data: bytes) -> tuple[int, int] | None:
    if not data:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                return int(width), int(height)
        except Image.DecompressionBombError:
            return -1, -1  # past Pillow's own bound (twice its MAX_IMAGE_PIXELS)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            return None
