"""Datasets: add labelled images (zip, files class by class, or a server folder), look at them,
see what was skipped and why, delete."""

from pathlib import Path

import pandas as pd
import streamlit as st

from core.data import datasets, uploads
from core.errors import UserError
from core.jobs import views
from core.access.limits import disk_full_is_user_error
from pages._common import (
    IMAGE_TYPES, class_counts_figure, current_user, md_text, page_header, session_factory, settings, show_figure,
    through_router, thumbnail, user_errors,
)

through_router()
Session = session_factory()
cfg = settings()
user = current_user()  # viewers browse; adding and deleting need an editor
SOURCES = ["Zip file", "Image files by class", "Folder on the server"]
DEFAULT_CLASSES = ["CLL", "FL", "MCL"]

page_header("Datasets", "Labelled H&E images, one class per folder. Every file is decoded when it is added, so a "
            "bad file is reported here with its reason rather than failing a training run later.")

flash = st.session_state.pop("ds_flash", None)
if flash:
    st.success(flash, icon=":material/check_circle:")

with Session() as s:
    names = [d.name for d in views.dataset_rows(s)]


def ingest_now(source: str, name: str, groups_csv, group_pattern: str) -> None:
    """Run the ingest the user asked for, with a progress bar; on success remember the report and rerun."""
    bar = st.progress(0.0, text="Checking images…")

    def progress(done: int, total: int) -> None:
        bar.progress(done / max(total, 1), text=f"Checking images: {done} of {total}")

    options = dict(groups_csv=groups_csv, group_pattern=group_pattern.strip() or None, progress=progress)
    with user_errors():
        # The commit writes too: a full disk there is reported like one during the ingest.
        with disk_full_is_user_error(cfg, f"dataset '{name}'"), Session.begin() as s:
            if source == SOURCES[0]:
                upload = st.session_state.get("ds_zip")
                if upload is None:
                    raise UserError("Choose a .zip file first.")
                report = uploads.ingest_zip(s, cfg, upload, upload.name, name or Path(upload.name).stem, **options,
                                            user=user)
            elif source == SOURCES[1]:
                files = []
                for i in range(st.session_state.get("ds_n_classes", 3)):
                    label = st.session_state.get(f"ds_class_{i}", "").strip()
                    chosen = st.session_state.get(f"ds_files_{i}") or []
                    if chosen and not label:
                        raise UserError(f"Give a class name for the {len(chosen)} file(s) in row {i + 1}.")
                    files += [(label, f.name, f) for f in chosen]
                report = uploads.ingest_files(s, cfg, files, name, **options, user=user)
            else:
                report = uploads.import_folder(s, cfg, st.session_state.get("ds_path", ""),
                                               name or Path(st.session_state.get("ds_path", "")).name, **options,
                                               user=user)
        st.session_state["ds_report"] = report
        st.session_state["ds_selected"] = report.name
        st.session_state["ds_goto"] = "Browse"
        st.rerun()
    bar.empty()


def show_report(report: datasets.IngestReport) -> None:
    counts = ", ".join(f"{md_text(c)}: {n}" for c, n in report.class_counts.items())
    st.success(f"Dataset **{md_text(report.name)}**: {report.added} image(s) added, "
               f"{report.already_present} already present, "
               f"{len(report.skipped) + len(report.duplicates)} skipped. Now {counts}.", icon=":material/check_circle:")
    rows = [{"file": p, "reason": r} for p, r in report.skipped]
    rows += [{"file": p, "reason": f"duplicate of {other} (stored once)"} for p, other in report.duplicates]
    if rows:
        st.markdown("**Files not taken, and why**")
        st.dataframe(pd.DataFrame(rows), hide_index=True)


def add_tab() -> None:
    if not user.can_edit:
        st.info("Adding images needs the editor role. Ask an administrator if you need it.", icon=":material/lock:")
        return
    source = st.segmented_control("Source", SOURCES, default=SOURCES[0], key="ds_source", required=True)
    name = st.text_input("Dataset name", key="ds_name", placeholder="e.g. lymphoma",
                         help="A new name creates a dataset; an existing name adds images to it (same classes only).")
    if source == SOURCES[0]:
        st.file_uploader("A .zip with one folder per class (CLASS/image.tif)", type=["zip"], key="ds_zip",
                         help="A wrapper folder inside the zip is fine. TIF/TIFF, PNG, JPEG and BMP are read.")
        st.caption("Without a name, the dataset is named after the zip file.")
    elif source == SOURCES[1]:
        n = st.session_state.setdefault("ds_n_classes", 3)
        for i in range(n):
            c1, c2 = st.columns([1, 3], vertical_alignment="top")
            c1.text_input(f"Class {i + 1}", value=DEFAULT_CLASSES[i] if i < len(DEFAULT_CLASSES) else "", key=f"ds_class_{i}")
            c2.file_uploader(f"Images of class {i + 1}", type=IMAGE_TYPES, accept_multiple_files=True, key=f"ds_files_{i}")
        if st.button("Another class", icon=":material/add:"):
            st.session_state["ds_n_classes"] = n + 1
            st.rerun()
    else:
        if cfg.import_roots:
            st.text_input("Folder (or .zip) on the server", key="ds_path",
                          placeholder=str(cfg.import_roots[0] / "lymphoma"))
            st.caption("Allowed below: " + ", ".join(f"`{r}`" for r in cfg.import_roots))
        else:
            st.info("Importing from the server is turned off. An administrator can allow folders with the "
                    "`IMPORT_ROOTS` setting.", icon=":material/lock:")
    with st.expander("Specimen groups (optional)"):
        st.caption("Images of one specimen share stain and tissue; with groups, splits keep each specimen on one "
                   "side, which is the honest evaluation. Give a CSV (columns `file,group`) or a pattern.")
        groups_csv = st.file_uploader("Groups CSV", type=["csv"], key="ds_groups_csv")
        group_pattern = st.text_input("Group pattern (regular expression on CLASS/file)", key="ds_group_pattern",
                                      placeholder=r"^[^/]+/(\d+)_")
    if st.button("Add images", type="primary", key="ds_add"):
        ingest_now(source, name.strip(), groups_csv, group_pattern)


