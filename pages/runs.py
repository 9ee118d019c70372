"""Runs: every training run in a table; one run's live progress, results, approval and management
(resume, train again, delete); several runs' curves and differing settings side by side."""

import pandas as pd
import streamlit as st

from core.data import audit
from core.evaluation import metrics
from core.evaluation.calibration_words import change_text
from core.inference import approval
from core.inference.probabilities import Probabilities
from core.jobs import comparisons, manage, views
from pages._common import (
    STATUS_BADGE,
    confusion_figure,
    csv_bytes,
    current_user,
    curves_figure,
    grad_cam_for,
    md_text,
    page_header,
    pct,
    reliability_chart,
    request_cancel,
    session_factory,
    settings,
    show_figure,
    show_grad_cam,
    start_worker,
    text_table,
    through_router,
    thumbnail,
    user_errors,
)
from pages._field import field_panel
from pages._model_card import model_card_buttons
from pages._retrain import retrain_panel
from pages._run_cells import cell_choice, cell_images_panel, slide_cell_panel

through_router()
Session = session_factory()
cfg = settings()
user = current_user()  # managing runs, approving models and downloading model files need an editor
LEAKY_NOTE = (
    "LEAKY protocol (the paper's): augmented copies of the same source images are in both training and "
    "test, so these numbers overstate accuracy on new images."
)
FLASH = "runs_flash"  # a success message to show once, after the rerun an action causes

page_header(
    "Runs",
    "Every training run with its data, split, settings and results. Each figure names the "
    "protocol it was measured under.",
)
if FLASH in st.session_state:
    st.success(st.session_state.pop(FLASH), icon=":material/check_circle:")


def failure_notice() -> None:
    """The runs that failed since this user last dismissed them, with what to do next."""
    with Session() as s:
        notices = views.failure_notices(s, user.name)
    if not notices:
        return
    lines = [
        f"- **Run {n.run_id}** ({md_text(n.title)}) failed {views.duration_text(views.seconds_since(n.finished_at))} "
        f"ago: {md_text(n.message)}"
        for n in notices[:5]
    ]
    more = f"\n\n…and {len(notices) - 5} more (filter the table by status *failed*)." if len(notices) > 5 else ""
    box, button = st.columns([6, 1], vertical_alignment="center")
    box.error(
        f"**{len(notices)} run(s) failed since you last looked**\n\n" + "\n".join(lines) + more, icon=":material/error:"
    )
    if button.button(
        "Dismiss",
        key="runs_dismiss_failures",
        width="stretch",
        help="Hide these notices here and in the sidebar; the runs stay in the table.",
    ):
        with Session.begin() as s:
            manage.mark_failures_seen(s, user.name, max(n.finished_at for n in notices))
        st.rerun(scope="app")


failure_notice()

with Session() as s:
    all_runs = views.run_rows(s)
    intervals = comparisons.test_intervals(s, [(r.id, r.seed) for r in all_runs if r.status == "succeeded"])
# The key figures first (name, status, accuracy and its interval) and only as many columns as fit
# beside the sidebar at 1280 px: the rest of a run's settings are in its own panel below.
rows = [
    {
        "name": r.title,
        "status": r.status,
        "test accuracy": r.summary.test_accuracy,
        "95% interval": views.interval_text(intervals.get(r.id)),
        "run": r.id,
        "dataset": r.dataset,
        "version": r.config.dataset_version,
        "split": r.config.split,
    }
    for r in all_runs
]
labels = {r.id: r.label(results=False) for r in all_runs}
with_curves = {r.id for r in all_runs if r.epochs_done}

if not rows:
    st.info("No runs yet. Launch one on the **Train** page.", icon=":material/monitoring:")
    st.stop()

table = pd.DataFrame(rows)
f1, f2, f3 = st.columns(3)
by_dataset = f1.multiselect("Dataset", sorted(table["dataset"].unique()), key="runs_f_dataset", placeholder="all")
by_status = f2.multiselect("Status", views.STATUSES, key="runs_f_status", placeholder="all")
by_split = f3.multiselect("Split", sorted(table["split"].dropna().unique()), key="runs_f_split", placeholder="all")
keep = pd.Series(True, index=table.index)
if by_dataset:
    keep &= table["dataset"].isin(by_dataset)
if by_status:
    keep &= table["status"].isin(by_status)
if by_split:
    keep &= table["split"].isin(by_split)
