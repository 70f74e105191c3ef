"""gateway.media_limits: URLs by scheme and host, inline sizes without decoding, image sides
from the header alone."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from typing import Any

import pytest
from PIL import Image

from gateway.config import Limits
from gateway.limit_names import Limit
from gateway.media_limits import media_findings


def messages(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(parts)}]


def data_url(fmt: str, width: int, height: int, mime: str) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, fmt)
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def png_header(width: int, height: int) -> bytes:
    """A PNG of that size with no pixel data at all: its signature, header and end chunks."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


ALLOW_LIST = Limits(remote_media="allow-list", remote_media_hosts=["cdn.example.com"])


@pytest.mark.parametrize(
    ("url", "limits", "limit"),
    [
        ("https://cdn.example.com/a.png", ALLOW_LIST, None),
        ("https://CDN.example.com:443/a.png", ALLOW_LIST, None),
        ("https://cdn.example.com@10.0.0.5/a.png", ALLOW_LIST, Limit.REMOTE_MEDIA),
        ("https://cdn.example.com.evil.org/a.png", ALLOW_LIST, Limit.REMOTE_MEDIA),
        ("http://127.0.0.1:8081/quarantine", Limits(), Limit.REMOTE_MEDIA),
        ("http://[::1]/", Limits(remote_media="any"), None),
        ("file:///etc/passwd", Limits(remote_media="any"), Limit.MEDIA_SCHEME),
        ("FILE:/etc/passwd", ALLOW_LIST, Limit.MEDIA_SCHEME),
        ("ftp://cdn.example.com/a.png", ALLOW_LIST, Limit.MEDIA_SCHEME),
        ("/etc/passwd", Limits(remote_media="any"), Limit.MEDIA_SCHEME),
    ],
)
def test_media_urls(url: str, limits: Limits, limit: Limit | None) -> None:
    """Remote URLs by policy and exact host; file:, other schemes and bare paths never."""
    part = {"type": "image_url", "image_url": {"url": url}}
    found = [f.limit for f in media_findings(messages(part), limits)]
    assert found == ([] if limit is None else [limit])


@pytest.mark.parametrize(
    ("fmt", "mime"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("GIF", "image/gif"),
                      ("WEBP", "image/webp")]
)  # fmt: skip
def test_image_sides_from_the_header(fmt: str, mime: str) -> None:
    """Common formats: the size is read from the header, in the input_image shape too."""
    limits = Limits(max_image_side=100)
    ok = {"type": "input_image", "image_url": data_url(fmt, 100, 3, mime)}
    wide = {"type": "image_url", "image_url": {"url": data_url(fmt, 101, 3, mime)}}
    assert list(media_findings(messages(ok), limits)) == []
    assert [f.limit for f in media_findings(messages(wide), limits)] == [Limit.MAX_IMAGE_SIDE]


def test_a_header_past_the_first_bytes_is_still_found() -> None:
    """A JPEG whose size marker follows large metadata is decoded whole from base64 (never
    its pixels) and still measured."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "JPEG", exif=b"Exif\x00\x00" + b"\x00" * 65000)
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    found = [
        f.limit for f in media_findings(messages({"type": "image_url", "image_url": url}), Limits())
    ]
    assert found == [Limit.MIN_IMAGE_SIDE]


def test_not_an_image_is_left_to_the_engine() -> None:
    """Bytes Pillow cannot read as an image are not refused here."""
    url = "data:image/png;base64," + base64.b64encode(b"hello").decode()
    assert (
        list(media_findings(messages({"type": "image_url", "image_url": {"url": url}}), Limits()))
        == []
    )


def test_a_decompression_bomb_is_refused_by_pixels() -> None:
    """An image past Pillow's own bomb bound is refused as too many pixels, not decoded."""
    url = "data:image/png;base64," + base64.b64encode(png_header(20000, 20000)).decode()
    found = list(
        media_findings(
            messages({"type": "image_url", "image_url": {"url": url}}),
            Limits(max_image_side=100000),
        )
    )
    assert [f.limit for f in found] == [Limit.MAX_IMAGE_PIXELS]


def test_embeds_count_and_are_bounded() -> None:
    """*_embeds parts count as media and their inline size is bounded."""
    part = {"type": "image_embeds", "image_embeds": "QUFBQUFB"}  # 6 bytes
    limits = Limits(max_media_bytes=5, max_media_parts=1)
    found = [f.limit for f in media_findings(messages(part, part), limits)]
    assert found == [Limit.MAX_MEDIA_BYTES, Limit.MAX_MEDIA_BYTES, Limit.MAX_MEDIA_PARTS]
