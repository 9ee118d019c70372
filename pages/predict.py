"""Predict: classify new images with a finished run (the approved model unless another is chosen):
probabilities, a Grad-CAM heat map, a table (and CSV) for a batch; every classification is logged,
and the History tab lists the log."""

import hashlib
import io
import time
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import streamlit as st

from core.errors import UserError
from core.evaluation import calibration, calibration_words
from core.inference import service
from core.inference.probabilities import CALIBRATED
from core.jobs import views
from pages._common import (
    IMAGE_TYPES,
    csv_bytes,
    current_user,
    grad_cam_for,
    md_text,
    page_header,
    pct,
    probabilities_figure,
    session_factory,
    settings,
    show_figure,
    show_grad_cam,
    through_router,
    user_errors,
    verdict_words,
)

if TYPE_CHECKING:
    from core.inference import saliency

through_router()
Session = session_factory()
cfg = settings()
user = current_user()
FEW_VALIDATION = 50  # validation images below which a refer threshold is only a rough guide
THUMBNAIL_SIDE = 480  # px: the image shown beside its heat map (a JPEG of some 40 kB is kept)
HISTORY_DAYS = 30  # the History tab's default date range

page_header(
    "Predict",
    "Classify new H&E images with a trained run: the subtype, each class's probability, and a "
    "Grad-CAM heat map of the regions that drove the decision.",
)


# The model is loaded once per model file and server process, for every session: core's engine
# (core/inference/engine.py) keeps it, keyed by the file's sha256, so a retrained run's new file
# under the same id is loaded anew. The model code (and torch) is imported only when a model is needed.
def model_of(run_id: int) -> str | None:
    from core.inference import predict

    return predict.model_sha256(cfg, run_id)


def predictor_of(run_id: int):
    from core.inference import engine

    with Session() as s:
        return engine.get_predictor(s, cfg, run_id)


# --------------------------------------------------------------------------------------------
# The model


def pick_model() -> views.RunRow | None:
    """The run to classify with: the approved model unless the user picks another."""
    with Session() as s:
        finished = {r.id: r for r in views.run_rows(s, status="succeeded")}
        approvals = views.approval_panel(s)
    if not finished:
        st.info(
            "No finished run yet. Train one on the **Train** page; only runs that succeeded can classify images.",
            icon=":material/biotech:",
        )
        return None
    approved = {a.run_id: a for a in approvals.current if a.run_id in finished}
    default = approvals.default.run_id if approvals.default is not None else None
    ids = list(finished)
    run_id = st.selectbox(  # the whole width: a run's label names what sets it apart, and is long
        "Model (a run that succeeded)",
        ids,
        index=ids.index(default) if default in finished else 0,
        format_func=lambda i: finished[i].label() + (" · approved" if i in approved else ""),
        key="pr_run",
        help="The approved model is chosen for you: an editor approves a run for use on the Runs page.",
    )
    row = finished[run_id]
    st.caption(
        f"Trained on **{md_text(row.dataset)}** ({md_text(', '.join(row.classes))}) at "
        f"{row.config.image_size} px, weights {md_text(row.weights)}. Test accuracy "
        f"{pct(row.summary.test_accuracy)} under: {row.protocol}."
    )
    if run_id in approved:
        a = approved[run_id]
        note = f": {md_text(a.note)}" if a.note else ""
        st.caption(
            f":green-badge[:material/verified: approved] by {md_text(a.approved_by)} on {a.approved_at:%Y-%m-%d}{note}"
        )
    elif approvals.default is not None:
        st.caption(f"Not the approved model ({md_text(approvals.default.run_label)} is).")
    if row.leaky:
        st.warning(
            "This model was evaluated with the paper's leaky protocol: its test accuracy overstates how well it "
            "does on new images.",
            icon=":material/warning:",
        )
    return row


# --------------------------------------------------------------------------------------------
# Uploads: only the current batch stays, in the uploader and in memory


def uploader_key() -> str:
    round_ = st.session_state.get("pr_upload_round", 0)
    return "pr_files" if round_ == 0 else f"pr_files_{round_}"


