"""Decoding images within pixel limits: a TIFF, PNG, JPEG or BMP file (any mode) to 8-bit RGB.

One decoder for ingest (`check_image`, the full check of a file), training (through the cache) and
prediction (`load_rgb`, `image_size`), so "supported" and "too large" mean the same everywhere. An
image is refused on its header's size (MAX_IMAGE_PIXELS) before any pixel is decoded. A caller that
needs fewer pixels (prediction, core/inference/service.py) has images past REDUCE_ABOVE_PIXELS
decoded reduced, with no full-size copy beside the decoded frame (`load_rgb`'s reduce_to); 16/32-bit
grey is scaled to 8 bits a stripe of rows at a time for the same reason.

Apart from ingest because it needs no database and no store: the predictor, the cache and the pages
decode images without importing how datasets are built.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from core.errors import UserError

IMAGE_EXTENSIONS = {".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp"}
# PIL picks the decoder from the bytes, not the extension; limiting it to these formats means
# "supported" means the same thing at ingest, in training and in prediction.
PIL_FORMATS = ("TIFF", "PNG", "JPEG", "BMP")


class BadImage(Exception):
    """A file that cannot be used; `reason` starts with a short fixed phrase shown to the user."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# Rows converted at a time from 16/32-bit to 8-bit: about a million pixels, so the float copies
# the scaling needs are a few MB, not eight bytes for every pixel of the image.
_STRIPE_PIXELS = 1 << 20


def _stripes(im: PILImage.Image, multiple: int = 1) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, array) for stripes of about _STRIPE_PIXELS pixels, top to bottom; each stripe but
    the last has a multiple of `multiple` rows."""
    w, h = im.size
    rows = multiple * max(1, _STRIPE_PIXELS // max(w * multiple, 1))
    for top in range(0, h, rows):
        yield top, np.asarray(im.crop((0, top, w, min(h, top + rows))))


def _grey_scale(im: PILImage.Image) -> Callable[[np.ndarray], np.ndarray]:
    """The 16/32-bit grey values of `im` to 0..255, for its stripes: scaling the value range, as
    clipping would turn most pixels white. The range is the whole image's (one pass in stripes)."""
    lo, hi = 0.0, 65535.0  # unsigned 16-bit modes: in range whatever the pixels
    if not im.mode.startswith("I;16"):
        lo, hi = np.inf, -np.inf
        for _, a in _stripes(im):
            lo, hi = min(lo, float(a.min())), max(hi, float(a.max()))
    if im.mode != "F" and lo >= 0 and hi <= 65535:
        # 16-bit data (I;16, I;16B, or the 32-bit "I" container some decoders use for it).
        # Scale the full 0..65535 range rather than stretching each image, so brightness
        # stays comparable between images. Looking up a table of the 65,536 values is a few
        # times faster than computing each pixel.
        table = np.rint(np.arange(65536) / 257.0).astype(np.uint8)

        def scale(a: np.ndarray) -> np.ndarray:
            return table[a]
    elif im.mode == "F" and lo >= 0 and hi <= 1:

        def scale(a: np.ndarray) -> np.ndarray:
            return np.rint(a.astype(np.float64) * 255.0)
    else:

        def scale(a: np.ndarray) -> np.ndarray:
            return np.rint((a.astype(np.float64) - lo) * (255.0 / (hi - lo))) if hi > lo else np.zeros(a.shape)

    return scale


def _grey_to_uint8(im: PILImage.Image) -> PILImage.Image:
    """16/32-bit grey to 8-bit (`_grey_scale`), in stripes of rows into one 8-bit array: the only
    full-size allocation is the result, never a float copy of the whole image."""
    scale = _grey_scale(im)
    out = np.empty((im.height, im.width), np.uint8)
    for top, a in _stripes(im):
        out[top : top + len(a)] = scale(a)
    return PILImage.fromarray(out, "L")