shown = table[keep].drop(columns=["split"])
# Rows tall enough for the grid to wrap long text (it wraps above 64 px): the protocol, names and
# notes are read whole, not cut off.
st.dataframe(
    shown,
    hide_index=True,
    height=min(520, 38 + 73 * len(shown)),
    placeholder="–",
    row_height=72,
    column_config={
        "name": st.column_config.TextColumn(
            width=300, help="Its own name, or what sets its settings apart from the paper's"
        ),
        "test accuracy": st.column_config.NumberColumn(format="percent", width=90),
        "95% interval": st.column_config.TextColumn(
            width=110,
            help="Bootstrap over the run's test images (whole "
            "specimens where known): where its accuracy on other images like "
            "these likely lies.",
        ),
        "run": st.column_config.NumberColumn(width=50),
        "status": st.column_config.TextColumn(width=90),
        "dataset": st.column_config.TextColumn(width=110),
        "version": st.column_config.NumberColumn(
            width=60,
            format="%d",
            help="The version of the dataset it trained on (the Datasets page lists them); "
            "empty: run before versions were kept",
        ),
    },
)
st.caption(
    "Click a column header to sort. Test accuracy is on the run's own test part: compare runs only under "
    "the same protocol (the Compare tab says whether a gap is more than noise)."
)
ids = [int(i) for i in shown["run"]] or [r["run"] for r in rows]

# A link to ?run=N (the sidebar's failure notice) selects that run, once per link followed.
query_run = st.query_params.get("run")
if query_run and query_run.isdigit() and int(query_run) in labels and st.session_state.get("runs_query") != query_run:
    st.session_state["runs_query"] = query_run
    st.session_state["runs_selected"] = int(query_run)
# The run just launched on the Train page, once: the page opens on it whether reached by the link
# there or by the sidebar. Not a widget's key, so no page that lacks the widget clears it.
focus = st.session_state.pop("runs_focus", None)
if focus in labels:
    st.session_state["runs_selected"] = focus
if st.session_state.get("runs_selected") not in ids:
    st.session_state["runs_selected"] = ids[0]


# ---------------------------------------------------------------------------------------------
# One run: its progress


def metrics_row(curve: views.RunCurves) -> None:
    """Four cards with short values (a card cuts off what does not fit), the rest as text below."""
    run, epochs = curve.run, curve.epochs
    c = st.columns(4)
    if run.active:  # while it trains: where it is, how long it has left, how fast it goes
        last = epochs[-1] if epochs else None
        left, now, slowed = curve.remaining_seconds(), curve.speed_now(), curve.slowed_to()
        c[0].metric("Epochs done", f"{len(epochs)} of {run.config.epochs}", border=True)
        c[1].metric("Last validation accuracy", pct(last.val_accuracy if last else None), border=True)
        # An estimate at the speed of the last seconds, not a bound: a busier machine makes it longer.
        # With early stopping on, training may end before its last epoch.
        c[2].metric(
            "Time left" + (" (if every epoch runs)" if run.config.patience else ""),
            "estimating…" if left is None else f"≈ {views.duration_text(left)}",
            border=True,
            help="Training time left at the speed of the last 20 seconds of steps, so it follows the machine "
            "when other work slows it; validation between epochs and the test come on top."
            + (" Early stopping may end training sooner." if run.config.patience else ""),
        )
        c[3].metric("Elapsed", views.duration_text(run.seconds), border=True)
        speed = (
            f"Speed {views.speed_text(now)} now"
            if now is not None
            else f"Speed {views.speed_text(last.images_per_second if last else None)} in the last epoch"
        )
        st.caption(
            f"{speed} · training on {md_text(run.device or 'the device the worker reports when it starts')}"
            "  \nThe first epochs say the least: the curves settle after a few, so judge a run by its later "
            "epochs."
        )
        if slowed is not None:
            st.warning(
                f"Training goes at {slowed:.0%} of its earlier speed: other work shares this machine. The time "
                "left follows the speed of the last seconds.",
                icon=":material/speed:",
            )
        return
    s = run.summary
    shown = lambda v: "–" if v is None else v  # noqa: E731
    c[0].metric(
        "Test accuracy",
        pct(s.test_accuracy, 2),
        border=True,
        help="On the run's test part, with the weights of the best validation epoch (its model file).",
    )
    c[1].metric(
        "Best epoch",
        shown(s.best_epoch),
        border=True,
        help="The epoch with the best validation accuracy: its weights are the ones tested and kept.",
    )
    c[2].metric("Epochs trained", f"{len(epochs)} of {run.config.epochs}", border=True)
    c[3].metric("Duration", views.duration_text(run.seconds), border=True)
    if s.stopped_early:
        st.info(
            f"**Stopped early** after epoch {s.stopped_at_epoch} of {run.config.epochs}: the validation loss "
            f"had not improved for {_epochs(run.config.patience)}, so training ended there. The best epoch "
            f"({shown(s.best_epoch)}) is the one tested and kept.",
            icon=":material/front_hand:",
        )
    memory = s.gpu_peak_memory_gib
    st.caption(
        f"Training speed: {views.speed_text(s.images_per_second)} (mean over epochs) · trained on "
        f"{md_text(run.device or '–')}"
        + (f" · peak GPU memory {memory:.1f} GiB" if memory is not None else " · no GPU memory used (CPU run)")
        + f"  \nSamples: {shown(s.n_train)} augmented training images, {shown(s.n_val)} validation and "
        f"{shown(s.n_test)} test images (untouched)"
    )