def clear_uploads() -> None:
    """A fresh uploader (a new key) and no results; the old files leave the server's memory now
    rather than when the browser session ends (Streamlit's in-memory file store keeps them until then)."""
    from streamlit.runtime.memory_uploaded_file_manager import MemoryUploadedFileManager
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    files = st.session_state.get(uploader_key()) or []
    if ctx is not None and isinstance(ctx.uploaded_file_mgr, MemoryUploadedFileManager):
        for f in files:
            ctx.uploaded_file_mgr.remove_file(session_id=ctx.session_id, file_id=f.file_id)
    st.session_state["pr_upload_round"] = st.session_state.get("pr_upload_round", 0) + 1
    st.session_state.pop("pr_results", None)
    st.session_state.pop("pr_cam", None)


def uploads() -> list:
    files = st.file_uploader(
        "Images to classify (TIF, PNG, JPEG, BMP)", type=IMAGE_TYPES, accept_multiple_files=True, key=uploader_key()
    )
    if not files:
        st.session_state.pop("pr_results", None)
        st.session_state.pop("pr_cam", None)
        st.caption("Upload one image to see its heat map, or many for a table of results.")
        return []
    st.button(
        "Clear",
        icon=":material/delete_sweep:",
        on_click=clear_uploads,
        key="pr_clear",
        help="Remove these images from the page and from the server's memory, to start a new batch.",
    )
    return files


# --------------------------------------------------------------------------------------------
# Classifying (through core's service, which logs each image)


def classify(run_id: int, files: list) -> dict | None:
    """The batch's results, classified once per (model, files) and kept while the user looks
    around; only the latest batch is kept, and of its images only a small thumbnail each (the
    service decodes them one at a time and drops them). None when the model cannot be used, the
    batch is too large or the server too busy (said on the page)."""
    model = model_of(run_id)
    key = (run_id, model, tuple(hashlib.sha256(f.getvalue()).hexdigest() for f in files))
    cache = st.session_state.setdefault("pr_results", {})
    if key in cache:
        return cache[key]
    result = {"key": key, "problems": [], "thumbnails": [], "sources": []}

    def seen(index: int, image) -> None:
        result["sources"].append(index)  # which upload each answer is, for its heat map
        result["thumbnails"].append(thumbnail(image))

    try:
        result.update(
            run_model(
                run_id,
                [service.ImageInput(f.name, f.getvalue()) for f in files],
                lambda image, e: result["problems"].append(e.for_page()),
                seen,
            )
        )
    except UserError as e:
        st.error(md_text(e.for_page()), icon=":material/warning:")
        return None
    cache.clear()  # keep only the latest batch in memory
    cache[key] = result
    return result


def thumbnail(image, side: int = THUMBNAIL_SIDE) -> bytes:
    """A JPEG of at most `side` px a side: what the page keeps of an image to show it."""
    small = image.copy()
    small.thumbnail((side, side))
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def run_model(run_id: int, images: list, unreadable, seen) -> dict:
    """Load the model (once per server process) and classify, showing each step as it goes."""
    started = time.monotonic()
    with st.status("Classifying…", expanded=True) as status:
        st.write("Reading the model file…")
        model_of(run_id)
        st.write("Preparing the model (the first time on this server: up to a minute; then it stays loaded)…")
        predictor = predictor_of(run_id)
        st.write("Classifying…")
        bar = st.progress(0.0)
        answers = service.classify(
            Session,
            cfg,
            user,
            images,
            run_id=run_id,
            source="page",
            target=st.session_state.get(f"pr_target_{run_id}"),
            progress=lambda done, total: bar.progress(done / total, text=f"{done} of {total} image(s)"),
            unreadable=unreadable,
            seen=seen,
        )
        status.update(
            label=f"Classified {len(answers)} image(s) in {time.monotonic() - started:.1f} s",
            state="complete",
            expanded=False,
        )
    return {"answers": answers, "classes": list(predictor.classes), "calibration": predictor.calibration}


# --------------------------------------------------------------------------------------------
# The refer band


