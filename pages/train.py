"""Train: choose data, split, augmentation, weights and training settings (the paper's by default),
launch a background run, and watch or cancel the queue."""

from pathlib import Path

import streamlit as st
from sqlalchemy import select

from core.data import audit, datasets, splits
from core.jobs import runs
from core.training import presets
from core.store.db import Run
from core.errors import UserError
from core.training.run_config import STAIN_NORMALISATIONS, RunConfig
from core.data.splits import PROTOCOLS
from pages._common import (
    ACTIVE, STATUS_BADGE, current_user, md_text, page_header, progress_text, protocol_of, request_cancel,
    session_factory, settings, start_worker, through_router, user_errors,
)

through_router()
Session = session_factory()
cfg = settings()
user = current_user()  # launching and cancelling need an editor
PAPER = RunConfig(dataset="-")
SPLIT_LABELS = {
    "holdout": "Holdout: split first, augment only the training part (honest)",
    "kfold": "k-fold cross-validation: one run per fold (honest)",
    "paper-leaky": "The paper's protocol: augment everything, then split (LEAKY)",
}
WEIGHT_LABELS = {
    "imagenet": "ImageNet (torchvision download)",
    "file": "A weights file on the server",
    "none": "None: random initialisation",
}

page_header("Train", "The modified DenseNet-201 (FC 512, dropout 0.5, no layer frozen) trained with Adam on "
            "cross-entropy. Every default below is the paper's; runs train in the background worker.")


def _weights_default() -> tuple[str, str]:
    w = cfg.default_weights
    return (w, "") if w in ("imagenet", "none") else ("file", w)


def apply_preset(name: str) -> None:
    values = presets.training_preset(name)
    # The paper used ImageNet weights; a site that set DEFAULT_WEIGHTS (say, the same weights as a
    # local file, because it is offline) keeps its choice, unless the preset names its weights.
    choice, path = (values["weights"], "") if "weights" in presets.TRAINING_PRESETS[name] else _weights_default()
    st.session_state.update({
        "tr_split": values["split"], "tr_test_fraction": values["test_fraction"], "tr_val_fraction": values["val_fraction"],
        "tr_folds": values["folds"], "tr_seed": values["seed"], "tr_per_class": values["per_class"],
        "tr_aug_preset": presets.PAPER_PRESET, "tr_weights": choice, "tr_weights_path": path,
        "tr_epochs": values["epochs"], "tr_batch_size": values["batch_size"], "tr_lr": values["lr"],
        "tr_image_size": values["image_size"], "tr_device": values["device"], "tr_leak_ok": False,
        "tr_stain": values["stain_normalisation"], "tr_hed": values["hed_jitter"], "tr_tta": values["tta"],
        "tr_tiles": values["tiles"],
    })
    if values["grouped"] is not None:
        st.session_state["tr_grouped"] = values["grouped"]
    st.session_state["tr_flash"] = f"Loaded '{name}'. Check the dataset and weights, then launch."


choice, path = _weights_default()
for key, value in {
    "tr_split": PAPER.split, "tr_test_fraction": PAPER.test_fraction, "tr_val_fraction": PAPER.val_fraction,
    "tr_folds": PAPER.folds, "tr_seed": PAPER.seed, "tr_per_class": PAPER.per_class,
    "tr_aug_preset": presets.PAPER_PRESET, "tr_weights": choice, "tr_weights_path": path,
    "tr_epochs": PAPER.epochs, "tr_batch_size": PAPER.batch_size, "tr_lr": PAPER.lr,
    "tr_image_size": PAPER.image_size, "tr_device": PAPER.device,
    "tr_stain": PAPER.stain_normalisation, "tr_hed": PAPER.hed_jitter, "tr_tta": PAPER.tta, "tr_tiles": PAPER.tiles,
}.items():
    st.session_state.setdefault(key, value)

with Session() as s:
    ds_list = datasets.list_datasets(s)
    ds_info = {d.name: {"images": len(d.images), "classes": list(d.classes),
                        "groups": len({im.group for im in d.images if im.group is not None})} for d in ds_list}
    preset_names = presets.preset_names(s)
