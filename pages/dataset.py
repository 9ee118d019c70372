"""Datasets: add labelled images (zip, files class by class, or a server folder) or whole slides (a
server folder or zip of class folders of slides, tiled at one scale), look at them, a slide dataset's
slides and each slide's tiling over its thumbnail, estimate specimen groups from file numbers, see
what was skipped and why, its versions and what changed between two, delete."""

import base64
import io
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from PIL import Image as PILImage

from core.access.limits import disk_full_is_user_error
from core.data import datasets, groups, slide_views, uploads
from core.data.ingest import IngestReport
from core.data.slide_ingest import SlideIngestReport
from core.errors import UserError
from core.jobs import views
from core.slides.reader import MAX_MPP, MIN_MPP
from core.slides.tiling import MAX_TILE_PX, MIN_TILE_PX
from pages._common import (
    IMAGE_TYPES,
    class_counts_figure,
    current_user,
    md_text,
    page_header,
    plot_text,
    require_editor,
    session_factory,
    settings,
    show_figure,
    text_table,
    through_router,
    thumbnail,
    user_errors,
)
from pages._label_issues import label_issues_section

through_router()
Session = session_factory()
cfg = settings()
user = current_user()  # viewers browse; adding and deleting need an editor
SOURCES = ["Zip file", "Image files by class", "Folder on the server"]
TILE_COLOURS = ("#00a3e0", "#f39c12", "#2ecc71")  # kept, with pen ink, blurred: apart from H&E's pink and purple
DEFAULT_CLASSES = ["CLL", "FL", "MCL"]

page_header(
    "Datasets",
    "Labelled H&E images, one class per folder. Every file is decoded when it is added, so a "
    "bad file is reported here with its reason rather than failing a training run later.",
)

flash = st.session_state.pop("ds_flash", None)
if flash:
    st.success(flash, icon=":material/check_circle:")

with Session() as s:
    names = [d.name for d in views.dataset_rows(s)]


def slide_options() -> uploads.SlideOptions:
    """The whole-slide fields of the form as they stand (each shown with its default)."""
    state = st.session_state
    return uploads.SlideOptions(
        mpp=state.get("ds_slide_mpp"),
        tile_px=state.get("ds_tile_px"),
        tile_mpp=state.get("ds_tile_mpp"),
        max_tiles=state.get("ds_max_tiles"),
    )


def ingest_now(source: str, name: str, groups_csv, group_pattern: str) -> None:
    """Run the ingest the user asked for, with a progress bar; on success remember the report and rerun."""
    bar = st.progress(0.0, text="Reading the files…")
    start = time.monotonic()

    def progress(done: int, total: int) -> None:
        bar.progress(done / max(total, 1), text=f"Checking images: {done} of {total}")

    def tile_progress(done: int, total: int) -> None:
        # Slides take long and alike: the time per slide so far gives the time left.
        left = (time.monotonic() - start) / max(done, 1) * (total - done)
        after = f" · about {views.duration_text(left)} left" if done < total else " · checking their tiles"
        bar.progress(done / max(total, 1), text=f"Tiling slides: {done} of {total}{after}")

    options = dict(groups_csv=groups_csv, group_pattern=group_pattern.strip() or None, progress=progress)
    slides = dict(slides=slide_options(), tile_progress=tile_progress)
    with user_errors():
        # The commit writes too: a full disk there is reported like one during the ingest.
        with disk_full_is_user_error(cfg, f"dataset '{name}'"), Session.begin() as s:
            if source == SOURCES[0]:
                upload = st.session_state.get("ds_zip")
                if upload is None:
                    raise UserError("Choose a .zip file first.")
                report = uploads.ingest_zip(
                    s, cfg, upload, upload.name, name or Path(upload.name).stem, **options, **slides, user=user
                )
            elif source == SOURCES[1]:
                files = []
                for i in range(st.session_state.get("ds_n_classes", 3)):
                    label = st.session_state.get(f"ds_class_{i}", "").strip()
                    chosen = st.session_state.get(f"ds_files_{i}") or []
                    if chosen and not label:
                        raise UserError(f"Give a class name for the {len(chosen)} file(s) in row {i + 1}.")
                    files += [(label, f.name, f) for f in chosen]
                report = uploads.ingest_files(s, cfg, files, name, **options, user=user)
            else:
                report = uploads.import_folder(
                    s,
                    cfg,
                    st.session_state.get("ds_path", ""),
                    name or Path(st.session_state.get("ds_path", "")).name,
                    **options,
                    **slides,
                    user=user,
                )
        st.session_state["ds_report"] = report
        st.session_state["ds_selected"] = report.ingest.name if isinstance(report, SlideIngestReport) else report.name
        st.session_state["ds_goto"] = "Browse"
        st.rerun()
    bar.empty()


