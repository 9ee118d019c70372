"""Whole-slide prediction speed: tiles per second for tiling and for prediction, the library's path
(core/slides: fast path) against the plain loop (baseline), on one synthetic slide in the same run.

The slide (tests/slides.py's writer: a pyramidal tiled TIFF at 0.25 um/px, three levels) holds
blocks of tissue-like texture over about a third of its area, glass elsewhere. The model is an
untrained DenseNet-201 with the paper's head in a model file that records its scale (tiles of
--tile-px pixels at --mpp um/px), run by the app's engine for the device (ONNX Runtime on the CPU,
compiled torch on CUDA; core/inference/engine.py).

    tiling      baseline: every cell of the grid read at the model's scale and checked (tissue.py)
                fast:     tiling.tile_slide: the thumbnail's tissue mask first, then only the cells
                          it calls tissue are read and checked
    prediction  baseline: for each kept tile, read its region and predict it alone
                fast:     predict.predict_slide's batches (iter_tiles, --batch tiles a call to the
                          model: by default 32 on CUDA, 4 on the CPU), its tiling time taken off
    end to end  tile_slide + the one-tile loop against predict_slide as a whole

Both paths give each tile the same probabilities (the largest difference is printed). Rates are
kept tiles per second of the slide's tissue.

    python -m bench.slide --device cpu                                          # the CPU figures
    python -m bench.slide --device cpu --tile-px 32 --width 3000 --height 2000  # smoke
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import report, sync
from core.config import load_settings
from core.inference.model_file import write_model
from core.slides.predict import default_batch, predict_slide, slide_scale
from core.slides.reader import open_slide
from core.slides.scale import scale_meta
from core.slides.tiling import tile_slide
from core.slides.tissue import check_tile
from core.training.loop import pick_device
from core.training.model import PaperDenseNet
from tests.slides import Region, class_texture, write_slide

CLASSES = ["CLL", "FL", "MCL"]


def synthetic_slide(path: Path, width: int, height: int) -> Path:
    """Three blocks of the classes' textures, each a third of the width and a third of the height
    apart, on glass: about a third of the slide is tissue."""
    w, h = width // 3, height // 3
    blocks = [
        Region(width // 12, height // 12, w, h, class_texture("CLL")),
        Region(width // 2, height // 6, w, 2 * h, class_texture("FL")),
        Region(width // 12, height // 2, w, h, class_texture("MCL")),
    ]
    return write_slide(path, width, height, blocks, mpp=0.25)


def make_predictor(tmp: Path, tile_px: int, mpp: float, device: torch.device):
    """The app's engine for `device` over a model file with the scale recorded."""
    torch.manual_seed(0)
    model_file = tmp / "model.safetensors"
    write_model(
        model_file,
        PaperDenseNet(len(CLASSES)).state_dict(),
        {"classes": CLASSES, "preparation": {"image_size": tile_px}, "scale": scale_meta(tile_px, mpp)},
    )
    if device.type == "cuda":
        from core.inference.predict import Predictor

        return Predictor.from_file(model_file, str(device))
    from core.inference.onnx_export import write_onnx
    from core.inference.onnx_predict import OnnxPredictor

    write_onnx(model_file, tmp / "model.onnx", "bench")
    return OnnxPredictor.from_files(tmp / "model.onnx", model_file, str(device))


def naive_tiling(slide, tile_px: int, mpp: float, settings) -> list[tuple[int, int]]:
    """Every grid cell read at the scale and checked: the kept cells' (col, row)."""
    info = slide.info
    step_x, step_y = tile_px * mpp / info.mpp_x, tile_px * mpp / info.mpp_y
    kept = []
    for row in range(int(info.height // step_y)):
        for col in range(int(info.width // step_x)):
            tile = slide.region(round(col * step_x), round(row * step_y), tile_px, mpp)
            if not check_tile(tile, settings.tissue_min_saturation, settings.tissue_max_pale_fraction).pale:
                kept.append((col, row))
    return kept


def one_by_one(slide, tiling, predictor) -> np.ndarray:
    """The plain loop: read one tile, predict it, next."""
    return np.concatenate(
        [predictor.predict([slide.region(t.x, t.y, tiling.tile_px, tiling.mpp)]).shown for t in tiling.tiles]
    )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tile-px", type=int, default=224, help="the model's tiles, in pixels")
    parser.add_argument("--mpp", type=float, default=0.5, help="the model's tiles' microns per pixel")
    parser.add_argument("--width", type=int, default=12_000, help="the slide's level-0 width (0.25 um/px)")
    parser.add_argument("--height", type=int, default=8_000)
    parser.add_argument(
        "--batch",
        type=int,
        default=0,
        help="tiles per call of the model on the fast path (0: the library's for the device)",
    )
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    settings = load_settings({"INFERENCE_ENGINE": "auto"})

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        path = synthetic_slide(Path(tmp) / "slide.tif", args.width, args.height)
        print(f"slide {args.width} x {args.height} written in {time.perf_counter() - started:.1f} s", flush=True)
        predictor = make_predictor(Path(tmp), args.tile_px, args.mpp, device)
        scale = slide_scale(predictor)
        batch = args.batch or default_batch(predictor)
        with open_slide(path) as slide:
            t0 = time.perf_counter()
            kept = naive_tiling(slide, scale.tile_px, scale.mpp, settings)
            naive_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            tiling = tile_slide(
                slide,
                scale.tile_px,
                scale.mpp,
                max_tiles=0,
                min_saturation=settings.tissue_min_saturation,
                max_pale_fraction=settings.tissue_max_pale_fraction,
            )
            tiling_seconds = time.perf_counter() - t0
            # The first call at each batch size either path makes allocates, and on CUDA compiles: not timed.
            tile = slide.region(0, 0, scale.tile_px, scale.mpp)
            for size in {1, min(batch, len(tiling.tiles)), len(tiling.tiles) % batch} - {0}:
                predictor.predict([tile] * size)
            sync(device)
            t0 = time.perf_counter()
            plain = one_by_one(slide, tiling, predictor)
            sync(device)
            plain_seconds = time.perf_counter() - t0
        pred = predict_slide(predictor, path, scale=scale, settings=settings, batch=batch)
    n = pred.n_tiles
    found = {(t.col, t.row) for t in tiling.tiles}
    print(
        f"{n} tissue tiles of {tiling.columns * tiling.rows} cells; the naive tiling kept {len(kept)}, "
        f"{len(found & set(kept))} of them the same",
        flush=True,
    )
    print(
        f"largest probability difference, batched vs one by one: {np.abs(pred.tile_probabilities - plain).max():.2g}",
        flush=True,
    )
    model_seconds = pred.seconds - pred.tiling_seconds
    rows = [
        (
            f"tiling ({n} tissue tiles of {tiling.columns * tiling.rows} cells)",
            n / naive_seconds,
            n / tiling_seconds,
            "tiles/s",
        ),
        (f"prediction, read + model, batch {batch}", n / plain_seconds, n / model_seconds, "tiles/s"),
        ("whole slide, end to end", n / (tiling_seconds + plain_seconds), n / pred.seconds, "tiles/s"),
    ]
    engine = type(predictor).__name__
    return report(
        f"Whole-slide prediction: the plain one-tile loop (baseline) against core/slides (fast path), "
        f"{args.tile_px} px at {args.mpp:g} um/px, {engine}",
        device,
        rows,
    )


if __name__ == "__main__":
    main()
