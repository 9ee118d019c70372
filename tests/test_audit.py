"""Leak audit: planted copies are found, clean images are not flagged; block groups keep splits apart."""

import io
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from core.access.accounts import LOCAL_USER
from core.data import groups
from core.data.audit import audit_images, audit_split, format_audit, hamming, phash, pixel_hash
from core.data.ingest import ingest
from core.data.splits import make_split, split_parts
from core.errors import UserError
from core.store.db import Dataset
from core.store.db import Image as ImageRow


def tissue(index: int, size: int = 64) -> np.ndarray:
    """A distinct H&E-like field: pink background, purple nuclei of random size and place, noise."""
    rng = np.random.default_rng(zlib.crc32(f"tissue/{index}".encode()))
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.ones((size, size, 3)) * (rng.uniform(200, 240), rng.uniform(140, 190), rng.uniform(180, 220))
    for _ in range(rng.integers(10, 40)):
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(2, 8)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (
            rng.uniform(60, 120),
            rng.uniform(40, 80),
            rng.uniform(120, 170),
        )
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg(a: np.ndarray, quality: int = 75) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def brighter(a: np.ndarray, by: int = 15) -> np.ndarray:
    return np.clip(a.astype(int) + by, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def train():
    return [tissue(i) for i in range(40)]


def test_clean_distinct_images_are_not_flagged(train):
    test = [tissue(100 + i) for i in range(15)]
    report = audit_images(train, test)
    assert report.exact == [] and report.near == []
    assert report.warning is None
    assert 0.7 < report.nn_ratio < 1.5  # same generator on both sides
    assert "No leak found" in format_audit(report)


@pytest.mark.parametrize(
    "name, make_copy", [("jpeg", jpeg), ("brighter", brighter), ("jpeg+brighter", lambda a: brighter(jpeg(a, 85), 10))]
)
def test_planted_near_duplicate_is_found(train, name, make_copy):
    test = [tissue(100 + i) for i in range(10)] + [make_copy(train[7])]
    ids = [f"new{i}" for i in range(10)] + ["copy-of-7"]
    report = audit_images(train, test, [f"train{i}" for i in range(40)], ids)
    assert report.exact == []
    assert [(p.test, p.train) for p in report.near] == [("copy-of-7", "train7")]
    assert report.near[0].distance <= report.hash_threshold
    assert report.warning and "nearly equal" in report.warning
    assert "| copy-of-7 | train7 |" in format_audit(report)


def test_planted_exact_duplicate_is_found_from_another_format(train):
    # The same pixels from a PIL image (e.g. decoded from PNG) count as the same image.
    test = [tissue(100), Image.fromarray(train[3]), tissue(101)]
    report = audit_images(train, test, test_ids=["a", "dup", "b"])
    assert [(p.test, p.train, p.distance) for p in report.exact] == [("dup", "train[3]", 0.0)]
    assert report.near == []  # an exact hit is not listed again as near
    assert report.warning and "exactly equal" in report.warning
    assert pixel_hash(train[3]) == pixel_hash(Image.fromarray(train[3]))


def test_many_close_neighbours_raise_a_warning(train):
    # Shifted crops of training fields: not copies, but each test image sits right next to one.
    crops = [np.roll(train[i], 3, axis=1) for i in range(10)]
    report = audit_images(train, crops)
    assert len(report.close) >= 3
    assert report.warning is not None


def test_phash_is_robust_to_recompression_but_separates_fields():
    a, b = tissue(1), tissue(2)
    assert hamming(phash(a)[None], phash(jpeg(a))[None])[0, 0] <= 4
    assert hamming(phash(a)[None], phash(b)[None])[0, 0] > 12


def _numbered_dataset(root, per_class=12):
    for c, label in enumerate(("CLL", "FL", "MCL")):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(tissue(1000 * c + i, 40)).save(root / label / f"{100 * c + i:03d}.png")
    return root


def test_block_manifest_groups_consecutive_numbers(tmp_path):
    root = _numbered_dataset(tmp_path / "src", per_class=10)
    (tmp_path / "src" / "CLL" / "notes.txt").write_text("not an image")
    rows = groups.block_manifest(root, block_size=4)
    assert len(rows) == 30 and rows[0] == ("CLL/000.png", "CLL-000-003")
    by_group = {}
    for file, group in rows:
        by_group.setdefault(group, []).append(file)
    # 10 images per class in blocks of at most 4 -> 3 blocks of near-equal size (4, 3, 3)
    assert sorted(len(v) for k, v in by_group.items() if k.startswith("FL")) == [3, 3, 4]
    assert len(by_group) == 9


def test_block_manifest_starts_a_block_at_a_gap_and_rejects_unnumbered(tmp_path):
    root = tmp_path / "src"
    for label, names in {"A": ["001.png", "002.png", "010.png", "011.png"], "B": ["x1.png", "x2.png"]}.items():
        (root / label).mkdir(parents=True)
        for n in names:
            Image.fromarray(tissue(len(n))).save(root / label / n)
    assert dict(groups.block_manifest(root, block_size=9)) == {
        "A/001.png": "A-001-002",
        "A/002.png": "A-001-002",
        "A/010.png": "A-010-011",
        "A/011.png": "A-010-011",
        "B/x1.png": "B-001-002",
        "B/x2.png": "B-001-002",
    }
    (root / "B" / "scan.png").write_bytes((root / "B" / "x1.png").read_bytes())
    with pytest.raises(UserError, match="scan.png"):
        groups.block_manifest(root, 9)
    with pytest.raises(UserError, match="at least 1"):
        groups.block_manifest(root, 0)


def test_groups_cli_writes_the_csv(tmp_path):
    root = _numbered_dataset(tmp_path / "src", per_class=6)
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "core", "groups", str(root), "--block-size", "3"],
        capture_output=True,
        text=True,
        check=True,
        cwd=repo,
    )
    lines = out.stdout.splitlines()
    assert lines[0] == "file,group" and len(lines) == 19 and "CLL/000.png,CLL-000-002" in lines
    assert "6 groups" in out.stderr
    help_text = subprocess.run(
        [sys.executable, "-m", "core", "groups", "--help"], capture_output=True, text=True, check=True, cwd=repo
    ).stdout
    assert "--block-size" in help_text and "APPROXIMATION" in help_text