def _epochs(n: int) -> str:
    return f"{n} epoch{'' if n == 1 else 's'}"


def live_panel(run_id: int, was_active: bool) -> None:
    """Progress, metrics and curves; refreshed every few seconds while the run is queued or running."""
    with Session() as s:
        curve = views.run_curve(s, run_id)
    run, epochs = curve.run, curve.epochs
    if was_active and not run.active:
        st.rerun(scope="app")  # finished: draw the results once, and stop polling
    if run.active:
        fraction, text = run.progress_bar()
        st.progress(fraction, text=text)
    if epochs or run.status != "failed":  # a run that failed at its start has no numbers
        metrics_row(curve)
    if epochs:
        show_figure(
            curves_figure([(f"run {run.id}", epochs)], f"Run {run.id}: loss and accuracy per epoch", run.protocol),
            key=f"runs_curves_{run.id}",
        )
    elif run.active:
        st.caption("Curves appear after the first epoch.")


# ---------------------------------------------------------------------------------------------
# One run: its results


def table_one(report: metrics.Report) -> pd.DataFrame:
    """The paper's Table I layout: one row per class, then the overall accuracy."""
    frame = pd.DataFrame(
        [
            {
                "Class": r.name,
                "Accuracy": r.accuracy,
                "Precision": r.precision,
                "Recall": r.recall,
                "F1-score": r.f1,
                "Support": r.support,
            }
            for r in report.rows
        ]
    )
    overall = pd.DataFrame(
        [
            {
                "Class": "Overall accuracy",
                "Accuracy": report.accuracy,
                "Precision": None,
                "Recall": None,
                "F1-score": None,
                "Support": report.n,
            }
        ]
    )
    return pd.concat([frame, overall], ignore_index=True)


def misclassified(found: views.RunResults, classes: tuple[str, ...]) -> None:
    wrong = found.misclassified
    st.subheader(f"Misclassified test images ({len(wrong)})")
    if not wrong:
        st.caption("Every test image was classified correctly.")
        return
    if found.run.leaky:
        st.caption("Leaky protocol: the test samples are augmented copies; the source image is shown.")
    limit, per_row = 24, 5
    cols = st.columns(per_row)
    # Stored raw; shown calibrated where the run has a temperature, as the Predict page shows them.
    shown = Probabilities.of_run([p.probabilities for p in wrong[:limit]], found.run.summary.calibration)
    for k, (pred, row) in enumerate(zip(wrong[:limit], shown.shown)):
        probs = " · ".join(f"{c} {p:.1%}" for c, p in zip(classes, row))
        name = pred.name + (f" (copy {pred.aug_index})" if pred.aug_index is not None else "")
        with cols[k % per_row]:
            st.image(thumbnail(str(pred.path)), width="stretch")
            st.markdown(f"**{md_text(classes[pred.true_label])} → {md_text(classes[pred.predicted_label])}**")
            st.caption(f"{md_text(name)}  \n{shown.label}: {md_text(probs)}")
    if len(wrong) > limit:
        st.caption(f"The first {limit} of {len(wrong)}; the predictions CSV below lists them all.")
    if found.model_file is not None:
        explain_mistake(found, wrong[:limit], classes)


def explain_mistake(found: views.RunResults, wrong: list, classes: tuple[str, ...]) -> None:
    """Grad-CAM of one misclassified image, for the class the model chose: where it saw that class."""
    run = found.run
    names = {
        k: f"{p.name}: {classes[p.true_label]} taken for {classes[p.predicted_label]}" for k, p in enumerate(wrong)
    }
    pick = st.selectbox(
        "Where did the model see the wrong class? (Grad-CAM)",
        [None, *names],
        key=f"runs_cam_{run.id}",
        format_func=lambda k: "Choose a misclassified image" if k is None else names[k],
    )
    if pick is None:
        return
    from core.data.decoding import load_rgb  # decoding: only for the image asked for
    from core.inference import predict

    mistake = wrong[pick]
    with user_errors(), st.spinner("Computing the Grad-CAM heat map…"):
        explainer = grad_cam_for(run.id, predict.model_sha256(cfg, run.id), cfg.database_url)
        cam = explainer.explain(load_rgb(mistake.path, cfg.max_image_pixels), class_index=mistake.predicted_label)
        show_grad_cam(
            cam, explainer.pipeline.image_size, classes[mistake.predicted_label], run.id, key=f"runs_cam_chart_{run.id}"
        )


