"""Input pipeline speed: how many augmented training images per second can be produced.

Baseline: what a plain Augmentor script does per image: decode the full-size 1388x1040 TIF,
augment at full size, resize to the training size. Fast path (the library's): decode and resize
once (cached by content hash), augment at training size, spread over worker processes.

    python -m bench.input_pipeline                    # all cores
    python -m bench.input_pipeline --images 8 --samples 64   # quick smoke
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image as PILImage

from bench.common import report
from core.config import load_settings
from core.data.cache import resized_array
from core.data.decoding import load_rgb
from core.store.db import Image
from core.transforms import augment
from core.transforms.pipelines import resize


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32, help="distinct source TIFs")
    parser.add_argument("--samples", type=int, default=1200, help="augmented images to produce")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    params = augment.AugmentParams()
    ops = augment.build_operations(params)

    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings({"APP_HOME": tmp})
        rng = np.random.default_rng(0)
        rows = []
        for i in range(args.images):
            data = rng.integers(0, 255, (1040, 1388, 3), dtype=np.uint8)
            path = settings.images_dir / f"{i}.tif"
            path.parent.mkdir(parents=True, exist_ok=True)
            PILImage.fromarray(data).save(path)
            rows.append(
                Image(sha256=hashlib.sha256(path.read_bytes()).hexdigest(), stored_path=str(path.relative_to(tmp)))
            )

        n_base = max(8, args.samples // 20)  # the baseline is slow; time a part of it
        t0 = time.perf_counter()
        for k in range(n_base):
            full = load_rgb(settings.app_home / rows[k % len(rows)].stored_path)
            resize(augment.augment(full, ops, seed=k)[0], args.image_size)
        base_rate = n_base / (time.perf_counter() - t0)

        t0 = time.perf_counter()
        arrays = [resized_array(settings, r, args.image_size) for r in rows]  # first use: decode + cache
        first_decode = time.perf_counter() - t0
        t0 = time.perf_counter()
        arrays = [resized_array(settings, r, args.image_size) for r in rows]  # later runs: from the cache
        cached_rate = len(rows) / (time.perf_counter() - t0)
        pil = [PILImage.fromarray(a) for a in arrays]
        labels = [0] * len(pil)
        t0 = time.perf_counter()
        augment.expand(pil, labels, args.samples, params, seed=0, workers=args.workers)
        expand_seconds = time.perf_counter() - t0
        fast_rate = args.samples / (first_decode + expand_seconds)  # from files, decode included

    print(f"decode+resize of {len(rows)} TIFs: {first_decode:.2f} s once; from cache: {cached_rate:.0f} img/s")
    return report(
        f"Input pipeline ({args.workers} worker processes for the fast path)",
        torch.device("cpu"),
        [("augmented training images", base_rate, fast_rate, "img/s")],
    )


if __name__ == "__main__":
    main()
