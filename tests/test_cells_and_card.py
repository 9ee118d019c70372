"""A confusion matrix's cells opened on the Runs page (core/evaluation/cells.py), and a run's model card
(core/jobs/model_card.py) on the page and the command line. Finished runs are records made directly
(tests/test_runs_page.py finished_run): no training."""

from __future__ import annotations

import html

import pytest
from sqlalchemy import select

from core.__main__ import main
from core.access.accounts import EDITOR, LOCAL_USER, User
from core.data.ingest import ingest
from core.evaluation import cells, metrics
from core.inference import approval
from core.jobs import model_card
from core.store.db import Prediction, Run, RunStatus
from core.store.engine import make_sessionmaker
from core.training.run_config import RunConfig
from tests.synthetic import synthetic_image, write_dataset
from tests.test_runs_page import TINY, finished_run, open_runs

EVIL = "<img src=x onerror=alert(1)>"


@pytest.fixture(autouse=True)
def no_worker(monkeypatch):
    from core.jobs import worker

    monkeypatch.setattr(worker, "ensure_worker", lambda settings: True)


@pytest.fixture
def lab(settings):
    """Dataset 'synthetic' (3 classes x 5 images), as tests/test_runs_page.py's."""
    Session = make_sessionmaker(settings.database_url)
    write_dataset(settings.app_home.parent / "src", per_class=5)
    with Session.begin() as s:
        ingest(s, settings, settings.app_home.parent / "src", "synthetic", user=LOCAL_USER)
    return settings, Session


def test_a_cells_images_are_exactly_its_test_images(lab):
    cfg, Session = lab
    run_id = finished_run(cfg, Session, RunConfig(dataset="synthetic", **TINY))
    with Session() as s:
        run = s.get(Run, run_id)
        classes = list(run.dataset.classes)
        report = metrics.run_report(s, run)
        stored = s.execute(select(Prediction.image_id, Prediction.true_label, Prediction.predicted_label)).all()
        found = {
            (t, p): cells.cell_images(s, cfg, run_id, classes[t], classes[p])
            for t in range(len(classes))
            for p in range(len(classes))
        }
    for (t, p), images in found.items():
        assert sorted(im.image_id for im in images) == sorted(i for i, a, b in stored if (a, b) == (t, p))
        assert len(images) == report.confusion[t, p]
    assert sum(len(v) for v in found.values()) == len(stored) > 0
    some = next(im for v in found.values() for im in v)
    assert some.path.exists() and len(some.probabilities) == len(classes)


def test_choosing_a_cell_on_the_runs_page_shows_its_images(lab, monkeypatch):
    cfg, Session = lab
    run_id = finished_run(cfg, Session, RunConfig(dataset="synthetic", **TINY))
    with Session() as s:
        run = s.get(Run, run_id)
        classes, confusion = list(run.dataset.classes), metrics.run_report(s, run).confusion
    t, p = divmod(int(confusion.argmax()), len(classes))  # a cell with images
    at = open_runs(monkeypatch, cfg, runs_selected=run_id)
    pictures = len(at.get("image"))
    at.selectbox(key=f"runs_cell_{run_id}_true").set_value(classes[t])
    at.selectbox(key=f"runs_cell_{run_id}_pred").set_value(classes[p]).run()
    assert not at.exception and not at.error
    heading = [m.value for m in at.markdown if m.value.startswith("**True ")]
    assert heading == [f"**True {classes[t]}, predicted {classes[p]}: {confusion[t, p]} test image(s)**"]
    assert len(at.get("image")) == pictures + confusion[t, p]
    assert {b.key for b in at.get("download_button")} >= {f"runs_card_md_{run_id}", f"runs_card_html_{run_id}"}


@pytest.fixture
def evil_run(tmp_path, monkeypatch):
    """A succeeded, approved run on a dataset and a class named like HTML, approved by a user and
    with a note named so too."""
    cfg_home = tmp_path / "home"
    monkeypatch.setenv("APP_HOME", str(cfg_home))
    from core.config import load_settings

    cfg = load_settings({"APP_HOME": str(cfg_home)})
    Session = make_sessionmaker(cfg.database_url)
    for label in ("CLL", EVIL, "FL"):
        (tmp_path / "src" / label).mkdir(parents=True)
        for i in range(5):
            synthetic_image("CLL" if label == EVIL else label, i + 10 * len(label)).save(
                tmp_path / "src" / label / f"{i:03d}.png"
            )
    with Session.begin() as s:
        ingest(s, cfg, tmp_path / "src", EVIL, user=LOCAL_USER)
    run_id = finished_run(cfg, Session, RunConfig(dataset=EVIL, **TINY))
    with Session.begin() as s:
        approval.approve(s, cfg, run_id, User(EVIL, EDITOR), note=f"checked {EVIL}")
    return cfg, Session, run_id


