"""Suspected label errors (core/evaluation/label_issues.py) and their gallery on the Datasets page.

Three images are given a wrong class (a relabel), and a k-fold run's out-of-fold probabilities are
recorded directly, as a model that learnt the real classes would give them: no training."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

from core.access import accounts
from core.access.accounts import EDITOR, LOCAL_USER, VIEWER, User
from core.data import splits, versions
from core.data.ingest import ingest
from core.errors import UserError
from core.evaluation import label_issues
from core.jobs import runs
from core.store.db import Image, Prediction, RunStatus
from core.store.engine import make_sessionmaker
from core.store.label_checks import LabelCheck
from core.training.run_config import RunConfig
from tests.synthetic import write_dataset
from tests.test_pages import APP, open_page

ANA, VIC = User("ana", EDITOR), User("vic", VIEWER)
SWAPPED = {"CLL/001.tif": "FL", "FL/002.tif": "MCL", "MCL/003.tif": "CLL"}  # image -> the wrong class given
TINY = dict(image_size=32, epochs=1, per_class=2, weights="none", device="cpu")


@pytest.fixture(autouse=True)
def no_worker(monkeypatch):
    from core.jobs import worker

    monkeypatch.setattr(worker, "ensure_worker", lambda settings: True)


def real_class(image: Image) -> str:
    return image.original_name.split("/")[0]


def record_kfold(settings, Session, folds: int = 3) -> list[int]:
    """A succeeded k-fold run on the dataset's latest version, each fold's test images scored as a
    model that learnt their real classes (their folders) would score them."""
    rng = np.random.default_rng(0)
    with Session.begin() as s:
        made = runs.create_runs(
            s, settings, RunConfig(dataset="lab", split="kfold", folds=folds, **TINY), user=LOCAL_USER
        )
        s.flush()
        classes = list(made[0].dataset.classes)
        for run in made:
            run.status = RunStatus.succeeded
            for im in splits.split_parts(s, run.split, run.fold)["test"]:
                alpha = np.ones(len(classes))
                alpha[classes.index(real_class(im))] += 12
                p = rng.dirichlet(alpha)
                s.add(
                    Prediction(
                        run_id=run.id,
                        image_id=im.id,
                        true_label=classes.index(im.label),
                        predicted_label=int(p.argmax()),
                        probabilities=[float(v) for v in p],
                    )
                )
        return [r.id for r in made]


@pytest.fixture
def lab(settings, tmp_path):
    """Dataset 'lab' (3 classes x 8 images): version 1 as ingested, version 2 with three images given
    a wrong class, and a k-fold run on version 2."""
    Session = make_sessionmaker(settings.database_url)
    write_dataset(tmp_path / "src", per_class=8)
    with Session.begin() as s:
        ingest(s, settings, tmp_path / "src", "lab", user=ANA)
    with Session.begin() as s:
        sha = dict(s.execute(select(Image.original_name, Image.sha256)).tuples().all())
        versions.relabel(s, settings, "lab", {sha[name]: wrong for name, wrong in SWAPPED.items()}, user=ANA)
    record_kfold(settings, Session)
    return settings, Session


def test_the_three_swapped_labels_are_among_the_top_five_suspects(lab):
    settings, Session = lab
    with Session() as s:
        found = label_issues.label_issues(s, settings, "lab", 2)
    assert (found.source, found.scored, found.images, len(found.run_ids)) == (label_issues.KFOLD, 24, 24, 3)
    top = {issue.name: issue for issue in found.issues[:5]}
    assert set(SWAPPED) <= set(top), [i.name for i in found.issues]
    for name, wrong in SWAPPED.items():  # the given class is the wrong one, the suspected one the real one
        assert (top[name].given, top[name].suspected) == (wrong, name.split("/")[0])
    probabilities = [i.given_probability for i in found.issues]
    assert probabilities == sorted(probabilities)  # the most doubtful first
    assert "Out-of-fold" in found.words() and "24 of the version's 24" in found.words()


def test_the_rule_is_confident_learnings():
    """Thresholds are each class's mean self-confidence; a row is a suspect only below its own
    class's threshold with another class at or above its threshold."""
    labels = [0, 0, 0, 1, 1, 1]
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6], [0.1, 0.9]])
    assert label_issues.class_thresholds(labels, probs).round(3).tolist() == [0.633, 0.733]
    (suspect,) = label_issues.find_suspects(labels, probs)
    # Row 4 is below its class's threshold too (0.6 < 0.733), but no other class reaches its own.
    assert (suspect.index, suspect.given, suspect.suspected) == (2, 0, 1)