def predictions_csv(found: views.RunResults, classes: tuple[str, ...]) -> bytes:
    probs = Probabilities.of_run([p.probabilities for p in found.predictions], found.run.summary.calibration)
    calibrated = probs.shown if probs.is_calibrated else [()] * len(found.predictions)
    frame = pd.DataFrame(
        [
            {
                "image": pred.image,
                "augmented_copy": pred.aug_index,
                "group": pred.group,
                "true": classes[pred.true_label],
                "predicted": classes[pred.predicted_label],
                **{f"raw_p_{c}": p for c, p in zip(classes, pred.probabilities)},
                **{f"calibrated_p_{c}": p for c, p in zip(classes, cal)},
            }
            for pred, cal in zip(found.predictions, calibrated)
        ]
    )
    return csv_bytes(frame)


def calibration_panel(found: views.RunResults) -> None:
    """How far the run's confidences can be trusted, in plain words; the technical terms in the tooltips."""
    run, uncertainty, cal = found.run, found.uncertainty, found.calibration
    with st.expander('How far its confidence can be trusted, and the "uncertain, refer" band', expanded=False):
        if not cal.calibrated:
            st.caption(f"Not calibrated: {md_text(cal.note)}.")
            return
        c = st.columns(3)
        c[0].metric("Confidence scaling", cal.scaling, border=True, help=cal.technical)
        c[1].metric("Calibration error, validation", cal.val_error, border=True, help=cal.ERROR_HELP)
        # The test figures from the same bins as the chart below, so the card and its legend agree.
        test = (
            cal.test_error
            if uncertainty.reliability is None
            else change_text((uncertainty.reliability.ece, uncertainty.reliability_after.ece))
        )
        c[2].metric("Calibration error, test", test, border=True, help=cal.ERROR_HELP)
        st.caption(cal.scaling_sentence)
        st.markdown(cal.refer_sentence)
        if uncertainty.reliability is not None:
            fig = reliability_chart(
                uncertainty.reliability,
                uncertainty.reliability_after,
                f"Run {run.id}: confidence against accuracy on the test part",
                run.protocol,
                wrap=80,
            )
            for trace in fig.data:  # the chart's technical names, in the page's words
                trace.name = views.plain_calibration_words(trace.name or "")
            show_figure(fig, key=f"runs_reliability_{run.id}")
            st.caption(
                "Confidence scaling is fitted on the validation part only; the test part shows whether it "
                "carries over. Bars on the dashed line: confidence matches accuracy."
            )


def bootstrap_lines(found: views.RunResults) -> None:
    boot = found.uncertainty.bootstrap
    how = (
        f"{boot.n_groups} specimens (or source images) resampled whole"
        if boot.n_groups is not None
        else "test images resampled one by one"
    )
    st.markdown(
        f"Test accuracy {pct(boot.accuracy.estimate)}, likely between "
        f"**{pct(boot.accuracy.low)} and {pct(boot.accuracy.high)}** on other images like these."
    )
    st.caption(f"{boot.level:.0%} bootstrap interval: {how}.")


def folds_panel(folds: views.FoldResults) -> None:
    st.markdown(f"**{folds.n_folds}-fold cross-validation** · {folds.n_done} of {folds.n_folds} folds finished")
    if folds.summary is None:
        return
    summary = folds.summary
    st.metric(
        "Accuracy across folds",
        f"{pct(summary.accuracy_mean)} ± {pct(summary.accuracy_std)}",
        help="Mean ± sample standard deviation over the finished folds.",
    )
    if folds.spread:
        st.caption(folds.spread)
    if folds.yardstick:
        st.caption(folds.yardstick)
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "Class": row["name"],
                    **{
                        m: f"{row[m.lower().replace('-score', '') + '_mean']:.3f} ± "
                        f"{row[m.lower().replace('-score', '') + '_std']:.3f}"
                        for m in ("Accuracy", "Precision", "Recall", "F1-score")
                    },
                }
                for row in summary.rows
            ]
        ),
        hide_index=True,
    )