def refer_band(run_id: int, result: dict) -> tuple[float | None, np.ndarray]:
    """(threshold, refer per image) for the accuracy the user asks for, chosen on the run's
    validation images by its predictor; says what the band rests on."""
    answers, cal = result["answers"], result["calibration"]
    shown = np.asarray([[a.probabilities[c] for c in result["classes"]] for a in answers])
    if answers[0].kind != "calibrated":
        st.caption(
            "This run had no validation part, so these are the model's own probabilities, not adjusted, and no "
            '"uncertain, refer" band applies. Train with a validation fraction above 0 for one.',
            help="Raw softmax probabilities: no temperature scaling was fitted.",
        )
        return None, np.zeros(len(answers), dtype=bool)
    # Only the targets some threshold can promise from this validation part (and the run's own).
    supported = calibration.supported_target(np.asarray(cal.val_probs), cal.val_labels)
    own = calibration.DEFAULT_REFER_TARGET if cal.refer_target is None else cal.refer_target
    targets = sorted({t for t in (0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99) if t <= supported} | {own})
    about = (
        "Predictions below the confidence threshold that can promise this accuracy (with 95% confidence, from "
        "the run's validation images) are marked 'uncertain, refer'. The offered targets are those the validation "
        "images can support" + (f" (at most {supported:.0%} here)." if supported < 0.99 else ".")
    )
    if len(targets) == 1:  # nothing to choose: the run's own target, which its validation part cannot lower
        target = targets[0]
        st.caption(
            f"Accuracy required of a prediction shown as a diagnosis: {target:.0%}, the run's own; its "
            "validation images support no other target.",
            help=about,
        )
    else:
        target = st.select_slider(
            "Accuracy required of a prediction shown as a diagnosis",
            targets,
            value=own,
            format_func=lambda t: f"{t:.0%}",
            key=f"pr_target_{run_id}",
            help=about,
        )
    band = predictor_of(run_id).refer_band(target)  # chosen on the validation images, as at training
    threshold, n_val = band.threshold, band.n_val
    words = calibration_words.calibration_words(cal, band)
    st.caption(
        f"{words.scaling_sentence} {words.refer_sentence}",
        help=f"{words.technical} The refer threshold is the lowest adjusted confidence whose validation "
        "predictions at or above it reach the chosen accuracy by a one-sided Clopper-Pearson lower bound "
        "at 95% (selection with guaranteed risk, Geifman and El-Yaniv 2017).",
    )
    logged = {a.refer_target for a in answers}
    if logged != {band.target}:
        st.info(
            f"These images were classified and logged at {', '.join(f'{t:.0%}' for t in logged if t)}; the "
            f"verdicts below are at {band.target:.0%}, which the log does not hold. Classify them again to log "
            "them at this target.",
            icon=":material/history:",
        )
    if n_val < FEW_VALIDATION:
        st.warning(
            f"The threshold rests on only {n_val} validation images; treat it as rough. With so few, it moves "
            "in steps of one image, and a high accuracy cannot be promised at all. A run with at least "
            f"{FEW_VALIDATION} validation images gives a steadier one.",
            icon=":material/warning:",
        )
    return threshold, calibration.refer_verdict(shown, threshold)


# --------------------------------------------------------------------------------------------
# Results


def results_table(result: dict, refer: np.ndarray) -> pd.DataFrame:
    classes = result["classes"]
    calibrated = result["answers"][0].kind == "calibrated"
    return pd.DataFrame(
        [
            {
                "file": a.name,
                "predicted": a.predicted,
                "probabilities": a.label,
                "confidence": a.confidence,
                "verdict": verdict_words(bool(r) if calibrated else None),
                **{c: a.probabilities[c] for c in classes},
            }
            for a, r in zip(result["answers"], refer)
        ]
    )


def batch_summary(table: pd.DataFrame, classes: list[str], calibrated: bool) -> None:
    """Counts for a batch: with a refer band, the referred apart and only confident predictions per class."""
    if calibrated:
        confident = table[table["verdict"] == "confident"]["predicted"].value_counts()
        cols = st.columns(len(classes) + 1)
        cols[0].metric(
            "Referred",
            int((table["verdict"] == "uncertain, refer").sum()),
            border=True,
            help="Not confident enough to report a subtype: to be seen by a pathologist.",
        )
        for col, c in zip(cols[1:], classes):
            col.metric(f"Confident {md_text(c)}", int(confident.get(c, 0)), border=True)
    else:
        counts = table["predicted"].value_counts()
        for col, c in zip(st.columns(len(classes)), classes):
            col.metric(f"Predicted {md_text(c)}", int(counts.get(c, 0)), border=True)


