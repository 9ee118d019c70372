"""Home: what the app does, the datasets and runs at a glance, the best result on unseen specimens
beside its colour-only yardstick, what this server trains on, the worker's state."""

import pandas as pd
import streamlit as st

from core.jobs import comparisons, estimate, views
from core.store import consistency
from pages._common import current_user, md_text, pct, session_factory, settings, through_router

through_router()
Session = session_factory()
cfg = settings()

st.title("Lymphoma subtype recognition")
st.markdown(
    "Train and use the modified DenseNet-201 of Hasan et al. on H&E images of **CLL**, **FL** and "
    "**MCL** (or any classes you upload). Evaluation is honest by default: the data are split "
    "before augmentation, by specimen where specimens are known."
)
machine_box = st.empty()  # filled last: finding the GPU loads torch, which need not hold up the rest


@st.cache_resource(show_spinner=False)
def startup_check(database_url: str, app_home: str) -> consistency.ConsistencyReport:
    # Once per server process (and database): a crash while files were written shows up at the
    # next start. The quick check only stats files; `python -m core check --deep` hashes them.
    return consistency.check(Session, cfg)


check = startup_check(cfg.database_url, str(cfg.app_home))
if not check.clean:
    st.warning(
        "**The database and the files under APP_HOME disagree** (checked when the server started):\n\n"
        + "\n".join(f"- {line}" for line in check.summary(quote="`"))
        + "\n\nDetails: `python -m core check` on the server. Leftover files are harmless and "
        "`python -m core check --fix` removes them; for missing or damaged files, ingest those images again "
        "(or train the run again).",
        icon=":material/report:",
    )

with Session() as s:
    all_datasets = views.dataset_rows(s)
    all_runs = views.run_rows(s)
    status = views.worker_panel(s, cfg)
    recent = all_runs[:10]
    intervals = comparisons.test_intervals(s, [(r.id, r.seed) for r in recent if r.status == "succeeded"])
    running = views.run_curves(s, [r.id for r in all_runs if r.status == "running"][:3])
    best = views.best_grouped(all_runs)
    versus_colour = None if best.run is None else comparisons.network_vs_colour(s, best.run.id)
    in_use = views.models_in_use(s)
ds_rows = [
    {"dataset": d.name, "images": d.images, "classes": ", ".join(d.classes), "specimen groups": d.groups}
    for d in all_datasets
]
# The key figures first (name, status, accuracy with its interval), so that they show without scrolling.
run_rows = [
    {
        "name": r.title,
        "status": r.status,
        "test accuracy (95% interval)": views.accuracy_text(r.summary.test_accuracy, intervals.get(r.id)),
        "run": r.id,
        "dataset": r.dataset,
    }
    for r in recent
]

m1, m2, m3, m4 = st.columns(4)
m1.metric("Datasets", len(all_datasets), border=True)
m2.metric("Images", sum(r["images"] for r in ds_rows), border=True)
m3.metric("Runs", len(all_runs), border=True)
m4.metric("Queued or running", sum(r.active for r in all_runs), border=True)

for curve in running:  # what trains now, and how long it has left, without going to the Runs page
    fraction, words = curve.run.progress_bar()
    left = curve.remaining_seconds()
    speed = curve.speed_now()
    when = "" if left is None else f" · time left ≈ {views.duration_text(left)}"
    st.progress(
        fraction,
        text=f"Run {curve.run.id} ({curve.run.title}): {words}{when}"
        + ("" if speed is None else f" · {views.speed_text(speed)} now"),
    )
    if curve.slowed_to() is not None:
        st.caption(
            f"Run {curve.run.id} trains at {curve.slowed_to():.0%} of its earlier speed: other work shares "
            "the machine, and the time left follows the speed of the last seconds."
        )

