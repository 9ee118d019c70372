"""Runs: every training run in a table; one run's live curves, confusion matrix, Table I,
misclassified images, config and downloads; several runs' curves overlaid."""

import io
from pathlib import Path

import pandas as pd
import streamlit as st
from sqlalchemy import select

from core.evaluation import metrics, yardstick
from core.jobs import runs
from core.evaluation.calibration import format_run_calibration
from core.store.db import EpochMetric, Image, Prediction, RunStatus
from pages._common import (
    ACTIVE, STATUS_BADGE, confusion_figure, curves_figure, current_user, duration, is_leaky, md_text, page_header,
    pct, progress_text, protocol_of, reliability_chart, request_cancel, run_label, session_factory, settings,
    show_figure, through_router, thumbnail, user_errors,
)

through_router()
Session = session_factory()
cfg = settings()
user = current_user()  # cancelling and downloading checkpoints need an editor
LEAKY_NOTE = ("LEAKY protocol (the paper's): augmented copies of the same source images are in both training and "
              "test, so these numbers overstate accuracy on new images.")

page_header("Runs", "Every training run with its data, split, settings and results. Each figure names the "
            "protocol it was measured under.")

with Session() as s:
    all_runs = runs.list_runs(s)
    rows = [{
        "run": r.id, "status": r.status.value, "dataset": r.dataset.name,
        "protocol": protocol_of(r), "split": r.config.get("split"),
        "test accuracy": r.summary.get("test_accuracy"), "best epoch": r.summary.get("best_epoch"),
        "epochs": r.config.get("epochs"), "image size": r.config.get("image_size"),
        "per class": r.config.get("per_class"), "lr": r.config.get("lr"), "batch": r.config.get("batch_size"),
        "weights": (r.weights_used or r.config.get("weights", "")).split(" (")[0],
        "device": r.device, "created": r.created_at, "created by": r.created_by, "duration": duration(r),
    } for r in reversed(all_runs)]
    labels = {r.id: run_label(r, results=False) for r in all_runs}
    with_curves = set(s.scalars(select(EpochMetric.run_id).distinct()))

if not rows:
    st.info("No runs yet. Launch one on the **Train** page.", icon=":material/monitoring:")
    st.stop()

table = pd.DataFrame(rows)
f1, f2, f3 = st.columns(3)
by_dataset = f1.multiselect("Dataset", sorted(table["dataset"].unique()), key="runs_f_dataset", placeholder="all")
by_status = f2.multiselect("Status", [s.value for s in RunStatus], key="runs_f_status", placeholder="all")
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


def metrics_row(run, epochs: list) -> None:
    s = run.summary
    c = st.columns(5)
    if run.status in ACTIVE:  # while it trains: where it is and how fast it goes
        last = epochs[-1] if epochs else None
        c[0].metric("Epochs done", f"{len(epochs)} of {run.config.get('epochs')}", border=True)
        c[1].metric("Last validation accuracy", pct(last.val_accuracy if last else None), border=True)
        c[2].metric("Speed", f"{last.images_per_second:.0f} img/s" if last else "–", border=True,
                    help="Training images per second in the last epoch.")
        c[3].metric("Device", (run.device or "–").split(" (")[0], help=run.device, border=True)
        c[4].metric("Elapsed", duration(run), border=True)
        return
    c[0].metric("Test accuracy", pct(s.get("test_accuracy"), 2), border=True,
                help="On the run's test part, with the checkpoint of the best validation epoch.")
    c[1].metric("Best epoch", s.get("best_epoch", "–"), border=True)
    c[2].metric("Train / val / test", f"{s.get('n_train', '–')} / {s.get('n_val', '–')} / {s.get('n_test', '–')}",
                border=True, help="Samples: augmented training images, untouched validation and test images.")
    c[3].metric("Device", (run.device or "–").split(" (")[0], help=run.device, border=True)
    c[4].metric("Duration", duration(run), border=True)
    speed, memory = s.get("images_per_second"), s.get("gpu_peak_memory_gib")
    st.caption(f"Training speed: {f'{speed:.0f} images/s' if speed else '–'} (mean over epochs)"
               + (f" · peak GPU memory {memory:.1f} GiB" if memory is not None else " · no GPU memory used (CPU run)"))


def live_panel(run_id: int, was_active: bool) -> None:
    """Progress, metrics and curves; refreshed every few seconds while the run is queued or running."""
    with Session() as s:
        run = runs.get_run(s, run_id)
        if was_active and run.status not in ACTIVE:
            st.rerun(scope="app")  # finished: draw the results once, and stop polling
        protocol = protocol_of(run)
        if run.status in ACTIVE:
            fraction, text = progress_text(run)
            st.progress(fraction, text=text)
        epochs = list(run.epochs)
        if epochs or run.status != RunStatus.failed:  # a run that failed at its start has no numbers
            metrics_row(run, epochs)
        if epochs:
            show_figure(curves_figure([(f"run {run.id}", epochs)], f"Run {run.id}: loss and accuracy per epoch",
                                      protocol), key=f"runs_curves_{run.id}")
        elif run.status in ACTIVE:
            st.caption("Curves appear after the first epoch.")