SECTIONS = (
    "Intended use",
    "Not to be used for",
    "Training data",
    "Protocol and split",
    "Test metrics",
    "Calibration and the refer band",
    "Colour-only yardstick",
    "Field accuracy",
    "Approval history",
    "Model file",
)


def test_the_model_card_has_each_section_and_escapes_every_name(evil_run):
    cfg, Session, run_id = evil_run
    with Session() as s:
        card = model_card.model_card(s, cfg, run_id)
    markdown, page = model_card.to_markdown(card), model_card.to_html(card)
    assert card.approved and "(approved model)" in markdown.splitlines()[0]
    for section in SECTIONS:
        assert f"\n## {section}\n" in markdown and f"<h2>{section}</h2>" in page
    assert model_card.NO_FIELD in markdown and "not a diagnosis" in markdown
    assert card.model_sha256 and card.model_sha256 in markdown and "95% interval" in markdown
    assert "Holdout" in markdown and f"Seed {card.run.seed}" in markdown
    # Every name (dataset, class, approver, note) is text: no tag in the page, none in the Markdown.
    assert "<img" not in page and page.count(html.escape(EVIL)) >= 4
    assert "<img" not in markdown.replace("\\<img", "") and "\\<img src=x onerror=alert(1)\\>" in markdown
    assert all(tag in {"h1", "h2", "p", "table", "thead", "tbody", "tr", "th", "td"} for tag in _tags(page))


def _tags(page: str) -> set[str]:
    import re

    body = page.split("<body>", 1)[1]
    return {m.group(1) for m in re.finditer(r"<\s*/?\s*([a-zA-Z0-9]+)", body)} - {"body", "html"}


def test_the_card_command_writes_a_card_and_refuses_a_missing_or_unfinished_run(evil_run, capsys, tmp_path):
    cfg, Session, run_id = evil_run
    out = tmp_path / "card.html"
    assert main(["card", str(run_id), "--html", "--out", str(out)]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>") and "<img" not in out.read_text()
    capsys.readouterr()
    assert main(["card", "999"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: No run with id 999")
    with Session.begin() as s:
        s.get(Run, run_id).status = RunStatus.failed
    assert main(["card", str(run_id)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "only a run that succeeded" in err[0]


def test_a_per_slide_cell_holds_the_slides_the_per_slide_matrix_counts_there(lab, monkeypatch):
    """Tiles of 15 slides (each image of 'synthetic' the tile of a slide CLASS-k): each slide in the cell
    of its class and its verdict, with exactly its test tiles."""
    from core.evaluation import slides
    from core.store.db import Image, Slide

    cfg, Session = lab
    with Session.begin() as s:
        for im in s.scalars(select(Image)):
            im.group = f"{im.label}-{int(im.original_name[-7:-4])}"
        dataset_id = s.scalar(select(Image.dataset_id))
        for label in ("CLL", "FL", "MCL"):
            for k in range(5):
                s.add(
                    Slide(
                        dataset_id=dataset_id,
                        label=label,
                        file_name=f"{label}-{k}",
                        size_bytes=1,
                        mtime=0.0,
                        sha256="0" * 64,
                        mpp=0.5,
                        vendor="test",
                        width=10,
                        height=10,
                        tiling="{}",
                        tiles_kept=3,
                    )
                )
    run_id = finished_run(cfg, Session, RunConfig(dataset="synthetic", **{**TINY, "grouped": True}))
    with Session() as s:
        report = slides.slide_report(s, s.get(Run, run_id))
        tested = dict(s.execute(select(Prediction.image_id, Image.group).join(Image)).tuples().all())
        found = {(t, p): cells.slide_cell(s, cfg, run_id, t, p) for t in report.classes for p in report.classes}
    for (t, p), chosen in found.items():
        assert len(chosen) == report.confusion[report.classes.index(t), report.classes.index(p)]
        for slide in chosen:
            assert sorted(im.image_id for im in slide.tiles) == sorted(i for i, g in tested.items() if g == slide.slide)
    assert sum(len(v) for v in found.values()) == report.n > 0

    t, p = max(found, key=lambda cell: len(found[cell]))
    at = open_runs(monkeypatch, cfg, runs_selected=run_id)
    at.selectbox(key=f"runs_slide_cell_{run_id}_true").set_value(t)
    at.selectbox(key=f"runs_slide_cell_{run_id}_pred").set_value(p).run()
    assert not at.exception and not at.error
    heading = [m.value for m in at.markdown if m.value.startswith("**True ")]
    assert heading == [f"**True {t}, predicted {p}: {len(found[t, p])} test slide(s)**"]
