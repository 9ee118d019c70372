"""Review: editors look at logged predictions (the referred ones and the least confident first), record
each one's true class or "cannot tell" with a note, and turn the reviewed images into a new version of
a dataset to train the model again on. Viewers do not see this page (streamlit_app.py lists it for
editors only); it and core refuse them all the same."""

from datetime import UTC, date, datetime, timedelta

import pandas as pd
import streamlit as st

from core.jobs import views
from core.review import queue, retrain, store, to_data
from pages._common import (
    current_user,
    md_text,
    page_header,
    pct,
    probabilities_figure,
    session_factory,
    settings,
    show_figure,
    text_table,
    through_router,
    thumbnail,
    user_errors,
    verdict_words,
)

through_router()
Session = session_factory()
cfg = settings()
user = current_user()
QUEUE_DAYS = 30  # the queue's default date range
IMAGE_SIDE = 480  # px of the image shown to the reviewer

page_header(
    "Review",
    "Check what the models said: give logged predictions their true class. The ones the model referred "
    "come first, then the least confident. Reviewed images can become data to train the model again.",
)
if not user.can_edit:
    st.info("Reviewing predictions needs the editor role.", icon=":material/lock:")
    st.stop()
if not cfg.reviews:
    st.info(
        "Reviews are switched off on this server (REVIEWS=0); an administrator can switch them on.",
        icon=":material/toggle_off:",
    )
    st.stop()


def date_bounds(dates) -> tuple[datetime | None, datetime | None]:
    """[since, until) in UTC of a date range widget's value (one date while the second is picked)."""
    picked = [d for d in (dates if isinstance(dates, (tuple, list)) else (dates,)) if isinstance(d, date)]
    if not picked:
        return None, None
    start, end = picked[0], picked[-1]
    return datetime.combine(start, datetime.min.time()), datetime.combine(end + timedelta(days=1), datetime.min.time())


def filters(choices, blind: bool) -> queue.QueueFilters:
    a, b, c, d = st.columns(4)
    run_id = a.selectbox(
        "Model", [None, *choices.run_ids], format_func=lambda i: "all" if i is None else f"run {i}", key="rv_model"
    )
    # Widgets whose choices differ in a blind review have keys of their own there: the browser keeps
    # a widget's old labels while its key stays the same.
    if blind:
        predicted = None
        b.selectbox(
            "Predicted class",
            ["all (hidden)"],
            key="rv_class_blind",
            disabled=True,
            help="Off in a blind review: choosing it would tell the model's answer.",
        )
    else:
        predicted = b.selectbox(
            "Predicted class",
            [None, *choices.predicted],
            format_func=lambda p: "all" if p is None else p,
            key="rv_class",
        )
    today = datetime.now(UTC).date()
    dates = c.date_input(
        "Dates", (today - timedelta(days=QUEUE_DAYS), today), key="rv_dates", help="Days in UTC, both ends included."
    )
    unreviewed = d.toggle("Only those I have not reviewed", value=True, key="rv_unreviewed")
    since, until = date_bounds(dates)
    return queue.QueueFilters(run_id, since, until, predicted, unreviewed)


def queue_table(items: tuple[queue.QueueItem, ...], blind: bool) -> None:
    table = pd.DataFrame(
        [
            {
                "log id": item.prediction.id,
                "when (UTC)": item.prediction.at.replace(microsecond=0),
                "model": f"run {item.prediction.run_id}",
                "file": item.prediction.image_name,
                "predicted": item.prediction.predicted,
                "verdict": verdict_words(item.prediction.refer),
                "confidence": item.confidence,
                "reviews": len(item.reviews),
                "reviewers disagree": item.disagreement,
                "image": "kept" if item.image_path is not None else "not kept",
            }
            for item in items
        ]
    )
    if blind:  # the model's answer, whether reviewers differ, and a file name that may name a class
        table = table.drop(columns=["file", "predicted", "verdict", "confidence", "reviewers disagree"])
    st.dataframe(
        table,
        hide_index=True,
        column_config={
            "confidence": st.column_config.ProgressColumn("confidence", format="percent", min_value=0, max_value=1)
        },
    )


