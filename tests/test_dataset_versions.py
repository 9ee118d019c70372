"""Dataset versions (core/data/versions.py): every change to a dataset's images makes a new version,
runs name the version they trained on and are split over exactly its images and classes, and two
versions are compared image by image, on the command line and on the Datasets page."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from core.__main__ import build_parser, config_from_args, main
from core.access.accounts import EDITOR, LOCAL_USER, VIEWER, User
from core.data import splits, versions
from core.data.datasets import get_dataset
from core.data.ingest import ingest
from core.errors import UserError
from core.jobs import execute, runs
from core.store.db import Image
from core.store.engine import make_sessionmaker
from core.training.run_config import RunConfig
from tests.synthetic import write_dataset
from tests.test_pages import open_page

ANA = User("ana", EDITOR)
TINY = dict(epochs=1, image_size=32, per_class=2, weights="none", device="cpu")


def ingest_into(settings, Session, folder, per_class: int, user: User | None = ANA) -> None:
    """Write `per_class` images of each class under `folder` (the first ones always the same bytes)
    and ingest them into dataset "ds"."""
    write_dataset(folder, per_class=per_class)
    with Session.begin() as s:
        ingest(s, settings, folder, "ds", user=user)


def image_ids(Session, number: int) -> set[int]:
    with Session() as s:
        version = versions.get_version(s, get_dataset(s, "ds"), number)
        return {im.image_id for im in versions.version_images(s, version)}


def test_an_ingest_that_adds_images_makes_the_next_version_and_the_diff_lists_them(
    settings, monkeypatch, capsys, tmp_path
):
    Session = make_sessionmaker(settings.database_url)
    ingest_into(settings, Session, tmp_path / "first", per_class=2)
    ingest_into(settings, Session, tmp_path / "first", per_class=2)  # nothing new: no version
    ingest_into(settings, Session, tmp_path / "more", per_class=3)  # 000-001 again, 002 new in each class
    with Session() as s:
        listed = versions.version_list(s, "ds")
        found = versions.diff(s, "ds", 1, 2)
    assert [(v.number, v.created_by, v.counts) for v in listed] == [
        (2, "ana", {"CLL": 3, "FL": 3, "MCL": 3}),
        (1, "ana", {"CLL": 2, "FL": 2, "MCL": 2}),
    ]
    assert "3 added" in listed[0].note
    assert [im.name for im in found.added] == ["CLL/002.tif", "FL/002.tif", "MCL/002.tif"]
    assert (found.removed, found.relabelled, found.regrouped) == ((), (), ())
    assert found.summary() == "version 1 → 2: 3 added, 0 removed, 0 relabelled"

    monkeypatch.setenv("APP_HOME", str(settings.app_home))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert main(["versions", "ds"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["version 2", "version 1"]
    assert "9 images (CLL 3, FL 3, MCL 3)" in lines[0]
    assert main(["diff", "ds", "1", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "dataset 'ds', version 1 → 2: 3 added, 0 removed, 0 relabelled"
    assert [line.split("\t")[:3] for line in out[1:]] == [
        ["added", "CLL/002.tif", "CLL"],
        ["added", "FL/002.tif", "FL"],
        ["added", "MCL/002.tif", "MCL"],
    ]

    at = open_page(monkeypatch, settings, "pages/dataset.py")  # the Browse tab, on "ds"
    tables = [t.value for t in at.dataframe if "version" in t.value.columns or "change" in t.value.columns]
    assert [list(t["version"]) for t in tables if "version" in t.columns] == [[2, 1]]
    assert [list(t["image"]) for t in tables if "change" in t.columns] == [["CLL/002.tif", "FL/002.tif", "MCL/002.tif"]]


def test_a_run_launched_before_an_ingest_keeps_its_version_and_is_split_over_its_images(settings, tmp_path):
    Session = make_sessionmaker(settings.database_url)
    ingest_into(settings, Session, tmp_path / "first", per_class=4)
    with Session.begin() as s:
        (before,) = runs.create_runs(s, settings, RunConfig(dataset="ds", **TINY), user=LOCAL_USER)
    ingest_into(settings, Session, tmp_path / "more", per_class=6)  # 2 new images per class: version 2
    first, second = image_ids(Session, 1), image_ids(Session, 2)
    assert len(first) == 12 and len(second) == 18 and first < second

    with Session.begin() as s:
        again = RunConfig.from_dict(s.merge(before).config)  # "train again with these settings"
        (retrained,) = runs.create_runs(s, settings, again, user=LOCAL_USER)
        (latest,) = runs.create_runs(s, settings, RunConfig(dataset="ds", **TINY), user=LOCAL_USER)
        drawn = {
            r.id: {im.id for part in splits.split_parts(s, r.split, r.fold).values() for im in part}
            for r in (s.merge(before), retrained, latest)
        }
        numbers = {r.id: r.config["dataset_version"] for r in (s.merge(before), retrained, latest)}
    assert numbers == {before.id: 1, retrained.id: 1, latest.id: 2}
    assert drawn[before.id] == drawn[retrained.id] == first
    assert drawn[latest.id] == second
    job = execute.load_job(Session, retrained.id)  # what training reads: version 1's images alone
    assert {im.id for part in job.parts.values() for im in part} == first
    assert (job.dataset["version"], job.dataset["n_images"]) == (1, 12)


def test_relabel_makes_a_version_whose_diff_shows_it_and_earlier_versions_keep_their_classes(settings, tmp_path):
    Session = make_sessionmaker(settings.database_url)
    ingest_into(settings, Session, tmp_path / "first", per_class=3)
    stored = sorted(p for p in settings.images_dir.rglob("*") if p.is_file())
    with Session() as s:
        sha = s.scalar(select(Image.sha256).where(Image.original_name == "CLL/001.tif"))
    with Session.begin() as s:
        with pytest.raises(UserError, match="XX is not one of them"):
            versions.relabel(s, settings, "ds", {sha: "XX"}, ANA, "")
        with pytest.raises(UserError, match="not in dataset 'ds'"):
            versions.relabel(s, settings, "ds", {"0" * 64: "FL"}, ANA, "")
        with pytest.raises(UserError, match="editor"):
            versions.relabel(s, settings, "ds", {sha: "FL"}, User("vic", VIEWER), "")
        made = versions.relabel(s, settings, "ds", {sha: "FL"}, ANA, "second opinion: follicular")
        assert (made.number, made.created_by, made.note) == (2, "ana", "second opinion: follicular")
        assert made.counts == {"CLL": 2, "FL": 4, "MCL": 3}
    assert sorted(p for p in settings.images_dir.rglob("*") if p.is_file()) == stored  # no file copied
    with Session.begin() as s:
        found = versions.diff(s, "ds", 1, 2)
        dataset = get_dataset(s, "ds")
        labels = {}
        for number in (1, 2):  # the split of each version sees the image with that version's class
            split = splits.make_split(s, dataset, protocol="paper-leaky", version=number)
            (image,) = [im for im in splits.split_parts(s, split, 0)["pool"] if im.sha256 == sha]
            labels[number] = image.label
    assert labels == {1: "CLL", 2: "FL"}
    assert [(old.label, new.label, new.name) for old, new in found.relabelled] == [("CLL", "FL", "CLL/001.tif")]
    assert [(x.change, x.image, x.label) for x in found.lines()] == [("relabelled", "CLL/001.tif", "CLL → FL")]
    with Session() as s:  # version 1's split handed out a copy: the image's row keeps its new class
        assert s.scalar(select(Image.label).where(Image.sha256 == sha)) == "FL"


def test_train_names_a_version_as_name_at_number_and_a_missing_one_is_a_plain_error(
    settings, monkeypatch, capsys, tmp_path
):
    parse = build_parser().parse_args
    assert config_from_args(parse(["train", "--dataset", "ds@1"]), settings) == RunConfig(
        dataset="ds", dataset_version=1, weights=settings.default_weights
    )
    assert config_from_args(parse(["train", "--dataset", "ds"]), settings).dataset_version is None
    with pytest.raises(UserError, match="give the version once"):
        config_from_args(parse(["train", "--dataset", "ds@1", "--dataset-version", "2"]), settings)

    ingest_into(settings, make_sessionmaker(settings.database_url), tmp_path / "first", per_class=2)
    monkeypatch.setenv("APP_HOME", str(settings.app_home))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert main(["train", "--dataset", "ds@9", "--weights", "none"]) == 2
    assert capsys.readouterr().err.strip() == "error: Dataset 'ds' has no version 9; its versions are 1 to 1."
