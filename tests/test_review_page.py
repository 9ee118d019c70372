"""The Review page, driven by Streamlit's AppTest: the queue with referred predictions first, the
image or a word that it was not kept, a review recorded under the signed-in editor's name, a second
reviewer's disagreement shown, names and notes as text, and nothing of it for a viewer.

No model: the log rows are written by hand (tests/test_reviews.py has the core side).
"""

from __future__ import annotations

import hashlib
import json
from datetime import date
from pathlib import Path

import pytest
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

from core.access import accounts
from core.access.accounts import EDITOR, LOCAL_USER, VIEWER, User
from core.config import load_settings
from core.data import versions
from core.inference import prediction_log
from core.review import store
from core.store.db import Image, Run
from core.store.engine import make_sessionmaker
from core.store.review_tables import Review
from core.training.run_config import RunConfig
from tests.test_reviews import log, make_lab, png

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "streamlit_app.py")
NOTE = "**bold** <b>tag</b> [link](http://x.org)"


@pytest.fixture
def home(tmp_path, monkeypatch):
    settings = load_settings({"APP_HOME": str(tmp_path / "home")})
    monkeypatch.setenv("APP_HOME", str(settings.app_home))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("START_WORKER", "0")
    return settings


def open_review(at: AppTest) -> AppTest:
    at.run()
    assert not at.exception, at.exception
    at.switch_page("pages/review.py").run()
    assert not at.exception, at.exception
    return at


def test_an_editor_reviews_the_referred_prediction_first_and_sees_a_disagreement(home, monkeypatch):
    monkeypatch.setenv("AUTH_MODE", "none")
    Session = make_sessionmaker(home.database_url)
    data = png("FL", 7)
    prediction_log.keep_for_review(home, [(hashlib.sha256(data).hexdigest(), data)])
    confident = log(Session, 3, "CLL", 0.9, False, user="*eve*")
    referred = log(Session, 3, "FL", 0.7, True, data=data, user="*eve*")
    at = open_review(AppTest.from_file(APP, default_timeout=60))

    assert list(at.dataframe[0].value["log id"]) == [referred, confident]
    assert at.get("image") and not at.info  # the referred one's image was kept
    assert any("by \\*eve\\*" in c.value for c in at.caption)  # a name as text
    assert at.selectbox(key=f"rv_verdict_{referred}").value is None  # no class chosen for the reviewer
    at.button(key="rv_submit").click().run()
    assert any("nothing was recorded" in w.value for w in at.warning)
    with Session() as s:
        assert not s.scalars(select(Review)).all()
    at.selectbox(key=f"rv_verdict_{referred}").set_value("MCL")
    at.text_area(key=f"rv_note_{referred}").set_value(NOTE)
    at.button(key="rv_submit").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    with Session() as s:
        (row,) = s.scalars(select(Review)).all()
    assert (row.log_id, row.reviewer, row.true_class, row.note) == (referred, "local", "MCL", NOTE)
    assert list(at.dataframe[0].value["log id"]) == [confident]  # out of the reviewer's own queue
    assert any("image was not kept" in i.value for i in at.info)

    with Session.begin() as s:  # a second reviewer says otherwise
        store.record_review(s, home, User("bo", EDITOR), referred, "FL", "looks follicular")
    at.toggle(key="rv_unreviewed").set_value(False).run()
    at.selectbox(key="rv_pick").set_value(referred).run()
    assert not at.exception
    assert any("Reviewers disagree" in w.value for w in at.warning)
    reviews = at.dataframe[1].value
    assert list(reviews["reviewer"]) == ["local", "bo"] and list(reviews["note"]) == [NOTE, "looks follicular"]


