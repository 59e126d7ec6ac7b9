"""Images of samples for vision-language models: references, validation, decoding, paths and hashes.

An image is read from a local file or from bytes only, never downloaded, and checked before any model sees it
(format, file size, pixel count, decodable pixels); errors name the data file and row, or the request field.
The data reader, index builds and the service's converters need only this part, so it imports no torch: PIL
is imported when an image is actually opened. The vision-language models themselves are in vision.py.
"""

from __future__ import annotations

import functools
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError
from .files import sha256_file

# Formats accepted, as PIL names them, with their MIME types.
IMAGE_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif",
                 "BMP": "image/bmp"}
MIME_TYPES = {mime: fmt for fmt, mime in IMAGE_FORMATS.items()} | {"image/jpg": "JPEG"}
MAX_IMAGE_BYTES = 32 * 2**20
MAX_IMAGE_PIXELS = 50_000_000  # about 7,000 × 7,000; PIL's decompression-bomb guard starts near 89M
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class ImageRef:
    """An image of one sample, not yet decoded: a local file or the bytes of one.

    Attributes:
        path: the image file (absolute, as resolved by the data reader), or None.
        data: the encoded image (PNG, JPEG, ...), or None; exactly one of path and data is set.
        mime_type: the declared type of `data` ("image/png"), checked against its content; "" if unknown.
        source: where the reference came from, for error messages: the data file, or a request field.
        row: the 0-based row of `source`, or None.
    """

    path: str | None = None
    data: bytes | None = field(default=None, repr=False)
    mime_type: str = ""
    source: str = ""
    row: int | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.data is None):
            raise ValueError("ImageRef needs exactly one of path and data")

    def error(self, message: str) -> DataError:
        """A DataError about this image, naming its file and the data file and row (or request field)."""
        what = f"image {self.path!r}: " if self.path is not None else ("" if self.source else "image: ")
        return DataError(what + message, path=self.source or None, row=self.row)

    def read(self) -> bytes:
        """The encoded image bytes (read from the file, at most MAX_IMAGE_BYTES)."""
        if self.data is not None:
            return self.data
        try:
            with open(self.path, "rb") as fh:
                data = fh.read(MAX_IMAGE_BYTES + 1)
        except FileNotFoundError as exc:
            raise self.error("file not found; check the path (relative paths are read from the data file's "
                             "folder)") from exc
        except OSError as exc:
            raise self.error(f"cannot read the file ({exc.strerror or exc})") from exc
        return data

    def load(self):
        """The decoded image as an RGB `PIL.Image.Image`, validated (see `decode_image`)."""
        return decode_image(self.read(), self.mime_type, self.error)

    def payload(self) -> tuple[bytes, str]:
        """(encoded bytes, MIME type) to send over the wire; the type is read from the content."""
        data = self.read()
        return data, IMAGE_FORMATS[check_header(data, self.error)[0]]


def _open(data: bytes, fail):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise fail(f"not a recognised image; use one of {', '.join(sorted(IMAGE_FORMATS))}") from exc
    except Image.DecompressionBombError as exc:
        raise fail(f"too many pixels (at most {MAX_IMAGE_PIXELS}); downscale the image") from exc


def check_header(data: bytes, fail=None) -> tuple[str, tuple[int, int]]:
    """(format, (width, height)) of encoded image bytes from their header, without decoding the pixels.

    Args:
        fail: message → exception to raise (default: DataError).

    Raises:
        DataError (or fail's): empty, over MAX_IMAGE_BYTES, unknown or unsupported format, too many pixels.
    """
    fail = fail or DataError
    if not data:
        raise fail("is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise fail(f"is larger than {MAX_IMAGE_BYTES // 2**20} MiB; downscale or recompress it")
    img = _open(data, fail)
    fmt = img.format or ""
    if fmt not in IMAGE_FORMATS:
        raise fail(f"format {fmt or 'unknown'} is not supported; use one of {', '.join(sorted(IMAGE_FORMATS))}")
    w, h = img.size
    if w < 1 or h < 1 or w * h > MAX_IMAGE_PIXELS:
        raise fail(f"size {w}×{h} is out of range (1 to {MAX_IMAGE_PIXELS} pixels); downscale the image")
    return fmt, (w, h)


def decode_image(data: bytes, mime_type: str = "", fail=None):
    """Decode and validate an encoded image → RGB `PIL.Image.Image`.

    Args:
        data: the encoded image.
        mime_type: its declared type ("" = not declared); must match the content when given.
        fail: message → exception to raise (default: DataError).

    Raises:
        DataError (or fail's): as `check_header`; a MIME type that is unknown or does not match the content;
            pixel data that cannot be decoded (truncated or corrupt file).
    """
    fail = fail or DataError
    if mime_type and mime_type.lower() not in MIME_TYPES:
        raise fail(f"MIME type {mime_type!r} is not supported; use one of {', '.join(sorted(IMAGE_FORMATS.values()))}")
    fmt, _ = check_header(data, fail)
    if mime_type and MIME_TYPES[mime_type.lower()] != fmt:
        raise fail(f"declared as {mime_type} but the content is {fmt}; send the right MIME type")
    img = _open(data, fail)
    try:
        img.load()
        return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors for truncated or corrupt pixel data
        raise fail(f"cannot be decoded ({exc}); the file is truncated or corrupt") from exc


def resolve_image_path(value: Any, source: str) -> str:
    """The absolute path of an image reference read from a data row.

    Args:
        value: the row's image field: a path (relative paths are taken from the data file's folder), or a
            `{"path": ...}` struct as `datasets` writes Image columns (embedded bytes are not supported).
        source: the data file.

    Returns:
        The resolved path (checked to be a file no larger than MAX_IMAGE_BYTES whose header is a supported
        image of at most MAX_IMAGE_PIXELS pixels; the pixels are decoded later, in the forward pass).

    Raises:
        ValueError: with a message saying what to change (the caller adds file and row).
    """
    if isinstance(value, dict):
        if value.get("bytes") is not None and not value.get("path"):
            raise ValueError("holds embedded image bytes, which are not supported; write the images to files "
                             "and put their paths in the column")
        value = value.get("path")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a path to an image file, got {type(value).__name__} {value!r}")
    if _URL.match(value):
        raise ValueError(f"is a URL ({value[:60]!r}); images are read from local files only, never downloaded")
    p = Path(value).expanduser()
    if not p.is_absolute():
        p = Path(source).resolve().parent / p
    if not p.exists():
        raise ValueError(f"image file {value!r} not found (looked for {p}); relative paths are read from the "
                         "data file's folder")
    if not p.is_file():
        raise ValueError(f"image path {value!r} is not a file")
    size = p.stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise ValueError(f"image file {value!r} is larger than {MAX_IMAGE_BYTES // 2**20} MiB; downscale it")
    with open(p, "rb") as fh:
        head = fh.read(MAX_IMAGE_BYTES)

    def fail(message: str) -> ValueError:
        return ValueError(f"image file {value!r} {message}")

    check_header(head, fail)
    return str(p)


@functools.lru_cache(maxsize=4096)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)[0]


def file_sha256(path: str) -> str:
    """sha256 hex of a file's content (cached by path, size and modification time)."""
    st = os.stat(path)
    return _file_sha256(path, st.st_size, st.st_mtime_ns)
