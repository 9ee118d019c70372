"""The Runs page and the sidebar, driven by Streamlit's AppTest: failed runs announced and explained in
the page's words, runs told apart by name and settings, runs managed by editors only, speed and time
left, plain words for calibration, the training worker's state, and approving a model.

Finished runs are records made directly (epochs, predictions, a calibration record and a stand-in
model file), so no test trains a model; the one failed run fails where a real one does, loading
ImageNet weights offline.
"""

from __future__ import annotations

import urllib.error
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

from core.access import accounts
from core.access.accounts import EDITOR, LOCAL_USER, VIEWER
from core.config import Settings, load_settings
from core.data import splits
from core.data.ingest import ingest
from core.errors import UserError
from core.evaluation.calibration import run_calibration
from core.inference.model_file import write_model
from core.jobs import execute, queue, runs
from core.store.db import EpochMetric, Prediction, Run, RunStatus, Worker, utcnow
from core.store.engine import make_sessionmaker
from core.store.records import RunProgress, RunSummary
from core.store.runs import model_path, run_dir
from core.training import presets
from core.training.run_config import RunConfig
from core.transforms.augment import AugmentParams
from tests.synthetic import write_dataset

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "streamlit_app.py")
UNUSED_HASH = "$argon2id$v=19$m=65536,t=3,p=4$unused"  # sessions are signed in directly: no password is checked
TINY = dict(
    image_size=32, epochs=2, per_class=4, batch_size=4, lr=1e-3, weights="none", device="cpu", val_fraction=0.25
)


@pytest.fixture(autouse=True)
def no_worker(monkeypatch):
    """Record worker starts instead of spawning a training process inside the test run."""
    from core.jobs import worker

    started = []
    monkeypatch.setattr(worker, "ensure_worker", lambda settings: started.append(settings) or True)
    return started


@pytest.fixture
def lab(tmp_path) -> tuple[Settings, object]:
    """An install with a dataset 'synthetic' (3 classes x 5 images) and no runs."""
    cfg = load_settings({"APP_HOME": str(tmp_path / "home")})
    Session = make_sessionmaker(cfg.database_url)
    write_dataset(tmp_path / "src", per_class=5)
    with Session.begin() as s:
        ingest(s, cfg, tmp_path / "src", "synthetic", user=LOCAL_USER)
    return cfg, Session


def finished_run(
    cfg: Settings,
    Session,
    config: RunConfig,
    *,
    status: RunStatus = RunStatus.succeeded,
    name: str | None = None,
    notes: str | None = None,
    speed: float = 0.42,
    **summary,
) -> int:
    """A run's records as training leaves them, without training: two epochs and, for a succeeded
    run, test predictions, a calibration record and a model file (a stand-in tensor)."""
    rng = np.random.default_rng(7)
    with Session.begin() as s:
        words = {k: v for k, v in (("name", name), ("notes", notes)) if v is not None}
        (run,) = runs.create_runs(s, cfg, config, **words, user=LOCAL_USER)
        s.flush()
        classes = list(run.dataset.classes)
        parts = splits.split_parts(s, run.split, run.fold)
        scored = {
            part: (
                rng.dirichlet(np.ones(len(classes)), len(parts[part])),
                [classes.index(im.label) for im in parts[part]],
            )
            for part in ("val", "test")
        }
        run.status, run.started_at = status, utcnow() - timedelta(minutes=5)
        run.finished_at, run.device = utcnow(), "cpu (2 threads)"
        s.add_all(
            EpochMetric(
                run_id=run.id,
                epoch=e,
                train_loss=1.0 / e,
                train_accuracy=0.4 * e,
                val_loss=1.1 / e,
                val_accuracy=0.35 * e,
                seconds=30.0,
                images_per_second=speed,
            )
            for e in (1, 2)
        )
        if status == RunStatus.succeeded:
            probs, labels = scored["test"]
            s.add_all(
                Prediction(
                    run_id=run.id,
                    image_id=im.id,
                    true_label=t,
                    predicted_label=int(p.argmax()),
                    probabilities=[float(v) for v in p],
                )
                for im, t, p in zip(parts["test"], labels, probs)
            )
            run.summary = RunSummary(
                protocol=splits.describe(run.split),
                test_accuracy=float(np.mean(probs.argmax(1) == labels)),
                best_epoch=2,
                n_train=12,
                n_val=len(labels),
                n_test=len(probs),
                images_per_second=speed,
                calibration=run_calibration(*scored["val"], probs, labels),
                **summary,
            ).to_dict()
        run_id, created = run.id, run.created_at
    if status == RunStatus.succeeded:
        write_model(
            model_path(cfg, run_id), {"w": torch.zeros(2)}, {"run_created": created.isoformat(), "classes": classes}
        )
    return run_id


