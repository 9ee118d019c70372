"""Datasets, their versions and augmentation presets as the pages show them, and the Augmentation page's
preview image."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image as PILImage
from sqlalchemy import distinct, func, select
from sqlalchemy.orm import Session, selectinload

from core.config import Settings
from core.data import versions
from core.data.datasets import get_dataset
from core.data.decoding import load_rgb
from core.data.versions import VersionDiff, VersionSummary
from core.store.db import AugmentationPreset, Dataset, Image, Run


@dataclass(frozen=True)
class DatasetRow:
    name: str
    classes: tuple[str, ...]
    images: int
    groups: int  # specimen groups; 0 when none are known


def dataset_rows(session: Session) -> list[DatasetRow]:
    """Every dataset with its image and group counts, by name: Home, Train, Datasets, Augmentation."""
    query = (
        select(Dataset, func.count(Image.id), func.count(distinct(Image.group)))
        .outerjoin(Image, Image.dataset_id == Dataset.id)
        .group_by(Dataset.id)
        .order_by(Dataset.name)
    )
    return [DatasetRow(d.name, tuple(d.classes), n, groups) for d, n, groups in session.execute(query)]


@dataclass(frozen=True)
class ImageRow:
    id: int
    label: str
    group: str | None
    original_name: str  # its path inside the source, e.g. "CLL/001.tif"
    stored_path: str  # relative to APP_HOME
    sha256: str
    path: Path  # the stored file

    @property
    def name(self) -> str:
        return Path(self.original_name).name


@dataclass(frozen=True)
class DatasetDetail:
    name: str
    classes: tuple[str, ...]
    source: str
    created_at: datetime
    created_by: str | None
    images: tuple[ImageRow, ...]
    skipped: tuple[tuple[str, str], ...]  # (file, reason)
    n_runs: int

    @property
    def groups(self) -> set[str]:
        return {im.group for im in self.images if im.group is not None}

    def source_for(self, import_roots: Sequence[Path], full: bool) -> str:
        """Where its images came from, as a user may read it: in full for an editor (`full`); else a
        folder on the server by its path below the import root it lies in (IMPORT_ROOTS), or by its
        own name. An upload is named by its file(s) already."""
        if full or not self.source.startswith("/"):
            return self.source
        source = Path(self.source)
        root = next((r for r in import_roots if source.is_relative_to(r)), None)
        if root is not None and source != root:
            return source.relative_to(root).as_posix()
        return source.name

    def class_counts(self) -> dict[str, int]:
        return {c: sum(im.label == c for im in self.images) for c in self.classes}


def dataset_detail(session: Session, settings: Settings, name: str) -> DatasetDetail:
    """One dataset with its images, skipped files and number of runs: the Datasets and Augmentation pages."""
    n_runs = select(func.count(Run.id)).where(Run.dataset_id == Dataset.id).correlate(Dataset).scalar_subquery()
    found = session.execute(
        select(Dataset, n_runs)
        .where(Dataset.name == name)
        .options(selectinload(Dataset.images), selectinload(Dataset.skipped))
    ).first()
    if found is None:
        get_dataset(session, name)  # raises the UserError that names the known datasets
    d, runs = found
    images = tuple(
        ImageRow(
            im.id, im.label, im.group, im.original_name, im.stored_path, im.sha256, settings.app_home / im.stored_path
        )
        for im in sorted(d.images, key=lambda im: im.id)
    )
    return DatasetDetail(
        d.name,
        tuple(d.classes),
        d.source,
        d.created_at,
        d.created_by,
        images,
        tuple((f.path, f.reason) for f in d.skipped),
        runs,
    )


def dataset_versions(session: Session, name: str) -> tuple[VersionSummary, ...]:
    """The versions of dataset `name`, newest first: the Datasets page's list, the Train page's picker."""
    return tuple(versions.version_list(session, name))


def version_diff(session: Session, name: str, old: int, new: int) -> VersionDiff:
    """What changed between two versions of dataset `name`, image by image: the Datasets page."""
    return versions.diff(session, name, old, new)


@dataclass(frozen=True)
class PresetRow:
    name: str
    params: dict[str, Any]
    created_at: datetime
    created_by: str | None


def preset_rows(session: Session) -> list[PresetRow]:
    """The saved augmentation presets, by name (the paper's, built in, is not stored)."""
    query = select(AugmentationPreset).order_by(AugmentationPreset.name)
    return [PresetRow(p.name, dict(p.params), p.created_at, p.created_by) for p in session.scalars(query)]


def preview_image(image: ImageRow, size: int) -> PILImage.Image:
    """The stored image at the training size with its proportions kept (its shorter side `size`
    pixels, e.g. 417x312 -> 299x224), for the Augmentation page's preview. Training squeezes each
    image to a size x size square; the preview keeps the tissue's shape so its changes can be judged."""
    original = load_rgb(image.path)
    w, h = original.size
    scale = size / min(w, h)
    return original.resize((max(1, round(w * scale)), max(1, round(h * scale))), PILImage.Resampling.LANCZOS)
