"""The Runs page's panel on field accuracy: how a model did on the predictions people reviewed (the
Review page), with the confusion matrix and the figures week by week.

Not a page: the Runs page calls `field_panel(run_id)` inside its own layout. The figures are
core/review/field.py's; this lays them out."""

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.review import field
from pages._common import PALETTE, confusion_figure, pct, session_factory, show_figure, text_table, user_errors

LABEL = "field: reviewed predictions"


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
    if found.weeks:
        show_figure(_weekly(found), key=f"field_weeks_{run_id}")


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
    fig.update_xaxes(title="week (Monday, UTC)")
    fig.update_yaxes(range=[0, 1.02], tickformat=".0%")
    fig.update_layout(title={"text": f"By week ({LABEL})"}, height=340, legend={"orientation": "h", "y": -0.25})
    return fig
