"""The Predict page's "Whole slide" tab: send a slide (an upload, or one under IMPORT_ROOTS) to be
classified in the background by a run trained on slide tiles, follow it tile by tile, then read its
verdict, its heat map over the thumbnail, its most confident tiles, and download the per-tile CSV
and the GeoJSON that QuPath opens. The work is core/jobs/slide_jobs.py's; this lays it out.

This module is imported once per server process and serves every user: each function asks for the
session's user and settings when it runs, and nothing of theirs is kept at module level."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from PIL import Image as PILImage

from core.jobs import slide_jobs, views
from pages._common import (
    current_user,
    md_text,
    pct,
    plot_text,
    probabilities_figure,
    session_factory,
    settings,
    show_figure,
    start_worker,
    user_errors,
)

SLIDE_TYPES = ["svs", "ndpi", "scn", "bif", "czi", "tif", "tiff"]
REFRESH_SECONDS = 2.0


def pick_slide_model() -> tuple[views.RunRow, object] | None:
    """A run whose model records the scale of its tiles (only those can classify slides)."""
    Session = session_factory()
    cfg = settings()
    with Session() as s:
        scales = views.slide_models(s, cfg)
        rows = {r.id: r for r in views.run_rows(s, status="succeeded") if r.id in scales}
    if not rows:
        st.info(
            "No run can classify whole slides yet. A run trained on a dataset of slide tiles can: ingest a folder "
            "of class folders of slides on the **Datasets** page or with `python -m core ingest FOLDER --name "
            "NAME`, then train on it.",
            icon=":material/biotech:",
        )
        return None
    ids = list(rows)
    run_id = st.selectbox(
        "Model (a run trained on slide tiles)",
        ids,
        format_func=lambda i: rows[i].label(),
        key="sl_run",
        help="Only runs trained on tiles of whole slides know the scale to cut a "
        "slide at; a run trained on field images does not.",
    )
    scale = scales[run_id]
    st.caption(
        f"Cuts each slide into tiles of {scale.tile_px} px at {scale.mpp:g} µm per pixel, the scale this "
        f"run was trained at, and predicts every tissue tile. The slide's verdict is the mean of its tiles' "
        f"probabilities. Test accuracy {pct(rows[run_id].summary.test_accuracy)} per tile."
    )
    return rows[run_id], scale


def send_form(run_id: int) -> None:
    """Upload a slide, or name one on the server, with its microns per pixel if its file lacks them."""
    Session = session_factory()
    cfg = settings()
    user = current_user()
    with st.form("sl_form", clear_on_submit=True, border=True):
        upload = st.file_uploader(
            "Whole-slide image (SVS, NDPI, SCN, BIF, CZI or pyramidal TIFF)", type=SLIDE_TYPES, key="sl_file"
        )
        path = st.text_input(
            "…or its path on the server (under IMPORT_ROOTS)",
            key="sl_path",
            disabled=not cfg.import_roots,
            help="For MRXS and VMS slides, whose pixels lie in a "
            "folder beside the file, and for slides too large to upload."
            + ("" if cfg.import_roots else " Turned off: IMPORT_ROOTS is not set on this server."),
        )
        mpp = st.number_input(
            "Microns per pixel",
            min_value=0.0,
            max_value=20.0,
            value=0.0,
            step=0.05,
            format="%.3f",
            key="sl_mpp",
            help="Only for a slide whose file does not record it (0: use the file's). "
            "A 40x scan is about 0.25, 20x about 0.5.",
        )
        sent = st.form_submit_button("Classify slide", type="primary", icon=":material/play_arrow:")
    if not sent:
        return
    with user_errors():
        given = mpp if mpp > 0 else None
        if upload is not None:
            limit = int(cfg.max_session_upload_mb * 2**20) if cfg.max_session_upload_mb > 0 else 2**62
            stored = slide_jobs.store_upload(cfg, upload.name, upload, limit)
            job = slide_jobs.queue_slide(
                Session, cfg, user, run_id, name=upload.name, path=stored, uploaded=True, source="page", mpp=given
            )
        elif path.strip():
            from pathlib import Path

            job = slide_jobs.queue_slide(
                Session,
                cfg,
                user,
                run_id,
                name=Path(path.strip()).name,
                path=Path(path),
                uploaded=False,
                source="page",
                mpp=given,
            )
        else:
            st.warning("Choose a slide to upload, or give its path on the server.", icon=":material/warning:")
            return
        start_worker(cfg)
        st.session_state["sl_job"] = job
        st.toast(f"Slide job {job} queued.", icon=":material/schedule:")


def pick_job() -> views.SlideJobView | None:
    Session = session_factory()
    cfg = settings()
    user = current_user()
    with Session() as s:
        jobs = views.slide_jobs(s, cfg, user=None if user.can_edit else user.name)
    if not jobs:
        return None
    ids = [j.id for j in jobs]
    wanted = st.session_state.get("sl_job")
    chosen = st.selectbox(
        "Slide",
        ids,
        index=ids.index(wanted) if wanted in ids else 0,
        key="sl_pick",
        format_func=lambda i: next(
            f"Job {j.id} · {j.slide_name} · {j.created_at:%Y-%m-%d %H:%M} UTC" for j in jobs if j.id == i
        ),
    )
    return next(j for j in jobs if j.id == chosen)


def follow(job_id: int) -> None:
    """The job's progress, redrawn every REFRESH_SECONDS while it is queued or running."""
    Session = session_factory()
    cfg = settings()
    with Session() as s:
        job = views.slide_job(s, cfg, job_id)
    if job.queued:
        st.caption("Queued: the worker takes it after the runs and slides before it.")
    elif not job.ended:
        if job.total is None:
            st.progress(0.0, text="Finding the tissue and cutting it into tiles…")
        else:
            left = job.seconds_left()
            about = f" · about {views.duration_text(left)} left" if left is not None else ""
            st.progress(job.fraction, text=f"{job.done:,} of {job.total:,} tiles classified{about}")
    if job.ended:
        st.rerun()  # the whole tab, to show the results