def show_report(report: IngestReport) -> None:
    counts = ", ".join(f"{md_text(c)}: {n}" for c, n in report.class_counts.items())
    st.success(
        f"Dataset **{md_text(report.name)}**: {report.added} image(s) added, "
        f"{report.already_present} already present, "
        f"{len(report.skipped) + len(report.duplicates)} skipped. Now {counts}.",
        icon=":material/check_circle:",
    )
    not_taken(report.skipped, report.duplicates)


def not_taken(skipped, duplicates) -> None:
    rows = [{"file": p, "reason": r} for p, r in skipped]
    rows += [{"file": p, "reason": f"duplicate of {other} (stored once)"} for p, other in duplicates]
    if rows:
        st.markdown("**Files not taken, and why**")
        text_table(pd.DataFrame(rows))


def show_slide_report(report: SlideIngestReport) -> None:
    """Slides added and their tiles, at what scale; slides already there; what in the source was not read."""
    tiles, scale = report.ingest, report.scale
    counts = ", ".join(f"{md_text(c)}: {n}" for c, n in tiles.class_counts.items())
    cap = f"at most {scale.max_tiles} a slide" if scale.max_tiles else "every tissue tile"
    present = f", {len(report.already_present)} already present" if report.already_present else ""
    st.success(
        f"Dataset **{md_text(tiles.name)}**: {len(report.slides)} slide(s) added{present}, "
        f"{report.tiles_kept} tile(s) of {scale.tile_px} px at {scale.mpp:g} µm per pixel ({cap}); "
        f"{tiles.added} new tile image(s) stored. Now {counts} tiles.",
        icon=":material/check_circle:",
    )
    rows = [{"slide": rel, "class": label, "tiles kept": kept, "": "added"} for rel, label, kept in report.slides]
    rows += [
        {"slide": rel, "class": rel.split("/", 1)[0], "tiles kept": None, "": "already in the dataset"}
        for rel in report.already_present
    ]
    if rows:
        text_table(pd.DataFrame(rows))
    not_taken([*report.skipped, *tiles.skipped], tiles.duplicates)


def slide_fields(source: str) -> None:
    """How slides are read and tiled, for a zip or server folder that turns out to hold slides."""
    where = "zip" if source == SOURCES[0] else "folder"
    with st.expander("Whole-slide images: scale and tiling"):
        st.caption(
            f"Used when the class folders of the {where} hold whole-slide images (SVS, NDPI, MRXS, SCN, "
            "pyramidal TIFF, …): each slide is cut into square tiles at one physical scale over its tissue, "
            "and each tile's specimen group is its slide. Defaults are this server's settings."
        )
        st.number_input(
            "Microns per pixel (only for slides whose files lack it)",
            MIN_MPP,
            MAX_MPP,
            value=None,
            step=0.05,
            format="%.3f",
            key="ds_slide_mpp",
            placeholder="read from each slide's file",
            help="A 40x scan is about 0.25, 20x about 0.5. For field images, their microns per pixel, "
            "recorded as the dataset's scale.",
        )
        a, b, c = st.columns(3)
        a.number_input(
            "Tile size (px)",
            MIN_TILE_PX,
            MAX_TILE_PX,
            cfg.slide_tile_px,
            key="ds_tile_px",
            help="Each tile's side, in pixels at the tile scale.",
        )
        b.number_input(
            "Tile scale (µm per pixel)",
            MIN_MPP,
            MAX_MPP,
            cfg.slide_mpp,
            step=0.05,
            format="%.3f",
            key="ds_tile_mpp",
            help="The microns per pixel the tiles are cut at, whatever each slide's "
            "own; a model trained on them classifies slides at this scale.",
        )
        c.number_input(
            "Tiles per slide at most",
            0,
            None,
            cfg.slide_max_tiles,
            key="ds_max_tiles",
            help="Sampled at random over the tissue, the same each time; 0 takes every tissue tile.",
        )


