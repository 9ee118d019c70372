"""The Runs page's model card downloads: a succeeded run's card (core/jobs/model_card.py) as Markdown
and as an HTML page, made when a button is pressed."""

import streamlit as st

from core.config import Settings
from core.jobs import model_card
from core.jobs.views import RunRow


def _card_text(Session, cfg: Settings, run_id: int, html: bool) -> str:
    with Session() as s:
        card = model_card.model_card(s, cfg, run_id)
    return model_card.to_html(card) if html else model_card.to_markdown(card)


def model_card_buttons(run: RunRow, Session, cfg: Settings) -> None:
    """Two download buttons, side by side, for everyone who may read the run."""
    help_text = (
        "What the model is for and not for, its training data, protocol, test figures with intervals, "
        "calibration, colour-only yardstick, approvals and its model file's sha256."
    )
    a, b = st.columns(2)
    a.download_button(
        "Model card (Markdown)",
        icon=":material/description:",
        data=lambda: _card_text(Session, cfg, run.id, html=False),
        file_name=f"run-{run.id}-model-card.md",
        mime="text/markdown",
        on_click="ignore",
        key=f"runs_card_md_{run.id}",
        help=help_text,
    )
    b.download_button(
        "Model card (HTML)",
        icon=":material/description:",
        data=lambda: _card_text(Session, cfg, run.id, html=True),
        file_name=f"run-{run.id}-model-card.html",
        mime="text/html",
        on_click="ignore",
        key=f"runs_card_html_{run.id}",
        help=help_text,
    )
