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
    for column, (kind, html, suffix, mime) in zip(
        st.columns(2), (("Markdown", False, "md", "text/markdown"), ("HTML", True, "html", "text/html")), strict=True
    ):
        column.download_button(
            f"Model card ({kind})",
            icon=":material/description:",
            data=lambda html=html: _card_text(Session, cfg, run.id, html=html),
            file_name=f"run-{run.id}-model-card.{suffix}",
            mime=mime,
            on_click="ignore",
            key=f"runs_card_{suffix}_{run.id}",
            help=help_text,
        )