def report_panel(found: views.RunResults) -> None:
    """A succeeded run's confusion matrix, Table I, intervals, colour yardstick and k-fold summary."""
    run, report = found.run, found.report
    left, right = st.columns([2, 3], gap="large")
    with left:
        show_figure(
            confusion_figure(report.confusion, run.classes, f"Run {run.id}: confusion matrix", run.protocol, wrap=60),
            key=f"runs_cm_{run.id}",
        )
        cell = cell_choice(run.classes, f"runs_cell_{run.id}")
    with right:
        st.markdown(f"**Per-class results (the paper's Table I layout)** · {report.n} test samples")
        st.caption(run.protocol)
        st.dataframe(
            table_one(report),
            hide_index=True,
            placeholder="",
            column_config={
                c: st.column_config.NumberColumn(format="%.3f") for c in ("Accuracy", "Precision", "Recall", "F1-score")
            },
        )
        st.caption(
            "Per-class accuracy counts the images rightly put in or kept out of each class (one-vs-rest, "
            "(TP + TN) / N, as in the paper)."
        )
        bootstrap_lines(found)
        if found.yardstick:
            st.caption(found.yardstick)
        if found.folds is not None:
            folds_panel(found.folds)
    if cell is not None:
        cell_images_panel(run, cell, Session, cfg)
    if found.slides is not None:
        slides_panel(found)


def slides_panel(found: views.RunResults) -> None:
    """A run on slide tiles, judged per slide: each test slide's verdict is the mean of its tiles'
    probabilities (as a slide is classified on the Predict page)."""
    run, report = found.run, found.slides
    st.markdown(f"**Per slide (the mean of its tiles' probabilities)** · {report.n} test slides")
    left, right = st.columns([2, 3], gap="large")
    with left:
        show_figure(
            confusion_figure(
                report.confusion, run.classes, f"Run {run.id}: confusion matrix per slide", run.protocol, wrap=60
            ),
            key=f"runs_slide_cm_{run.id}",
        )
        cell = cell_choice(run.classes, f"runs_slide_cell_{run.id}")
    with right:
        st.dataframe(
            table_one(report),
            hide_index=True,
            placeholder="",
            column_config={
                c: st.column_config.NumberColumn(format="%.3f") for c in ("Accuracy", "Precision", "Recall", "F1-score")
            },
        )
        if report.n < 30:
            st.caption(f"Only {report.n} test slides: one slide moves the accuracy by {pct(1 / max(report.n, 1))}.")
        table = pd.DataFrame(
            [
                {
                    "slide": r.slide,
                    "true": r.true_class,
                    "predicted": r.predicted_class,
                    "its probability": r.probabilities[run.classes.index(r.predicted_class)],
                    "tiles": r.n_tiles,
                    **{f"tiles {c}": share for c, share in zip(run.classes, r.tile_shares)},
                }
                for r in report.slides
            ]
        )
        st.dataframe(
            table,
            hide_index=True,
            column_config={
                "its probability": st.column_config.NumberColumn(format="%.3f"),
                **{
                    f"tiles {c}": st.column_config.NumberColumn(
                        format="%.2f", help="share of the slide's test tiles predicted as this class"
                    )
                    for c in run.classes
                },
            },
        )
    if cell is not None:
        slide_cell_panel(run, cell, Session, cfg)


def for_reader(value):
    """`value` (text or JSON) as this user may read it: a viewer reads files on the server (a weights
    file, say) by their names, not by their paths."""
    return value if user.can_edit else views.without_paths_in(value)


def failure_panel(found: views.RunResults) -> None:
    st.error(f"**This run failed.** {md_text(found.message or 'No error was recorded.')}", icon=":material/error:")
    if user.can_edit:
        st.caption("Resume it below once the cause is fixed, or train again with other settings.")
    if found.technical_log and user.can_edit:  # tracebacks and server paths: for the people who run the server
        with st.expander("Technical log", expanded=False, icon=":material/terminal:"):
            st.code(found.technical_log, language="text", wrap_lines=True, height=360)
    elif found.technical_log:
        st.caption("Its technical log is shown to editors.")


