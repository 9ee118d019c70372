"""A compact JPEG copy of a dataset folder (one sub-folder per class), to take to a machine that
cannot read the original: the GPU machine receives at most 64 MiB with the code, and the
lymphoma images are 77 MB as PNG (and 1.2 GB as the original TIFs).

Class folders keep their names; each image (TIF, PNG, JPEG, BMP, in any mode the app accepts) is
decoded the way ingest decodes it (core.data.decoding.load_rgb), shrunk so that its longer side is
at most --max-side pixels (never enlarged) and written as SRC's file name with a .jpg suffix.
Anything else in SRC (a README, hidden files) is left out.

    python -m bench.pack_data ../shared/data/lymphoma-iicbu2008 var/bench-data --max-side 448 --quality 90
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from PIL import Image as PILImage

from core.data.decoding import IMAGE_EXTENSIONS, load_rgb
from core.errors import UserError


@dataclass(frozen=True)
class Packed:
    per_class: dict[str, int]
    bytes_written: int

    def describe(self) -> str:
        counts = ", ".join(f"{label} {n}" for label, n in self.per_class.items())
        return f"{sum(self.per_class.values())} JPEG images ({counts}), {self.bytes_written / 2**20:.1f} MiB"


def class_folders(src: Path) -> list[Path]:
    if not src.is_dir():
        raise SystemExit(f"error: {src} is not a folder")
    folders = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise SystemExit(f"error: {src} has no class sub-folders")
    return folders


def pack_image(path: Path, out: Path, max_side: int, quality: int) -> int:
    image = load_rgb(path)
    if max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize(
            (max(1, round(image.width * scale)), max(1, round(image.height * scale))), PILImage.Resampling.LANCZOS
        )
    image.save(out, "JPEG", quality=quality)
    return out.stat().st_size


def pack(src: Path, dst: Path, *, max_side: int, quality: int) -> Packed:
    per_class: dict[str, int] = {}
    written = 0
    for folder in class_folders(src):
        images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        stems = [p.stem for p in images]
        if len(set(stems)) != len(stems):  # a.tif and a.png would both become a.jpg
            raise SystemExit(f"error: {folder} holds two images with the same name apart from the suffix")
        (dst / folder.name).mkdir(parents=True, exist_ok=True)
        for path in images:
            written += pack_image(path, dst / folder.name / f"{path.stem}.jpg", max_side, quality)
        per_class[folder.name] = len(images)
    return Packed(per_class, written)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="folder with one sub-folder per class")
    parser.add_argument(
        "dst", type=Path, help="where the JPEG copy goes (created; files of the same name are replaced)"
    )
    parser.add_argument("--max-side", type=int, default=448, help="longest side in pixels after shrinking")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality, 1-95")
    args = parser.parse_args(argv)
    if args.max_side < 1 or not 1 <= args.quality <= 95:
        parser.error("--max-side must be at least 1 and --quality between 1 and 95")
    try:
        packed = pack(args.src, args.dst, max_side=args.max_side, quality=args.quality)
    except UserError as e:  # a file that is not a usable image: say which, keep nothing quiet
        raise SystemExit(f"error: {e}") from None
    text = f"{args.dst}: {packed.describe()}"
    print(text)
    return text


if __name__ == "__main__":
    main()
