"""Predict: classify new images with a finished run; probabilities, a Grad-CAM heat map, and a
table (and CSV) for a batch."""

import hashlib
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import streamlit as st

from core.evaluation import calibration
from core.jobs import views
from core.data.datasets import load_rgb
from core.errors import UserError
from core.inference.probabilities import Probabilities
from pages._common import (
    IMAGE_TYPES, md_text, page_header, pct, probabilities_figure, session_factory, settings, show_figure,
    through_router, user_errors,
)

if TYPE_CHECKING:
    from core.inference import predict, saliency

through_router()
Session = session_factory()
cfg = settings()
BATCH = 16

page_header("Predict", "Classify new H&E images with a trained run: the subtype, each class's probability, and a "
            "Grad-CAM heat map of the regions that drove the decision.")


# The model is compiled as it loads on a GPU, and on the CPU with CPU_COMPILE=1: once per model and
# server process, from seconds to a few minutes for the first model a machine compiles. Cached by the
# model file's sha256 (`model`), not by the run id alone: an id can name a newer run's model.
# The model code (and torch) is imported by the first function that needs a model, not with the page.
def model_of(run_id: int) -> str | None:
    from core.inference import predict

    return predict.model_sha256(cfg, run_id)


@st.cache_resource(show_spinner="Loading the model (and compiling it where set up to: the first time can take "
                   "minutes)…", max_entries=4)
def predictor_for(run_id: int, model: str | None, database_url: str) -> "predict.Predictor":
    from core.inference import predict

    with Session() as s:
        return predict.load_predictor(s, cfg, run_id)


@st.cache_resource(show_spinner=False, max_entries=4)
def grad_cam_for(run_id: int, model: str | None, database_url: str) -> "saliency.GradCam":
    from core.inference import saliency

    return saliency.GradCam(predictor_for(run_id, model, database_url))


with Session() as s:
    finished = views.run_rows(s, status="succeeded")
info = {r.id: {"label": r.label(), "protocol": r.protocol, "leaky": r.leaky, "classes": list(r.classes),
               "dataset": r.dataset, "accuracy": r.summary.test_accuracy, "size": r.config.image_size,
               "weights": r.weights} for r in finished}

if not info:
    st.info("No finished run yet. Train one on the **Train** page; only runs that succeeded can classify images.",
            icon=":material/biotech:")
    st.stop()

pick, about = st.columns([2, 3], vertical_alignment="bottom")
run_id = pick.selectbox("Model (a run that succeeded)", list(info), format_func=lambda i: info[i]["label"], key="pr_run")
meta = info[run_id]
about.caption(f"Trained on **{md_text(meta['dataset'])}** ({md_text(', '.join(meta['classes']))}) at "
              f"{meta['size']} px, weights {md_text(meta['weights'])}. Test accuracy {pct(meta['accuracy'])} under: {meta['protocol']}.")
if meta["leaky"]:
    st.warning("This model was evaluated with the paper's leaky protocol: its test accuracy overstates how well it "
               "does on new images.", icon=":material/warning:")

uploads = st.file_uploader("Images to classify (TIF, PNG, JPEG, BMP)", type=IMAGE_TYPES, accept_multiple_files=True,
                           key="pr_files")
if not uploads:
    st.caption("Upload one image to see its heat map, or many for a table of results.")
    st.stop()

# Decode and classify once per (model, files); the results stay while the user looks around.
model = model_of(run_id)
key = (model, tuple(hashlib.sha256(f.getvalue()).hexdigest() for f in uploads))
cache = st.session_state.setdefault("pr_results", {})
if key not in cache:
    try:
        predictor = predictor_for(run_id, model, cfg.database_url)
    except UserError as e:
        st.error(md_text(str(e)), icon=":material/warning:")
        st.stop()
    images, names, problems = [], [], []
    for f in uploads:
        try:
            images.append(load_rgb(f, max_pixels=cfg.max_image_pixels))
            names.append(f.name)
        except UserError as e:
            problems.append(str(e))
    probabilities = []
    if images:
        bar = st.progress(0.0, text="Classifying…")
        for start in range(0, len(images), BATCH):
            probabilities.extend(predictor.probabilities(images[start:start + BATCH]))
            done = min(start + BATCH, len(images))
            bar.progress(done / len(images), text=f"Classifying: {done} of {len(images)}")
        bar.empty()
    cache.clear()  # keep only the latest batch in memory
    cache[key] = {"names": names, "images": images, "probabilities": probabilities, "problems": problems,  # raw
                  "classes": predictor.classes}
result = cache[key]
classes = result["classes"]
for problem in result["problems"]:
    st.error(f"Not classified: {md_text(problem)}", icon=":material/warning:")
if not result["names"]:
    st.stop()