with st.container(border=True, key="home_best"):
    st.markdown("**Best result on unseen specimens**")
    if best.run is None:
        st.caption(best.explanation())
    else:
        a, b, c = st.columns([1, 1, 3], vertical_alignment="center")
        a.metric(
            f"This run (run {best.run.id})",
            pct(best.accuracy),
            help="Test accuracy on a split that keeps each specimen on one side: the images tested come "
            "from specimens the model never saw in training.",
        )
        b.metric(
            "Colour alone, same split",
            pct(best.yardstick),
            help="A logistic regression on 12 colour statistics per image (means and spreads of R, G, B "
            "and their optical densities), fitted on the same training part and scored on the same "
            "test part.",
        )
        c.caption(best.explanation(versus_colour))

if in_use:
    with st.container(border=True, key="home_in_use"):
        st.markdown("**Models in use**")
        for model in in_use:
            st.markdown(f"{md_text(', '.join(model.approval.classes))}: {md_text(model.words())}")

st.subheader("How it works")
steps = [
    (
        "pages/dataset.py",
        ":material/folder_open:",
        "1. Add data",
        "Upload a .zip with one folder per class, or images class by class.",
    ),
    (
        "pages/augmentation.py",
        ":material/tune:",
        "2. Augment",
        "Augmentor's rotate, distortion and zoom at the paper's values, with a live preview.",
    ),
    (
        "pages/train.py",
        ":material/rocket_launch:",
        "3. Train",
        "DenseNet-201 + FC 512 + dropout 0.5 in the background, on the GPU when there is one.",
    ),
    (
        "pages/runs.py",
        ":material/monitoring:",
        "4. Results",
        "Curves, confusion matrix, the paper's Table I and the misclassified images.",
    ),
    (
        "pages/predict.py",
        ":material/biotech:",
        "5. Classify",
        "A new image's subtype, its probabilities and a Grad-CAM heat map.",
    ),
]
if current_user().can_edit and cfg.reviews:  # the Review page is listed for editors only
    steps.append(
        (
            "pages/review.py",
            ":material/rate_review:",
            "6. Review",
            "Give predictions their true class; reviewed cases become data to train again on.",
        )
    )
for col, (page, icon, title, text) in zip(st.columns(len(steps)), steps):
    with col.container(border=True, height="stretch"):
        st.page_link(page, label=title, icon=icon)
        st.caption(text)

# Each table the page's full width, so that every column shows without scrolling sideways.
st.subheader("Recent runs")
if run_rows:
    st.dataframe(
        pd.DataFrame(run_rows),
        hide_index=True,
        placeholder="–",
        row_height=72,  # tall enough for the grid to wrap a long name rather than cut it
        column_config={
            "name": st.column_config.TextColumn(width=330),
            "status": st.column_config.TextColumn(width=90),
            "test accuracy (95% interval)": st.column_config.TextColumn(
                width=190,
                help="On the run's own test part; the interval is a bootstrap over its test "
                "images (whole specimens where known), as on the Runs page.",
            ),
            "run": st.column_config.NumberColumn(width=50),
            "dataset": st.column_config.TextColumn(width=120),
        },
    )
else:
    st.info("No training runs yet. Launch one on the **Train** page.")
st.subheader("Datasets")
if ds_rows:
    st.dataframe(pd.DataFrame(ds_rows), hide_index=True)
else:
    st.info("No datasets yet. Add one on the **Datasets** page (or `python -m core ingest FOLDER --name NAME`).")

st.subheader("Training worker")
if status.alive:
    st.metric("Training worker", status.state(), border=True, help=status.details())
    st.caption(
        f"{status.queued} run(s) queued. Training runs in its own process: closing the browser or "
        "restarting the web server does not stop it."
    )
else:
    st.warning(
        f"No training worker is running; {status.queued} queued run(s) wait. It is started with the app: "
        "reload the page, or run `python -m core worker`.",
        icon=":material/error:",
    )

machine = estimate.machine_summary()
with Session() as s:  # the paper's settings estimated as the Train page estimates a run
    machine_words = machine.sentence(estimate.paper_estimate(s, machine))
if machine.has_gpu:
    machine_box.caption(machine_words)
else:
    machine_box.info(machine_words, icon=":material/memory:")
