"""Runs: every training run in a table; one run's live curves, confusion matrix, Table I,
misclassified images, config and downloads; several runs' curves overlaid."""

import io

import pandas as pd
import streamlit as st

from core.evaluation import metrics
from core.evaluation.calibration import format_run_calibration
from core.inference.probabilities import Probabilities
from core.jobs import views
from pages._common import (
    STATUS_BADGE, confusion_figure, curves_figure, current_user, duration, md_text, page_header, pct,
    reliability_chart, request_cancel, session_factory, settings, show_figure, through_router, thumbnail,
    user_errors,
)

through_router()
Session = session_factory()
cfg = settings()
user = current_user()  # cancelling and downloading model files need an editor
LEAKY_NOTE = ("LEAKY protocol (the paper's): augmented copies of the same source images are in both training and "
              "test, so these numbers overstate accuracy on new images.")

page_header("Runs", "Every training run with its data, split, settings and results. Each figure names the "
            "protocol it was measured under.")

with Session() as s:
    all_runs = views.run_rows(s)
rows = [{
    "run": r.id, "status": r.status, "dataset": r.dataset, "protocol": r.protocol, "split": r.config.split,
    "test accuracy": r.summary.test_accuracy, "best epoch": r.summary.best_epoch, "epochs": r.config.epochs,
    "image size": r.config.image_size, "per class": r.config.per_class, "lr": r.config.lr,
    "batch": r.config.batch_size, "weights": r.weights, "device": r.device, "created": r.created_at,
    "created by": r.created_by, "duration": duration(r.seconds),
} for r in all_runs]
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
shown = table[keep]
st.dataframe(
    shown, hide_index=True, height=min(400, 38 + 35 * len(shown)), placeholder="–",
    column_config={
        "test accuracy": st.column_config.NumberColumn(format="percent"),
        "lr": st.column_config.NumberColumn(format="%.0e"),
        "created": st.column_config.DatetimeColumn("created (UTC)", format="YYYY-MM-DD HH:mm"),
        "protocol": st.column_config.TextColumn(width="large"),
        "status": st.column_config.TextColumn(width="small"),
    },
)
st.caption("Click a column header to sort. Test accuracy is on the run's own test part: compare runs only under "
           "the same protocol.")
ids = [int(i) for i in shown["run"]] or [r["run"] for r in rows]

query_run = st.query_params.get("run")
if query_run and query_run.isdigit() and int(query_run) in labels:
    st.session_state.setdefault("runs_selected", int(query_run))
if st.session_state.get("runs_selected") not in ids:
    st.session_state["runs_selected"] = ids[0]


# ---------------------------------------------------------------------------------------------
# One run


def table_one(report: metrics.Report) -> pd.DataFrame:
    """The paper's Table I layout: one row per class, then the overall accuracy."""
    frame = pd.DataFrame([{"Class": r.name, "Accuracy": r.accuracy, "Precision": r.precision, "Recall": r.recall,
                           "F1-score": r.f1, "Support": r.support} for r in report.rows])
    overall = pd.DataFrame([{"Class": "Overall accuracy", "Accuracy": report.accuracy, "Precision": None,
                             "Recall": None, "F1-score": None, "Support": report.n}])
    return pd.concat([frame, overall], ignore_index=True)


def metrics_row(run: views.RunRow, epochs: tuple[views.EpochRow, ...]) -> None:
    s = run.summary
    c = st.columns(5)
    if run.active:  # while it trains: where it is and how fast it goes
        last = epochs[-1] if epochs else None
        c[0].metric("Epochs done", f"{len(epochs)} of {run.config.epochs}", border=True)
        c[1].metric("Last validation accuracy", pct(last.val_accuracy if last else None), border=True)
        c[2].metric("Speed", f"{last.images_per_second:.0f} img/s" if last else "–", border=True,
                    help="Training images per second in the last epoch.")
        c[3].metric("Device", (run.device or "–").split(" (")[0], help=run.device, border=True)
        c[4].metric("Elapsed", duration(run.seconds), border=True)
        return
    shown = lambda v: "–" if v is None else v  # noqa: E731
    c[0].metric("Test accuracy", pct(s.test_accuracy, 2), border=True,
                help="On the run's test part, with the weights of the best validation epoch (its model file).")
    c[1].metric("Best epoch", shown(s.best_epoch), border=True)
    c[2].metric("Train / val / test", f"{shown(s.n_train)} / {shown(s.n_val)} / {shown(s.n_test)}",
                border=True, help="Samples: augmented training images, untouched validation and test images.")
    c[3].metric("Device", (run.device or "–").split(" (")[0], help=run.device, border=True)
    c[4].metric("Duration", duration(run.seconds), border=True)
    speed, memory = s.images_per_second, s.gpu_peak_memory_gib
    st.caption(f"Training speed: {f'{speed:.0f} images/s' if speed else '–'} (mean over epochs)"
               + (f" · peak GPU memory {memory:.1f} GiB" if memory is not None else " · no GPU memory used (CPU run)"))


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
        metrics_row(run, epochs)
    if epochs:
        show_figure(curves_figure([(f"run {run.id}", epochs)], f"Run {run.id}: loss and accuracy per epoch",
                                  run.protocol), key=f"runs_curves_{run.id}")
    elif run.active:
        st.caption("Curves appear after the first epoch.")


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