predictor = predictor_for(run_id, model, cfg.database_url)
# Calibrated where the run has a temperature (as on the Runs page and the command line), else raw; labelled.
displayed = Probabilities(np.asarray(result["probabilities"]), predictor.temperature)
shown, kind = displayed.shown, displayed.label
threshold, refer = None, np.zeros(len(shown), dtype=bool)
if predictor.temperature is None:
    st.caption("This run had no validation part, so these are raw model probabilities, not calibrated, and no "
               "\"uncertain, refer\" band applies. Train with a validation fraction above 0 for one.")
else:
    targets = sorted({0.8, 0.85, 0.9, 0.95, 0.99, predictor.calibration["refer_target"]})
    target = st.select_slider("Accuracy required of a prediction shown as a diagnosis", targets,
                              value=predictor.calibration["refer_target"], format_func=lambda t: f"{t:.0%}",
                              key=f"pr_target_{run_id}",
                              help="Predictions whose calibrated confidence is below the threshold that reached this "
                                   "accuracy on the run's validation images are marked 'uncertain, refer'.")
    threshold = predictor.refer_threshold(target)
    refer = calibration.refer_verdict(shown, threshold)
    n_val = predictor.calibration["n_val"]
    band = ("no threshold reached it on validation: every prediction is marked 'uncertain, refer'"
            if threshold is None else f"confidence below {threshold:.1%} is marked 'uncertain, refer'")
    st.caption(f"Probabilities are temperature-scaled (T = {predictor.temperature:.2f}) on the run's {n_val} "
               f"validation images; {band}. With few validation images the threshold is itself uncertain.")

table = pd.DataFrame([{"file": name, "predicted": classes[int(p.argmax())], "probabilities": kind,
                       "confidence": float(p.max()), "verdict": "uncertain, refer" if r else "confident",
                       **{c: float(v) for c, v in zip(classes, p)}}
                      for name, p, r in zip(result["names"], shown, refer)])

st.subheader("Result" if len(table) == 1 else f"Results for {len(table)} images")
if len(table) > 1:
    counts = table["predicted"].value_counts()
    cols = st.columns(len(classes))
    for col, c in zip(cols, classes):
        col.metric(f"Predicted {md_text(c)}", int(counts.get(c, 0)), border=True)
st.dataframe(table, hide_index=True, column_config={
    name: st.column_config.ProgressColumn(name, format="percent", min_value=0, max_value=1)
    for name in ["confidence", *classes]
})
st.download_button("Results (.csv)", icon=":material/download:", data=table.to_csv(index=False).encode(), file_name=f"predictions-run-{run_id}.csv",
                   mime="text/csv", on_click="ignore")
if len(table) > 1:
    chosen = st.selectbox("Look at one image", range(len(table)), format_func=lambda i: result["names"][i], key="pr_detail")
else:
    chosen = 0

name, image, probs = result["names"][chosen], result["images"][chosen], shown[chosen]
predicted = int(probs.argmax())
left, middle, right = st.columns([1, 1, 1], gap="medium")
with left:
    st.markdown(f"**{md_text(name)}**")
    st.image(image, caption=f"{image.width}×{image.height} px", width="stretch")
with middle:
    target = st.selectbox("Heat map for class", range(len(classes)), index=predicted, format_func=lambda i: classes[i],
                          key=f"pr_cam_class_{(model or '')[:12]}_{key[1][chosen][:12]}")  # per model and image
    with st.spinner("Computing the Grad-CAM heat map…"), user_errors():
        cam = grad_cam_for(run_id, model, cfg.database_url).explain(image, class_index=int(target))
        if cam.flat:
            cells = max(1, int(meta["size"]) // 32)
            st.info(f"Grad-CAM for {md_text(classes[cam.class_index])}: no heat map to show. This model was trained at "
                    f"{meta['size']} px, where the last dense block is {cells}×{cells} cell(s), so the map carries no "
                    "location. Train at 224 px (the paper's size) for a 7×7 map.", icon=":material/blur_off:")
        else:
            st.image(cam.overlay, caption=f"Grad-CAM for {md_text(classes[cam.class_index])} on the last dense block "
                     "(red: regions that raised this class's score)", width="stretch")
with right:
    if refer[chosen]:
        st.metric("Uncertain, refer", md_text(classes[predicted]), delta=f"most likely, {probs[predicted]:.1%} {kind}", delta_color="off",
                  border=True)
        st.warning("Not confident enough to report a subtype: refer this image to a pathologist "
                   "(or review it with more of the specimen).", icon=":material/help:")
    else:
        st.metric("Predicted subtype", md_text(classes[predicted]), delta=f"{probs[predicted]:.1%} {kind}",
                  delta_color="off", border=True)
    show_figure(probabilities_figure(classes, probs, f"Class probabilities ({kind})", f"run {run_id} · {meta['protocol']}",
                                     wrap=42), key="pr_probs")
