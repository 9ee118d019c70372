"""The Runs page's panel on training a run again: queue it on a newer version of its dataset with its
own test images kept as the test part, and compare the two runs on exactly those images.

Not a page: the Runs page calls `retrain_panel(run_id)` inside its own layout."""

import streamlit as st

from core.review import retrain
from pages._common import current_user, md_text, pct, session_factory, settings, user_errors


def retrain_panel(run_id: int) -> None:
    """Run `run_id`'s comparisons on frozen test images, and (for an editor) a way to train it again."""
    with user_errors():
        _panel(run_id)


def _panel(run_id: int) -> None:
    with session_factory()() as s:
        comparisons = retrain.frozen_test_comparisons(s, run_id)
        choice = retrain.retrain_choice(s, run_id)
    if not comparisons and not choice.possible:
        return
    st.subheader("Trained again on newer data", anchor=False)
    for c in comparisons:
        _comparison(c)
    if choice.possible and current_user().can_edit:
        _train_again(choice)


def _comparison(c: retrain.FrozenTestComparison) -> None:
    st.markdown(f"**Run {c.new_run}** (trained again) against **run {c.old_run}**, on run {c.old_run}'s test images")
    a, b, d = st.columns(3)
    a.metric(f"Run {c.old_run}", pct(c.old_accuracy), help="Accuracy on run's own test images.")
    b.metric(
        f"Run {c.new_run}",
        pct(c.new_accuracy),
        None if c.paired is None else f"{c.paired.difference * 100:+.1f} points",
        help="Accuracy on the same images.",
        # A gap within noise is shown as a figure, not as a rise or a fall.
        **({"delta_color": "off", "delta_arrow": "off"} if c.paired is None or c.paired.within_noise else {}),
    )
    d.metric("Test images", f"{c.scored} of {c.test_images}" if c.paired else str(c.test_images))
    st.caption(md_text(c.words))


def _train_again(choice: retrain.RetrainChoice) -> None:
    trained = "an unrecorded version" if choice.trained_on is None else f"version {choice.trained_on}"
    with st.expander(f"Train run {choice.run_id} again on a newer version of {md_text(choice.dataset)}"):
        st.caption(
            f"Run {choice.run_id} was trained on {trained}. A new run with its settings learns from the newer "
            f"version, and is tested on run {choice.run_id}'s own test images, so the two compare on the same images."
        )
        version = st.selectbox(
            "Version", choice.newer, format_func=lambda n: f"version {n}", key=f"rt_version_{choice.run_id}"
        )
        if st.button("Train again", key=f"rt_train_{choice.run_id}", icon=":material/replay:"):
            cfg = settings()
            with user_errors():
                with session_factory().begin() as s:
                    run_id = retrain.train_again(s, cfg, current_user(), choice.run_id, version)
                st.success(f"Run {run_id} is queued.", icon=":material/rocket_launch:")
