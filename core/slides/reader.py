"""Open a whole-slide image and read it at a physical scale.

A slide is a pyramid: level 0 at full resolution, each further level a downsampled copy. Callers ask
for pixels at a number of microns per pixel (mpp); `Slide.region` reads the coarsest level still at
least as fine as that, then resizes. Nothing here reads a whole level into memory: a read larger
than `CHUNK_PX` on a side (a thumbnail of a slide with one level, a coarse region of a big slide) is
done in pieces, each shrunk as it is read.

Everything OpenSlide can raise on a bad file, at open or later on a read (OpenSlide reads tiles
lazily, so a damaged file may open and fail on its first region), becomes a `UserError` that names
the file, never its folder.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import openslide
from PIL import Image

from core.errors import UserError

# Formats OpenSlide reads, by extension. .tif/.tiff are slides only when OpenSlide recognises them
# (see is_slide_path): a plain TIFF of one microscope field stays an ordinary image.
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".czi")
TIFF_SUFFIXES = (".tif", ".tiff")

# Scanners give 0.1-0.5 um/px at 40x-20x, 1-2 at 5x; outside this range the value is a mistake
# (a TIFF's 72 dpi read as pixels per centimetre gives ~350).
MIN_MPP, MAX_MPP = 0.05, 20.0
CHUNK_PX = 2048  # the largest read from OpenSlide at once, per side: 16 MB of RGBA
_LEVEL_TOLERANCE = 1.01  # a level 4.0002x down still serves a request for 4x (odd sizes round)


@dataclass(frozen=True)
class Level:
    """One level of the pyramid: its size in pixels and how many level-0 pixels one of its pixels spans."""

    width: int
    height: int
    downsample: float


@dataclass(frozen=True)
class SlideInfo:
    """What a slide is: size, pyramid, physical scale and where that scale came from."""

    name: str  # the file's name, without its folder
    width: int  # level 0, in pixels
    height: int
    levels: tuple[Level, ...]  # level 0 first
    mpp_x: float  # microns per level-0 pixel, across
    mpp_y: float  # and down
    mpp_given: bool  # True: mpp_x/mpp_y were given by the user (open_slide's mpp), not read from the file
    vendor: str  # OpenSlide's format name, e.g. "aperio", "hamamatsu", "generic-tiff"
    objective_power: float | None  # the scanner's objective (20, 40, ...); None when the file does not say

    @property
    def mpp(self) -> float:
        """One microns-per-pixel value: the mean of across and down (they differ only on odd scanners)."""
        return (self.mpp_x + self.mpp_y) / 2


def check_mpp(value: object, what: str = "Microns per pixel") -> float:
    """`value` as a float if it is a plausible microns per pixel (MIN_MPP..MAX_MPP); else UserError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not MIN_MPP <= float(value) <= MAX_MPP:
        raise UserError(f"{what} must be a number from {MIN_MPP} to {MAX_MPP:g}, got {value!r}.")
    return float(value)


def is_slide_path(path: Path | str) -> bool:
    """Whether a file should be read as a whole-slide image rather than as an ordinary image.

    By extension (SLIDE_SUFFIXES). A .tif/.tiff is a slide when OpenSlide recognises its layout
    (a vendor's TIFF such as Aperio's or Philips', or a tiled TIFF) and, for a generic tiled TIFF,
    when it is a pyramid of more than one level: a TIFF of one field, tiled or not, stays on the
    ordinary image path. A file that cannot be read is not called a slide here; reading it says why.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SLIDE_SUFFIXES:
        return True
    if suffix not in TIFF_SUFFIXES:
        return False
    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
        if vendor is None:
            return False
        if vendor != "generic-tiff":
            return True
        with openslide.OpenSlide(str(path)) as slide:
            return slide.level_count > 1
    except (openslide.OpenSlideError, OSError):
        return False


@contextmanager
def _reading(name: str) -> Iterator[None]:
    """OpenSlide's errors on a file it opened (a damaged or cut-short file fails on a read) as UserError."""
    try:
        yield
    except openslide.OpenSlideError:
        raise UserError(f"{name} is damaged or incomplete: part of it cannot be read.") from None


