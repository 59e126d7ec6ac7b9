"""Image files (indexer/images.py): decoding validates the format, the declared MIME type and the size."""

from __future__ import annotations

import pytest

from forvalue.indexer.errors import DataError
from forvalue.indexer.images import decode_image

from vlm_factories import make_image


def test_decode_image_validates():
    img = decode_image(make_image(0, (20, 30)), "image/png")
    assert img.size == (30, 20) and img.mode == "RGB"
    decode_image(make_image(0, fmt="JPEG"), "image/jpeg")
    with pytest.raises(DataError, match="declared as image/png but the content is JPEG"):
        decode_image(make_image(0, fmt="JPEG"), "image/png")
    with pytest.raises(DataError, match="MIME type 'image/svg' is not supported"):
        decode_image(make_image(0), "image/svg")
    with pytest.raises(DataError, match="not a recognised image"):
        decode_image(b"definitely not an image")
    with pytest.raises(DataError, match="is empty"):
        decode_image(b"")
    with pytest.raises(DataError, match="format TIFF is not supported"):
        decode_image(make_image(0, fmt="TIFF"))
    with pytest.raises(DataError, match="truncated or corrupt"):
        decode_image(make_image(0, (64, 64))[:200])


def test_size_limits(monkeypatch):
    import forvalue.indexer.images as images

    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match=r"size 11×10 is out of range"):
        decode_image(make_image(0, (10, 11)))
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 50)
    with pytest.raises(DataError, match="larger than"):
        decode_image(make_image(0, (10, 11)))
