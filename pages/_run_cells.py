"""The Runs page's confusion-matrix cells opened: choose a true class and a predicted class beside a
matrix, and see the test images of that cell (core/evaluation/cells.py) with their probabilities;
for the per-slide matrix, the cell's slides with their tiles.

Plotly heatmaps report no clicked cell to Streamlit's selection events, so two select boxes name it."""

import streamlit as st

from core.config import Settings
from core.evaluation import cells
from core.inference.probabilities import Probabilities
from core.jobs import views
from pages._common import md_text, thumbnail, user_errors

PER_ROW, LIMIT, SLIDES, TILES = 6, 24, 6, 12


def cell_choice(
    classes: tuple[str, ...] | list[str],
    key: str,
    labels: tuple[str, str] = ("True class", "Predicted class"),
    what: str = "images",
) -> tuple[str, str] | None:
    """Two select boxes naming a cell of the matrix drawn above them (rows, columns as `labels` say);
    None until both are chosen."""
    st.caption(f"Open a cell: its {what} appear below.")
    options = [None, *classes]
    chosen = [
        column.selectbox(label, options, key=f"{key}_{part}", format_func=lambda c: "choose" if c is None else c)
        for column, label, part in zip(st.columns(2), labels, ("true", "pred"), strict=True)
    ]
    return None if None in chosen else (chosen[0], chosen[1])


def _heading(truth: str, guess: str, found: list, noun: str) -> bool:
    """The opened cell's heading and, when it is empty, that it is; whether it holds anything."""
    st.markdown(f"**True {md_text(truth)}, predicted {md_text(guess)}: {len(found)} test {noun}(s)**")
    if not found:
        st.caption(f"No test {noun} is in this cell.")
    return bool(found)


def _probability_words(run: views.RunRow, images: list) -> tuple[list[str], str]:
    """Each image's probabilities in one line, calibrated where the run has a temperature (as the
    Predict page shows them), and which they are."""
    shown = Probabilities.of_run([im.probabilities for im in images], run.summary.calibration)
    lines = [" · ".join(f"{c} {p:.1%}" for c, p in zip(run.classes, row)) for row in shown.shown]
    return lines, shown.label


def _gallery(images: list[cells.CellImage], run: views.RunRow, limit: int) -> None:
    lines, kind = _probability_words(run, images[:limit])
    for start in range(0, len(lines), PER_ROW):
        for col, image, line in zip(
            st.columns(PER_ROW), images[start : start + PER_ROW], lines[start : start + PER_ROW]
        ):
            name = image.short_name + (f" (copy {image.aug_index})" if image.aug_index is not None else "")
            col.image(thumbnail(str(image.path)), width="stretch")
            col.caption(f"{md_text(name)}  \n{kind}: {md_text(line)}")


def cell_images_panel(run: views.RunRow, chosen: tuple[str, str], Session, cfg: Settings) -> None:
    """The test images of the chosen cell of the run's test matrix."""
    truth, guess = chosen
    with user_errors():
        with Session() as s:
            found = cells.cell_images(s, cfg, run.id, truth, guess)
        if not _heading(truth, guess, found, "image"):
            return
        _gallery(found, run, LIMIT)
        if len(found) > LIMIT:
            st.caption(f"The first {LIMIT} of {len(found)}; the predictions CSV below lists them all.")


def slide_cell_panel(run: views.RunRow, chosen: tuple[str, str], Session, cfg: Settings) -> None:
    """The test slides of the chosen cell of the per-slide matrix, each with some of its tiles."""
    truth, guess = chosen
    with user_errors():
        with Session() as s:
            found = cells.slide_cell(s, cfg, run.id, truth, guess)
        if not _heading(truth, guess, found, "slide"):
            return
        for slide in found[:SLIDES]:
            mean = " · ".join(f"{c} {p:.1%}" for c, p in zip(run.classes, slide.probabilities))
            st.caption(
                f"{md_text(slide.slide)}: mean of its {len(slide.tiles)} test tiles (raw) {md_text(mean)}"
                + (f"; its first {TILES} tiles:" if len(slide.tiles) > TILES else ":")
            )
            _gallery(list(slide.tiles), run, TILES)
        if len(found) > SLIDES:
            st.caption(f"The first {SLIDES} of {len(found)} slides.")
