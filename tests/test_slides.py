"""Whole-slide images (core/slides/): opening at a known scale, regions at a requested scale, refusals
in plain words, tissue and tile checks, the tiling over tissue and its record, and bounded memory on
a big slide. Slides are synthetic pyramidal TIFFs written by tests/slides.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageDraw, ImageFilter

from core.config import load_settings
from core.errors import UserError
from core.slides.reader import is_slide_path, open_slide
from core.slides.tiling import Tiling, iter_tiles, tile_slide
from core.slides.tissue import check_tile, tissue_mask
from tests.slides import Region, class_texture, dots, solid, two_region_slide, write_slide


@pytest.fixture(scope="module")
def two_regions(tmp_path_factory):
    """The two-region slide (CLL texture left, FL right, glass around) and its regions."""
    return two_region_slide(tmp_path_factory.mktemp("slides") / "two.tif")


@pytest.fixture(scope="module")
def full_tiling(two_regions) -> Tiling:
    with open_slide(two_regions[0]) as slide:
        return tile_slide(slide, tile_px=224, mpp=0.5, max_tiles=0)


def _dark_span(row: np.ndarray) -> tuple[int, int]:
    """First and last index of the dark pixels along one row of an RGB array."""
    dark = np.nonzero(row.mean(axis=-1) < 128)[0]
    return int(dark[0]), int(dark[-1])


def _share_in(x: float, y: float, step: float, region: Region) -> float:
    """Share of the level-0 box of side `step` at (x, y) inside a region."""
    w = max(0.0, min(x + step, region.x + region.width) - max(x, region.x))
    h = max(0.0, min(y + step, region.y + region.height) - max(y, region.y))
    return w * h / (step * step)


def _overlap(tiling: Tiling, tile, region: Region) -> float:
    """Share of a kept tile's level-0 box inside a region."""
    return _share_in(tile.x, tile.y, tiling.step_x, region)


def test_a_written_slide_opens_with_its_pyramid_and_microns_per_pixel(tmp_path):
    path = write_slide(tmp_path / "s.tif", 3000, 2000, mpp=0.25, levels=3, factor=2)
    with open_slide(path) as slide:
        info = slide.info
    assert (info.name, info.width, info.height, info.vendor) == ("s.tif", 3000, 2000, "generic-tiff")
    assert [lv.downsample for lv in info.levels] == [1.0, 2.0, 4.0]
    assert (info.levels[2].width, info.levels[2].height) == (750, 500)
    assert (info.mpp_x, info.mpp_y, info.mpp, info.mpp_given) == (0.25, 0.25, 0.25, False)
    assert info.objective_power is None

    four = write_slide(tmp_path / "four.tiff", 4096, 4096, mpp=0.5, levels=3, factor=4)
    with open_slide(four) as slide:
        assert [lv.downsample for lv in slide.info.levels] == [1.0, 4.0, 16.0]
    # A slide by extension or by layout; a plain TIFF of one field, or one tiled level, is an image.
    plain = tmp_path / "field.tif"
    Image.new("RGB", (64, 48), (200, 80, 160)).save(plain)
    tifffile.imwrite(tmp_path / "tiled.tif", np.zeros((512, 512, 3), np.uint8), tile=(256, 256))
    assert is_slide_path(path) and is_slide_path(four) and is_slide_path(tmp_path / "absent.svs")
    assert not is_slide_path(plain) and not is_slide_path(tmp_path / "tiled.tif")
    assert not is_slide_path(tmp_path / "photo.png")