if st.session_state["tr_aug_preset"] not in preset_names:  # deleted on the Augmentation page meanwhile
    st.session_state["tr_aug_preset"] = presets.PAPER_PRESET

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
            ds_name = st.selectbox("Dataset", list(ds_info), key="tr_dataset",
                                   format_func=lambda n: f"{n} ({ds_info[n]['images']} images, {', '.join(ds_info[n]['classes'])})")
            split = st.radio("Split protocol", PROTOCOLS, format_func=lambda p: SPLIT_LABELS.get(p, p), key="tr_split")
            groups = ds_info[ds_name]["groups"]
            grouped = None
            if split != "paper-leaky":
                if groups:
                    grouped = st.checkbox(f"Keep each specimen on one side ({groups} groups)", value=True, key="tr_grouped",
                                          help="Images of one specimen share stain and tissue; splitting them inflates scores.")
                else:
                    st.caption("This dataset has no specimen groups, so the split is by image: images of one "
                               "specimen may land on both sides. Add groups on the Datasets page for a stricter test.")
            a, b, c = st.columns(3)
            a.number_input("Test fraction", 0.05, 0.9, step=0.05, format="%.2f", key="tr_test_fraction",
                           disabled=split == "kfold", help="Paper: 0.2 (80/20).")
            b.number_input("Validation fraction", 0.0, 0.9, step=0.05, format="%.2f", key="tr_val_fraction",
                           help="Of the non-test part; picks the best epoch, which is the one evaluated. 0 = none.")
            c.number_input("Folds", 2, 20, step=1, key="tr_folds", disabled=split != "kfold")
            st.number_input("Seed", 0, 2**31 - 1, step=1, key="tr_seed", help="Split, augmentation and training are all seeded.")
            split_key = (ds_name, split, grouped, st.session_state["tr_seed"], st.session_state["tr_test_fraction"],
                         st.session_state["tr_val_fraction"], st.session_state["tr_folds"])
            if user.can_edit and split != "paper-leaky" and st.button(
                    "Audit this split for leaks", icon=":material/content_copy:", key="tr_audit",
                    help="Looks for test images that equal, nearly equal or closely resemble a training image "
                         "(duplicates, neighbouring fields of one slide). Runs audit their split too."):
                with user_errors(), st.spinner("Comparing every test image with the training images…"):
                    with Session.begin() as s:
                        planned = splits.make_split(
                            s, datasets.get_dataset(s, ds_name), protocol=split, grouped=grouped,
                            seed=int(split_key[3]), test_fraction=float(split_key[4]), val_fraction=float(split_key[5]),
                            folds=int(split_key[6]))
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
            aug_preset = st.selectbox("Augmentation preset", preset_names, key="tr_aug_preset",
                                      help="Make presets on the Augmentation page.")
            st.number_input("Augmented images per class", 1, 100_000, step=100, key="tr_per_class",
                            help="Paper: 1200 per class (3600 in all).")
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
            weights = st.radio("Weights", list(WEIGHT_LABELS), format_func=WEIGHT_LABELS.get, key="tr_weights",
                               label_visibility="collapsed")
            if weights == "imagenet":
                st.caption("The paper's choice. torchvision downloads them once (about 80 MB, cached under TORCH_HOME). "
                           "**On a machine without internet the download fails and the run stops at its start** "
                           "with that message; use a weights file or no weights there.")
            elif weights == "file":
                st.text_input("Path on the server", key="tr_weights_path", placeholder="/models/densenet201-c1103571.pth",
                              help="A torchvision DenseNet-201 state dict (.pth, .safetensors) or a checkpoint of this app.")
            else:
                st.caption("Training from random initialisation: expect much lower accuracy than with ImageNet "
                           "weights on a few hundred images. The run records that it used no weights.")
        with st.container(border=True):
            st.markdown("**Training**")
            a, b = st.columns(2)
            a.number_input("Epochs", 1, 1000, step=1, key="tr_epochs", help="Paper: 25.")
            b.number_input("Batch size", 1, 1024, step=1, key="tr_batch_size", help="Paper: 24.")
            a.number_input("Learning rate (Adam)", 1e-7, 1.0, step=1e-5, format="%.1e", key="tr_lr", help="Paper: 1e-4.")
            b.number_input("Image size (px)", 32, 1024, step=32, key="tr_image_size",
                           help="Paper: 224. Images are squashed to this square before augmentation.")
            st.selectbox("Device", ["auto", "cpu", "cuda"], key="tr_device",
                         help="auto: the GPU when there is one (bf16), else the CPU (slow at 224 px).")
        with st.container(border=True):
            st.markdown("**Generalisation to new specimens** (not in the paper; off by default)")
            a, b = st.columns(2)
            a.selectbox("Stain normalisation", STAIN_NORMALISATIONS, key="tr_stain",
                        help="Map every image's H&E colours onto one training image (Macenko or Reinhard), so "
                             "staining differences between specimens matter less. The reference comes from the "
                             "training part only; prediction applies the same mapping.")
            b.number_input("H&E stain jitter", 0.0, 1.0, step=0.01, format="%.2f", key="tr_hed",
                           help="Random stain variation in HED colour space of each augmented training image "
                                "(e.g. 0.05); 0 = off. Never applied to validation or test images.")
            a.number_input("Tiles per image", 0, 256, step=1, key="tr_tiles",
                           help="0: whole images squashed to the image size (the paper). N > 0: up to N tiles of the "
                                "image size cut at native resolution; an image's prediction is the mean of its tiles'.")
            b.checkbox("Test-time augmentation", key="tr_tta",
                       help="Average each prediction over the image and its three flips.")
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
                dataset=ds_name, split=split, grouped=grouped if split != "paper-leaky" else None,
                test_fraction=float(st.session_state["tr_test_fraction"]),
                val_fraction=float(st.session_state["tr_val_fraction"]), folds=int(st.session_state["tr_folds"]),
                per_class=int(st.session_state["tr_per_class"]), augmentation=augmentation, weights=weights_value,
                epochs=int(st.session_state["tr_epochs"]), batch_size=int(st.session_state["tr_batch_size"]),
                lr=float(st.session_state["tr_lr"]), image_size=int(st.session_state["tr_image_size"]),
                seed=int(st.session_state["tr_seed"]), device=st.session_state["tr_device"],
                stain_normalisation=st.session_state["tr_stain"], hed_jitter=float(st.session_state["tr_hed"]),
                tta=bool(st.session_state["tr_tta"]), tiles=int(st.session_state["tr_tiles"]),
            )
            with Session.begin() as s:
                ids = [r.id for r in runs.create_runs(s, cfg, config, user=user)]
            start_worker(cfg)
            st.session_state["tr_flash"] = (f"Queued run {ids[0]}" if len(ids) == 1 else
                                            f"Queued runs {', '.join(map(str, ids))} (one per fold)") + \
                ". The background worker picks it up; follow it on the Runs page."
            st.session_state["runs_selected"] = ids[0]
            st.session_state["tr_launched"] = True
            st.rerun()


def _active_runs() -> list[dict]:
    with Session() as s:
        rows = s.scalars(select(Run).where(Run.status.in_(ACTIVE)).order_by(Run.id)).all()
        return [{"id": r.id, "status": r.status,
                 "label": f"**Run {r.id}** {STATUS_BADGE[r.status]} {md_text(r.dataset.name)}",
                 "protocol": protocol_of(r), "progress": progress_text(r), "cancel": r.cancel_requested,
                 "device": r.device} for r in rows]


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
            fraction, text = row["progress"]
            a.markdown(f"{row['label']} · {row['protocol']}" + (f" · {row['device']}" if row["device"] else ""))
            a.progress(fraction, text=text)
            if row["cancel"]:
                b.caption("Cancelling…")
            elif user.can_edit and b.button("Cancel", key=f"tr_cancel_{row['id']}", width="stretch"):
                with user_errors():
                    request_cancel(Session, row["id"])
                    st.rerun()  # the whole page: the queue may also be drawn in a full run


queue()