def _to_rgb(im: PILImage.Image) -> PILImage.Image:
    """8-bit RGB of a loaded image. The caller's image is left as it was (and may be closed after)."""
    if im.mode.startswith("I") or im.mode == "F":
        grey = _grey_to_uint8(im)
        return grey.convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        # Transparent areas become white (empty slide), not black (dense tissue). Pasting through
        # the alpha band gives alpha_composite's values without its three full-size copies.
        rgba = im if im.mode == "RGBA" else im.convert("RGBA")
        out = PILImage.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, (0, 0), rgba)
        return out
    if im.mode == "RGB":
        return im
    return im.convert("RGB")  # L, P, 1, CMYK, YCbCr


def _reduced_rgb(im: PILImage.Image, factor: int) -> PILImage.Image:
    """8-bit RGB of a loaded image, each `factor` x `factor` block of pixels averaged into one.

    Converted and reduced a stripe of rows at a time (stripes of whole blocks, so the result is the
    reduction of the whole converted image): beside the decoded frame, no full-size copy is made,
    neither RGB (4 bytes a pixel) nor, for 16/32-bit images, 8-bit grey.
    """
    w, h = im.size
    out = PILImage.new("RGB", (-(-w // factor), -(-h // factor)))
    if im.mode.startswith("I") or im.mode == "F":
        scale = _grey_scale(im)
        for top, a in _stripes(im, factor):
            grey = np.empty(a.shape, np.uint8)
            grey[...] = scale(a)
            out.paste(PILImage.fromarray(grey, "L").convert("RGB").reduce(factor), (0, top // factor))
        return out
    rows = factor * max(1, _STRIPE_PIXELS // (w * factor))
    for top in range(0, h, rows):
        stripe = im.crop((0, top, w, min(h, top + rows)))  # keeps the palette and transparency
        out.paste(_to_rgb(stripe).reduce(factor), (0, top // factor))
    return out


# The app's MAX_IMAGE_PIXELS, checked on the header before anything is decoded, is the only
# limit: PIL's own (about 179 MP) would refuse sizes an administrator allowed, with PIL's number.
PILImage.MAX_IMAGE_PIXELS = None


@contextmanager
def _opened(src: Path | BinaryIO, max_pixels: int | None, min_side: int | None) -> Iterator[PILImage.Image]:
    """The image, opened lazily (header only) and checked against the size limits; raises BadImage."""
    try:
        im = PILImage.open(src, formats=PIL_FORMATS)
    except UnidentifiedImageError:
        raise BadImage("not an image: no TIFF, PNG, JPEG or BMP data found") from None
    except FileNotFoundError:
        raise
    except Exception as e:  # PIL raises many types on malformed headers
        raise BadImage(f"corrupt: {e}") from None
    with im:
        w, h = im.size
        # Checked before decoding: a tiny file can declare a 100,000 x 100,000 image, and the
        # decoded frame takes up to 4 bytes a pixel (PIL keeps RGB, 32-bit and 2-band modes so).
        if max_pixels is not None and w * h > max_pixels:
            raise BadImage(f"too many pixels: {w}x{h} is more than {max_pixels:,} (MAX_IMAGE_PIXELS)")
        if min_side is not None and min(w, h) < min_side:
            raise BadImage(f"too small: {w}x{h}, each side must be at least {min_side} px")
        yield im


def _load(im: PILImage.Image) -> None:
    """Decode every pixel (the full check of a file); raises BadImage."""
    try:
        im.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure means a damaged file
        raise BadImage(f"corrupt: {e}") from None


def _rgb(im: PILImage.Image, factor: int = 1) -> PILImage.Image:
    try:
        return _to_rgb(im) if factor == 1 else _reduced_rgb(im, factor)
    except Exception as e:  # noqa: BLE001 - e.g. a mode PIL cannot convert
        raise BadImage(f"corrupt: {e}") from None


def check_image(path: Path, max_pixels: int | None, min_side: int | None) -> tuple[str, str, int, int]:
    """The full check of an image file at ingest: its header within the size limits, every pixel
    decoded, and its mode one that converts to RGB. Returns (PIL format, PIL mode, width, height);
    raises BadImage with the reason. Nothing decoded is kept."""
    with _opened(path, max_pixels, min_side) as im:
        fmt, mode, (width, height) = im.format or "", im.mode, im.size
        _load(im)
        # Every later use converts to RGB; one pixel shows the mode allows it, without the
        # memory of a full-size copy.
        _rgb(im.crop((0, 0, 1, 1)))
    return fmt, mode, width, height


# Images up to this size are decoded whole even where the caller could do with fewer pixels, so that
# ordinary images (the paper's 1388x1040, a camera's 12 MP) reach a model exactly as in training; only
# larger ones (whole-slide crops, or a few hundred kB of PNG that declare 100 MP) are reduced.
REDUCE_ABOVE_PIXELS = 16_000_000


def _reduction(size: tuple[int, int], reduce_to: int | None) -> int:
    """The whole factor an image of `size` is reduced by: 1 up to REDUCE_ABOVE_PIXELS, otherwise the
    largest that keeps its shorter side at least `reduce_to` (None: never reduced)."""
    w, h = size
    if reduce_to is None or w * h <= REDUCE_ABOVE_PIXELS:
        return 1
    return max(1, min(w, h) // max(reduce_to, 1))


def _give_back_memory() -> None:
    """Return the freed pages of a large decoded frame to the operating system. glibc keeps freed
    blocks of many MB in its heaps for reuse, so a server that decoded one huge image would stay that
    large; malloc_trim releases them. Elsewhere (no glibc) nothing is done."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _decode(
    src: Path | BinaryIO, max_pixels: int | None, min_side: int | None = None, reduce_to: int | None = None
) -> tuple[PILImage.Image, str, str]:
    """Open, check the header size, decode and convert to RGB; reduced (`_reduction`) where the
    image is larger than the caller needs: a JPEG by its decoder (draft mode: 1/2 to 1/8 of each
    side, decoded at that size), any image by averaging blocks of pixels as it is converted.

    Returns (rgb image, PIL format, original PIL mode); raises BadImage with the reason. Peak
    memory is the decoded frame plus the RGB result, under 8 bytes per pixel of MAX_IMAGE_PIXELS;
    reduced, the frame plus a few MB.
    """
    with _opened(src, max_pixels, min_side) as im:
        fmt, mode, (w, h) = im.format or "", im.mode, im.size
        if fmt == "JPEG" and reduce_to is not None and _reduction(im.size, reduce_to) > 1:
            im.draft(None, (reduce_to, reduce_to))  # each side stays at least reduce_to
        _load(im)
        rgb = _rgb(im, _reduction(im.size, reduce_to))
    if w * h > REDUCE_ABOVE_PIXELS:
        del im  # the decoded frame, unless it is the result
        _give_back_memory()
    return rgb, fmt, mode


def load_rgb(
    path: Path | str | BinaryIO, max_pixels: int | None = None, *, reduce_to: int | None = None
) -> PILImage.Image:
    """Decode a TIFF/PNG/JPEG/BMP file (any mode: RGBA, L, P, 1, 16-bit, CMYK...) to 8-bit RGB.

    Also accepts an open binary file (e.g. an upload). A file that is not a usable image raises
    UserError. Files not checked at ingest (uploads to predict, files named on the command line)
    must pass `max_pixels` (settings.max_image_pixels): without it no size is refused.
    `reduce_to`: the shorter side the caller needs; an image of more than REDUCE_ABOVE_PIXELS is
    then decoded reduced by a whole factor that keeps its shorter side at least that (None: whole).
    """
    if isinstance(path, str):
        path = Path(path)
    try:
        rgb, _, _ = _decode(path, max_pixels, reduce_to=reduce_to)
    except BadImage as e:
        raise UserError(f"{_name(path)}: {e.reason}") from None
    return rgb


def image_size(path: Path | BinaryIO, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) from the file's header, with the checks of `load_rgb` that need no pixel:
    UserError for a file that is not a TIFF/PNG/JPEG/BMP image or has more than `max_pixels`.
    An open file is left at its start."""
    try:
        with _opened(path, max_pixels, None) as im:
            return im.size
    except BadImage as e:
        raise UserError(f"{_name(path)}: {e.reason}") from None
    finally:
        if not isinstance(path, Path):
            path.seek(0)


def _name(path: Path | BinaryIO) -> str:
    return path.name if isinstance(path, Path) else getattr(path, "name", "image")