def results(job: views.SlideJobView, classes: tuple[str, ...]) -> None:
    v = job.verdict
    if v.refer is None:
        verdict, note = v.predicted, "no refer band: the run has no validation part"
    elif v.refer:
        verdict, note = "Uncertain, refer", f"most likely {v.predicted}"
    else:
        verdict, note = v.predicted, "confident"
    plain = {"delta_color": "off", "delta_arrow": "off", "border": True}  # figures, not rises or falls
    seconds = f"{v.seconds:.1f} s" if v.seconds < 10 else views.duration_text(v.seconds)
    cols = st.columns(3)
    cols[0].metric("Slide verdict", verdict, note, **plain)
    cols[1].metric("Tissue tiles", f"{v.tiles_kept:,}", f"{v.tile_px} px at {v.tile_mpp:g} µm/px", **plain)
    cols[2].metric("Time", seconds, f"{v.tiles_per_second:.1f} tiles/s", **plain)
    band = (
        f"for {v.refer_target:.0%} accuracy, chosen on its validation tiles, not on whole slides, so it is no "
        "guarantee per slide"
        if v.refer_target is not None
        else ""
    )
    if v.refer is not None and v.refer_threshold is None:
        st.caption(
            f"No confidence threshold can promise {v.refer_target:.0%} accuracy from the run's validation tiles, so "
            f"every slide is referred (the run's band {band})."
        )
    elif v.refer is not None:
        st.caption(
            f"The slide is referred when the mean probability of its top class is below {pct(v.refer_threshold)}: "
            f"the run's band {band}."
        )
    left, right = st.columns([3, 2])
    with left:
        show_figure(heat_figure(job, classes), key=f"sl_heat_{job.id}")
    with right:
        show_figure(
            probabilities_figure(
                list(classes),
                [v.probabilities[c] for c in classes],
                "The slide's probabilities",
                "mean of its tiles' (" + v.probability_kind + ")",
            ),
            key=f"sl_probs_{job.id}",
        )
        st.caption(
            "Share of the tissue tiles predicted as each class: "
            + ", ".join(f"{md_text(c)} {pct(v.tissue_share[c])}" for c in classes)
        )
    gallery(job, classes)
    downloads(job)