def test_a_blind_review_hides_the_models_answer_until_it_is_recorded(home, monkeypatch):
    monkeypatch.setenv("AUTH_MODE", "none")
    Session = make_sessionmaker(home.database_url)
    data = png("FL", 9)
    prediction_log.keep_for_review(home, [(hashlib.sha256(data).hexdigest(), data)])
    referred = log(Session, 3, "FL", 0.7, True, data=data)  # its file name, fl-0.7.png, says the class
    with Session.begin() as s:
        store.record_review(s, home, User("bo", EDITOR), referred, "MCL", "bo's note")
    at = open_review(AppTest.from_file(APP, default_timeout=60))
    assert any(m.value.startswith("**Model's answer:** FL") for m in at.markdown)  # seen by default

    at.toggle(key="rv_blind").set_value(True).run()
    assert not at.exception, at.exception
    queue_tab = at.tabs[0]
    shown = [m.value for m in [*queue_tab.markdown, *queue_tab.caption, *queue_tab.info, *queue_tab.warning]]
    assert not [w for w in shown if "Model's answer" in w or "fl-0.7" in w or "bo's note" in w], shown
    assert not at.get("plotly_chart")  # no probabilities
    assert list(queue_tab.dataframe[0].value.columns) == ["log id", "when (UTC)", "model", "reviews", "image"]
    assert len(at.tabs[0].dataframe) == 1  # the queue; the other reviewer's verdict is not listed
    assert at.selectbox(key="rv_pick_blind").options == [f"log {referred} · run 3"]
    assert at.selectbox(key="rv_class_blind").disabled
    at.selectbox(key=f"rv_verdict_{referred}").set_value("MCL")
    at.button(key="rv_submit").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("The model had said FL (uncertain, refer)" in s.value for s in at.success)
    with Session() as s:
        rows = {r.reviewer: r.blind for r in s.scalars(select(Review))}
    assert rows == {"bo": False, "local": True}

    # Told the model's answer, the reviewer is no longer blind to it: a replacement is not counted blind.
    at.toggle(key="rv_unreviewed").set_value(False).run()
    assert any("so you know the model's answer" in c.value for c in at.caption)
    at.selectbox(key=f"rv_verdict_{referred}").set_value("CLL")
    at.button(key="rv_submit").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    with Session() as s:
        assert {(r.reviewer, r.true_class, r.blind) for r in s.scalars(select(Review))} == {
            ("bo", "MCL", False),
            ("local", "CLL", False),
        }


def test_a_viewer_gets_neither_the_queue_nor_its_images(home, monkeypatch, tmp_path):
    path = tmp_path / "accounts.toml"
    digest = accounts.hash_password("correct horse battery")
    accounts.write_accounts(path, accounts.Accounts({"vic": accounts.Account("vic", digest, VIEWER)}))
    monkeypatch.setenv("AUTH_MODE", "password")
    monkeypatch.setenv("AUTH_FILE", str(path))
    Session = make_sessionmaker(home.database_url)
    data = png("FL", 8)
    prediction_log.keep_for_review(home, [(hashlib.sha256(data).hexdigest(), data)])
    log(Session, 3, "FL", 0.6, True, data=data, user="vic")
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["auth_user"] = "vic"
    at.run()
    assert not at.exception and "vic" in " ".join(m.value for m in at.sidebar.markdown)
    assert "6. Review" not in [link.proto.label for link in at.get("page_link")]  # not a viewer's page
    with pytest.raises(ValueError, match="Could not find a navigation page") as listed:
        at.switch_page("pages/review.py")  # not among the viewer's pages
    assert "pages/predict.py" in str(listed.value)
    at.switch_page("pages/predict.py").run()  # the page the viewer has shows no other review
    assert not at.exception and not at.get("image")


def field_panel_script(run_id: int) -> None:
    from pages._field import field_panel

    field_panel(run_id)