def misclassified(s, run, classes: list[str]) -> None:
    wrong = s.execute(
        select(Prediction, Image).join(Image, Image.id == Prediction.image_id)
        .where(Prediction.run_id == run.id, Prediction.true_label != Prediction.predicted_label)
        .order_by(Prediction.id)
    ).all()
    st.subheader(f"Misclassified test images ({len(wrong)})")
    if not wrong:
        st.caption("Every test image was classified correctly.")
        return
    if is_leaky(run):
        st.caption("Leaky protocol: the test samples are augmented copies; the source image is shown.")
    limit, per_row = 24, 5
    cols = st.columns(per_row)
    for k, (pred, image) in enumerate(wrong[:limit]):
        probs = " · ".join(f"{c} {p:.0%}" for c, p in zip(classes, pred.probabilities))
        name = Path(image.original_name).name + (f" (copy {pred.aug_index})" if pred.aug_index is not None else "")
        with cols[k % per_row]:
            st.image(thumbnail(str(cfg.app_home / image.stored_path)), width="stretch")
            st.markdown(f"**{md_text(classes[pred.true_label])} → {md_text(classes[pred.predicted_label])}**")
            st.caption(f"{md_text(name)}  \n{md_text(probs)}")
    if len(wrong) > limit:
        st.caption(f"The first {limit} of {len(wrong)}; the predictions CSV below lists them all.")


def predictions_csv(s, run, classes: list[str]) -> bytes:
    rows = s.execute(
        select(Prediction, Image).join(Image, Image.id == Prediction.image_id)
        .where(Prediction.run_id == run.id).order_by(Prediction.id)
    ).all()
    frame = pd.DataFrame([{
        "image": image.original_name, "augmented_copy": pred.aug_index, "group": image.group,
        "true": classes[pred.true_label], "predicted": classes[pred.predicted_label],
        **{f"p_{c}": p for c, p in zip(classes, pred.probabilities)},
    } for pred, image in rows])
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    return buf.getvalue().encode()


def calibration_panel(run, uncertainty: dict) -> None:
    cal = run.summary.get("calibration") or {}
    with st.expander("Calibration and the \"uncertain, refer\" band", expanded=False):
        st.markdown(format_run_calibration(cal).replace("\n", "  \n"))
        if uncertainty["reliability"] is not None:
            show_figure(reliability_chart(uncertainty["reliability"], uncertainty["reliability_after"],
                                          f"Run {run.id}: test reliability", protocol_of(run), wrap=80),
                        key=f"runs_reliability_{run.id}")
            st.caption("Temperature fitted on the validation part only; the test part shows whether it carries over.")