def test_a_confirmed_label_leaves_the_list_for_its_version_and_later_ones_and_viewers_change_nothing(lab):
    settings, Session = lab
    with Session() as s:
        first, second, third = label_issues.label_issues(s, settings, "lab", 2).issues[:3]
    for act in (
        lambda s: label_issues.confirm_label(s, "lab", 2, first.image_id, VIC),
        lambda s: label_issues.relabel_image(s, settings, "lab", 2, first.image_id, first.suspected, VIC),
    ):
        with Session.begin() as s, pytest.raises(UserError, match="only editors"):
            act(s)
    with Session.begin() as s:
        label_issues.confirm_label(s, "lab", 2, first.image_id, ANA)
        assert label_issues.relabel_image(s, settings, "lab", 2, second.image_id, second.suspected, ANA) == 3
    with Session() as s:
        again = label_issues.label_issues(s, settings, "lab", 2)
        assert s.scalar(select(LabelCheck.checked_by)) == "ana"
    assert first.image_id not in {i.image_id for i in again.issues} and again.confirmed == 1
    assert {i.image_id: i.relabelled_to for i in again.issues}[second.image_id] == second.suspected

    record_kfold(settings, Session)  # a k-fold run on version 3: the confirmed image stays off the list
    with Session() as s:
        later = label_issues.label_issues(s, settings, "lab", 3)
    listed = {i.image_id for i in later.issues}
    assert first.image_id not in listed and second.image_id not in listed and third.image_id in listed
    assert later.confirmed == 1


def test_without_a_kfold_run_only_a_runs_test_images_are_ranked_and_it_says_so(settings, tmp_path):
    Session = make_sessionmaker(settings.database_url)
    write_dataset(tmp_path / "src", per_class=5)
    with Session.begin() as s:
        ingest(s, settings, tmp_path / "src", "lab", user=ANA)
    with Session() as s:
        assert label_issues.label_issues(s, settings, "lab", 1).source == label_issues.NONE
        assert label_issues.scored_versions(s, "lab") == []
    with Session.begin() as s:
        (run,) = runs.create_runs(s, settings, RunConfig(dataset="lab", **TINY), user=LOCAL_USER)
        s.flush()
        run.status = RunStatus.succeeded
        test = splits.split_parts(s, run.split, 0)["test"]
        s.add_all(
            Prediction(run_id=run.id, image_id=im.id, true_label=0, predicted_label=0, probabilities=[0.4, 0.3, 0.3])
            for im in test
        )
    with Session() as s:
        found = label_issues.label_issues(s, settings, "lab", 1)
    assert (found.source, found.scored, found.images) == (label_issues.TEST_PART, len(test), 15)
    assert f"Only the {len(test)} test images of run {run.id}" in found.words()


def test_the_gallery_relabels_and_confirms_for_editors_only(lab, monkeypatch, tmp_path):
    settings, Session = lab
    at = open_page(monkeypatch, settings, "pages/dataset.py")
    at.selectbox(key="ds_selected").set_value("lab").run()
    assert at.selectbox(key="ds_li_version").value == 2
    captions = " ".join(c.value for c in at.caption)
    assert all(name in captions.replace("\\", "") for name in SWAPPED)
    with Session() as s:
        top = label_issues.label_issues(s, settings, "lab", 2).issues[0]
    key = f"2_{top.image_id}"
    assert at.selectbox(key=f"ds_li_class_{key}").value == top.suspected

    at.button(key=f"ds_li_relabel_{key}").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    with Session() as s:
        diff = versions.diff(s, "lab", 2, 3)
    assert [(new.name, old.label, new.label) for old, new in diff.relabelled] == [(top.name, top.given, top.suspected)]
    assert {x.change for x in diff.lines()} == {"relabelled"}
    assert (at.selectbox(key="ds_diff_old").value, at.selectbox(key="ds_diff_new").value) == (2, 3)

    with Session() as s:
        second = label_issues.label_issues(s, settings, "lab", 2).issues[1]
    at.button(key=f"ds_li_confirm_2_{second.image_id}").click().run()
    assert not at.exception
    keys = {b.key for b in at.button}
    assert f"ds_li_confirm_2_{second.image_id}" not in keys and f"ds_li_confirm_2_{top.image_id}" not in keys

    path = tmp_path / "accounts.toml"
    accounts.write_accounts(
        path, accounts.Accounts({"vic": accounts.Account("vic", "$argon2id$v=19$m=65536,t=3,p=4$unused", VIEWER)})
    )
    monkeypatch.setenv("AUTH_MODE", "password")
    monkeypatch.setenv("AUTH_FILE", str(path))
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["auth_user"] = "vic"
    at.run().switch_page("pages/dataset.py").run()
    at.selectbox(key="ds_selected").set_value("lab").run()
    assert not [b for b in at.button if b.key.startswith("ds_li_")]
    assert "needs the editor role" in " ".join(c.value for c in at.caption)