def add_tab() -> None:
    if not user.can_edit:
        st.info("Adding images needs the editor role. Ask an administrator if you need it.", icon=":material/lock:")
        return
    source = st.segmented_control("Source", SOURCES, default=SOURCES[0], key="ds_source", required=True)
    name = st.text_input(
        "Dataset name",
        key="ds_name",
        placeholder="e.g. lymphoma",
        help="A new name creates a dataset; an existing name adds images to it (same classes only).",
    )
    if source == SOURCES[0]:
        st.file_uploader(
            "A .zip with one folder per class (CLASS/image.tif)",
            type=["zip"],
            key="ds_zip",
            help="A wrapper folder inside the zip is fine. TIF/TIFF, PNG, JPEG and BMP are read; "
            "whole-slide images (SVS, NDPI, SCN, pyramidal TIFF, …) are tiled.",
        )
        st.caption("Without a name, the dataset is named after the zip file.")
    elif source == SOURCES[1]:
        n = st.session_state.setdefault("ds_n_classes", 3)
        for i in range(n):
            c1, c2 = st.columns([1, 3], vertical_alignment="top")
            c1.text_input(
                f"Class {i + 1}", value=DEFAULT_CLASSES[i] if i < len(DEFAULT_CLASSES) else "", key=f"ds_class_{i}"
            )
            c2.file_uploader(
                f"Images of class {i + 1}", type=IMAGE_TYPES, accept_multiple_files=True, key=f"ds_files_{i}"
            )
        if st.button("Another class", icon=":material/add:"):
            st.session_state["ds_n_classes"] = n + 1
            st.rerun()
    else:
        if cfg.import_roots:
            st.text_input(
                "Folder (or .zip) on the server", key="ds_path", placeholder=str(cfg.import_roots[0] / "lymphoma")
            )
            st.caption("Allowed below: " + ", ".join(f"`{r}`" for r in cfg.import_roots))
        else:
            st.info(
                "Importing from the server is turned off. An administrator can allow folders with the "
                "`IMPORT_ROOTS` setting.",
                icon=":material/lock:",
            )
    if source != SOURCES[1]:
        slide_fields(source)
    with st.expander("Specimen groups (optional)"):
        st.caption(
            "Images of one specimen share stain and tissue; with groups, splits keep each specimen on one "
            "side, which is the honest evaluation. Give a table of each file's specimen, or the part of the "
            "file names that names it. Without specimen ids, add the images first and then estimate groups "
            "from their file numbers under **Browse**."
        )
        groups_csv = st.file_uploader(
            "Table of specimens (CSV)",
            type=["csv"],
            key="ds_groups_csv",
            help="Columns `file,group`: one row per image, `file` as CLASS/name "
            "(e.g. `CLL/000.png`), `group` its specimen id.",
        )
        example = groups.EXAMPLE_PATTERN
        group_pattern = st.text_input(
            "Specimen id in the file names",
            key="ds_group_pattern",
            placeholder=example,
            help=f"A regular expression on CLASS/file; its first capture group (or one named `group`) is the "
            f"specimen id. The example `{example}` takes the class and the tens of the file number: "
            f"{', '.join(f'`{n}`' for n in groups.EXAMPLE_NAMES)} fall in groups "
            f"{', '.join(f'`{re.search(example, n).group(1)}`' for n in groups.EXAMPLE_NAMES)}, blocks of "
            "ten consecutive numbers (an approximation where specimen ids are lost).",
        )
    if st.button("Add images", type="primary", key="ds_add"):
        ingest_now(source, name.strip(), groups_csv, group_pattern)