def _slide_mpp(properties: dict[str, str]) -> tuple[float, float] | None:
    """(across, down) microns per pixel as the file records them; None when it records neither."""

    def number(key: str) -> float | None:
        try:
            value = float(properties[key])
        except (KeyError, ValueError):
            return None
        return value if math.isfinite(value) and value > 0 else None

    x, y = number(openslide.PROPERTY_NAME_MPP_X), number(openslide.PROPERTY_NAME_MPP_Y)
    x, y = x or y, y or x  # only one recorded: square pixels
    return None if x is None or y is None else (x, y)


def _objective(properties: dict[str, str]) -> float | None:
    try:
        value = float(properties[openslide.PROPERTY_NAME_OBJECTIVE_POWER])
    except (KeyError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _resolve_mpp(name: str, properties: dict[str, str], mpp: float | None) -> tuple[float, float, bool]:
    if mpp is not None:
        given = check_mpp(mpp)
        return given, given, True
    recorded = _slide_mpp(properties)
    if recorded is None:
        raise UserError(
            f"{name} has no microns per pixel; give it with --mpp or the 'Microns per pixel' field.",
            page=f"{name} has no microns per pixel; give it in the 'Microns per pixel' field.",
        )
    for value in recorded:
        if not MIN_MPP <= value <= MAX_MPP:
            raise UserError(
                f"{name} records {value:g} microns per pixel, outside {MIN_MPP}-{MAX_MPP:g}; give the right value "
                "with --mpp or the 'Microns per pixel' field.",
                page=f"{name} records {value:g} microns per pixel, outside {MIN_MPP}-{MAX_MPP:g}; give the right "
                "value in the 'Microns per pixel' field.",
            )
    return recorded[0], recorded[1], False


def _on_white(rgba: Image.Image) -> Image.Image:
    """RGB with transparent pixels (outside the scanned area, missing tiles) as white glass."""
    if rgba.mode != "RGBA":
        return rgba.convert("RGB")
    low, high = rgba.getchannel("A").getextrema()
    if low == 255:  # the usual case inside the scanned area: nothing to blend
        return rgba.convert("RGB")
    if high == 0:
        return Image.new("RGB", rgba.size, (255, 255, 255))
    out = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    out.alpha_composite(rgba)
    return out.convert("RGB")


class Slide:
    """An open slide; use as a context manager or call `close`. Build with `open_slide`."""

    def __init__(self, path: Path, mpp: float | None = None) -> None:
        name = path.name
        if not path.is_file():
            raise UserError(f"{name} not found.")
        try:
            self._osr = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise UserError(
                f"{name} is not a whole-slide image that can be read (SVS, NDPI, MRXS, SCN, VMS, BIF, "
                "CZI or tiled pyramidal TIFF), or it is damaged or incomplete."
            ) from None
        except (openslide.OpenSlideError, OSError):
            raise UserError(f"{name} is damaged or incomplete: it cannot be read as a slide.") from None
        self._closed = False
        try:
            self.info = self._describe(name, mpp)
        except BaseException:
            self.close()
            raise

    def _describe(self, name: str, mpp: float | None) -> SlideInfo:
        with _reading(name):
            props = dict(self._osr.properties)
            levels = tuple(
                Level(w, h, float(d)) for (w, h), d in zip(self._osr.level_dimensions, self._osr.level_downsamples)
            )
        mpp_x, mpp_y, given = _resolve_mpp(name, props, mpp)
        return SlideInfo(
            name=name,
            width=levels[0].width,
            height=levels[0].height,
            levels=levels,
            mpp_x=mpp_x,
            mpp_y=mpp_y,
            mpp_given=given,
            vendor=props.get(openslide.PROPERTY_NAME_VENDOR, "unknown"),
            objective_power=_objective(props),
        )

    def close(self) -> None:
        """Let go of the file; closing twice is harmless, reading after it a ValueError."""
        if not self._closed:
            self._closed = True
            self._osr.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose pixels span at most `downsample` level-0 pixels (0 when none does)."""
        best = 0
        for i, level in enumerate(self.info.levels):
            if level.downsample <= downsample * _LEVEL_TOLERANCE:
                best = i
        return best

    def thumbnail(self, max_side: int) -> Image.Image:
        """The whole slide as RGB, its longer side `max_side` pixels (never enlarged past level 0)."""
        if max_side < 1:
            raise ValueError(f"max_side must be at least 1, got {max_side}")
        info = self.info
        scale = max(1.0, max(info.width, info.height) / max_side)  # level-0 pixels per thumbnail pixel
        size = (max(1, round(info.width / scale)), max(1, round(info.height / scale)))
        level = self.best_level(scale)
        ds = info.levels[level].downsample
        box = (info.levels[level].width, info.levels[level].height)
        # The level's own size can be a pixel short of level-0 size / downsample; read that much.
        box = (min(box[0], math.ceil(info.width / ds)), min(box[1], math.ceil(info.height / ds)))
        return self._read_scaled(level, 0, 0, box, size)

    def region(self, x: int, y: int, size_px: int, mpp: float) -> Image.Image:
        """size_px x size_px RGB at `mpp` microns per pixel, its top-left at level-0 pixel (x, y).

        It spans size_px * mpp / mpp_x level-0 pixels across (and likewise down). Read from the
        coarsest level at least as fine as `mpp`, then resized; outside the slide is white.
        """
        if not 1 <= size_px <= 4 * CHUNK_PX:
            raise ValueError(f"size_px must be 1..{4 * CHUNK_PX}, got {size_px}")
        mpp = check_mpp(mpp)
        span_x, span_y = size_px * mpp / self.info.mpp_x, size_px * mpp / self.info.mpp_y
        level = self.best_level(min(span_x, span_y) / size_px)
        ds = self.info.levels[level].downsample
        box = (max(1, round(span_x / ds)), max(1, round(span_y / ds)))
        return self._read_scaled(level, int(x), int(y), box, (size_px, size_px))

    def _read_scaled(self, level: int, x: int, y: int, box: tuple[int, int], out: tuple[int, int]) -> Image.Image:
        """`box` (w, h) pixels of `level` from level-0 (x, y), resized to `out`, read in pieces if large."""
        if box[0] <= CHUNK_PX and box[1] <= CHUNK_PX:
            image = self._read(level, x, y, box)
            return image if image.size == out else image.resize(out, Image.Resampling.LANCZOS)
        result = Image.new("RGB", out, (255, 255, 255))
        ds = self.info.levels[level].downsample
        # Pieces cover whole output pixels, so their edges meet exactly in the result.
        per_x, per_y = box[0] / out[0], box[1] / out[1]  # level pixels per output pixel
        step_x, step_y = max(1, int(CHUNK_PX / per_x)), max(1, int(CHUNK_PX / per_y))
        for oy in range(0, out[1], step_y):
            oy1 = min(out[1], oy + step_y)
            ly0, ly1 = math.floor(oy * per_y), math.floor(oy1 * per_y)
            for ox in range(0, out[0], step_x):
                ox1 = min(out[0], ox + step_x)
                lx0, lx1 = math.floor(ox * per_x), math.floor(ox1 * per_x)
                piece = self._read(
                    level, x + round(lx0 * ds), y + round(ly0 * ds), (max(1, lx1 - lx0), max(1, ly1 - ly0))
                )
                result.paste(piece.resize((ox1 - ox, oy1 - oy), Image.Resampling.BOX), (ox, oy))
        return result

    def _read(self, level: int, x: int, y: int, size: tuple[int, int]) -> Image.Image:
        if self._closed:
            raise ValueError(f"{self.info.name} is closed")
        with _reading(self.info.name):
            return _on_white(self._osr.read_region((x, y), level, size))


def open_slide(path: Path | str, mpp: float | None = None) -> Slide:
    """Open a whole-slide image. `mpp` (microns per level-0 pixel) supplies or overrides the file's own.

    UserError, naming the file, when it is missing, not a slide, damaged, or has no plausible
    microns per pixel and none is given. Use as `with open_slide(p) as slide:`.
    """
    return Slide(Path(path), mpp)
