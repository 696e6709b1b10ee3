"""Image loading: every image becomes an 8-bit RGB :class:`PIL.Image.Image` or a :class:`DatasetError`."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

from racnn.data.errors import DatasetError

__all__ = ["ImageTooLarge", "NotAnImage", "load_image", "to_rgb"]

# Background that transparent pixels are composited onto.
_WHITE = (255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency (RGBA, LA, P/L with a transparent colour) goes on white."""
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # High bit depth greyscale: rescale to 0..255 instead of letting PIL clip at 255.
        lo, hi = image.getextrema()  # type: ignore[misc]
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        image = image.convert("F").point(lambda v: (v - lo) * scale).convert("L")
    return image.convert("RGB")


class NotAnImage(DatasetError):
    """The file is no image format PIL can identify."""


class ImageTooLarge(DatasetError):
    """The image has more pixels than the caller allows (a decompression bomb, or just too big)."""


def load_image(
    source: str | Path | BinaryIO,
    *,
    name: str | None = None,
    max_pixels: int | None = None,
    upright: bool = False,
) -> Image.Image:
    """Read an image (a file, or an open binary stream such as an upload) fully, so truncated files fail
    here, and return it as RGB.

    No EXIF rotation is applied unless ``upright`` (datasets: their annotations refer to the stored pixel grid;
    a user's photo, as ``predict`` and ``serve`` read it: turned as a viewer shows it). ``name`` is what messages call
    the image (default: the path). ``max_pixels``: refuse larger images from their header, before decoding
    them (:class:`ImageTooLarge`); PIL's own decompression-bomb limit applies too.
    Raises :class:`DatasetError` ``"{name}: cannot read image ({reason})"`` for a missing, corrupt or
    truncated file, :class:`NotAnImage` for a file of no image format.
    """
    name = name or str(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. PIL's "Palette images with transparency" notice
            with Image.open(source) as image:
                w, h = image.size
                if max_pixels is not None and w * h > max_pixels:
                    raise ImageTooLarge(f"{name}: {w} x {h} pixels, over the limit of {max_pixels:,}")
                image.load()
                return to_rgb(ImageOps.exif_transpose(image) if upright else image)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{name}: cannot read image ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise NotAnImage(f"{name}: cannot read image (not an image: no format PIL can read)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, FileNotFoundError) and exc.strerror else str(exc)
        raise DatasetError(f"{name}: cannot read image ({reason or type(exc).__name__})") from exc