def results(run_id: int) -> None:
    with Session() as s:
        found = views.run_results(s, cfg, run_id)
    run = found.run
    if run.status == "failed":
        failure_panel(found)
    elif run.status == "cancelled":
        st.info("This run was cancelled; its curves show the epochs it finished.", icon=":material/block:")

    leak = run.summary.leak_audit
    if leak is not None and leak.warning:
        st.warning(audit.record_verdict(leak), title="Leak check of this run's split", icon=":material/content_copy:")
        st.caption("How it was checked", help=leak.summary)
    elif leak is not None:
        st.caption(f"Leak check of this run's split: {audit.record_verdict(leak)}", help=leak.summary)

    if found.report is not None:
        report_panel(found)
        calibration_panel(found)
        misclassified(found, run.classes)

    with st.expander("Full configuration"):
        st.markdown(
            f"**Protocol:** {run.protocol}  \n"
            f"**Augmentation preset:** {md_text(run.augmentation)}  \n"
            f"**Weights:** {md_text(for_reader(run.weights_used or run.config.weights))}  \n"
            f"**Experiment:** `{run.experiment}` · fold {run.fold} · split id {run.split_id}"
        )
        st.json(
            for_reader({"config": found.config_json, "summary": found.summary_json, "timings_seconds": found.timings}),
            expanded=1,
        )
    downloads(found)
    if run.status == "succeeded":
        approval_panel(found)
        field_panel(run.id)
        retrain_panel(run.id)


def downloads(found: views.RunResults) -> None:
    run, model = found.run, found.model_file
    a, b, c = st.columns(3)
    # The model file is the trained weights (the team's work): editors only. The results (CSV) are
    # for everyone.
    if model is not None and user.can_edit:
        a.download_button(
            "Model file (.safetensors)",
            icon=":material/download:",
            data=lambda: model.read_bytes(),
            file_name=f"run-{run.id}-model.safetensors",
            mime="application/octet-stream",
            on_click="ignore",
            key=f"runs_dl_ckpt_{run.id}",
        )
    elif model is not None:
        a.caption("Downloading the model file needs the editor role.")
    if model is not None and user.can_edit and run.status == "succeeded":
        c.download_button(
            "Download for use outside the app (ONNX)",
            icon=":material/download:",
            data=lambda: onnx_bytes(run.id),
            file_name=f"run-{run.id}.onnx",
            mime="application/octet-stream",
            on_click="ignore",
            key=f"runs_dl_onnx_{run.id}",
            help="The network as an ONNX model, for ONNX Runtime and other tools. It takes uint8 RGB "
            "images already resized (or tiled) and stain-normalised as this run does, and returns "
            "raw class probabilities; the run's preparation and calibration are in its metadata.",
        )
    if found.report is not None:
        b.download_button(
            "Test predictions (.csv)",
            icon=":material/download:",
            data=predictions_csv(found, run.classes),
            file_name=f"run-{run.id}-predictions.csv",
            mime="text/csv",
            on_click="ignore",
            key=f"runs_dl_csv_{run.id}",
        )
    if run.status == "succeeded":
        model_card_buttons(run, Session, cfg)


def onnx_bytes(run_id: int) -> bytes:
    """The run's ONNX file, exported on the first download (and cached beside its model file)."""
    from core.inference.onnx_export import export_run  # torch: only when someone downloads it

    with Session() as s:
        return export_run(s, cfg, run_id).read_bytes()


# ---------------------------------------------------------------------------------------------
# One run: approval for use


def approval_panel(found: views.RunResults) -> None:
    """Whether this run's model is the one approved for its classes; editors approve or withdraw it."""
    run = found.run
    classes = ", ".join(sorted(run.classes))
    with Session() as s:
        panel = views.approval_panel(s)
    mine = panel.of_run(run.id)
    others = [a for a in panel.current if a.classes == tuple(sorted(run.classes)) and a.run_id != run.id]
    st.subheader("Approved model")
    if mine is not None:
        st.markdown(
            f":green-badge[:material/verified: approved model for {md_text(classes)}] "
            f"by {md_text(mine.approved_by)} on {mine.approved_at:%Y-%m-%d %H:%M} UTC"
            + (f": {md_text(mine.note)}" if mine.note else "")
        )
    elif others:
        st.caption(f"Not approved: {md_text(others[0].run_label)} is the approved model for {md_text(classes)}.")
    else:
        st.caption(f"No model is approved for {md_text(classes)} yet.")
    if user.can_edit:
        approval_actions(run, classes, mine is not None, found.model_file is not None)
    history = [a for a in panel.history if a.classes == tuple(sorted(run.classes))]
    if history:
        with st.expander(f"Approval history for {md_text(classes)} ({len(history)})"):
            text_table(
                pd.DataFrame(
                    [
                        {
                            "model": a.run_label,
                            "state": a.state,
                            "approved by": a.approved_by,
                            "approved (UTC)": f"{a.approved_at:%Y-%m-%d %H:%M}",
                            "note": a.note,
                            "withdrawn by": a.withdrawn_by or "",
                            "withdrawn (UTC)": f"{a.withdrawn_at:%Y-%m-%d %H:%M}" if a.withdrawn_at else "",
                        }
                        for a in history
                    ]
                ),
                column_config={"note": st.column_config.TextColumn(width="large")},
            )