def reviews_table(item: queue.QueueItem) -> None:
    if not item.reviews:
        st.caption("Not reviewed yet.")
        return
    if item.disagreement:
        st.warning(
            "Reviewers disagree on this image: it is left out of field accuracy and cannot become data "
            "until they agree.",
            icon=":material/rule:",
        )
    text_table(
        pd.DataFrame(
            [
                {
                    "reviewer": r.reviewer,
                    "true class": r.verdict,
                    "when (UTC)": r.reviewed_at.replace(microsecond=0),
                    "note": r.note,
                }
                for r in item.reviews
            ]
        )
    )


def review_form(item: queue.QueueItem, blind: bool) -> None:
    mine = item.review_by(user.name)
    options = [*item.classes, store.CANNOT_TELL]
    with st.form(f"rv_form_{item.prediction.id}"):
        # Nothing chosen beforehand: a review recorded by a click alone would be the first class (or
        # the model's answer), and it becomes training data.
        verdict = st.selectbox(
            "True class",
            options,
            index=options.index(mine.verdict) if mine is not None else None,
            placeholder="Choose what the image shows",
            key=f"rv_verdict_{item.prediction.id}",
            help="What the image shows, as you judge it; 'cannot tell' when it does not show enough.",
        )
        note = st.text_area("Note", value=mine.note if mine else "", key=f"rv_note_{item.prediction.id}")
        sent = st.form_submit_button(
            "Record review" if mine is None else "Replace my review", type="primary", key="rv_submit"
        )
    if blind and mine is not None:
        st.caption(
            "You have reviewed this image before, so you know the model's answer: a new verdict replaces "
            "yours but is not counted as blind."
        )
    if sent and verdict is None:
        st.warning("Choose the true class (or 'cannot tell') first; nothing was recorded.")
    elif sent:
        with user_errors():
            with Session.begin() as s:
                store.record_review(
                    s,
                    cfg,
                    user,
                    item.prediction.id,
                    None if verdict == store.CANNOT_TELL else verdict,
                    note,
                    blind=blind and mine is None,  # once told the model's answer, a reviewer is no longer blind
                )
            st.session_state["rv_recorded"] = (item.prediction, blind)
            st.rerun()


def item_detail(item: queue.QueueItem, blind: bool) -> None:
    p = item.prediction
    left, right = st.columns([3, 2])
    with left:
        if item.image_path is None:
            st.info(
                "The image was not kept, so it is not shown here: referred images are kept for review while "
                "MAX_DISK_GB leaves room, every image with PREDICTION_LOG_IMAGES=1, and a whole slide never (it "
                "stays where it was). Record a verdict only from the original: the file, the slide or the glass.",
                icon=":material/hide_image:",
            )
        else:
            name = f"log {p.id}" if blind else md_text(p.image_name)  # a file name may say the class
            st.image(thumbnail(str(item.image_path), IMAGE_SIDE), caption=name)
    with right:
        if blind:
            st.info(
                "Blind review: the model's answer and other reviewers' verdicts are hidden until you have "
                "recorded yours.",
                icon=":material/visibility_off:",
            )
        else:
            st.markdown(f"**Model's answer:** {md_text(p.predicted)} · {verdict_words(p.refer)} · run {p.run_id}")
            st.caption(
                f"Classified {p.at:%Y-%m-%d %H:%M} UTC by {md_text(p.user)}; {p.probability_kind} probabilities."
            )
            show_figure(probabilities_figure(list(p.probabilities), list(p.probabilities.values()), "Probabilities"))
    if blind:
        others = [r for r in item.reviews if r.reviewer != user.name]
        st.caption(f"{len(others)} other reviewer(s)' verdict(s), hidden." if others else "No other reviewer yet.")
    else:
        reviews_table(item)
    review_form(item, blind)