def open_runs(monkeypatch, cfg: Settings, **state) -> AppTest:
    monkeypatch.setenv("APP_HOME", str(cfg.app_home))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    at = AppTest.from_file(APP, default_timeout=120)
    for key, value in state.items():
        at.session_state[key] = value
    at.run()
    at.switch_page("pages/runs.py").run()
    assert not at.exception, at.exception
    return at


def plain(markdown: str) -> str:
    """Markdown as it reads (md_text escapes punctuation and inserts invisible word joiners)."""
    return markdown.replace("\\", "").replace("\u2060", "")


def sidebar_text(at: AppTest) -> str:
    return " ".join(m.value for m in at.sidebar.markdown)


def visible_text(at: AppTest) -> str:
    """What the page shows as text (not the tooltips)."""
    parts = [e.value for kind in ("markdown", "caption", "error", "warning", "info", "success") for e in at.get(kind)]
    parts += [f"{m.label} {m.value}" for m in at.metric]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# A failed run


def test_a_failed_run_is_announced_and_says_what_to_do_in_the_pages_words(lab, monkeypatch):
    """Offline, a run with ImageNet weights fails where a real one does; the sidebar announces it,
    the page says what to do with the Train page's options (the command line keeps its flags), and
    the error in full waits in a collapsed, wrapped technical log (one line: a user's error has no
    traceback)."""
    from core.training import model

    class Offline:
        class IMAGENET1K_V1:  # noqa: N801 - torchvision's enum member name
            @staticmethod
            def get_state_dict(progress: bool = False):
                raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(model, "DenseNet201_Weights", Offline)
    cfg, Session = lab
    with Session.begin() as s:
        (run,) = runs.create_runs(
            s, cfg, RunConfig(dataset="synthetic", **{**TINY, "weights": "imagenet"}), user=LOCAL_USER
        )
    with pytest.raises(UserError):
        execute.execute_run(Session, cfg, run.id)
    with Session() as s:
        recorded = s.get(Run, run.id)
        assert recorded.status == RunStatus.failed and "--weights none" in recorded.error  # the CLI's words

    at = open_runs(monkeypatch, cfg)
    assert f"run {run.id} failed" in sidebar_text(at)
    assert any(f"Run {run.id}" in e.value and "failed since you last looked" in e.value for e in at.error)
    (failure,) = [plain(e.value) for e in at.error if "This run failed" in e.value]
    assert "None: random initialisation" in failure and "Train page" in failure and "--weights" not in failure
    (technical,) = [x for x in at.expander if x.label == "Technical log"]
    (log,) = technical.code
    assert log.proto.wrap_lines and f"run {run.id} failed: " in log.value and "no route to host" in log.value
    assert "Traceback" not in log.value

    at.sidebar.button(key="sb_dismiss_failures").click().run()
    assert not at.exception
    assert "failed" not in sidebar_text(at)
    assert not any("failed since you last looked" in e.value for e in at.error)
    assert any("This run failed" in e.value for e in at.error)  # the run itself still says so


# ---------------------------------------------------------------------------------------------
# Telling runs apart


def test_runs_are_told_apart_by_name_settings_and_augmentation_preset(lab, monkeypatch):
    cfg, Session = lab
    with Session.begin() as s:
        flips = presets.save_preset(s, "with flips", AugmentParams(flip_left_right_probability=0.5)).params
    paper = finished_run(cfg, Session, RunConfig(dataset="synthetic", **TINY))
    flipped = finished_run(cfg, Session, RunConfig(dataset="synthetic", augmentation=flips, **TINY))
    at = open_runs(monkeypatch, cfg)
    picker = at.selectbox(key="runs_selected")
    labels = {i: picker.format_func(i) for i in (paper, flipped)}
    assert labels[paper] != labels[flipped], labels
    assert "with flips" in labels[flipped] and "with flips" not in labels[paper]
    assert "32 px" in labels[paper] and "2 epochs" in labels[paper]

    named = finished_run(
        cfg,
        Session,
        RunConfig(dataset="synthetic", **{**TINY, "hed_jitter": 0.05}),
        name="March scanner check",
        notes="Checks the new scanner.\nSame specimens as run 1.",
    )
    at.run()
    picker = at.selectbox(key="runs_selected")
    assert picker.format_func(named) == f"Run {named} · March scanner check"
    table = at.dataframe[0]
    assert table.proto.row_height > 64  # tall enough for the grid to wrap the protocol, not cut it off
    assert list(table.value.columns[:4]) == ["name", "status", "test accuracy", "95% interval"]  # key figures first
    assert "with flips" in dict(zip(table.value["run"], table.value["name"]))[flipped]

    picker.set_value(named).run()
    assert any("Checks the new scanner." in m.value and "Same specimens as run 1." in m.value for m in at.markdown)

    at.session_state["runs_tab"] = "Compare runs"
    at.session_state["runs_compare"] = [paper, flipped]
    at.run()
    assert not at.exception
    differences = at.dataframe[-1].value
    assert list(differences.columns) == [f"Run {paper}", f"Run {flipped}"]
    assert list(differences.loc["Augmentation preset"]) == [presets.PAPER_PRESET, "with flips"]
    assert list(differences.loc["Augmentation: flip left right probability"]) == ["0", "0.5"]
    assert "Epochs" not in differences.index  # only what differs