def approval_actions(run: views.RunRow, classes: str, approved: bool, has_model: bool) -> None:
    if approved:
        if st.button("Withdraw this approval", key=f"runs_withdraw_{run.id}", icon=":material/remove_done:"):
            with user_errors():
                with Session.begin() as s:
                    approval.withdraw(s, run.id, user)
                st.session_state[FLASH] = (
                    f"Approval of run {run.id} withdrawn: {md_text(classes)} has no approved model now."
                )
                st.rerun()
        return
    if not has_model:
        st.caption("This run has no model file, so it cannot be approved.")
        return
    with Session() as s:
        concerns = comparisons.approval_concerns(s, run.id)
    if concerns:
        st.warning(
            "**Think twice before approving this model:**\n" + "\n".join(f"- {c}" for c in concerns),
            icon=":material/report:",
        )
    with st.form(f"runs_approve_form_{run.id}", border=True):
        note = st.text_area(
            "Note (why this model)",
            key=f"runs_approve_note_{run.id}",
            max_chars=approval.MAX_NOTE,
            placeholder="e.g. validated on the March specimens",
        )
        despite = concerns and st.checkbox("Approve anyway: I have read why not", key=f"runs_approve_despite_{run.id}")
        pressed = st.form_submit_button(
            f"Approve this model for {md_text(classes)}",
            icon=":material/verified:",
            key=f"runs_approve_{run.id}",
            help="Classifications that name no run (the Predict page's default, the API) "
            "use the approved model of their classes; it replaces the one before.",
        )
    if pressed:
        with user_errors():
            with Session.begin() as s:
                comparisons.approve_checked(s, cfg, run.id, user, note, despite=bool(despite))
            st.session_state[FLASH] = f"Run {run.id} is now the approved model for {md_text(classes)}."
            st.rerun()


# ---------------------------------------------------------------------------------------------
# One run: managing it (editors)


def manage_panel(run: views.RunRow) -> None:
    """Resume a failed or cancelled run, train again with its settings, delete it (left to right,
    those that apply)."""
    slots = iter(st.columns(3))
    if run.status in ("failed", "cancelled"):
        resumes = manage.resumable(cfg, run.id)
        label = "Resume from its last finished epoch" if resumes else "Retry from the start"
        if next(slots).button(
            label,
            key=f"runs_requeue_{run.id}",
            icon=":material/replay:",
            width="stretch",
            help="Queue it again with the same settings"
            + (
                ", continuing after its last finished epoch."
                if resumes
                else "; it has no finished epoch to continue from."
            ),
        ):
            with user_errors():
                with Session.begin() as s:
                    continues = manage.requeue_run(s, cfg, run.id, user=user)
                start_worker(cfg)
                st.session_state[FLASH] = f"Run {run.id} queued again" + (
                    ", to continue after its last finished epoch." if continues else ", from the start."
                )
                st.rerun()
    if next(slots).button(
        "Train again with these settings",
        key=f"runs_again_{run.id}",
        icon=":material/content_copy:",
        width="stretch",
        help="Opens the Train page with this run's settings filled in, to change and launch.",
    ):
        st.session_state["train_prefill"] = run.config.to_dict()
        st.switch_page("pages/train.py")
    slot = next(slots)
    if run.status == "running":
        slot.caption("A running run cannot be deleted: cancel it first.")
        return
    with slot.popover("Delete run", icon=":material/delete:", width="stretch"):
        st.markdown(
            f"Delete run {run.id} with its curves, results and files (model file, checkpoints, logs)? "
            "This cannot be undone."
        )
        sure = st.checkbox(f"Yes, delete run {run.id}", key=f"runs_confirm_delete_{run.id}")
        if st.button("Delete", key=f"runs_delete_{run.id}", type="primary", disabled=not sure):
            with user_errors():
                with Session.begin() as s:
                    manage.delete_run(s, cfg, run.id, user=user)
                st.session_state[FLASH] = f"Deleted run {run.id} and its files."
                st.rerun()


