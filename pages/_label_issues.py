"""The Datasets page's suspected label errors: for a version a run has scored, the images whose given
class the model finds least likely (core/evaluation/label_issues.py), as a gallery; an editor
relabels one (the dataset's next version) or confirms its class (it leaves the list)."""

import streamlit as st

from core.access.accounts import User
from core.config import Settings
from core.evaluation import label_issues
from core.evaluation.label_issues import LabelIssue, LabelIssues
from pages._common import md_text, thumbnail, user_errors

PER_ROW, LIMIT = 4, 24
HOW = (
    "Confident learning (as the cleanlab library does it): each class's threshold is the mean probability "
    "the model gives it over the images labelled with it. An image is a suspect when its given class "
    "scores below that class's threshold while another class reaches its own; the most doubtful first. "
    "The probabilities come from models that did not train on the image (the folds of a k-fold run)."
)


def label_issues_section(name: str, Session, cfg: Settings, user: User) -> None:
    """The suspects of a version of dataset `name`, with an editor's two answers to each."""
    st.subheader("Suspected label errors")
    with Session() as s:
        numbers = label_issues.scored_versions(s, name)
    if not numbers:
        st.caption(
            "No run trained on this dataset has succeeded yet. Once one has, the images whose class it doubts "
            "are listed here (a k-fold run checks every image)."
        )
        return
    if st.session_state.get("ds_li_version") not in numbers:  # first time, or another dataset's
        st.session_state["ds_li_version"] = numbers[0]
    number = st.selectbox(
        "Version to check",
        numbers,
        key="ds_li_version",
        format_func=lambda n: f"version {n}",
        help="The versions a run that succeeded was trained on.",
    )
    with Session() as s:
        found = label_issues.label_issues(s, cfg, name, number)
    st.caption(md_text(found.words()), help=HOW)
    if not found.issues:
        return
    if not user.can_edit:
        st.caption("Relabelling an image or confirming its class needs the editor role.")
    shown = found.issues[:LIMIT]
    for start in range(0, len(shown), PER_ROW):
        for col, issue in zip(st.columns(PER_ROW), shown[start : start + PER_ROW]):
            with col, user_errors():
                issue_card(issue, found, Session, cfg, user)
    if len(found.issues) > LIMIT:
        st.caption(f"The {LIMIT} most doubtful of {len(found.issues)}; answer these to see the next.")


def issue_card(issue: LabelIssue, found: LabelIssues, Session, cfg: Settings, user: User) -> None:
    st.image(thumbnail(str(issue.path)), width="stretch")
    st.markdown(f"**{md_text(issue.given)}**, or **{md_text(issue.suspected)}**?")
    st.caption(
        f"{md_text(issue.name)}  \nProbability of its class {issue.given_probability:.1%}, of "
        f"{md_text(issue.suspected)} {issue.suspected_probability:.1%} (run {issue.run_id})"
    )
    if issue.relabelled_to is not None:
        st.caption(f"Relabelled {md_text(issue.relabelled_to)} in a later version.")
        return
    if not user.can_edit:
        return
    key = f"{found.version}_{issue.image_id}"
    label = st.selectbox(
        "New class",
        found.classes,
        index=found.classes.index(issue.suspected),
        key=f"ds_li_class_{key}",
        label_visibility="collapsed",
    )
    if st.button("Relabel", key=f"ds_li_relabel_{key}", icon=":material/edit:", width="stretch"):
        with Session.begin() as s:
            made = label_issues.relabel_image(s, cfg, found.dataset, found.version, issue.image_id, label, user)
        st.session_state["ds_flash"] = (
            f"{md_text(issue.name)} is {md_text(label)} in version {made} of '{md_text(found.dataset)}'."
        )
        # The Versions section below shows what changed, from the version checked to the new one.
        st.session_state["ds_diff_old"], st.session_state["ds_diff_new"] = found.version, made
        st.rerun()
    if st.button(
        "Its class is right",
        key=f"ds_li_confirm_{key}",
        icon=":material/check:",
        width="stretch",
        help="Keep its class: it leaves this list, here and in later versions, while its class stays the same.",
    ):
        with Session.begin() as s:
            label_issues.confirm_label(s, found.dataset, found.version, issue.image_id, user)
        st.session_state["ds_flash"] = f"{md_text(issue.name)} stays {md_text(issue.given)}."
        st.rerun()