def test_block_groups_never_straddle_a_grouped_split_and_the_audit_is_clean(tmp_path, settings, Session):
    root = _numbered_dataset(tmp_path / "src", per_class=12)
    groups.write_manifest(groups.block_manifest(root, block_size=3), tmp_path / "groups.csv")
    with Session.begin() as s:
        report = ingest(s, settings, root, "blocks", groups_csv=tmp_path / "groups.csv", user=LOCAL_USER)
        dataset_id = report.dataset_id
    with Session.begin() as s:
        dataset = s.get(Dataset, dataset_id)
        split = make_split(s, dataset, protocol="holdout", seed=3, test_fraction=0.25, val_fraction=0.2)
        assert split.grouped
        parts = split_parts(s, split, 0)
        assert set(parts) == {"train", "val", "test"}
        side = {}
        for part, images in parts.items():
            for im in images:
                assert side.setdefault(im.group, part) == part, f"group {im.group} in {side[im.group]} and {part}"
        assert len({im.group for im in s.scalars(select(ImageRow))}) == 12

        audit = audit_split(s, settings, split, 0, image_size=32)
        assert audit.n_test == len(parts["test"]) and audit.n_train == len(parts["train"]) + len(parts["val"])
        assert audit.exact == [] and audit.near == [] and audit.warning is None
        assert "grouped by specimen" in audit.protocol

        leaky = make_split(s, dataset, protocol="paper-leaky", seed=0)
        assert "by construction" in audit_split(s, settings, leaky, 0).warning
