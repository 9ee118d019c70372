"""Entry point: `streamlit run streamlit_app.py`. Routes to the pages (which call core/) and draws
the shared sidebar: the background worker's state."""

import streamlit as st
from sqlalchemy import select

from core.db import Run, RunStatus
from pages._common import session_factory, settings, start_worker, user_errors, worker_status

st.set_page_config(page_title="Lymphoma subtype recognition", page_icon="🔬", layout="wide")


@st.cache_resource(ttl=30, show_spinner=False)
def _worker_started(database_url: str) -> bool:
    # Once per server process and database, re-checked every 30 s, so `streamlit run` alone is
    # enough and a worker that died is replaced. The URL is the cache key.
    return start_worker(settings())


@st.cache_resource(show_spinner=False)
def local_device() -> str:
    """What a worker on this machine trains on (torch's 'auto' choice), before it reports its own."""
    from core.train import describe_device, pick_device

    return describe_device(pick_device("auto"))


def sidebar_worker() -> None:
    cfg = settings()
    with user_errors():
        _worker_started(cfg.database_url)
    with session_factory()() as s:
        status = worker_status(s, cfg)
        # A worker lists a run until its next heartbeat; show only those still running.
        listed = [r for w in status["workers"] for r in w["running"]]
        running = set(s.scalars(select(Run.id).where(Run.id.in_(listed), Run.status == RunStatus.running)))
    st.markdown("**Background worker**")
    workers = status["workers"]
    if status["alive"]:
        for w in workers:
            device = w["device"] or local_device()  # known once it has trained a run
            kind = "GPU" if device.startswith("cuda") else "CPU"
            mine = [r for r in w["running"] if r in running]
            doing = "training " + ", ".join(f"run {r}" for r in mine) if mine else "idle"
            st.markdown(f":green-badge[:material/memory: {kind}] {doing}")
            st.caption(f"{device} · heartbeat {w['heartbeat_age']:.0f} s ago")
    else:
        st.markdown(":red-badge[:material/error: not running]")
        st.caption("It starts with the app; reload the page to try again.")
    queued = int(status["queued"])
    st.caption(f"{queued} run(s) queued" if queued else "Queue empty")


pages = {
    "": [st.Page("pages/home.py", title="Home", icon=":material/home:", default=True)],
    "Data": [
        st.Page("pages/dataset.py", title="Datasets", icon=":material/folder_open:", url_path="dataset"),
        st.Page("pages/augmentation.py", title="Augmentation", icon=":material/tune:", url_path="augmentation"),
    ],
    "Model": [
        st.Page("pages/train.py", title="Train", icon=":material/rocket_launch:", url_path="train"),
        st.Page("pages/runs.py", title="Runs", icon=":material/monitoring:", url_path="runs"),
        st.Page("pages/predict.py", title="Predict", icon=":material/biotech:", url_path="predict"),
    ],
}
page = st.navigation(pages)
with st.sidebar:
    sidebar_worker()
page.run()