def test_a_region_has_the_requested_scale_from_the_best_level(tmp_path):
    # A black 800-pixel square at level-0 (1000, 1000) of a 0.25 um/px slide whose glass is missing
    # tiles (transparent in OpenSlide), which must come back white.
    square = Region(1000, 1000, 800, 800, solid((0, 0, 0)))
    path = write_slide(tmp_path / "sq.tif", 4096, 4096, [square], mpp=0.25, levels=3, sparse=True)
    with open_slide(path) as slide:
        assert [slide.best_level(d) for d in (0.5, 1.0, 3.9, 4.0, 100.0)] == [0, 0, 1, 2, 2]
        # 2 um/px: 8 level-0 pixels a pixel, read from level 2 (4x) and halved: the square is 100 px.
        a = np.asarray(slide.region(800, 800, 200, 2.0))
        assert a.shape == (200, 200, 3)
        first, last = _dark_span(a[100])
        assert abs(first - 25) <= 1 and abs(last - 124) <= 1
        assert (a[5, 5] == 255).all() and (a[190, 190] == 255).all()  # glass is white
        # 0.7 um/px, between levels 1 (0.5) and 2 (1.0): 800 / 2.8 = 286 px, starting at 100 / 2.8.
        first, last = _dark_span(np.asarray(slide.region(900, 900, 400, 0.7))[200])
        assert abs(first - 36) <= 1 and abs(last - first + 1 - 286) <= 2
        # Finer than level 0 (0.125 um/px): enlarged, the square's edge 50 level-0 px in is 100 px in.
        first, _ = _dark_span(np.asarray(slide.region(950, 1100, 200, 0.125))[100])
        assert abs(first - 100) <= 1
        beyond = np.asarray(slide.region(4000, 4000, 100, 0.25))  # mostly outside the slide
        assert (beyond == 255).all()


def test_a_slide_without_microns_per_pixel_is_refused_unless_given(tmp_path):
    path = write_slide(tmp_path / "bare.tif", 1024, 1024, mpp=None, levels=2)
    with pytest.raises(UserError) as e:
        open_slide(path)
    assert str(e.value) == ("bare.tif has no microns per pixel; give it with --mpp or the 'Microns per pixel' field.")
    assert "'Microns per pixel' field" in e.value.for_page() and "--mpp" not in e.value.for_page()
    with open_slide(path, mpp=0.3) as slide:
        assert (slide.info.mpp_x, slide.info.mpp_y, slide.info.mpp_given) == (0.3, 0.3, True)
        assert slide.region(0, 0, 64, 0.6).size == (64, 64)
    for bad in (0, -1, 0.01, 50, float("nan"), float("inf"), True, "0.5"):
        with pytest.raises(UserError, match="must be a number from 0.05 to 20"):
            open_slide(path, mpp=bad)
    # A given value overrides the file's own.
    with open_slide(write_slide(tmp_path / "own.tif", 1024, 1024, mpp=0.25, levels=1), mpp=0.5) as slide:
        assert slide.info.mpp_x == 0.5


def _plain(error: UserError, tmp_path: Path) -> str:
    """The error's message, checked to name no folder and to carry no exception of OpenSlide's."""
    message = str(error)
    assert str(tmp_path) not in message and "Error" not in message and "Traceback" not in message
    return message