def heat_figure(job: views.SlideJobView, classes: tuple[str, ...]) -> go.Figure:
    """The heat map over the thumbnail: each tile in its class's colour, as opaque as its probability."""
    from core.slides.outputs import class_colour

    thumb = np.asarray(PILImage.open(job.folder / "thumbnail.jpg").convert("RGBA"))
    layer = views.overlay(job, classes)
    alpha = layer[..., 3:4].astype(np.float32) / 255
    blended = (thumb[..., :3] * (1 - alpha) + layer[..., :3] * alpha).astype(np.uint8)
    fig = go.Figure(go.Image(z=blended, hoverinfo="skip"))
    for k, name in enumerate(classes):  # a legend: one coloured square per class
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="markers",
                name=plot_text(name),
                marker={"size": 12, "symbol": "square", "color": class_colour(k)},
            )
        )
    fig.update_layout(
        title={
            "text": f"Tiles of {plot_text(job.slide_name)} by predicted class",
            "subtitle": {"text": "opacity: the tile's probability · drag to zoom, double-click to reset"},
        },
        height=520,
        margin={"l": 10, "r": 10, "t": 70, "b": 10},
        legend={"orientation": "h", "y": -0.02},
        xaxis={"visible": False},
        yaxis={"visible": False, "scaleanchor": "x"},
    )
    return fig


def gallery(job: views.SlideJobView, classes: tuple[str, ...]) -> None:
    st.markdown("**The most confident tiles of each class**")
    for k, name in enumerate(classes):
        tiles = sorted(job.folder.glob(f"top-{k}-*.jpg"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
        if not tiles:
            continue
        st.caption(md_text(name))
        st.image([str(p) for p in tiles], width=112)


def downloads(job: views.SlideJobView) -> None:
    from pathlib import Path

    stem = Path(job.slide_name).stem or "slide"
    cols = st.columns(2)
    geojson, tiles = job.file("slide.geojson"), job.file("slide.tiles.csv")
    if geojson is not None:
        cols[0].download_button(
            "GeoJSON for QuPath",
            geojson.read_bytes(),
            f"{stem}.geojson",
            "application/geo+json",
            icon=":material/download:",
            key=f"sl_geo_{job.id}",
            help="One square per tile with its class and probabilities, in the slide's level-0 "
            "pixels: File > Import objects in QuPath.",
        )
    if tiles is not None:
        cols[1].download_button(
            "Tiles (.csv)",
            tiles.read_bytes(),
            f"{stem}.tiles.csv",
            "text/csv",
            icon=":material/download:",
            key=f"sl_csv_{job.id}",
        )


def slide_tab() -> None:
    Session = session_factory()
    cfg = settings()
    user = current_user()
    picked = pick_slide_model()
    if picked is None:
        return
    row, _ = picked
    send_form(row.id)
    job = pick_job()
    if job is None:
        return
    st.subheader(md_text(job.slide_name))
    if not job.ended:
        if st.button("Cancel", key=f"sl_cancel_{job.id}", icon=":material/stop:"):
            with user_errors():
                slide_jobs.cancel_slide(Session, cfg, job.id, user)
                st.rerun()
        st.fragment(follow, run_every=REFRESH_SECONDS)(job.id)
    elif job.failed:
        st.error(md_text(job.error or "It failed."), icon=":material/error:")
    elif job.cancelled:
        st.info("Cancelled.", icon=":material/stop:")
    else:
        with Session() as s:
            classes = tuple(views.run_row(s, job.run_id).classes)
        results(job, classes)