def explained(run_id: int, model: str | None, load_image, image_sha256: str, class_index: int) -> "saliency.Saliency":
    """The Grad-CAM map of one image and class, kept for the latest one only: a rerun (another
    accuracy target, a History filter) shows it again without decoding the image (`load_image()`)
    or a pass back through the model."""
    key = (run_id, model, image_sha256, class_index)
    kept = st.session_state.get("pr_cam")
    if kept is None or kept[0] != key:
        with st.spinner("Computing the Grad-CAM heat map…"):
            explainer = grad_cam_for(run_id, model, cfg.database_url)
            kept = (key, explainer.explain(load_image(), class_index=class_index))
        st.session_state["pr_cam"] = kept
    return kept[1]


def heat_map(run_id: int, model: str | None, load_image, image_sha256: str, classes: list[str], predicted: int) -> None:
    target = st.selectbox(
        "Heat map for class",
        range(len(classes)),
        index=predicted,
        format_func=lambda i: classes[i],
        key=f"pr_cam_class_{(model or '')[:12]}_{image_sha256[:12]}",
    )  # per model and image
    with user_errors():
        explainer = grad_cam_for(run_id, model, cfg.database_url)
        cam = explained(run_id, model, load_image, image_sha256, int(target))
        show_grad_cam(cam, explainer.pipeline.image_size, classes[cam.class_index], run_id, key="pr_cam_chart")


def verdict(result: dict, chosen: int, refer: bool, run_id: int, protocol: str) -> None:
    answer, classes = result["answers"][chosen], result["classes"]
    probs = np.asarray([answer.probabilities[c] for c in classes])
    predicted, kind = int(probs.argmax()), answer.label
    # No arrow: the figure is a probability, not a change since something.
    if refer:
        st.metric(
            "Uncertain, refer",
            md_text(classes[predicted]),
            delta=f"most likely, {probs[predicted]:.1%} {kind}",
            delta_color="off",
            delta_arrow="off",
            border=True,
        )
        st.warning(
            "Not confident enough to report a subtype: refer this image to a pathologist "
            "(or review it with more of the specimen).",
            icon=":material/help:",
        )
    else:
        st.metric(
            "Predicted subtype",
            md_text(classes[predicted]),
            delta=f"{probs[predicted]:.1%} {kind}",
            delta_color="off",
            delta_arrow="off",
            border=True,
        )
    title = "Class probabilities (adjusted)" if kind == CALIBRATED else "Class probabilities (model's own)"
    show_figure(probabilities_figure(classes, probs, title, f"run {run_id} · {protocol}", wrap=42), key="pr_probs")


def classify_tab() -> None:
    row = pick_model()
    if row is None:
        return
    files = uploads()
    if not files:
        return
    result = classify(row.id, files)
    if result is None:
        return
    for problem in result["problems"]:
        st.error(f"Not classified: {md_text(problem)}", icon=":material/warning:")
    if not result["answers"]:
        return
    classes = result["classes"]
    try:
        _, refer = refer_band(row.id, result)
    except UserError as e:  # the run went since it classified (deleted, or its model file replaced)
        st.error(md_text(e.for_page()), icon=":material/warning:")
        return
    table = results_table(result, refer)
    st.subheader("Result" if len(table) == 1 else f"Results for {len(table)} images")
    if len(table) > 1:
        batch_summary(table, classes, result["answers"][0].kind == "calibrated")
    # The file, the answer and each class's probability: what fits beside the sidebar without scrolling
    # (the kind of probability is said once, in the caption; the confidence is the predicted class's).
    st.dataframe(
        table,
        hide_index=True,
        column_order=["file", "predicted", "verdict", *classes],
        column_config={
            "file": st.column_config.TextColumn(width="medium"),
            **{
                name: st.column_config.ProgressColumn(name, format="percent", min_value=0, max_value=1, width="small")
                for name in classes
            },
        },
    )
    st.caption(f"Each class's {result['answers'][0].label}.")
    # The download holds each prediction's fields as the log and the API name them (core/inference/service.py).
    st.download_button(
        "Results (.csv)",
        icon=":material/download:",
        file_name=f"predictions-run-{row.id}.csv",
        data=csv_bytes(pd.DataFrame([service.prediction_row(a) for a in result["answers"]])),
        mime="text/csv",
        on_click="ignore",
    )
    names = [a.name for a in result["answers"]]
    chosen = (
        st.selectbox("Look at one image", range(len(table)), format_func=lambda i: names[i], key="pr_detail")
        if len(table) > 1
        else 0
    )
    answer, upload = result["answers"][chosen], files[result["sources"][chosen]]
    predicted = classes.index(answer.predicted)
    # The image and its heat map side by side at the same width, so that one can be read against the other.
    left, right = st.columns(2, gap="medium")
    with left:
        st.markdown(f"**{md_text(answer.name)}**")
        st.image(result["thumbnails"][chosen], caption=f"{answer.width}×{answer.height} px", width="stretch")
        verdict(result, chosen, bool(refer[chosen]), row.id, row.protocol)
    with right:
        # Decoded again only for a new heat map, reduced as for classifying (a large image is not kept).
        heat_map(
            row.id,
            answer.model_sha256,
            lambda: service.decode_one(
                cfg, service.ImageInput(upload.name, upload.getvalue()), service.reduce_side(row.config.image_size)
            ),
            answer.image_sha256,
            classes,
            predicted,
        )