def test_cut_short_damaged_and_non_slide_files_give_plain_user_errors(tmp_path):
    texture = Region(0, 0, 2048, 2048, class_texture("MCL"))
    data = write_slide(tmp_path / "whole.tif", 2048, 2048, [texture], levels=3).read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as e:
        open_slide(cut)
    assert _plain(e.value, tmp_path).startswith("cut.tif is not a whole-slide image that can be read")

    # Zeroed level-0 tiles: it opens (OpenSlide reads tiles only when asked) and fails on the read.
    damaged = tmp_path / "damaged.tif"
    broken = bytearray(data)
    broken[len(data) // 10 : len(data) * 6 // 10] = bytes(len(data) * 6 // 10 - len(data) // 10)
    damaged.write_bytes(bytes(broken))
    with open_slide(damaged) as slide:
        for _ in range(2):  # and again, once OpenSlide has marked the slide as failed
            with pytest.raises(UserError) as e:
                slide.region(1024, 1024, 128, 0.25)
            assert _plain(e.value, tmp_path) == "damaged.tif is damaged or incomplete: part of it cannot be read."

    notes = tmp_path / "notes.svs"
    notes.write_text("not a slide")
    picture = tmp_path / "picture.tif"
    Image.new("RGB", (64, 48)).save(picture)
    for path in (notes, picture):
        with pytest.raises(UserError) as e:
            open_slide(path)
        assert _plain(e.value, tmp_path).startswith(f"{path.name} is not a whole-slide image that can be read")
    with pytest.raises(UserError, match="^gone.svs not found"):
        open_slide(tmp_path / "gone.svs")


def test_tissue_mask_and_tile_checks():
    texture = class_texture("CLL")(0, 0, 448, 448)
    glass = np.full((256, 256, 3), 250, np.uint8) + np.random.default_rng(0).integers(
        0, 5, (256, 256, 3), dtype=np.uint8
    )
    thumb = glass.copy()
    thumb[64:128, 32:96] = texture[:64, :64]
    mask = tissue_mask(Image.fromarray(thumb))
    assert mask[70:120, 40:90].all() and not mask[:, 128:].any()
    assert not tissue_mask(Image.fromarray(glass)).any()  # blank glass: noise is no tissue

    tile = Image.fromarray(texture).resize((224, 224), Image.Resampling.LANCZOS)
    clean = check_tile(tile)
    assert not (clean.pale or clean.pen or clean.blurry)
    assert check_tile(glass[:224, :224]).pale
    for ink in ((40, 80, 180), (40, 140, 70), (20, 20, 25)):  # blue, green and black pen
        marked = tile.copy()
        ImageDraw.Draw(marked).line((0, 100, 224, 120), fill=ink, width=14)
        assert check_tile(marked).pen
    assert check_tile(tile.filter(ImageFilter.GaussianBlur(3))).blurry


def test_tiling_keeps_tissue_of_both_regions_and_none_of_the_glass(two_regions, full_tiling):
    _, left, right = two_regions
    t = full_tiling
    assert (t.tile_px, t.mpp, t.step_x, t.step_y) == (224, 0.5, 448.0, 448.0)
    assert (t.columns, t.rows) == (6000 // 448, 3000 // 448)
    for tile in t.tiles:  # kept tiles are mostly over a region, never over glass alone
        assert max(_overlap(t, tile, left), _overlap(t, tile, right)) >= 0.35, tile
        assert (tile.x, tile.y) == (round(tile.col * t.step_x), round(tile.row * t.step_y))
    inside = {
        (c, r)
        for r in range(t.rows)
        for c in range(t.columns)
        if any(_share_in(c * 448, r * 448, 448, reg) == 1 for reg in (left, right))
    }
    assert len(inside) >= 12
    assert inside <= {(tile.col, tile.row) for tile in t.tiles}  # every cell wholly in tissue is kept
    assert t.dropped_background > 0 and t.dropped_over_cap == 0
    assert len(t.tiles) + t.dropped_background + t.dropped_pale == t.columns * t.rows
    assert t.pen_count == 0 and t.blurry_count == 0
    assert t.tiles == tuple(sorted(t.tiles, key=lambda k: (k.row, k.col)))
    assert t.thumbnail_box(t.tiles[0])[0] == pytest.approx(t.tiles[0].x / t.thumbnail_scale)

    with open_slide(two_regions[0]) as slide:
        capped = [tile_slide(slide, max_tiles=8, seed=seed) for seed in (0, 0, 1)]
        batches = list(iter_tiles(slide, capped[0], batch=3))
        with pytest.raises(UserError, match="Tile size"):
            tile_slide(slide, tile_px=8)
    assert capped[0] == capped[1] and capped[0].tiles != capped[2].tiles  # fixed by the seed
    for c in capped:
        assert len(c.tiles) == 8 and c.dropped_over_cap > 0 and c.dropped_background == t.dropped_background
        assert len(c.tiles) + c.dropped_pale + c.dropped_over_cap == len(t.tiles) + t.dropped_pale  # candidates
        assert any(_overlap(c, k, left) > 0.5 for k in c.tiles) and any(_overlap(c, k, right) > 0.5 for k in c.tiles)
    assert [len(b.tiles) for b in batches] == [3, 3, 2]
    assert batches[0].pixels.shape == (3, 224, 224, 3) and batches[0].pixels.dtype == np.uint8
    assert batches[0].tiles == capped[0].tiles[:3]


def test_a_pale_tile_is_dropped_as_pale(tmp_path):
    # Blue dots over a quarter of the area: tissue in the thumbnail, which averages them with the glass
    # between, but three quarters glass in each tile read at 0.5 um/px.
    sparse_dots = Region(800, 600, 2400, 1800, dots((90, 60, 200), period=8, side=4))
    path = write_slide(tmp_path / "pale.tif", 4000, 3000, [sparse_dots])
    with open_slide(path) as slide:
        t = tile_slide(slide, max_tiles=0)
    assert t.tiles == () and t.dropped_pale >= 20
    assert t.dropped_pale + t.dropped_background == t.columns * t.rows


def test_tiling_round_trips_through_json(full_tiling):
    t = dataclasses.replace(
        full_tiling, tiles=(dataclasses.replace(full_tiling.tiles[0], pen=True, blurry=True), *full_tiling.tiles[1:])
    )
    text = t.to_json()
    assert json.loads(text) == json.loads(json.dumps(t.to_dict()))  # plain JSON, for a database column
    back = Tiling.from_json(text)
    assert back == t and back.pen_count == 1 and back.blurry_count == 1
    assert Tiling.from_dict({**t.to_dict(), "added_later": 1}) == t


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _peak_growth_mb(work) -> float:
    """How far the process's resident memory rose above where it was while `work` ran, in MB."""
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # start the peak (VmHWM) again from the current size
    work()
    return (_status_kb("VmHWM") - before) / 1024


def test_a_big_mostly_empty_slide_tiles_in_bounded_memory(tmp_path):
    # 40,000 x 30,000 at 0.25 um/px: one level read whole would be 4.8 GB (RGBA), the 2x level 1.2 GB.
    # Tissue in two corners; the thumbnail, the tiling and the tiles read back stay under 150 MB.
    a = Region(2000, 2000, 1500, 1500, class_texture("MCL"))
    b = Region(36000, 26000, 1500, 1500, class_texture("CLL"))
    path = write_slide(tmp_path / "big.tif", 40_000, 30_000, [a, b], levels=6)
    found: list = []

    def work() -> None:
        with open_slide(path) as slide:
            tiling = tile_slide(slide, max_tiles=0)
            found.append(tiling)
            found.extend(len(batch.tiles) for batch in iter_tiles(slide, tiling, batch=8))

    assert _peak_growth_mb(work) < 150
    tiling = found[0]
    assert (tiling.columns, tiling.rows) == (89, 66) and sum(found[1:]) == len(tiling.tiles)
    assert all(max(_overlap(tiling, k, a), _overlap(tiling, k, b)) >= 0.35 for k in tiling.tiles)
    assert {_overlap(tiling, k, a) > 0 for k in tiling.tiles} == {True, False}  # both corners

    # One level only: the thumbnail is read in pieces, each shrunk as it comes, and lands in place.
    # Read whole, its level would take 216 MB as RGBA (OpenSlide's own get_thumbnail rises 440 MB here).
    square = Region(4000, 2000, 2000, 2000, solid((0, 0, 0)))
    flat = write_slide(tmp_path / "flat.tif", 9000, 6000, [square], levels=1, sparse=True)
    thumbs: list = []
    with open_slide(flat) as slide:
        assert _peak_growth_mb(lambda: thumbs.append(np.asarray(slide.thumbnail(512)))) < 150
    assert thumbs[0].shape == (341, 512, 3)
    rows, cols = np.nonzero(thumbs[0].mean(axis=-1) < 128)
    scale = 9000 / 512
    assert abs(cols.min() - 4000 / scale) <= 1 and abs(cols.max() + 1 - 6000 / scale) <= 1
    assert abs(rows.min() - 2000 / scale) <= 1 and abs(rows.max() + 1 - 4000 / scale) <= 1


def test_slide_settings_are_read_from_the_environment():
    default = load_settings({})
    assert (default.slide_mpp, default.slide_tile_px, default.slide_max_tiles) == (0.5, 224, 256)
    assert (default.tissue_min_saturation, default.tissue_max_pale_fraction) == (0.05, 0.6)
    s = load_settings(
        {
            "SLIDE_MPP": "0.25",
            "SLIDE_TILE_PX": "256",
            "SLIDE_MAX_TILES": "0",
            "TISSUE_MIN_SATURATION": "0.08",
            "TISSUE_MAX_PALE_FRACTION": "0.5",
        }
    )
    assert (s.slide_mpp, s.slide_tile_px, s.slide_max_tiles) == (0.25, 256, 0)
    assert (s.tissue_min_saturation, s.tissue_max_pale_fraction) == (0.08, 0.5)