# ---------------------------------------------------------------------------------------------
# Managing runs


def test_editors_retry_train_again_and_delete_runs(lab, monkeypatch, no_worker):
    cfg, Session = lab
    config = RunConfig(dataset="synthetic", **TINY)
    doomed = finished_run(cfg, Session, config)
    cancelled = finished_run(cfg, Session, config.replace(seed=3), status=RunStatus.cancelled)
    assert run_dir(cfg, doomed).is_dir()

    at = open_runs(monkeypatch, cfg, runs_selected=doomed)
    assert not at.button(key=f"runs_delete_{doomed}").value
    assert at.button(key=f"runs_delete_{doomed}").disabled  # until the confirmation is ticked
    at.checkbox(key=f"runs_confirm_delete_{doomed}").check().run()
    at.button(key=f"runs_delete_{doomed}").click().run()
    assert not at.exception and any(f"Deleted run {doomed}" in m.value for m in at.success)
    with Session() as s:
        assert s.get(Run, doomed) is None
        assert not s.scalars(select(Prediction).where(Prediction.run_id == doomed)).all()
    assert not run_dir(cfg, doomed).exists()

    at.selectbox(key="runs_selected").set_value(cancelled).run()
    at.button(key=f"runs_requeue_{cancelled}").click().run()  # no checkpoint: "Retry from the start"
    assert not at.exception and any(f"Run {cancelled} queued again" in m.value for m in at.success)
    with Session() as s:
        assert s.get(Run, cancelled).status == RunStatus.queued
    assert no_worker, "queueing a run again makes sure a worker is running"

    # The Train page takes the run's settings from st.session_state["train_prefill"] (a RunConfig's dict).
    at.button(key=f"runs_again_{cancelled}").click().run()
    assert not at.exception
    assert at.title[0].value == "Train"
    assert at.number_input(key="tr_seed").value == 3 and at.number_input(key="tr_epochs").value == TINY["epochs"]


def test_viewers_see_no_management_buttons(lab, monkeypatch, tmp_path):
    cfg, Session = lab
    run_id = finished_run(cfg, Session, RunConfig(dataset="synthetic", **TINY), status=RunStatus.failed)
    path = tmp_path / "accounts.toml"
    accounts.write_accounts(
        path,
        accounts.Accounts(
            {"vic": accounts.Account("vic", UNUSED_HASH, VIEWER), "ana": accounts.Account("ana", UNUSED_HASH, EDITOR)}
        ),
    )
    monkeypatch.setenv("AUTH_MODE", "password")
    monkeypatch.setenv("AUTH_FILE", str(path))
    at = open_runs(monkeypatch, cfg, auth_user="vic")
    managing = {f"runs_requeue_{run_id}", f"runs_again_{run_id}", f"runs_delete_{run_id}"}
    assert not managing & {b.key for b in at.button}
    at.session_state["auth_user"] = "ana"  # the same page for an editor
    at.run()
    assert managing <= {b.key for b in at.button}
    from core.jobs import manage

    with Session.begin() as s, pytest.raises(UserError, match="only editors"):
        manage.delete_run(s, cfg, run_id, user=accounts.User("vic", VIEWER))


def test_a_delete_and_a_workers_claim_take_turns(lab):
    """Whichever comes first wins: a deleted run is never claimed, a claimed one is not deleted."""
    from core.jobs import manage

    cfg, Session = lab
    config = RunConfig(dataset="synthetic", **TINY)
    with Session.begin() as s:
        first, second = (runs.create_runs(s, cfg, config.replace(seed=k), user=LOCAL_USER)[0].id for k in (1, 2))
    with Session.begin() as s:
        manage.delete_run(s, cfg, first, user=LOCAL_USER)
    assert queue.claim_next(Session, "w:1", first) is None  # nothing to take, nothing brought back
    assert queue.claim_next(Session, "w:1", second) == second
    with Session.begin() as s, pytest.raises(UserError, match="cancel it first"):
        manage.delete_run(s, cfg, second, user=LOCAL_USER)
    with Session() as s:
        assert s.get(Run, first) is None and s.get(Run, second).status == RunStatus.running