def browse_tab() -> None:
    if not names:
        st.info("No datasets yet. Add one in the **Add images** tab.", icon=":material/folder_open:")
        return
    if st.session_state.get("ds_selected") not in names:
        st.session_state["ds_selected"] = names[0]
    name = st.selectbox("Dataset", names, key="ds_selected")
    with Session() as s:
        d = views.dataset_detail(s, cfg, name)
    images, counts, groups, n_runs = d.images, d.class_counts(), d.groups, d.n_runs
    skipped = [{"file": path, "reason": reason} for path, reason in d.skipped]
    classes, source, created, created_by = d.classes, d.source, d.created_at, d.created_by

    c = st.columns(4)
    c[0].metric("Images", len(images), border=True)
    c[1].metric("Classes", len(classes), border=True)
    c[2].metric("Specimen groups", len(groups) if groups else "none", border=True,
                help="Without groups, images of one specimen can sit on both sides of a split.")
    c[3].metric("Files skipped", len(skipped), border=True)
    st.caption(f"Source: {md_text(source)} · added {created:%Y-%m-%d %H:%M} UTC"
               + (f" by {md_text(created_by)}" if created_by else "")
               + f" · {n_runs} run(s) use it")

    left, right = st.columns([3, 2])
    with left:
        show_figure(class_counts_figure(counts, f"Images per class in '{name}'",
                                        "source images before any augmentation or split"), key="ds_counts")
    with right:
        if groups:
            st.markdown("**Images per specimen group**")
            table = pd.crosstab(pd.Series([im.group for im in images], name="group"),
                                pd.Series([im.label for im in images], name="class"))
            st.dataframe(table, height=320)
        else:
            st.markdown("**No specimen groups**")
            st.caption("Splits will be stratified by class only. Add groups by ingesting again under the same "
                       "name with a groups CSV or pattern.")

    st.subheader("Samples")
    per_row = 8
    per_class = st.select_slider("Images shown per class", [per_row, 2 * per_row, 3 * per_row], key="ds_per_class")
    for label in classes:
        members = [im for im in images if im.label == label]
        step = max(1, len(members) // per_class)
        shown = members[::step][:per_class]  # spread over the class, not just its first files
        st.markdown(f"**{md_text(label)}** · {len(members)} images")
        with user_errors():
            for start in range(0, len(shown), per_row):
                for col, im in zip(st.columns(per_row), shown[start:start + per_row]):
                    col.image(thumbnail(str(im.path)), caption=md_text(im.name), width="stretch")

    with st.expander(f"Skipped files ({len(skipped)})", expanded=bool(skipped) and len(skipped) <= 20):
        if skipped:
            st.dataframe(pd.DataFrame(skipped), hide_index=True)
        else:
            st.caption("Every file was taken.")

    if not user.can_edit:
        return
    with st.expander("Delete this dataset"):
        st.warning(f"Deleting **{md_text(name)}** removes its {len(images)} images and its {n_runs} run(s) with their "
                   "results. Stored image files used by no other dataset are removed too.", icon=":material/delete:")
        sure = st.checkbox(f"Yes, delete '{md_text(name)}' and everything trained on it", key=f"ds_confirm_{name}")
        if st.button("Delete dataset", disabled=not sure, key="ds_delete"):
            with user_errors():
                with Session.begin() as s:
                    datasets.delete_dataset(s, cfg, name, user=user)
                st.session_state["ds_flash"] = f"Deleted dataset '{md_text(name)}'."
                st.session_state.pop("ds_selected", None)
                st.rerun()


report = st.session_state.pop("ds_report", None)
if report is not None:
    show_report(report)
if "ds_goto" in st.session_state:  # set before the tabs exist in this run
    st.session_state["ds_tab"] = st.session_state.pop("ds_goto")
browse, add = st.tabs(["Browse", "Add images"], default="Browse" if names else "Add images", key="ds_tab",
                      on_change="rerun")
if browse.open:
    with browse, user_errors():
        browse_tab()
if add.open:
    with add:
        add_tab()