def estimate_section(d: views.DatasetDetail) -> None:
    """Specimen groups from blocks of consecutive file numbers: shown to everyone, applied by an editor."""
    a, b = st.columns([3, 1], vertical_alignment="bottom")
    block = b.number_input(
        "Images per group, at most",
        1,
        100,
        groups.DEFAULT_BLOCK_SIZE,
        key="ds_block_size",
        help=f"{groups.DEFAULT_BLOCK_SIZE} gives about 30 groups for the 256 development images "
        "of IICBU-2008, about the number of specimens they come from.",
    )
    if a.button(
        "Estimate specimen groups from the images",
        icon=":material/auto_awesome_mosaic:",
        key="ds_estimate",
        help="An approximation: neighbouring file numbers of one class are taken to "
        "come from one specimen. Nothing changes until you apply it.",
    ):
        with user_errors():
            found = groups.estimate_groups(((im.label, im.original_name) for im in d.images), int(block))
            st.session_state["ds_estimate_result"] = (d.name, found)
    shown = st.session_state.get("ds_estimate_result")
    if not shown or shown[0] != d.name:
        return
    found = shown[1]
    st.info(
        f"**{found.n_groups} specimen groups estimated** for {len(found.groups)} images. {found.basis}",
        icon=":material/auto_awesome_mosaic:",
    )
    rows = [
        {"class": label, "groups": n, "images per group": f"{low}–{high}" if low != high else str(low)}
        for label, (n, low, high) in found.per_class().items()
    ]
    st.dataframe(pd.DataFrame(rows), hide_index=True)
    if not user.can_edit:
        st.caption("Applying them needs the editor role.")
        return
    if d.groups:
        st.caption(
            f"Applying replaces the dataset's {len(d.groups)} current groups. Splits made before keep "
            "their parts; new runs use the new groups."
        )
    if st.button(f"Apply these {found.n_groups} groups", type="primary", key="ds_apply_groups"):
        with user_errors():
            require_editor("change specimen groups")
            with Session.begin() as s:
                changed = groups.apply_groups(s, d.name, found.groups, user=user)
            st.session_state.pop("ds_estimate_result", None)
            st.session_state["ds_flash"] = (
                f"Dataset '{md_text(d.name)}' now has {found.n_groups} estimated specimen "
                f"groups ({changed} image(s) changed group)."
            )
            st.rerun()


def slides_section(slides: tuple[slide_views.SlideSummary, ...]) -> None:
    """The dataset's slides as a table, and one chosen slide's tiling drawn over its thumbnail."""
    st.subheader("Slides")
    text_table(
        pd.DataFrame(
            [
                {
                    "slide": x.file_name,
                    "class": x.label,
                    "size (px)": f"{x.width:,} × {x.height:,}",
                    "µm per pixel": f"{x.mpp:.3g}",
                    "vendor": x.vendor,
                    "tiles kept": x.tiles_kept,
                    "background": x.tiling.dropped_background,
                    "pale": x.tiling.dropped_pale,
                    "over the cap": x.tiling.dropped_over_cap,
                    "pen": x.tiling.pen_count,
                    "blurred": x.tiling.blurry_count,
                }
                for x in slides
            ]
        )
    )
    st.caption(
        "Grid cells dropped as background had too little tissue on the thumbnail; pale ones were mostly "
        "glass when read; over the cap, tissue not read once the most tiles per slide were kept. Pen and "
        "blurred count kept tiles with pen ink on them or out of focus."
    )
    by_id = {x.id: x for x in slides}
    if st.session_state.get("ds_slide") not in by_id:  # another dataset's slide, or none yet
        st.session_state["ds_slide"] = slides[0].id
    chosen = by_id[
        st.selectbox(
            "Slide", list(by_id), format_func=lambda i: f"{by_id[i].label} · {by_id[i].file_name}", key="ds_slide"
        )
    ]
    picture = cached_picture(chosen.sha256, chosen.source_path, chosen.file.value, chosen.tiling.to_json(), chosen)
    show_figure(tiling_figure(chosen, picture), key="ds_tiling")
    if picture.note:
        st.caption(md_text(picture.note))


@st.cache_data(show_spinner=False, max_entries=16)
def cached_picture(
    sha256: str, path: str | None, file_state: str, tiling: str, _slide: slide_views.SlideSummary
) -> slide_views.TilingPicture:
    """A slide's tiling picture, kept while what it is drawn from is the same (the slide's content, where
    it lies and whether it is there, its tiling): every rerun of the page would otherwise open the slide."""
    return slide_views.tiling_picture(_slide)