def predictions_csv(found: views.RunResults, classes: tuple[str, ...]) -> bytes:
    probs = Probabilities.of_run([p.probabilities for p in found.predictions], found.run.summary.calibration)
    calibrated = probs.shown if probs.is_calibrated else [()] * len(found.predictions)
    frame = pd.DataFrame([{
        "image": pred.image, "augmented_copy": pred.aug_index, "group": pred.group,
        "true": classes[pred.true_label], "predicted": classes[pred.predicted_label],
        **{f"raw_p_{c}": p for c, p in zip(classes, pred.probabilities)},
        **{f"calibrated_p_{c}": p for c, p in zip(classes, cal)},
    } for pred, cal in zip(found.predictions, calibrated)])
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    return buf.getvalue().encode()


def calibration_panel(run: views.RunRow, uncertainty: dict) -> None:
    with st.expander("Calibration and the \"uncertain, refer\" band", expanded=False):
        st.markdown(format_run_calibration(run.summary.calibration or {}).replace("\n", "  \n"))
        if uncertainty["reliability"] is not None:
            show_figure(reliability_chart(uncertainty["reliability"], uncertainty["reliability_after"],
                                          f"Run {run.id}: test reliability", run.protocol, wrap=80),
                        key=f"runs_reliability_{run.id}")
            st.caption("Temperature fitted on the validation part only; the test part shows whether it carries over.")


def report_panel(found: views.RunResults) -> None:
    """A succeeded run's confusion matrix, Table I, intervals, colour yardstick and k-fold summary."""
    run, report, boot = found.run, found.report, found.uncertainty["bootstrap"]
    left, right = st.columns([2, 3], gap="large")
    with left:
        show_figure(confusion_figure(report.confusion, run.classes, f"Run {run.id}: confusion matrix", run.protocol,
                                     wrap=60), key=f"runs_cm_{run.id}")
    with right:
        st.markdown(f"**Per-class results (the paper's Table I layout)** · {report.n} test samples")
        st.caption(run.protocol)
        st.dataframe(table_one(report), hide_index=True, placeholder="", column_config={
            c: st.column_config.NumberColumn(format="%.3f") for c in ("Accuracy", "Precision", "Recall", "F1-score")
        })
        st.caption("Per-class accuracy is one-vs-rest, (TP + TN) / N, as in the paper.")
        how = (f"{boot.n_groups} specimens (or source images) resampled whole" if boot.n_groups is not None
               else "test images resampled one by one")
        st.markdown(f"Test accuracy {pct(boot.accuracy.estimate)}, {boot.level:.0%} bootstrap interval "
                    f"**{pct(boot.accuracy.low)} – {pct(boot.accuracy.high)}** ({how}).")
        if found.yardstick:
            st.caption(found.yardstick)
        folds = found.folds
        if folds is not None:
            st.markdown(f"**{folds.n_folds}-fold cross-validation** · {folds.n_done} of {folds.n_folds} folds finished")
            if folds.summary is not None:
                summary = folds.summary
                st.metric("Accuracy across folds", f"{pct(summary.accuracy_mean)} ± {pct(summary.accuracy_std)}",
                          help="Mean ± sample standard deviation over the finished folds.")
                if folds.yardstick:
                    st.caption(folds.yardstick)
                st.dataframe(pd.DataFrame([{
                    "Class": row["name"],
                    **{m: f"{row[m.lower().replace('-score', '') + '_mean']:.3f} ± "
                          f"{row[m.lower().replace('-score', '') + '_std']:.3f}"
                       for m in ("Accuracy", "Precision", "Recall", "F1-score")},
                } for row in summary.rows]), hide_index=True)