def run_heading(run: views.RunRow) -> None:
    head, action = st.columns([5, 1], vertical_alignment="bottom")
    head.subheader(f"Run {run.id} · {md_text(run.title)} {STATUS_BADGE[run.status]}")
    head.caption(
        f"Dataset: {md_text(run.dataset)}, {run.version_text} · protocol: {run.protocol}  \n"
        f"Augmentation preset: {md_text(run.augmentation)} · created "
        f"{run.created_at:%Y-%m-%d %H:%M} UTC" + (f" by {md_text(run.created_by)}" if run.created_by else "")
    )
    if run.notes:
        st.markdown("**Notes:** " + "  \n".join(md_text(line) for line in run.notes.splitlines()))
    if run.active:
        if run.cancel_requested:
            action.caption("Cancelling…")
        elif user.can_edit and action.button("Cancel run", key=f"runs_cancel_{run.id}", width="stretch"):
            with user_errors():
                request_cancel(Session, run.id)
                st.rerun()


# ---------------------------------------------------------------------------------------------
# Several runs side by side


def compare_tab() -> None:
    # Keep the choice across visits, less runs deleted or filtered out since.
    kept = [i for i in st.session_state.get("runs_compare", []) if i in ids]
    st.session_state["runs_compare"] = kept or [i for i in ids if i in with_curves][:3]
    chosen = st.multiselect("Runs to compare", ids, format_func=labels.get, key="runs_compare")
    if len(chosen) < 2:
        st.info("Choose two or more runs to overlay their curves.")
        return
    with Session() as s:
        picked = views.run_curves(s, chosen)
    runs = [c.run for c in picked]
    protocols = {r.protocol for r in runs}
    if len(protocols) > 1:
        st.warning(
            "These runs were measured under different protocols; their accuracies are not comparable.",
            icon=":material/warning:",
        )
    subtitle = next(iter(protocols)) if len(protocols) == 1 else "protocols differ: " + " | ".join(sorted(protocols))
    show_figure(
        curves_figure([(f"run {c.run.id}", c.epochs) for c in picked], "Validation curves, overlaid", subtitle),
        key="runs_compare_curves",
    )
    columns = [f"Run {r.id}" for r in runs]
    # Names, notes and settings (the device is free text) as text, wrapped: long protocols are read whole.
    st.markdown("**Results**")
    text_table(
        pd.DataFrame(
            {
                "name": [r.title for r in runs],
                "status": [r.status for r in runs],
                "test accuracy": [pct(r.summary.test_accuracy) for r in runs],
                "best epoch": ["–" if r.summary.best_epoch is None else str(r.summary.best_epoch) for r in runs],
                "training speed": [views.speed_text(r.summary.images_per_second) for r in runs],
                "duration": [views.duration_text(r.seconds) for r in runs],
            },
            index=columns,
        ).T,
        hide_index=False,
    )
    difference_lines(runs)
    differences = views.setting_differences(runs)
    st.markdown("**Settings that differ**")
    if differences:
        text_table(
            pd.DataFrame([d.values for d in differences], index=[d.setting for d in differences], columns=columns),
            hide_index=False,
        )
        st.caption("Only the settings in which these runs differ; everything else was the same.")
    else:
        st.caption("These runs were trained with the same settings (they differ only in what was random, if at all).")


def difference_lines(runs: list[views.RunRow]) -> None:
    """Each run against the first chosen, on the test images both were scored on: the gap, its
    interval and whether it is more than noise (core/evaluation/compare.py)."""
    base = runs[0]
    with Session() as s:
        found = [(r, comparisons.run_vs_run(s, r.id, base.id)) for r in runs[1:] if r.status == "succeeded"]
    if base.status != "succeeded" or not found:
        return
    lines = [
        c.verdict(f"Run {r.id}", f"run {base.id}")
        if c is not None
        else f"Run {r.id} and run {base.id} were tested on different images (other splits), so no comparison of "
        "the two figures can say which is better."
        for r, c in found
    ]
    st.markdown("**Differences in test accuracy**  \n" + "  \n".join(lines))
    st.caption(
        "Each gap is measured on the test images both runs were scored on, with a 95% bootstrap interval; "
        '"within noise" means another draw of test images could reverse it. McNemar\'s test looks only at '
        "the images one run got right and the other wrong."
    )


tab_run, tab_compare = st.tabs(["One run", "Compare runs"], key="runs_tab", on_change="rerun")
if tab_run.open:
    with tab_run:
        run_id = st.selectbox("Run", ids, format_func=labels.get, key="runs_selected")
        with Session() as s:
            run = views.run_row(s, run_id)
        run_heading(run)
        if run.leaky:
            st.warning(LEAKY_NOTE, icon=":material/warning:")
        if user.can_edit:
            manage_panel(run)
        st.fragment(live_panel, run_every=2 if run.active else None)(run_id, run.active)
        if not run.active:
            with user_errors():
                results(run_id)

if tab_compare.open:
    with tab_compare:
        compare_tab()
