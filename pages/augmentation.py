"""Augmentation: Augmentor's operations with the paper's values as defaults, a live preview on one
image at the training size (its proportions kept), and named presets for the Train page; the preset
box says when the values shown are no longer the preset's."""

import dataclasses
import math

import pandas as pd
import streamlit as st

from core.errors import UserError
from core.jobs import views
from core.training import presets
from core.transforms import augment
from core.transforms.augment import AugmentParams
from pages._common import (
    current_user,
    md_text,
    page_header,
    require_editor,
    session_factory,
    settings,
    through_router,
    user_errors,
)

through_router()
Session = session_factory()
cfg = settings()
user = current_user()  # anyone previews; saving and deleting presets need an editor
PAPER = AugmentParams()
FIELDS = [f.name for f in dataclasses.fields(AugmentParams)]

page_header(
    "Augmentation",
    "Training images are multiplied with Augmentor's operations, each applied with exactly "
    "its probability. Only the training part of a split is augmented; test images stay untouched.",
)

for name in FIELDS:  # widget state starts at the paper's values
    st.session_state.setdefault(f"aug_{name}", getattr(PAPER, name))
st.session_state.setdefault("aug_loaded", presets.PAPER_PRESET)  # the preset whose values were loaded last

flash = st.session_state.pop("aug_flash", None)
if flash:
    st.success(flash, icon=":material/check_circle:")


def load_preset() -> None:
    with Session() as s:
        try:
            params = presets.get_params(s, st.session_state["aug_preset"])
        except UserError as e:
            st.session_state["aug_flash_error"] = md_text(str(e))
            return
    for name in FIELDS:
        st.session_state[f"aug_{name}"] = getattr(params, name)
    st.session_state["aug_loaded"] = st.session_state["aug_preset"]


def shown_params() -> AugmentParams | None:
    """The values in the widgets now (None while one is out of range: the page says so below)."""
    try:
        return AugmentParams(**{name: st.session_state[f"aug_{name}"] for name in FIELDS})
    except UserError:
        return None


with Session() as s:
    names = presets.preset_names(s)
    # What each preset does in words, one column: a column per setting would not fit beside the sidebar.
    saved = [
        {
            "preset": p.name,
            "operations": "; ".join(presets.augmentation_words(p.params)),
            "saved": p.created_at,
            "saved by": p.created_by,
        }
        for p in views.preset_rows(s)
    ]
    ds_names = [d.name for d in views.dataset_rows(s)]
    loaded = st.session_state["aug_loaded"]
    loaded_params = presets.get_params(s, loaded) if loaded in names else None  # None: deleted since
if "aug_select" in st.session_state:  # a preset just saved: chosen before the box is drawn
    st.session_state["aug_preset"] = st.session_state.pop("aug_select")
if st.session_state.get("aug_preset") not in names:
    st.session_state["aug_preset"] = loaded if loaded in names else presets.PAPER_PRESET
# Set from here, the box's value is sent to the browser with its label, so "— changed" shows in the
# box itself (a browser keeps the label it drew for a value it chose).
st.session_state["aug_preset"] = st.session_state["aug_preset"]
current = shown_params()
changes = (
    []
    if current is None or loaded_params is None
    else [
        f"{presets.AUGMENT_LABELS[name].lower()} {getattr(loaded_params, name):g} → {getattr(current, name):g}"
        for name in FIELDS  # a number box can step 0.4 to 0.45000000000000007 and back: equal within 1e-9
        if not math.isclose(getattr(current, name), getattr(loaded_params, name), rel_tol=0, abs_tol=1e-9)
    ]
)


def preset_label(name: str) -> str:
    return f"{name} — changed" if name == loaded and changes else name


top = st.columns([2, 1, 3], vertical_alignment="bottom")
top[0].selectbox(
    "Preset",
    names,
    key="aug_preset",
    format_func=preset_label,
    help="The paper's settings, or one you saved. Marked 'changed' once the values below differ "
    "from the preset they were loaded from.",
)
top[1].button("Load preset", on_click=load_preset, width="stretch")
if "aug_flash_error" in st.session_state:
    st.error(st.session_state.pop("aug_flash_error"))
if loaded_params is None:
    st.caption(
        f"Custom values: the preset '{md_text(loaded)}' they were loaded from was deleted. Save them as a "
        "preset below to train with them."
    )
elif changes:
    st.markdown(
        f":orange-badge[:material/edit: Changed from '{md_text(loaded)}']  "
        f"{len(changes)} value(s) differ: {'; '.join(changes)}. The Train page trains with saved presets: "
        "**save these values as a preset below** to use them, or load the preset again to go back."
    )
elif st.session_state["aug_preset"] != loaded:
    st.caption(
        f"The values below are those of '{md_text(loaded)}'. Press **Load preset** to use "
        f"'{md_text(st.session_state['aug_preset'])}'."
    )

settings_col, preview_col = st.columns([2, 3], gap="large")


def probability(name: str, label: str) -> None:
    st.number_input(
        label,
        0.0,
        1.0,
        step=0.05,
        format="%.2f",
        key=f"aug_{name}",
        help=f"Paper: {getattr(PAPER, name)}. Each image gets this operation with this probability.",
    )