def test_the_field_panel_draws_the_runs_reviewed_predictions(home, monkeypatch):
    monkeypatch.setenv("AUTH_MODE", "none")
    Session = make_sessionmaker(home.database_url)
    for predicted, true_class in [("CLL", "CLL"), ("FL", "MCL")]:
        log_id = log(Session, 5, predicted, 0.6, True)
        with Session.begin() as s:
            store.record_review(s, home, User("ana", EDITOR), log_id, true_class)
    at = AppTest.from_function(field_panel_script, args=(5,), default_timeout=60).run()
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Field accuracy"] == "50.0%" and metrics["Given blind"] == "0 of 2"
    assert "Reviewers agree" not in metrics  # no case reviewed twice
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    titles = [spec["layout"]["title"]["text"] for spec in specs]
    assert all("field: reviewed predictions" in t for t in titles) and len(titles) == 2
    # One week of reviews: the week axis still spans days around its Monday, not milliseconds.
    (week,) = {x for trace in specs[1]["data"] for x in trace["x"]}
    low, high = (date.fromisoformat(d[:10]) for d in specs[1]["layout"]["xaxis"]["range"])
    assert date.fromisoformat(week).weekday() == 0 and (high - low).days == 8 and low < date.fromisoformat(week) < high
    # A cell opened: its reviewed case, whose image was not kept.
    at.selectbox(key="field_5_true").set_value("MCL")
    at.selectbox(key="field_5_pred").set_value("FL").run()
    assert not at.exception, at.exception
    assert any(m.value == "**Reviewed MCL, the model said FL: 1 case(s)**" for m in at.markdown)
    assert any(c.value == "image not kept" for c in at.caption)


def retrain_panel_script(run_id: int) -> None:
    from pages._retrain import retrain_panel

    retrain_panel(run_id)


def test_the_retrain_panel_offers_a_newer_version_and_shows_the_queued_comparison(home, monkeypatch, tmp_path):
    monkeypatch.setenv("AUTH_MODE", "none")
    Session = make_sessionmaker(home.database_url)
    lab = make_lab(home, Session, tmp_path)
    with Session.begin() as s:
        sha = s.scalar(select(Image.sha256).where(Image.label == "CLL").limit(1))
        versions.relabel(s, home, "lymphoma", {sha: "FL"}, note="version 2", user=LOCAL_USER)
    at = AppTest.from_function(retrain_panel_script, args=(lab,), default_timeout=60).run()
    assert not at.exception, at.exception
    at.button(key=f"rt_train_{lab}").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    with Session() as s:
        (again,) = [r for r in s.scalars(select(Run)) if r.id != lab]
        assert RunConfig.from_dict(again.config).frozen_test_of_run == lab
    at.run()
    assert any(f"Run {again.id} is queued" in c.value for c in at.caption)


def test_home_shows_each_model_in_use_with_its_field_accuracy(home, monkeypatch, tmp_path):
    from core.inference.approval import class_set_key
    from core.store.db import ModelApproval

    monkeypatch.setenv("AUTH_MODE", "none")
    monkeypatch.setenv("START_WORKER", "0")
    Session = make_sessionmaker(home.database_url)
    lab = make_lab(home, Session, tmp_path)
    with Session.begin() as s:
        s.add(
            ModelApproval(
                class_set=class_set_key(["CLL", "FL", "MCL"]),
                run_id=lab,
                model_sha256="0" * 64,
                run_label=f"run {lab} · lymphoma",
                note="",
                approved_by="*ana*",
            )
        )
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception, at.exception
    assert any("No prediction of it reviewed" in m.value for m in at.markdown)
    assert "6. Review" in [link.proto.label for link in at.get("page_link")]  # an editor's last step

    for predicted, true_class in [("CLL", "CLL"), ("FL", "MCL")]:
        log_id = log(Session, lab, predicted, 0.6, True)
        with Session.begin() as s:
            store.record_review(s, home, User("bo", EDITOR), log_id, true_class, blind=predicted == "CLL")
    at.run()
    (line,) = [m.value for m in at.markdown if "approved by" in m.value]
    assert line.startswith("CLL, FL, MCL: run") and "approved by \\*ana\\*" in line  # a name as text
    shown = line.replace("\\", "").replace("\u2060", "")  # as the page draws it
    assert "(field, not a random draw): 50.0%" in shown and "over 2 case(s); 1 of 2 review(s) blind" in shown