def results(run_id: int) -> None:
    with Session() as s:
        run = runs.get_run(s, run_id)
        protocol = protocol_of(run)
        classes = list(run.dataset.classes)
        if run.status == RunStatus.failed:
            st.error(f"**This run failed.** {md_text(run.error or 'No error was recorded.')}", icon=":material/error:")
            log = run.log_tail
            log_file = runs.run_dir(cfg, run.id) / "train.log"
            if not log and log_file.exists():
                log = "\n".join(log_file.read_text(errors="replace").splitlines()[-60:])
            if log:
                st.markdown("**End of the log**")
                st.code(log, language="text")
        elif run.status == RunStatus.cancelled:
            st.info("This run was cancelled; its curves show the epochs it finished.", icon=":material/block:")

        leak = run.summary.get("leak_audit")
        if leak and leak.get("warning"):
            st.warning(f"**Leak audit of this run's split.** {leak['warning']}  \n{leak['summary']}",
                       icon=":material/content_copy:")
        elif leak:
            st.caption(f"Leak audit of this run's split: nothing found. {leak['summary']}")

        if run.status == RunStatus.succeeded:
            report = metrics.run_report(s, run)
            left, right = st.columns([2, 3], gap="large")
            with left:
                show_figure(confusion_figure(report.confusion, classes, f"Run {run.id}: confusion matrix", protocol,
                                             wrap=60), key=f"runs_cm_{run.id}")
            with right:
                st.markdown(f"**Per-class results (the paper's Table I layout)** · {report.n} test samples")
                st.caption(protocol)
                st.dataframe(table_one(report), hide_index=True, placeholder="", column_config={
                    c: st.column_config.NumberColumn(format="%.3f") for c in ("Accuracy", "Precision", "Recall", "F1-score")
                })
                st.caption("Per-class accuracy is one-vs-rest, (TP + TN) / N, as in the paper.")
                uncertainty = metrics.run_uncertainty(s, run)
                boot = uncertainty["bootstrap"]
                how = (f"{boot.n_groups} specimens (or source images) resampled whole" if boot.n_groups is not None
                       else "test images resampled one by one")
                st.markdown(f"Test accuracy {pct(boot.accuracy.estimate)}, {boot.level:.0%} bootstrap interval "
                            f"**{pct(boot.accuracy.low)} – {pct(boot.accuracy.high)}** ({how}).")
                if run.summary.get("colour_yardstick"):
                    st.caption(yardstick.describe(run.summary["colour_yardstick"]))
                siblings = runs.fold_siblings(s, run)
                if len(siblings) > 1:
                    done = [r for r in siblings if r.status == RunStatus.succeeded]
                    st.markdown(f"**{len(siblings)}-fold cross-validation** · {len(done)} of {len(siblings)} folds finished")
                    if done:
                        summary = metrics.summarise_folds([metrics.run_report(s, r) for r in done])
                        st.metric("Accuracy across folds", f"{pct(summary.accuracy_mean)} ± {pct(summary.accuracy_std)}",
                                  help="Mean ± sample standard deviation over the finished folds.")
                        across = yardstick.describe_folds([r.summary.get("colour_yardstick") for r in done])
                        if across:
                            st.caption(across)
                        st.dataframe(pd.DataFrame([{
                            "Class": row["name"],
                            **{m: f"{row[m.lower().replace('-score', '') + '_mean']:.3f} ± "
                                  f"{row[m.lower().replace('-score', '') + '_std']:.3f}"
                               for m in ("Accuracy", "Precision", "Recall", "F1-score")},
                        } for row in summary.rows]), hide_index=True)
            calibration_panel(run, uncertainty)
            misclassified(s, run, classes)

        with st.expander("Full configuration"):
            st.markdown(f"**Protocol:** {protocol}  \n"
                        f"**Weights:** {md_text(run.weights_used or run.config.get('weights'))}  \n"
                        f"**Experiment:** `{run.experiment}` · fold {run.fold} · split id {run.split_id}")
            st.json({"config": run.config, "summary": run.summary, "timings_seconds": run.timings}, expanded=1)

        best = runs.run_dir(cfg, run.id) / "best.pt"
        a, b, c = st.columns(3)
        # A checkpoint is the trained weights (the team's work) in a pickle, which can run code in
        # whoever loads it: editors only. The results (CSV) are for everyone.
        if best.exists() and user.can_edit:
            a.download_button("Best checkpoint (.pt)", icon=":material/download:", data=lambda: best.read_bytes(), file_name=f"run-{run.id}-best.pt",
                              mime="application/octet-stream", on_click="ignore", key=f"runs_dl_ckpt_{run.id}")
        elif best.exists():
            a.caption("Downloading the checkpoint needs the editor role.")
        if run.status == RunStatus.succeeded:
            b.download_button("Test predictions (.csv)", icon=":material/download:", data=predictions_csv(s, run, classes),
                              file_name=f"run-{run.id}-predictions.csv", mime="text/csv", on_click="ignore",
                              key=f"runs_dl_csv_{run.id}")


tab_run, tab_compare = st.tabs(["One run", "Compare runs"], key="runs_tab", on_change="rerun")
if tab_run.open:
    with tab_run:
        run_id = st.selectbox("Run", ids, format_func=labels.get, key="runs_selected")
        with Session() as s:
            run = runs.get_run(s, run_id)
            status, protocol, leaky = run.status, protocol_of(run), is_leaky(run)
            cancel_requested = run.cancel_requested
        head, action = st.columns([5, 1], vertical_alignment="bottom")
        head.subheader(f"Run {run_id} {STATUS_BADGE[status]}")
        head.caption(f"Protocol: {protocol}")
        if status in ACTIVE:
            if cancel_requested:
                action.caption("Cancelling…")
            elif user.can_edit and action.button("Cancel run", key=f"runs_cancel_{run_id}", width="stretch"):
                with user_errors():
                    request_cancel(Session, run_id)
                    st.rerun()
        if leaky:
            st.warning(LEAKY_NOTE, icon=":material/warning:")
        active = status in ACTIVE
        st.fragment(live_panel, run_every=2 if active else None)(run_id, active)
        if not active:
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
                picked = [runs.get_run(s, i) for i in chosen]
                series = [(f"run {r.id}", list(r.epochs)) for r in picked]
                protocols = {protocol_of(r) for r in picked}
                compare = pd.DataFrame([{
                    "run": r.id, "status": r.status.value, "dataset": r.dataset.name, "protocol": protocol_of(r),
                    "test accuracy": r.summary.get("test_accuracy"), "epochs": r.config.get("epochs"),
                    "lr": r.config.get("lr"), "batch": r.config.get("batch_size"),
                    "image size": r.config.get("image_size"), "per class": r.config.get("per_class"),
                    "weights": (r.weights_used or r.config.get("weights", "")).split(" (")[0], "seed": r.seed,
                } for r in picked])
            if len(protocols) > 1:
                st.warning("These runs were measured under different protocols; their accuracies are not comparable.",
                           icon=":material/warning:")
            subtitle = next(iter(protocols)) if len(protocols) == 1 else "protocols differ: " + " | ".join(sorted(protocols))
            show_figure(curves_figure(series, "Validation curves, overlaid", subtitle), key="runs_compare_curves")
            st.dataframe(compare, hide_index=True, placeholder="–", column_config={
                "test accuracy": st.column_config.NumberColumn(format="percent"),
                "lr": st.column_config.NumberColumn(format="%.0e"),
            })