def _png_uri(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def tiling_figure(slide: slide_views.SlideSummary, picture: slide_views.TilingPicture) -> go.Figure:
    """The kept tiles as rectangles (one trace per kind, so the legend counts them) over the thumbnail,
    or over a blank canvas with the slide's outline."""
    canvas = picture.thumbnail
    if canvas is None:
        canvas = np.full((picture.height, picture.width, 3), 250, np.uint8)
    # As a PNG: a thumbnail's pixels as JSON numbers would be several megabytes.
    fig = go.Figure(go.Image(source=_png_uri(canvas), x0=0.5, y0=0.5, hoverinfo="skip", name="slide"))
    if picture.thumbnail is None:
        w, h = picture.width, picture.height
        fig.add_trace(
            go.Scatter(
                x=[0, w, w, 0, 0],
                y=[0, 0, h, h, 0],
                mode="lines",
                name="the slide's outline",
                line={"color": "#7f8c8d", "dash": "dot"},
                hoverinfo="skip",
            )
        )
    kinds = (
        ("kept", picture.clean, TILE_COLOURS[0]),
        ("kept, pen ink", picture.pen, TILE_COLOURS[1]),
        ("kept, blurred", picture.blurry, TILE_COLOURS[2]),
    )
    for label, boxes, colour in kinds:
        if not boxes:
            continue
        xs: list[float | None] = []
        ys: list[float | None] = []
        for left, top, right, bottom in boxes:  # closed outlines in one trace, apart at each None
            xs += [left, right, right, left, left, None]
            ys += [top, top, bottom, bottom, top, None]
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                name=f"{label} ({len(boxes)})",
                hoverinfo="skip",
                line={"color": colour, "width": 2},
            )
        )
    tiling = slide.tiling
    fig.update_layout(
        title={
            "text": f"Tiles of {plot_text(slide.file_name)}",
            "subtitle": {
                "text": f"{len(tiling.tiles)} kept · {tiling.tile_px} px at {tiling.mpp:g} µm per "
                "pixel · drag to zoom, double-click to reset"
            },
        },
        height=520,
        margin={"l": 10, "r": 10, "t": 70, "b": 10},
        showlegend=True,
        legend={"orientation": "h", "y": -0.02},
        xaxis={"visible": False, "range": [0, picture.width]},
        yaxis={"visible": False, "scaleanchor": "x", "range": [picture.height, 0]},
    )
    return fig


def versions_section(name: str) -> None:
    """The dataset's versions, newest first, and what changed between any two of them."""
    with Session() as s:
        found = views.dataset_versions(s, name)
    st.subheader("Versions")
    if not found:
        st.caption("No version recorded yet: the first run launched on it records its images as version 1.")
        return
    st.caption(
        "Adding images, relabelling them or changing their groups makes a new version; the old ones stay "
        "as they were. A run names the version it trained on, and trains again on exactly its images."
    )
    text_table(
        pd.DataFrame(
            [
                {
                    "version": v.number,
                    "when (UTC)": f"{v.created_at:%Y-%m-%d %H:%M}",
                    "by": v.created_by or "",
                    "images": v.images,
                    "per class": ", ".join(f"{c} {n}" for c, n in v.counts.items()),
                    "note": v.note,
                }
                for v in found
            ]
        )
    )
    if len(found) < 2:
        return
    numbers = [v.number for v in found]
    for key, number in (("ds_diff_old", numbers[1]), ("ds_diff_new", numbers[0])):
        if st.session_state.get(key) not in numbers:  # first time, or another dataset's
            st.session_state[key] = number
    a, b = st.columns(2)
    old = a.selectbox("Compare version", numbers, key="ds_diff_old", format_func=lambda n: f"version {n}")
    new = b.selectbox("with version", numbers, key="ds_diff_new", format_func=lambda n: f"version {n}")
    with Session() as s:
        diff = views.version_diff(s, name, old, new)
    c = st.columns(4)
    for col, label, images in zip(
        c, ("Added", "Removed", "Relabelled", "Regrouped"), (diff.added, diff.removed, diff.relabelled, diff.regrouped)
    ):
        col.metric(label, len(images), border=True)
    lines = diff.lines()
    if not lines:
        st.caption(f"Versions {old} and {new} hold the same images with the same classes and groups.")
        return
    text_table(
        pd.DataFrame(
            [
                {"change": x.change, "image": x.image, "class": x.label, "group": x.group, "sha256": x.sha256}
                for x in lines
            ]
        )
    )