def results(run_id: int) -> None:
    with Session() as s:
        found = views.run_results(s, cfg, run_id)
    run = found.run
    if run.status == "failed":
        st.error(f"**This run failed.** {md_text(found.error or 'No error was recorded.')}", icon=":material/error:")
        if found.log:
            st.markdown("**End of the log**")
            st.code(found.log, language="text")
    elif run.status == "cancelled":
        st.info("This run was cancelled; its curves show the epochs it finished.", icon=":material/block:")

    leak = run.summary.leak_audit
    if leak and leak.get("warning"):
        st.warning(f"**Leak audit of this run's split.** {leak['warning']}  \n{leak['summary']}",
                   icon=":material/content_copy:")
    elif leak:
        st.caption(f"Leak audit of this run's split: nothing found. {leak['summary']}")

    if found.report is not None:
        report_panel(found)
        calibration_panel(run, found.uncertainty)
        misclassified(found, run.classes)

    with st.expander("Full configuration"):
        st.markdown(f"**Protocol:** {run.protocol}  \n"
                    f"**Weights:** {md_text(run.weights_used or run.config.weights)}  \n"
                    f"**Experiment:** `{run.experiment}` · fold {run.fold} · split id {run.split_id}")
        st.json({"config": found.config_json, "summary": found.summary_json, "timings_seconds": found.timings},
                expanded=1)

    model = found.model_file
    a, b, c = st.columns(3)
    # The model file is the trained weights (the team's work): editors only. The results (CSV) are
    # for everyone.
    if model is not None and user.can_edit:
        a.download_button("Model file (.safetensors)", icon=":material/download:", data=lambda: model.read_bytes(),
                          file_name=f"run-{run.id}-model.safetensors", mime="application/octet-stream",
                          on_click="ignore", key=f"runs_dl_ckpt_{run.id}")
    elif model is not None:
        a.caption("Downloading the model file needs the editor role.")
    if found.report is not None:
        b.download_button("Test predictions (.csv)", icon=":material/download:", data=predictions_csv(found, run.classes),
                          file_name=f"run-{run.id}-predictions.csv", mime="text/csv", on_click="ignore",
                          key=f"runs_dl_csv_{run.id}")


tab_run, tab_compare = st.tabs(["One run", "Compare runs"], key="runs_tab", on_change="rerun")
if tab_run.open:
    with tab_run:
        run_id = st.selectbox("Run", ids, format_func=labels.get, key="runs_selected")
        with Session() as s:
            run = views.run_row(s, run_id)
        head, action = st.columns([5, 1], vertical_alignment="bottom")
        head.subheader(f"Run {run_id} {STATUS_BADGE[run.status]}")
        head.caption(f"Protocol: {run.protocol}")
        if run.active:
            if run.cancel_requested:
                action.caption("Cancelling…")
            elif user.can_edit and action.button("Cancel run", key=f"runs_cancel_{run_id}", width="stretch"):
                with user_errors():
                    request_cancel(Session, run_id)
                    st.rerun()
        if run.leaky:
            st.warning(LEAKY_NOTE, icon=":material/warning:")
        st.fragment(live_panel, run_every=2 if run.active else None)(run_id, run.active)
        if not run.active:
            with user_errors():
                results(run_id)

if tab_compare.open:
    with tab_compare:
        # Keep the choice across visits, less runs deleted or filtered out since.
        kept = [i for i in st.session_state.get("runs_compare", []) if i in ids]
        st.session_state["runs_compare"] = kept or [i for i in ids if i in with_curves][:3]
        chosen = st.multiselect("Runs to compare", ids, format_func=labels.get, key="runs_compare")
        if len(chosen) < 2:
            st.info("Choose two or more runs to overlay their curves.")
        else:
            with Session() as s:
                picked = views.run_curves(s, chosen)
            series = [(f"run {c.run.id}", c.epochs) for c in picked]
            protocols = {c.run.protocol for c in picked}
            compare = pd.DataFrame([{
                "run": r.id, "status": r.status, "dataset": r.dataset, "protocol": r.protocol,
                "test accuracy": r.summary.test_accuracy, "epochs": r.config.epochs, "lr": r.config.lr,
                "batch": r.config.batch_size, "image size": r.config.image_size, "per class": r.config.per_class,
                "weights": r.weights, "seed": r.seed,
            } for r in (c.run for c in picked)])
            if len(protocols) > 1:
                st.warning("These runs were measured under different protocols; their accuracies are not comparable.",
                           icon=":material/warning:")
            subtitle = next(iter(protocols)) if len(protocols) == 1 else "protocols differ: " + " | ".join(sorted(protocols))
            show_figure(curves_figure(series, "Validation curves, overlaid", subtitle), key="runs_compare_curves")
            st.dataframe(compare, hide_index=True, placeholder="–", column_config={
                "test accuracy": st.column_config.NumberColumn(format="percent"),
                "lr": st.column_config.NumberColumn(format="%.0e"),
            })
