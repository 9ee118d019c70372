"""Synthetic microscopy-like images for tests: each class has its own dominant colour,
so a small network can learn the task quickly, with noise so that no two images are equal."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from core.access.accounts import LOCAL_USER

CLASS_COLOURS = {"CLL": (200, 80, 160), "FL": (90, 60, 200), "MCL": (230, 170, 200)}


def synthetic_array(label: str, index: int, size: tuple[int, int] = (64, 48)) -> np.ndarray:
    """An HxWx3 uint8 image: the class colour, blotches and per-image noise."""
    rng = np.random.default_rng(zlib.crc32(f"{label}/{index}".encode()))
    w, h = size
    base = np.array(CLASS_COLOURS[label], dtype=np.float32)
    img = np.ones((h, w, 3), np.float32) * base
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(6):  # "nuclei"
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, 6)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] *= 0.5
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def synthetic_image(label: str, index: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    return Image.fromarray(synthetic_array(label, index, size), "RGB")


def write_dataset(
    root: Path,
    per_class: int = 6,
    classes: tuple[str, ...] = ("CLL", "FL", "MCL"),
    ext: str = ".tif",
    size: tuple[int, int] = (64, 48),
) -> Path:
    """Write root/CLASS/NNN.ext for each class; returns root."""
    for label in classes:
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            synthetic_image(label, i, size).save(root / label / f"{i:03d}{ext}")
    return root


def ingest_synthetic(root: Path, settings, Session, per_class: int, name: str = "synthetic") -> str:
    """Write a synthetic TIF dataset under root and ingest it; returns the dataset name."""
    from core.data.ingest import ingest

    write_dataset(root, per_class=per_class, ext=".tif")
    with Session.begin() as s:
        ingest(s, settings, root, name, user=LOCAL_USER)
    return name


def train_runs(Session, settings, config) -> list[int]:
    """Create the runs of `config` (one per fold) and train each to its end in this process; their ids."""
    from core.jobs import execute, runs

    with Session.begin() as s:
        run_ids = [r.id for r in runs.create_runs(s, settings, config, user=LOCAL_USER)]
    for run_id in run_ids:
        execute.execute_run(Session, settings, run_id)
    return run_ids
