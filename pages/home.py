"""Home: what the app does, and the datasets and runs at a glance."""

import pandas as pd
import streamlit as st

from core import datasets, runs
from core.config import load_settings
from core.db import make_sessionmaker


@st.cache_resource
def session_factory(url: str):
    return make_sessionmaker(url)


settings = load_settings()
Session = session_factory(settings.database_url)

st.title("Lymphoma subtype recognition")
st.markdown(
    "Train and use the modified DenseNet-201 of Hasan et al. on H&E images of **CLL**, **FL** and "
    "**MCL** (or any classes you upload). Evaluation is honest by default: the data are split "
    "before augmentation, by specimen where specimens are known."
)

with Session() as s:
    ds = datasets.list_datasets(s)
    all_runs = runs.list_runs(s)
    ds_rows = [{"dataset": d.name, "images": len(d.images), "classes": ", ".join(d.classes)} for d in ds]
    run_rows = [
        {"run": r.id, "dataset": r.dataset.name, "status": r.status.value, "split": r.config["split"],
         "test accuracy": r.summary.get("test_accuracy"), "weights": r.weights_used or r.config["weights"]}
        for r in all_runs
    ]

left, right = st.columns(2)
with left:
    st.subheader("Datasets")
    if ds_rows:
        st.dataframe(pd.DataFrame(ds_rows), hide_index=True, width="stretch")
    else:
        st.info("No datasets yet. Add one with `python -m core ingest FOLDER --name NAME`.")
with right:
    st.subheader("Runs")
    if run_rows:
        st.dataframe(pd.DataFrame(run_rows), hide_index=True, width="stretch")
    else:
        st.info("No training runs yet.")