# ---------------------------------------------------------------------------------------------
# Speed, time left and the training worker


def test_speed_time_left_and_the_worker_say_the_same_as_the_queue(lab, monkeypatch):
    cfg, Session = lab
    done = finished_run(
        cfg,
        Session,
        RunConfig(dataset="synthetic", **{**TINY, "epochs": 6, "patience": 1}),
        speed=0.42,
        stopped_early=True,
        stopped_at_epoch=2,
    )
    with Session.begin() as s:
        (running,) = runs.create_runs(s, cfg, RunConfig(dataset="synthetic", **{**TINY, "epochs": 3}), user=LOCAL_USER)
        running.status, running.worker, running.started_at = RunStatus.running, "lab-server:4242", utcnow()
        running.heartbeat_at = utcnow()
        running.progress = RunProgress(stage="train", epoch=2, epochs=3, step=5, steps=10).to_dict()
        s.add(
            EpochMetric(
                run_id=running.id,
                epoch=1,
                train_loss=1.0,
                train_accuracy=0.5,
                val_loss=1.0,
                val_accuracy=0.5,
                seconds=30.0,
                images_per_second=0.8,
            )
        )
        (waiting,) = runs.create_runs(s, cfg, RunConfig(dataset="synthetic", **{**TINY, "seed": 5}), user=LOCAL_USER)
        # The worker's own list lags until its next heartbeat: it does not list the run yet.
        s.add(Worker(id="lab-server:4242", host="lab-server", pid=4242, heartbeat_at=utcnow(), run_ids=[]))
    at = open_runs(monkeypatch, cfg, runs_selected=running.id)
    sidebar = sidebar_text(at)
    assert f"running run {running.id} (started" in sidebar and "idle" not in sidebar
    assert "4242" not in sidebar + " ".join(c.value for c in at.sidebar.caption)  # host and pid only in the tooltip
    assert {m.label: m.value for m in at.metric}["Time left"] == "≈ 45 s"  # (3 - 1 - 0.5) epochs of 30 s
    assert any(
        "Speed 0.8 images/s in the last epoch" in c.value and "first epochs say the least" in c.value
        for c in at.caption
    )

    at.selectbox(key="runs_selected").set_value(waiting.id).run()
    assert {m.label: m.value for m in at.metric}["Time left"] == "estimating…"  # no epoch finished yet
    assert "1 run waiting in the queue" in " ".join(c.value for c in at.sidebar.caption)

    at.selectbox(key="runs_selected").set_value(done).run()
    assert any("Training speed: 0.42 images/s" in c.value for c in at.caption)
    assert any("Stopped early" in i.value and "after epoch 2 of 6" in i.value for i in at.info)


# ---------------------------------------------------------------------------------------------
# Plain words, and approving a model


def test_calibration_in_plain_words_and_a_model_approved_by_an_editor(lab, monkeypatch):
    cfg, Session = lab
    run_id = finished_run(cfg, Session, RunConfig(dataset="synthetic", **TINY))
    at = open_runs(monkeypatch, cfg)
    text = visible_text(at)
    assert "Confidence scaling" in text and "Calibration error, validation" in text
    assert "ECE" not in text and "T =" not in text and "temperature" not in text.lower()
    scaling = next(m for m in at.metric if m.label == "Confidence scaling")
    assert "Temperature scaling" in scaling.proto.help  # the technical term, in the tooltip
    assert "No model is approved for CLL, FL, MCL yet." in text
    assert "Download for use outside the app (ONNX)" in [b.proto.label for b in at.get("download_button")]

    # A tiny untrained model: the page says why not to approve it, and approving needs a second yes.
    assert any("Think twice before approving" in w.value for w in at.warning)
    at.text_area(key=f"runs_approve_note_{run_id}").input("validated on the March specimens")
    at.button(key=f"runs_approve_{run_id}").click().run()
    assert any("was not approved" in e.value and "Approve anyway" in e.value for e in at.error)
    at.checkbox(key=f"runs_approve_despite_{run_id}").check()
    at.button(key=f"runs_approve_{run_id}").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any(
        "approved model for CLL, FL, MCL" in m.value and "validated on the March" in m.value for m in at.markdown
    )
    assert any(
        "validated on the March specimens" in list(t.value["note"])[0] for t in at.dataframe if "note" in t.value
    )
