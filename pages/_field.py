"""The Runs page's panel on field accuracy: how a model did on the predictions people reviewed (the
Review page), with the confusion matrix and the figures week by week.

Not a page: the Runs page calls `field_panel(run_id)` inside its own layout. The figures are
core/review/field.py's; this lays them out."""

from datetime import timedelta

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.review import field
from pages._common import (
    PALETTE,
    confusion_figure,
    current_user,
    md_text,
    pct,
    session_factory,
    settings,
    show_figure,
    text_table,
    thumbnail,
    user_errors,
)
from pages._run_cells import cell_choice

LABEL = "field: reviewed predictions"
CELL_ROW, CELL_LIMIT = 6, 24


def field_panel(run_id: int) -> None:
    """Run `run_id`'s field accuracy; nothing when none of its predictions has been reviewed or logged."""
    with user_errors():
        _panel(run_id)


def _panel(run_id: int) -> None:
    with session_factory()() as s:
        found = field.field_accuracy(s, run_id)
    if not found.reviewed and not found.predictions:
        return
    st.subheader("In use: reviewed predictions", anchor=False)
    st.caption(
        "How the model did on the predictions people reviewed (the Review page). Reviewers look at the referred "
        "and least confident predictions first, so these are not a random draw of its predictions."
    )
    a, b, c, d = st.columns(4)
    a.metric(
        "Field accuracy",
        pct(found.accuracy),
        help=f"{found.level:.0%} bootstrap interval {pct(found.low)} to {pct(found.high)}"
        if found.accuracy is not None
        else "No reviewed prediction with one agreed true class yet.",
    )
    b.metric("Reviewed", f"{found.counted} of {found.reviewed}", help="Counted: every reviewer names the same class.")
    c.metric("Referred", pct(found.referred_share), help=f"Of its {found.predictions} logged prediction(s).")
    d.metric(
        "Overruled",
        pct(found.overruled_share),
        help="Reviews naming another class than the model's, of those naming one.",
    )
    e, f, _, _ = st.columns(4)
    if found.class_reviews:
        e.metric(
            "Given blind",
            f"{found.blind} of {found.class_reviews}",
            help="Reviews naming a class given without seeing the model's answer (blind review on the Review "
            "page); one given seeing it can lean toward it.",
        )
    if found.paired:
        f.metric(
            "Reviewers agree",
            pct(found.agreement_share),
            help=f"On {found.paired} case(s) reviewed twice or more (their first two reviews). "
            + (
                f"Fleiss' kappa, which corrects for agreement by chance: {found.kappa:.2f}."
                if found.kappa is not None
                else "Too few, or all one verdict, for a kappa."
            ),
        )
    st.caption(found.summary())
    if found.counted:
        show_figure(
            confusion_figure(np.array(found.confusion), found.classes, f"Confusion matrix ({LABEL})"),
            key=f"field_cm_{run_id}",
        )
        text_table(
            pd.DataFrame(
                {"class": list(found.classes), "recall": [pct(r) for r in found.recall]},
            )
        )
        if current_user().can_edit:
            _cell(run_id, found.classes)
    if found.weeks:
        show_figure(_weekly(found), key=f"field_weeks_{run_id}")


def _cell(run_id: int, classes: tuple[str, ...]) -> None:
    """A cell of the field matrix opened: its reviewed cases, with their images where kept."""
    chosen = cell_choice(classes, f"field_{run_id}", ("Reviewed class", "The model's class"), "reviewed cases")
    if chosen is None:
        return
    truth, guess = chosen
    cfg = settings()
    with session_factory()() as s:
        found = field.field_cell(s, cfg, current_user(), run_id, truth, guess)
    st.markdown(f"**Reviewed {md_text(truth)}, the model said {md_text(guess)}: {len(found)} case(s)**")
    for start in range(0, min(len(found), CELL_LIMIT), CELL_ROW):
        for col, case in zip(st.columns(CELL_ROW), found[start : start + CELL_ROW]):
            if case.image_path is not None:
                col.image(thumbnail(str(case.image_path)), width="stretch")
            else:
                col.caption("image not kept")
            words = (
                "log row pruned"
                if case.probabilities is None
                else " · ".join(f"{c} {p:.1%}" for c, p in case.probabilities.items())
            )
            col.caption(
                f"{md_text(case.image_name or f'log {case.log_id}')}  \n{case.probability_kind or ''} {md_text(words)}"
            )
    if len(found) > CELL_LIMIT:
        st.caption(f"The first {CELL_LIMIT} of {len(found)}, newest first.")


def _weekly(found: field.FieldAccuracy) -> go.Figure:
    weeks = [w.week.isoformat() for w in found.weeks]
    fig = go.Figure()
    for k, (name, values) in enumerate(
        [
            ("accuracy", [w.accuracy for w in found.weeks]),
            ("referred", [w.referred_share for w in found.weeks]),
            ("overruled", [w.overruled_share for w in found.weeks]),
        ]
    ):
        fig.add_trace(go.Scatter(x=weeks, y=values, name=name, mode="lines+markers", line_color=PALETTE[k]))
    # Whole weeks on a date axis, padded half a week each side: with one week alone, plotly would
    # zoom in to milliseconds around it.
    first, last = found.weeks[0].week, found.weeks[-1].week
    fig.update_xaxes(
        title="week (Monday, UTC)",
        type="date",
        tickformat="%d %b %Y",
        tick0=first.isoformat(),  # ticks on the Mondays
        dtick=7 * 24 * 3600 * 1000,
        range=[(first - timedelta(days=4)).isoformat(), (last + timedelta(days=4)).isoformat()],
    )
    fig.update_yaxes(range=[-0.04, 1.04], tickformat=".0%")  # a point at 0% or 100% drawn whole
    fig.update_layout(title={"text": f"By week ({LABEL})"}, height=340, legend={"orientation": "h", "y": -0.25})
    return fig
