"""How far colour alone goes on unseen specimens: a yardstick for the grouped-CV figures.

Each image becomes the 12 numbers of `core.evaluation.yardstick.colour_features` (mean and standard deviation
of R, G, B and of their optical densities, at 128x128) and a logistic regression is scored by
stratified grouped 5-fold CV with the given groups. Every run records the same yardstick on its own
split; this script gives it for several fold assignments at once, without training anything.

    python -m docs.scripts.colour_only_baseline ../shared/data/lymphoma-iicbu2008 groups.csv
"""

import argparse
import csv
import pathlib

import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from core.evaluation.yardstick import IMAGE_SIZE, colour_features

SUFFIXES = {".tif", ".tiff", ".png", ".jpg", ".jpeg"}


def features_of(path: pathlib.Path) -> np.ndarray:
    return colour_features(np.asarray(Image.open(path).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=pathlib.Path, help="a folder per class of images")
    parser.add_argument(
        "groups_csv",
        type=pathlib.Path,
        help="file,group rows with file as CLASS/NAME (python -m core groups writes one)",
    )
    parser.add_argument("--seeds", type=int, default=3, help="fold assignments to try (default 3)")
    args = parser.parse_args()

    with args.groups_csv.open(newline="") as f:
        groups = {row["file"]: row["group"] for row in csv.DictReader(f)}
    files = sorted(p for p in args.folder.glob("*/*") if p.suffix.lower() in SUFFIXES)
    x = np.array([features_of(p) for p in files])
    y = [p.parent.name for p in files]
    g = [groups.get(f"{p.parent.name}/{p.name}", p.name) for p in files]  # no group: its own
    print(f"{len(files)} images, {len(set(y))} classes, {len(set(g))} groups")
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    for seed in range(args.seeds):
        folds = StratifiedGroupKFold(5, shuffle=True, random_state=seed)
        scores = cross_val_score(model, x, y, groups=g, cv=folds)
        print(
            f"seed {seed}: colour-only grouped 5-fold accuracy {scores.mean():.1%} ± {scores.std(ddof=1):.1%}"
            f" (folds {', '.join(f'{s:.1%}' for s in scores)})"
        )


if __name__ == "__main__":
    main()