with settings_col:
    with st.container(border=True):
        st.markdown("**Rotate** · paper: p 0.4, up to 3° left or right")
        probability("rotate_probability", "Probability")
        a, b = st.columns(2)
        a.number_input("Max left (degrees)", 0, 25, step=1, key="aug_rotate_max_left")
        b.number_input("Max right (degrees)", 0, 25, step=1, key="aug_rotate_max_right")
    with st.container(border=True):
        st.markdown("**Random distortion** · paper: p 0.4, grid 4×4, magnitude 4")
        probability("distortion_probability", "Probability")
        a, b, c = st.columns(3)
        a.number_input("Grid width", 1, 64, step=1, key="aug_distortion_grid_width")
        b.number_input("Grid height", 1, 64, step=1, key="aug_distortion_grid_height")
        c.number_input("Magnitude", 0, 64, step=1, key="aug_distortion_magnitude")
    with st.container(border=True):
        st.markdown("**Zoom** (random crop, resized back) · paper: p 0.2, area 0.9")
        probability("zoom_probability", "Probability")
        st.number_input("Share of the area kept", 0.1, 0.99, step=0.05, format="%.2f", key="aug_zoom_percentage_area")
    with st.container(border=True):
        st.markdown("**Extras** · not in the paper, off by default")
        probability("flip_left_right_probability", "Flip left-right: probability")
        probability("flip_top_bottom_probability", "Flip top-bottom: probability")
        probability("rotate90_probability", "Rotate by 90°: probability")

params = None
with settings_col, user_errors():
    params = AugmentParams(**{name: st.session_state[f"aug_{name}"] for name in FIELDS})
    unchanged = 1.0
    for name in FIELDS:
        if name.endswith("_probability"):
            unchanged *= 1 - getattr(params, name)
    st.caption(
        f"About {unchanged:.0%} of the augmented training images come out unchanged (no operation fires)."
        + ("" if params != PAPER else " These are the paper's settings.")
    )

with preview_col:
    st.subheader("Preview")
    if not ds_names:
        st.info(
            "Add a dataset on the **Datasets** page to preview augmentation on its images.", icon=":material/image:"
        )
    elif params is not None:
        a, b, c = st.columns([2, 1, 2])
        ds_name = a.selectbox("Dataset", ds_names, key="aug_dataset")
        with Session() as s:
            dataset = views.dataset_detail(s, cfg, ds_name)
        label = b.selectbox("Class", dataset.classes, key="aug_class")
        members = {im.id: im for im in dataset.images if im.label == label}
        image_id = c.selectbox(
            "Image", list(members), format_func=lambda i: members[i].name, key=f"aug_image_{ds_name}_{label}"
        )
        image = members[image_id]
        a, b, c = st.columns(3)
        size = a.number_input(
            "Training size (px)",
            32,
            1024,
            224,
            step=32,
            key="aug_size",
            help="Training squeezes each image to this square before augmenting (paper: 224); "
            "the preview scales the image's shorter side to it instead.",
        )
        n = b.slider("Versions", 2, 16, 8, key="aug_n")
        seed = c.number_input("Seed", 0, 2**31 - 1, 0, key="aug_seed", help="Same seed, same versions.")
        with user_errors(), st.spinner("Augmenting…"):
            original = views.preview_image(image, int(size))
            versions = augment.preview(original, params, int(n), int(seed))
        per_row = 3
        st.markdown(
            f"**Original** at {original.width}×{original.height}, its proportions kept · then {n} augmented "
            "versions, captioned with the operations that fired"
        )
        st.caption(
            f"Training squeezes each image to a {size}×{size} square before augmenting; the preview keeps "
            "the image's shape so that the changes to the tissue are easy to judge."
        )
        cells = [(original, "original")] + [
            (
                im,
                " + ".join(presets.OPERATION_LABELS.get(f, f) for f in fired).capitalize()
                if fired
                else "no operation fired",
            )
            for im, fired in versions
        ]
        for start in range(0, len(cells), per_row):
            row = cells[start : start + per_row]
            cols = st.columns(per_row)
            for col, (im, caption) in zip(cols, row):
                col.image(im, caption=caption, width="stretch")

st.divider()
if not user.can_edit:
    st.subheader("Saved presets")
    st.caption("Saving and deleting presets needs the editor role.")
else:
    st.subheader("Save as a preset")
    a, b, c = st.columns([3, 1, 1], vertical_alignment="bottom")
    preset_name = a.text_input("Preset name", key="aug_new_name", placeholder="e.g. paper + flips")
    overwrite = b.checkbox("Replace if it exists", key="aug_overwrite")
    if c.button("Save preset", type="primary", disabled=params is None, width="stretch"):
        with user_errors():
            require_editor("save presets")
            with Session.begin() as s:
                presets.save_preset(s, preset_name, params, overwrite=overwrite).created_by = user.name
            # The values shown are now that preset's: the box shows it, unmarked.
            st.session_state["aug_loaded"] = st.session_state["aug_select"] = preset_name.strip()
            st.session_state["aug_flash"] = (
                f"Saved preset '{md_text(preset_name.strip())}'. Choose it on the Train page."
            )
            st.rerun()

if saved:
    st.dataframe(
        pd.DataFrame(saved),
        hide_index=True,
        row_height=56,
        placeholder="–",
        column_config={
            "saved": st.column_config.DatetimeColumn("saved (UTC)", format="YYYY-MM-DD HH:mm", width=130),
            "operations": st.column_config.TextColumn(width="large"),
            "saved by": st.column_config.TextColumn(width=90),
        },
    )
    if user.can_edit:
        a, b = st.columns([3, 1], vertical_alignment="bottom")
        doomed = a.selectbox("Delete a preset", [p["preset"] for p in saved], key="aug_delete_name")
        if b.button("Delete preset", width="stretch"):
            with user_errors():
                require_editor("delete presets")
                with Session.begin() as s:
                    presets.delete_preset(s, doomed)
                st.session_state["aug_flash"] = (
                    f"Deleted preset '{md_text(doomed)}'. Runs that used it keep their own copy."
                )
                st.rerun()
else:
    st.caption(
        "No saved presets yet. Runs copy a preset's values, so changing a preset later never alters a recorded run."
    )
