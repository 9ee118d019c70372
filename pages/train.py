"""Train: choose data, split, augmentation, weights and training settings, see about how long they
take on this machine, launch a background run, and watch or cancel the queue.

The form is filled once per browser session, from the first of: the settings the Runs page hands
over ("Train again with these settings", in st.session_state["train_prefill"]), the settings of the
run this user launched last, the quick preset on a machine without a GPU, the paper's settings.
After that it keeps its values while the user visits other pages."""

from pathlib import Path

import pandas as pd
import streamlit as st

from core.data import audit, datasets, splits
from core.errors import UserError
from core.jobs import estimate, runs, views
from core.training import presets
from core.training.run_config import RunConfig, setting_type, settings_fields
from pages._common import (
    STATUS_BADGE,
    current_user,
    md_text,
    page_header,
    request_cancel,
    session_factory,
    settings,
    start_worker,
    through_router,
    user_errors,
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
PRESET_ICONS = {
    presets.QUICK_TRY: ":material/bolt:",
    presets.PAPER_LEAKY: ":material/description:",
    presets.PAPER_HONEST: ":material/balance:",
    presets.UNSEEN_SPECIMENS_CPU: ":material/biotech:",
}
# The augmentation of a run the form was filled from, when no saved preset holds its values.
CUSTOM_AUGMENTATION = "Custom: the values of the run the form was filled from"
# Streamlit forgets a widget's value once a page without it is shown; this plain copy outlives the
# widgets, so that the form is as the user left it when they come back from another page.
KEPT = "tr_kept"
OWN_KEYS = ("tr_weights_path", "tr_name", "tr_notes")  # inputs that are not settings of RunConfig

page_header(
    "Train",
    "The modified DenseNet-201 (FC 512, dropout 0.5, no layer frozen) trained with Adam on "
    "cross-entropy. The presets fill in the form: the paper's settings, or a first run sized for this "
    "machine. Runs train in the background worker.",
)
machine = estimate.machine_summary()  # loads torch once per server process, to ask for a GPU


def form_key(name: str) -> str:
    """The session-state key of a setting's input."""
    return "tr_" + FIELDS[name].metadata.get("key", name)


FORM_KEYS = (*(form_key(name) for name in FIELDS), *OWN_KEYS)


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
        return container.radio(
            label, options, format_func=lambda o: meta["option_labels"].get(o, o), key=key, help=tip, disabled=disabled
        )
    if options:
        return container.selectbox(label, options, key=key, help=tip, disabled=disabled)
    low, high = meta["bounds"]
    return container.number_input(
        label, low, high, step=meta["step"], format=meta.get("format"), key=key, help=tip, disabled=disabled
    )


def section_inputs(section: str, split: str, columns: int, drawn: tuple[str, ...] = ()) -> None:
    """The inputs of a section's settings, in RunConfig's order, across `columns` (less those `drawn` already)."""
    names = [
        name
        for name, f in FIELDS.items()
        if f.metadata.get("section") == section and name not in DRAWN_HERE and name not in drawn
    ]
    cols = st.columns(columns)
    for i, name in enumerate(names):
        setting_input(cols[i % columns], name, split)


def weights_choice(weights: str) -> tuple[str, str]:
    """The weights radio's choice and the path box's text for a RunConfig's `weights`."""
    return (weights, "") if weights in ("imagenet", "none") else ("file", weights)


def fill_form(config: RunConfig, datasets_here: dict) -> None:
    """Every input set to `config`'s value (its dataset only if it is still here)."""
    with Session() as s:
        preset = presets.preset_holding(s, config.augmentation)
    choice, path = weights_choice(config.weights)
    st.session_state.update(
        {
            **form_values(config.to_dict()),
            form_key("weights"): choice,
            "tr_weights_path": path,
            form_key("augmentation"): preset or CUSTOM_AUGMENTATION,
            "tr_leak_ok": False,
            "tr_custom_augmentation": None if preset else config.augmentation,
        }
    )
    if config.dataset in datasets_here:
        st.session_state[form_key("dataset")] = config.dataset
    st.session_state[form_key("dataset_version")] = config.dataset_version or 0  # 0: the latest
    if config.grouped is not None:
        st.session_state[form_key("grouped")] = config.grouped


def preset_config(name: str) -> RunConfig:
    """Training preset `name` as a RunConfig, with weights this server can load (core/training/presets.py)."""
    config, choice = presets.preset_config(name, cfg.default_weights)
    if choice is not None and choice.reason:
        st.session_state["tr_weights_note"] = choice.reason
    return config


def apply_preset(name: str, datasets_here: dict) -> None:
    fill_form(preset_config(name), datasets_here)
    st.session_state["tr_preset_loaded"] = name
    st.session_state["tr_flash"] = f"Loaded '{name}'. Check the dataset and weights, then launch."


def start_form(datasets_here: dict) -> str | None:
    """Fill the form, once per browser session (see the module's docstring); returns a sentence on
    where its values came from, when it is worth saying."""
    handed = st.session_state.pop("train_prefill", None)
    first = KEPT not in st.session_state
    st.session_state.setdefault(KEPT, {})
    if handed is not None:
        fill_form(RunConfig.from_dict(handed), datasets_here)
        st.session_state["tr_preset_loaded"] = None
        return "The form holds the settings of the run you chose on the Runs page. Check them, then launch."
    if not first:  # back from another page: the form as the user left it
        for key, value in st.session_state[KEPT].items():
            st.session_state.setdefault(key, value)
        return None
    with Session() as s:
        last = views.last_launched_config(s, user.name)
    if last is not None:  # on the dataset's latest version: it may have grown since
        fill_form(last.replace(dataset_version=None), datasets_here)
        st.session_state["tr_preset_loaded"] = None
        return (
            "The form starts with the settings of the last run you launched. The buttons above load a preset instead."
        )
    if not machine.has_gpu:
        fill_form(preset_config(presets.QUICK_TRY), datasets_here)
        st.session_state["tr_preset_loaded"] = presets.QUICK_TRY
        return (
            f"No GPU on this machine, so the form starts with '{presets.QUICK_TRY}', sized for its CPU. "
            f"'{presets.PAPER_HONEST}' loads the paper's settings (hours on a CPU)."
        )
    fill_form(preset_config(presets.PAPER_HONEST), datasets_here)
    st.session_state["tr_preset_loaded"] = presets.PAPER_HONEST
    return None


def keep_form() -> None:
    """Copy the form's values where they outlive its widgets (see KEPT)."""
    st.session_state[KEPT] = {
        **st.session_state[KEPT],
        **{k: st.session_state[k] for k in FORM_KEYS if k in st.session_state},
    }


def form_config(ds_name: str, split: str, grouped: bool | None, aug_preset: str, weights: str) -> RunConfig:
    """The RunConfig the form shows (UserError when a value is not allowed)."""
    weights_value = st.session_state["tr_weights_path"].strip() if weights == "file" else weights
    if aug_preset == CUSTOM_AUGMENTATION:
        augmentation = st.session_state["tr_custom_augmentation"]
    else:
        with Session() as s:
            augmentation = presets.get_params(s, aug_preset).to_dict()
    return RunConfig(
        dataset=ds_name,
        dataset_version=st.session_state.get(form_key("dataset_version")) or None,
        grouped=grouped if split != "paper-leaky" else None,
        augmentation=augmentation,
        weights=weights_value,
        **{
            name: setting_type(f)(st.session_state[form_key(name)])
            for name, f in FIELDS.items()
            if name not in DRAWN_HERE
        },
    ).validate()  # the bounds of the inputs, again on the server: a crafted widget value gets no further


def preset_note(config: RunConfig) -> str:
    """Which training preset the form holds, or what was changed since one was loaded."""
    matched = presets.matching_preset(config.to_dict(), presets.usable_weights(cfg.default_weights).weights)
    if matched:
        return f"The form holds the settings of the preset '{matched}'."
    loaded = st.session_state.get("tr_preset_loaded")
    if not loaded:
        return "The form holds settings of your own, not a preset's."
    was, now = preset_config(loaded).to_dict(), config.to_dict()
    changed = [
        f"{FIELDS[name].metadata['label'].lower()} {was[name]} → {now[name]}"
        for name in (*(n for n in FIELDS if n not in DRAWN_HERE), "weights")
        if was[name] != now[name]
    ]
    if was["augmentation"] != now["augmentation"]:
        changed.append("other augmentation")
    if "grouped" in presets.TRAINING_PRESETS[loaded] and was["grouped"] != now["grouped"]:
        changed.append("specimens not kept on one side" if was["grouped"] else "specimens kept on one side")
    return f":orange-badge[:material/edit: Changed from '{loaded}']  " + ("; ".join(changed) or "its settings") + "."


def version_input(ds_name: str) -> int:
    """The dataset version to train on: 0 for the latest (as it is at launch), else a version's number."""
    with Session() as s:
        found = {v.number: v for v in views.dataset_versions(s, ds_name)}
    key, latest = form_key("dataset_version"), max(found, default=None)
    if st.session_state.get(key) not in (0, *found):  # none chosen yet, or a version of another dataset
        st.session_state[key] = 0

    def words(number: int) -> str:
        if number == 0:
            return "The latest" + (f" (version {latest})" if latest else "")
        v = found[number]
        return f"Version {number} · {v.created_at:%Y-%m-%d} · {v.images} images" + (f" · {v.note}" if v.note else "")

    help_text = FIELDS["dataset_version"].metadata["help"]
    return st.selectbox(
        FIELDS["dataset_version"].metadata["label"],
        [0, *sorted(found, reverse=True)],
        key=key,
        format_func=words,
        help=help_text[:1].upper() + help_text[1:] + ". The Datasets page "
        "lists the versions and what changed between them.",
    )


def launch(config: RunConfig, name: str, notes: str) -> None:
    """Queue the runs of `config` and make sure a worker takes them."""
    from core.training.model import check_weights  # torch: only when launching

    with st.spinner("Checking that the backbone weights can be loaded..."):
        check_weights(config.weights)  # here, not after the run has spent minutes augmenting its data
    with Session.begin() as s:
        ids = [r.id for r in runs.create_runs(s, cfg, config, user=user, name=name, notes=notes)]
    start_worker(cfg)
    st.session_state["tr_flash"] = (
        f"Queued run {ids[0]}" if len(ids) == 1 else f"Queued runs {', '.join(map(str, ids))} (one per fold)"
    ) + ". The background worker picks it up; follow it on the Runs page."
    st.session_state["runs_focus"] = ids[0]  # the Runs page opens on it, however it is reached
    st.session_state["tr_launched"] = True
    st.rerun()


with Session() as s:
    ds_info = {d.name: d for d in views.dataset_rows(s)}
    preset_names = presets.preset_names(s)
with user_errors():
    start_note = start_form(ds_info)
choice, path = weights_choice(cfg.default_weights)
for key, value in {
    **form_values(PAPER.to_dict()),
    form_key("augmentation"): presets.PAPER_PRESET,
    form_key("weights"): choice,
    "tr_weights_path": path,
    "tr_name": "",
    "tr_notes": "",
    "tr_custom_augmentation": None,
}.items():
    st.session_state.setdefault(key, value)
if st.session_state.get("tr_custom_augmentation"):
    preset_names = [*preset_names, CUSTOM_AUGMENTATION]
if st.session_state[form_key("augmentation")] not in preset_names:  # deleted on the Augmentation page meanwhile
    st.session_state[form_key("augmentation")] = presets.PAPER_PRESET
if st.session_state.get(form_key("dataset")) not in ds_info:  # deleted meanwhile
    st.session_state.pop(form_key("dataset"), None)
st.session_state.setdefault(form_key("grouped"), True)

flash = st.session_state.pop("tr_flash", None)
if flash:
    st.success(flash, icon=":material/check_circle:")
    if st.session_state.pop("tr_launched", False):
        st.page_link("pages/runs.py", label="Follow it on the Runs page", icon=":material/monitoring:")
        st.session_state.update(tr_name="", tr_notes="")  # a new run gets a name of its own
elif start_note:
    st.info(start_note, icon=":material/tune:")
keep_form()  # widgets and callbacks have set this run's values by now

if not ds_info:
    st.info("Add a dataset on the **Datasets** page first.", icon=":material/folder_open:")
else:
    offered = presets.training_presets(machine.has_gpu)
    # Two buttons a row: four in one cut their names off.
    for col, name in zip([c for _ in range(0, len(offered), 2) for c in st.columns(2)], offered):
        col.button(
            name,
            icon=PRESET_ICONS.get(name),
            on_click=apply_preset,
            args=(name, ds_info),
            width="stretch",
            help=presets.TRAINING_PRESET_HELP[name],
            key=f"tr_preset_{offered.index(name)}",
        )
    which_preset = st.empty()  # filled once the form's values are known

    data_col, model_col = st.columns(2, gap="large")
    with data_col:
        with st.container(border=True):
            st.markdown("**Data and split**")
            ds_name = st.selectbox(
                FIELDS["dataset"].metadata["label"],
                list(ds_info),
                key=form_key("dataset"),
                format_func=lambda n: f"{n} ({ds_info[n].images} images, {', '.join(ds_info[n].classes)})",
                on_change=lambda: st.session_state.update({form_key("dataset_version"): 0}),
            )
            version = version_input(ds_name)
            split = setting_input(st, "split")
            groups = ds_info[ds_name].groups
            grouped = None
            if split != "paper-leaky":
                if groups:
                    grouped = st.checkbox(
                        f"{FIELDS['grouped'].metadata['label']} ({groups} groups)",
                        key=form_key("grouped"),
                        help="Images of one specimen share stain and tissue; splitting them inflates scores.",
                    )
                else:
                    st.caption(
                        "This dataset has no specimen groups, so the split is by image: images of one "
                        "specimen may land on both sides. Add groups on the Datasets page for a stricter test."
                    )
            section_inputs("data", split, columns=3, drawn=("split",))
            split_key = (
                ds_name,
                version,
                split,
                grouped,
                *(st.session_state[form_key(name)] for name in SPLIT_SETTINGS),
            )
            if (
                user.can_edit
                and split != "paper-leaky"
                and st.button(
                    "Audit this split for leaks",
                    icon=":material/content_copy:",
                    key="tr_audit",
                    help="Looks for test images that equal, nearly equal or closely resemble a training image "
                    "(duplicates, neighbouring fields of one slide). Runs audit their split too.",
                )
            ):
                with user_errors(), st.spinner("Comparing every test image with the training images…"):
                    with Session.begin() as s:
                        planned = splits.make_split(
                            s,
                            datasets.get_dataset(s, ds_name),
                            protocol=split,
                            grouped=grouped,
                            version=version or None,
                            **{
                                name: setting_type(FIELDS[name])(value)
                                for name, value in zip(SPLIT_SETTINGS, split_key[4:])
                            },
                        )
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
                    "paper; every result of this run is labelled LEAKY.",
                    icon=":material/warning:",
                )
                leak_ok = st.checkbox(
                    "I understand that this run's test score is not a valid estimate", key="tr_leak_ok"
                )
        with st.container(border=True):
            st.markdown("**Augmentation** of the training part")
            aug_preset = st.selectbox(
                FIELDS["augmentation"].metadata["label"],
                preset_names,
                key=form_key("augmentation"),
                help="Make presets on the Augmentation page; values changed there train only once saved as a preset.",
            )
            section_inputs("augmentation", split, columns=1)
            with user_errors():
                if aug_preset == CUSTOM_AUGMENTATION:
                    values = st.session_state["tr_custom_augmentation"]
                else:
                    with Session() as s:
                        values = presets.get_params(s, aug_preset).to_dict()
                st.caption("Each augmented image: " + "; ".join(presets.augmentation_words(values)) + ".")
                with st.expander("The preset's values"):
                    st.dataframe(
                        pd.DataFrame(
                            {
                                "setting": list(presets.labelled(values)),
                                "value": list(presets.labelled(values).values()),
                            }
                        ),
                        hide_index=True,
                        width="stretch",
                    )

    with model_col:
        with st.container(border=True):
            st.markdown("**Backbone weights**")
            weights = st.radio(
                FIELDS["weights"].metadata["label"],
                list(WEIGHT_LABELS),
                format_func=WEIGHT_LABELS.get,
                key=form_key("weights"),
                label_visibility="collapsed",
            )
            if weights == "imagenet":
                st.caption(
                    "The paper's choice. torchvision downloads them once (about 80 MB, cached under TORCH_HOME). "
                    "Launching checks that they can be loaded: on a machine without internet it says so "
                    "and queues nothing; use a weights file or no weights there."
                )
            elif weights == "file":
                st.text_input(
                    "Path on the server",
                    key="tr_weights_path",
                    placeholder="/models/densenet201-c1103571.pth",
                    help="A torchvision DenseNet-201 state dict (.pth, .safetensors) or a checkpoint of this app.",
                )
            else:
                st.caption(
                    "Training from random initialisation: expect much lower accuracy than with ImageNet "
                    "weights on a few hundred images. The run records that it used no weights."
                )
                if st.session_state.get("tr_weights_note"):  # why the preset chose no weights
                    st.info(st.session_state["tr_weights_note"], icon=":material/cloud_off:")
        with st.container(border=True):
            st.markdown("**Training**")
            section_inputs("training", split, columns=2)
        with st.container(border=True):
            st.markdown("**Generalisation to new specimens** (not in the paper; off by default)")
            section_inputs("generalisation", split, columns=2)
            st.caption(
                "Every class gets the same number of augmented training images (class-balanced). "
                "Probabilities are calibrated on the validation part, which also sets the "
                "'uncertain, refer' band on the Predict page."
            )

    config = None
    with user_errors():
        config = form_config(ds_name, split, grouped, aug_preset, weights)
    if config is not None:
        which_preset.caption(preset_note(config))
    # The run's own words: a name (else the one the Runs page makes from the settings) and notes.
    auto = (
        " · ".join([ds_name, *views.setting_words(config, None if aug_preset == CUSTOM_AUGMENTATION else aug_preset)])
        if config is not None
        else ""
    )
    a, b = st.columns([1, 2])
    run_name = a.text_input(
        "Run name (optional)",
        key="tr_name",
        placeholder=auto,
        help="Your own name for the run, shown on the Runs page. Left empty, the run is called "
        "by its dataset and the settings that differ from the paper's, as shown.",
    )
    run_notes = b.text_area(
        "Notes (optional)",
        key="tr_notes",
        height=68,
        placeholder="Why this run, what to compare it with",
        help="Shown with the run on the Runs page; k-fold runs share them.",
    )

    if config is not None:
        with Session() as s:
            timing = estimate.time_estimate(s, config, len(ds_info[ds_name].classes), machine)
        gpu = (
            f"GPU found: {', '.join(sorted(set(machine.gpus)))}."
            if machine.has_gpu
            else f"No GPU found: runs train on this machine's CPU ({machine.cpu_cores} cores)."
        )
        st.info(f"**{gpu}** {timing.sentence()}", icon=":material/schedule:")

    ready = config is not None and leak_ok and (weights != "file" or st.session_state["tr_weights_path"].strip())
    if not user.can_edit:
        st.info(
            "Launching runs needs the editor role; the Runs page shows every run's results.", icon=":material/lock:"
        )
    elif st.button(
        "Launch training", icon=":material/rocket_launch:", type="primary", disabled=not ready, key="tr_launch"
    ):
        with user_errors():
            if weights == "file" and not Path(config.weights).expanduser().is_file():
                raise UserError(f"No weights file at {config.weights} on the server.")
            launch(config, run_name, run_notes)


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
            a.markdown(
                f"**Run {row.id}** {STATUS_BADGE[row.status]} {md_text(row.dataset)} · {row.protocol}"
                + (f" · {md_text(row.device)}" if row.device else "")
            )
            a.progress(fraction, text=text)
            if row.cancel_requested:
                b.caption("Cancelling…")
            elif user.can_edit and b.button("Cancel", key=f"tr_cancel_{row.id}", width="stretch"):
                with user_errors():
                    request_cancel(Session, row.id)
                    st.rerun()  # the whole page: the queue may also be drawn in a full run


queue()
