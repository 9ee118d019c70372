"""Train: choose data, split, augmentation, weights and training settings (the paper's by default),
launch a background run, and watch or cancel the queue."""

from pathlib import Path

import streamlit as st

from core.data import audit, datasets, splits
from core.jobs import runs, views
from core.training import presets
from core.errors import UserError
from core.training.run_config import RunConfig, setting_type, settings_fields
from pages._common import (
    STATUS_BADGE, current_user, md_text, page_header, request_cancel, session_factory, settings, start_worker,
    through_router, user_errors,
)

through_router()
Session = session_factory()
cfg = settings()
user = current_user()  # launching and cancelling need an editor
PAPER = RunConfig(dataset="-")
# The form's inputs come from RunConfig's fields (their type, label, help, bounds, choices); the
# few that show records (datasets, specimen groups, presets, files) are drawn by this page itself.
FIELDS = {f.name: f for f in settings_fields()}
DRAWN_HERE = {name for name, f in FIELDS.items() if f.metadata.get("drawn_by_page")}
SPLIT_SETTINGS = ("seed", "test_fraction", "val_fraction", "folds")  # what a split is made with, besides its protocol
WEIGHT_LABELS = {
    "imagenet": "ImageNet (torchvision download)",
    "file": "A weights file on the server",
    "none": "None: random initialisation",
}

page_header("Train", "The modified DenseNet-201 (FC 512, dropout 0.5, no layer frozen) trained with Adam on "
            "cross-entropy. Every default below is the paper's; runs train in the background worker.")


def form_key(name: str) -> str:
    """The session-state key of a setting's input."""
    return "tr_" + FIELDS[name].metadata.get("key", name)


def form_values(values: dict) -> dict:
    """The inputs' values for RunConfig `values` (less those the page draws itself)."""
    return {form_key(name): values[name] for name in FIELDS if name not in DRAWN_HERE}


def setting_input(container, name: str, split: str | None = None):
    """The input for setting `name`, its kind chosen by the field's type and choices; disabled
    under a split protocol it does not apply to. Returns its value."""
    f = FIELDS[name]
    meta, kind, key = f.metadata, setting_type(f), form_key(name)
    label, tip = meta["label"], meta["help"][:1].upper() + meta["help"][1:] + "."
    disabled = split is not None and split not in meta.get("splits", (split,))
    options = meta.get("choices") or meta.get("options")
    if kind is bool:
        return container.checkbox(label, key=key, help=tip, disabled=disabled)
    if options and "option_labels" in meta:
        return container.radio(label, options, format_func=lambda o: meta["option_labels"].get(o, o), key=key,
                               help=tip, disabled=disabled)
    if options:
        return container.selectbox(label, options, key=key, help=tip, disabled=disabled)
    low, high = meta["bounds"]
    return container.number_input(label, low, high, step=meta["step"], format=meta.get("format"), key=key,
                                  help=tip, disabled=disabled)


def section_inputs(section: str, split: str, columns: int, drawn: tuple[str, ...] = ()) -> None:
    """The inputs of a section's settings, in RunConfig's order, across `columns` (less those `drawn` already)."""
    names = [name for name, f in FIELDS.items()
             if f.metadata.get("section") == section and name not in DRAWN_HERE and name not in drawn]
    cols = st.columns(columns)
    for i, name in enumerate(names):
        setting_input(cols[i % columns], name, split)


def launch(config: RunConfig) -> None:
    """Queue the runs of `config` and make sure a worker takes them."""
    from core.training.model import check_weights  # torch: only when launching

    with st.spinner("Checking that the backbone weights can be loaded..."):
        check_weights(config.weights)  # here, not after the run has spent minutes augmenting its data
    with Session.begin() as s:
        ids = [r.id for r in runs.create_runs(s, cfg, config, user=user)]
    start_worker(cfg)
    st.session_state["tr_flash"] = (f"Queued run {ids[0]}" if len(ids) == 1 else
                                    f"Queued runs {', '.join(map(str, ids))} (one per fold)") + \
        ". The background worker picks it up; follow it on the Runs page."
    st.session_state["runs_selected"] = ids[0]
    st.session_state["tr_launched"] = True
    st.rerun()


def _weights_default() -> tuple[str, str]:
    w = cfg.default_weights
    return (w, "") if w in ("imagenet", "none") else ("file", w)


def apply_preset(name: str) -> None:
    values = presets.training_preset(name)
    # The paper used ImageNet weights; a site that set DEFAULT_WEIGHTS (say, the same weights as a
    # local file, because it is offline) keeps its choice, unless the preset names its weights.
    choice, path = (values["weights"], "") if "weights" in presets.TRAINING_PRESETS[name] else _weights_default()
    st.session_state.update({**form_values(values), form_key("augmentation"): presets.PAPER_PRESET,
                             form_key("weights"): choice, "tr_weights_path": path, "tr_leak_ok": False})
    if values["grouped"] is not None:
        st.session_state[form_key("grouped")] = values["grouped"]
    st.session_state["tr_flash"] = f"Loaded '{name}'. Check the dataset and weights, then launch."


