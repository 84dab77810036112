"""Refusing an image from its first bytes, before anything decodes it.

Kept free of heavy imports: img2dataset's pool processes import it (through the worker's resizer),
and they are restarted every few shards.
"""

from __future__ import annotations

import io
import warnings

_JPEG_SOI = b"\xff\xd8"
_JPEG_SOS = b"\xff\xda"
_JPEG_EOI = b"\xff\xd9"


def probe_image(data: bytes, max_pixels: int) -> str | None:
    """An error message when `data` must be refused before decoding, else None.

    Reads only the header (PIL opens lazily), so a 100-megapixel PNG costs a few bytes of memory here.
    """
    from PIL import Image

    if data.startswith(_JPEG_SOI) and data.rfind(_JPEG_EOI) <= data.rfind(_JPEG_SOS):
        # No end-of-image marker after the last scan (or no scan at all): cut short in transit.
        # OpenCV would decode the first half and fill the rest with grey.
        return "image file is truncated (JPEG end-of-image marker missing)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
    except Image.DecompressionBombError as err:
        return f"image too large: {err} (exceeds limit)"
    except Exception:
        return None  # not readable by PIL: let the resizer's own decoder decide and name it
    if width * height > max_pixels:
        return f"image too large: {width}x{height} = {width * height} pixels exceeds limit {max_pixels}"
    return None