def samples_section(images: list, classes: list[str]) -> None:
    st.subheader("Samples")
    per_row = 8
    per_class = st.segmented_control(
        "Images shown per class",
        [per_row, 2 * per_row, 3 * per_row],
        default=per_row,
        key="ds_per_class",
        required=True,
    )
    for label in classes:
        members = [im for im in images if im.label == label]
        step = max(1, len(members) // per_class)
        shown = members[::step][:per_class]  # spread over the class, not just its first files
        st.markdown(f"**{md_text(label)}** · {len(members)} images")
        with user_errors():
            for start in range(0, len(shown), per_row):
                for col, im in zip(st.columns(per_row), shown[start : start + per_row]):
                    col.image(thumbnail(str(im.path)), caption=md_text(im.name), width="stretch")


def delete_section(name: str, n_images: int, n_runs: int) -> None:
    with st.expander("Delete this dataset"):
        st.warning(
            f"Deleting **{md_text(name)}** removes its {n_images} images and its {n_runs} run(s) with their "
            "results. Stored image files used by no other dataset are removed too.",
            icon=":material/delete:",
        )
        sure = st.checkbox(f"Yes, delete '{md_text(name)}' and everything trained on it", key=f"ds_confirm_{name}")
        if st.button("Delete dataset", disabled=not sure, key="ds_delete"):
            with user_errors():
                with Session.begin() as s:
                    datasets.delete_dataset(s, cfg, name, user=user)
                st.session_state["ds_flash"] = f"Deleted dataset '{md_text(name)}'."
                st.session_state.pop("ds_selected", None)
                st.rerun()


def browse_tab() -> None:
    if st.session_state.get("ds_selected") not in names:
        st.session_state["ds_selected"] = names[0]
    name = st.selectbox("Dataset", names, key="ds_selected")
    with Session() as s:
        d = views.dataset_detail(s, cfg, name)
        scale, slides = slide_views.dataset_scale(s, name), slide_views.dataset_slides(s, name)
    images, counts, groups, n_runs = d.images, d.class_counts(), d.groups, d.n_runs
    skipped = [{"file": path, "reason": reason} for path, reason in d.skipped]
    classes, created, created_by = d.classes, d.created_at, d.created_by
    source = d.source_for(cfg.import_roots, full=user.can_edit)  # a viewer reads no server path

    c = st.columns(4)
    c[0].metric("Tiles" if slides else "Images", len(images), border=True)
    c[1].metric("Classes", len(classes), border=True)
    if slides:
        c[2].metric(
            "Slides",
            len(slides),
            border=True,
            help="Each tile's specimen group is its slide, so a split keeps a slide's tiles on one side.",
        )
    else:
        c[2].metric(
            "Specimen groups",
            len(groups) if groups else "none",
            border=True,
            help="Without groups, images of one specimen can sit on both sides of a split.",
        )
    c[3].metric("Files skipped", len(skipped), border=True)
    st.caption(
        f"Source: {md_text(source)} · added {created:%Y-%m-%d %H:%M} UTC"
        + (f" by {md_text(created_by)}" if created_by else "")
        + f" · {n_runs} run(s) use it"
        + (f" · scale: {scale.words}" if scale.words else "")
    )

    left, right = st.columns([3, 2])
    with left:
        show_figure(
            class_counts_figure(
                counts, f"Images per class in '{name}'", "source images before any augmentation or split"
            ),
            key="ds_counts",
        )
    with right:
        if groups:
            st.markdown("**Tiles per slide**" if slides else "**Images per specimen group**")
            table = pd.crosstab(
                pd.Series([im.group for im in images], name="group"),
                pd.Series([im.label for im in images], name="class"),
            )
            st.dataframe(table, height=320)
        else:
            st.markdown("**No specimen groups**")
            st.caption(
                "Splits will be stratified by class only. Estimate groups from the file numbers below, or "
                "add the images again under the same name with a table of specimens."
            )
    if slides:  # their groups are their slides, known: nothing to estimate
        slides_section(slides)
    else:
        estimated = st.session_state.get("ds_estimate_result", ("",))[0] == name
        with st.expander("Estimate specimen groups (an approximation)", expanded=not groups or estimated):
            estimate_section(d)

    samples_section(images, classes)

    with st.expander(f"Skipped files ({len(skipped)})", expanded=bool(skipped) and len(skipped) <= 20):
        if skipped:
            st.dataframe(pd.DataFrame(skipped), hide_index=True)
        else:
            st.caption("Every file was taken.")

    label_issues_section(name, Session, cfg, user)
    versions_section(name)

    if user.can_edit:
        delete_section(name, len(images), n_runs)


report = st.session_state.pop("ds_report", None)
if isinstance(report, SlideIngestReport):
    show_slide_report(report)
elif report is not None:
    show_report(report)
if "ds_goto" in st.session_state:  # set before the tabs exist in this run
    st.session_state["ds_tab"] = st.session_state.pop("ds_goto")
if not names:  # nothing to browse yet: the add form at once, with no tab to switch first
    st.subheader("Add images")
    add_tab()
else:
    browse, add = st.tabs(["Browse", "Add images"], default="Browse", key="ds_tab", on_change="rerun")
    if browse.open:
        with browse, user_errors():
            browse_tab()
    if add.open:
        with add:
            add_tab()