choice, path = _weights_default()
for key, value in {**form_values(PAPER.to_dict()), form_key("augmentation"): presets.PAPER_PRESET,
                   form_key("weights"): choice, "tr_weights_path": path}.items():
    st.session_state.setdefault(key, value)

with Session() as s:
    ds_info = {d.name: d for d in views.dataset_rows(s)}
    preset_names = presets.preset_names(s)
if st.session_state[form_key("augmentation")] not in preset_names:  # deleted on the Augmentation page meanwhile
    st.session_state[form_key("augmentation")] = presets.PAPER_PRESET

flash = st.session_state.pop("tr_flash", None)
if flash:
    st.success(flash, icon=":material/check_circle:")
    if st.session_state.pop("tr_launched", False):
        st.page_link("pages/runs.py", label="Follow it on the Runs page", icon=":material/monitoring:")

if not ds_info:
    st.info("Add a dataset on the **Datasets** page first.", icon=":material/folder_open:")
else:
    b1, b2, b3, _ = st.columns([1, 1, 1, 1])
    b1.button("Reproduce the paper", icon=":material/description:", on_click=apply_preset, args=("Reproduce the paper",), width="stretch",
              help="The paper's settings and its own (leaky) protocol: augment all images, then split 80/20.")
    b2.button("Paper settings, honest split", icon=":material/balance:", on_click=apply_preset, args=("Paper settings, honest split",),
              width="stretch", help="The paper's settings, evaluated on untouched test images.")
    b3.button("Unseen specimens (CPU)", icon=":material/biotech:", on_click=apply_preset, args=(presets.UNSEEN_SPECIMENS_CPU,),
              width="stretch", help=f"{presets.UNSEEN_SPECIMENS_CPU}: the best configuration compared so far on images of "
                                    "specimens left out of training, at reduced settings that a CPU can afford; "
                                    "no ImageNet weights. See docs/generalisation.md.")

    data_col, model_col = st.columns(2, gap="large")
    with data_col:
        with st.container(border=True):
            st.markdown("**Data and split**")
            ds_name = st.selectbox(FIELDS["dataset"].metadata["label"], list(ds_info), key=form_key("dataset"),
                                   format_func=lambda n: f"{n} ({ds_info[n].images} images, {', '.join(ds_info[n].classes)})")
            split = setting_input(st, "split")
            groups = ds_info[ds_name].groups
            grouped = None
            if split != "paper-leaky":
                if groups:
                    grouped = st.checkbox(f"{FIELDS['grouped'].metadata['label']} ({groups} groups)", value=True,
                                          key=form_key("grouped"),
                                          help="Images of one specimen share stain and tissue; splitting them inflates scores.")
                else:
                    st.caption("This dataset has no specimen groups, so the split is by image: images of one "
                               "specimen may land on both sides. Add groups on the Datasets page for a stricter test.")
            section_inputs("data", split, columns=3, drawn=("split",))
            split_key = (ds_name, split, grouped, *(st.session_state[form_key(name)] for name in SPLIT_SETTINGS))
            if user.can_edit and split != "paper-leaky" and st.button(
                    "Audit this split for leaks", icon=":material/content_copy:", key="tr_audit",
                    help="Looks for test images that equal, nearly equal or closely resemble a training image "
                         "(duplicates, neighbouring fields of one slide). Runs audit their split too."):
                with user_errors(), st.spinner("Comparing every test image with the training images…"):
                    with Session.begin() as s:
                        planned = splits.make_split(
                            s, datasets.get_dataset(s, ds_name), protocol=split, grouped=grouped,
                            **{name: setting_type(FIELDS[name])(value) for name, value in zip(SPLIT_SETTINGS, split_key[3:])})
                        found = audit.audit_split(s, cfg, planned, fold=0)
                    st.session_state["tr_audit_result"] = (split_key, found.warning, found.summary)
            audited = st.session_state.get("tr_audit_result")
            if audited and audited[0] == split_key:
                where = " (fold 1)" if split == "kfold" else ""
                if audited[1]:
                    st.warning(f"**Leak audit{where}:** {audited[1]}  \n{audited[2]}", icon=":material/content_copy:")
                else:
                    st.success(f"Leak audit{where}: nothing found. {audited[2]}", icon=":material/check_circle:")
            leak_ok = True
            if split == "paper-leaky":
                st.warning(
                    "**This protocol leaks test data into training.** Every image is augmented first and the "
                    "augmented copies are then split 80/20, so copies of the same source image (and images of the "
                    "same specimen) end up in both training and test. Its accuracy is inflated (the paper's 99.56% "
                    "came this way) and does not measure performance on new patients. Use it only to reproduce the "
                    "paper; every result of this run is labelled LEAKY.", icon=":material/warning:")
                leak_ok = st.checkbox("I understand that this run's test score is not a valid estimate", key="tr_leak_ok")
        with st.container(border=True):
            st.markdown("**Augmentation** of the training part")
            aug_preset = st.selectbox(FIELDS["augmentation"].metadata["label"], preset_names,
                                      key=form_key("augmentation"), help="Make presets on the Augmentation page.")
            section_inputs("augmentation", split, columns=1)
            with Session() as s, user_errors():
                p = presets.get_params(s, aug_preset)
                on = [f"rotate p {p.rotate_probability} ±{p.rotate_max_left}/{p.rotate_max_right}°",
                      f"distortion p {p.distortion_probability} grid {p.distortion_grid_width}×{p.distortion_grid_height} "
                      f"magnitude {p.distortion_magnitude}", f"zoom p {p.zoom_probability} area {p.zoom_percentage_area}"]
                on += [f"{label} p {v}" for label, v in (("flip left-right", p.flip_left_right_probability),
                                                         ("flip top-bottom", p.flip_top_bottom_probability),
                                                         ("rotate 90°", p.rotate90_probability)) if v > 0]
                st.caption(" · ".join(on))

    with model_col:
        with st.container(border=True):
            st.markdown("**Backbone weights**")
            weights = st.radio(FIELDS["weights"].metadata["label"], list(WEIGHT_LABELS), format_func=WEIGHT_LABELS.get,
                               key=form_key("weights"), label_visibility="collapsed")
            if weights == "imagenet":
                st.caption("The paper's choice. torchvision downloads them once (about 80 MB, cached under TORCH_HOME). "
                           "Launching checks that they can be loaded: on a machine without internet it says so "
                           "and queues nothing; use a weights file or no weights there.")
            elif weights == "file":
                st.text_input("Path on the server", key="tr_weights_path", placeholder="/models/densenet201-c1103571.pth",
                              help="A torchvision DenseNet-201 state dict (.pth, .safetensors) or a checkpoint of this app.")
            else:
                st.caption("Training from random initialisation: expect much lower accuracy than with ImageNet "
                           "weights on a few hundred images. The run records that it used no weights.")
        with st.container(border=True):
            st.markdown("**Training**")
            section_inputs("training", split, columns=2)
        with st.container(border=True):
            st.markdown("**Generalisation to new specimens** (not in the paper; off by default)")
            section_inputs("generalisation", split, columns=2)
            st.caption("Every class gets the same number of augmented training images (class-balanced). "
                       "Probabilities are calibrated on the validation part, which also sets the "
                       "'uncertain, refer' band on the Predict page.")

    ready = leak_ok and (weights != "file" or st.session_state["tr_weights_path"].strip())
    if not user.can_edit:
        st.info("Launching runs needs the editor role; the Runs page shows every run's results.", icon=":material/lock:")
    elif st.button("Launch training", icon=":material/rocket_launch:", type="primary", disabled=not ready, key="tr_launch"):
        with user_errors():
            weights_value = st.session_state["tr_weights_path"].strip() if weights == "file" else weights
            if weights == "file" and not Path(weights_value).expanduser().is_file():
                raise UserError(f"No weights file at {weights_value} on the server.")
            with Session() as s:
                augmentation = presets.get_params(s, aug_preset).to_dict()
            config = RunConfig(
                dataset=ds_name, grouped=grouped if split != "paper-leaky" else None, augmentation=augmentation,
                weights=weights_value, **{name: setting_type(f)(st.session_state[form_key(name)])
                                          for name, f in FIELDS.items() if name not in DRAWN_HERE},
            )
            launch(config)


def _active_runs() -> list[views.RunRow]:
    with Session() as s:
        return views.active_runs(s)


active = _active_runs()


@st.fragment(run_every=3 if active else None)
def queue() -> None:
    rows = _active_runs()
    st.subheader("Queue")
    if not rows:
        st.caption("Nothing queued or running. Finished runs are on the **Runs** page.")
        if active:  # the last run just finished: refresh the whole page once
            st.rerun(scope="app")
        return
    for row in rows:
        with st.container(border=True):
            a, b = st.columns([5, 1], vertical_alignment="center")
            fraction, text = row.progress_bar()
            a.markdown(f"**Run {row.id}** {STATUS_BADGE[row.status]} {md_text(row.dataset)} · {row.protocol}"
                       + (f" · {row.device}" if row.device else ""))
            a.progress(fraction, text=text)
            if row.cancel_requested:
                b.caption("Cancelling…")
            elif user.can_edit and b.button("Cancel", key=f"tr_cancel_{row.id}", width="stretch"):
                with user_errors():
                    request_cancel(Session, row.id)
                    st.rerun()  # the whole page: the queue may also be drawn in a full run


queue()