def queue_tab() -> None:
    with Session() as s:
        choices = queue.queue_choices(s, cfg, user)
    if not choices.run_ids:
        st.info("No prediction logged yet: predictions made on the Predict page, the API or `predict --log` come here.")
        return
    blind = st.toggle(
        "Blind review: hide the model's answer until I have given mine",
        key="rv_blind",
        help="A verdict given while seeing the model's answer can lean toward it. Reviews given blind are "
        "marked so, and the field accuracy on the Runs page says how many of its reviews were.",
    )
    chosen = filters(choices, blind)
    with Session() as s:
        found = queue.review_queue(s, cfg, user, chosen)
    recorded = st.session_state.pop("rv_recorded", None)
    if recorded is not None:
        prediction, was_blind = recorded
        told = (
            f" The model had said {md_text(prediction.predicted)} ({verdict_words(prediction.refer)})."
            if was_blind
            else ""
        )
        st.success(f"Review recorded.{told}", icon=":material/check:")
    if not found.items:
        st.caption("Nothing to review within these filters.")
        return
    more = "" if found.scanned_all else f" (ordered among the newest {queue.SCAN}: narrow the dates for older ones)"
    st.caption(f"{found.matched} prediction(s) to review{more}; the first {len(found.items)} are listed.")
    queue_table(found.items, blind)
    by_id = {item.prediction.id: item for item in found.items}
    picked = st.selectbox(
        "Review",
        list(by_id),
        format_func=lambda i: (
            f"log {i} · run {by_id[i].prediction.run_id}"
            + ("" if blind else f" · {by_id[i].prediction.predicted} · {pct(by_id[i].confidence)}")
        ),
        key="rv_pick_blind" if blind else "rv_pick",
    )
    item_detail(by_id[picked], blind)


def data_tab() -> None:
    with Session() as s:
        ready = to_data.ready_cases(s, cfg)
        datasets = views.dataset_rows(s)
    if not ready:
        st.caption("No reviewed prediction has one agreed true class yet.")
        return
    st.caption(
        f"{len(ready)} reviewed prediction(s) whose reviewers agree on a true class; "
        f"{sum(r.image_path is None for r in ready)} of them without a kept image."
    )
    usable = [r for r in ready if r.image_path is not None]
    text_table(
        pd.DataFrame(
            [
                {"log id": r.log_id, "model": f"run {r.run_id}", "true class": r.true_class, "image": "kept"}
                for r in usable
            ]
        )
    )
    if not usable or not datasets:
        return
    names = [d.name for d in datasets]
    dataset = st.selectbox("Add to dataset", names, key="rv_dataset")
    picked = st.multiselect(
        "Reviewed predictions", [r.log_id for r in usable], default=[r.log_id for r in usable], key="rv_cases"
    )
    note = st.text_input("Note for the new version", key="rv_version_note")
    if st.button("Add as a new version", type="primary", key="rv_add", disabled=not picked):
        with user_errors():
            with Session.begin() as s:
                added = to_data.add_reviewed_cases(s, cfg, user, dataset, picked, note)
            st.session_state["rv_added"] = added
    added = st.session_state.get("rv_added")
    if isinstance(added, to_data.AddedCases):
        st.success(
            f"Version {added.version} of {md_text(added.dataset)}: {len(added.added)} image(s) added, "
            f"{added.already_present} already in it, {added.without_image} without a kept image.",
            icon=":material/library_add:",
        )
        train_again(added)


def train_again(added: to_data.AddedCases) -> None:
    with Session() as s:
        approved = retrain.approved_for(s, added.dataset)
    if approved is None:
        st.caption("No approved model for this dataset's classes: train again from the Runs page.")
        return
    if st.button(
        f"Train run {approved} again on version {added.version}",
        key="rv_train_again",
        help="A run with the approved model's settings on the new version; its test images are the approved "
        "run's, so the Runs page compares the two on the same images.",
    ):
        with user_errors():
            with Session.begin() as s:
                run_id = retrain.train_again(s, cfg, user, approved, added.version, dataset=added.dataset)
            st.success(f"Run {run_id} is queued.", icon=":material/rocket_launch:")
            st.page_link("pages/runs.py", label=f"Open run {run_id}", query_params={"run": str(run_id)})


queue_view, data_view = st.tabs(["Queue", "Reviewed → data"])
with queue_view, user_errors():
    queue_tab()
with data_view, user_errors():
    data_tab()