# --------------------------------------------------------------------------------------------
# History: the log of predictions


def history_tab() -> None:
    with Session() as s:  # only the values the filters offer (no rows)
        choices = views.prediction_history(s, reader=user, limit=0).choices  # a viewer: their own rows
    if not choices.run_ids:
        st.info(
            "No prediction logged yet: each image classified here, through the API or with "
            "`python -m core predict --log` is listed here.",
            icon=":material/history:",
        )
        return
    a, b, c, d = st.columns(4)
    run_id = a.selectbox(
        "Model", [None, *choices.run_ids], format_func=lambda i: "all" if i is None else f"run {i}", key="pr_h_model"
    )
    who = b.selectbox("User", [None, *choices.users], format_func=lambda u: "all" if u is None else u, key="pr_h_user")
    predicted = c.selectbox(
        "Predicted class", [None, *choices.predicted], format_func=lambda p: "all" if p is None else p, key="pr_h_class"
    )
    today = datetime.now(UTC).date()
    dates = d.date_input(
        "Dates",
        (today - timedelta(days=HISTORY_DAYS), today),
        key="pr_h_dates",
        help="Days in UTC, both ends included.",
    )
    since, until = date_bounds(dates)
    with Session() as s:
        history = views.prediction_history(
            s, reader=user, since=since, until=until, run_id=run_id, user=who, predicted=predicted
        )
    if not history.rows:
        st.caption("No logged prediction matches these filters.")
        return
    more = f" (the newest {history.limit}: narrow the filters for older ones)" if history.truncated else ""
    st.caption(f"{len(history.rows)} logged prediction(s){more}.")
    table = pd.DataFrame(
        [
            {
                "when (UTC)": r.at.replace(microsecond=0),
                "user": r.user,
                "from": r.source,
                "model": f"run {r.run_id}",
                "file": r.image_name,
                "predicted": r.predicted,
                "verdict": verdict_words(r.refer),
                "confidence": r.probabilities.get(r.predicted),
                "model file (sha256)": r.model_sha256[:12],
            }
            for r in history.rows
        ]
    )
    st.dataframe(
        table,
        hide_index=True,
        column_config={
            "confidence": st.column_config.ProgressColumn("confidence", format="percent", min_value=0, max_value=1)
        },
    )
    st.download_button(
        "Log (.csv)",
        icon=":material/download:",
        data=history.csv().encode(),
        file_name="prediction-log.csv",
        mime="text/csv",
        on_click="ignore",
        key="pr_h_csv",
    )


def date_bounds(dates) -> tuple[datetime | None, datetime | None]:
    """[since, until) in UTC of a date range widget's value (one date while the user picks the second)."""
    picked = [d for d in (dates if isinstance(dates, (tuple, list)) else (dates,)) if isinstance(d, date)]
    if not picked:
        return None, None
    start, end = picked[0], picked[-1]
    return datetime.combine(start, datetime.min.time()), datetime.combine(end + timedelta(days=1), datetime.min.time())


classify_view, slide_view, history_view = st.tabs(["Classify", "Whole slide", "History"])
with classify_view:
    classify_tab()
with slide_view:
    from pages._slides import slide_tab  # here, so that its module is read only when the page is drawn

    slide_tab()
with history_view:
    history_tab()
