"""The Datasets, Augmentation and Home pages as a new user meets them: specimen groups estimated from
file numbers on the page, a group pattern that fits the data's names, the leak audit's verdict in
one plain sentence, the add form first on an empty install, the preview in the image's own
proportions, a preset marked once its values change, the best result on unseen specimens beside
colour alone, and what this server trains on.

Names follow the IICBU-2008 development copy (../shared/data/lymphoma-iicbu2008/README.md):
CLASS/NNN.png, indices in the source's order, CLL 000-077, FL 113-205, MCL 252-336.
"""

from __future__ import annotations

import re

import pytest
import torch
from sqlalchemy import select

from core.access.accounts import LOCAL_USER
from core.data import audit, groups
from core.data.ingest import ingest
from core.jobs import estimate, runs, views
from core.store.db import Image, Prediction, Run, RunStatus
from core.store.engine import make_sessionmaker
from core.store.records import LeakAudit, RunSummary, Yardstick
from core.training import presets
from core.training.run_config import RunConfig
from core.transforms import augment
from tests.synthetic import write_dataset
from tests.test_pages import open_page

DEV_NAMES = (
    [("CLL", f"CLL/{i:03d}.png") for i in range(0, 78)]
    + [("FL", f"FL/{i:03d}.png") for i in range(113, 206)]
    + [("MCL", f"MCL/{i:03d}.png") for i in range(252, 337)]
)


@pytest.fixture(autouse=True)
def no_worker(monkeypatch):
    """Record worker starts instead of spawning a training process inside the test run."""
    from core.jobs import worker

    monkeypatch.setattr(worker, "ensure_worker", lambda settings: True)


# ---------------------------------------------------------------------------------------------
# Specimen groups


def test_estimated_groups_of_the_development_names_are_about_its_specimens():
    found = groups.estimate_groups(DEV_NAMES)
    assert len(found.groups) == 256 and found.n_groups == 30  # 9 + 11 + 10 blocks of at most 9
    assert found.per_class() == {"CLL": (9, 8, 9), "FL": (11, 8, 9), "MCL": (10, 8, 9)}
    assert found.groups["CLL/000.png"] == found.groups["CLL/008.png"] != found.groups["CLL/009.png"]
    assert "approximation" in found.basis and "consecutive" in found.basis


def test_the_group_pattern_example_fits_the_data_names(settings, monkeypatch, tmp_path):
    at = open_page(monkeypatch, settings, "pages/dataset.py")
    example = at.text_input(key="ds_group_pattern").placeholder
    found = {name: re.search(example, name) for _, name in DEV_NAMES}
    assert all(found.values()), [n for n, m in found.items() if not m]
    assert found["CLL/000.png"].group(1) == found["CLL/009.png"].group(1) != found["CLL/010.png"].group(1)
    assert found["FL/120.png"].group(1) != found["MCL/320.png"].group(1)  # a group never spans two classes
    # Ingest takes it as it is shown.
    write_dataset(tmp_path / "src", per_class=12, ext=".png")
    Session = make_sessionmaker(settings.database_url)
    with Session.begin() as s:
        ingest(s, settings, tmp_path / "src", "patterned", group_pattern=example, user=LOCAL_USER)
    with Session() as s:
        assert len(set(s.scalars(select(Image.group)))) == 6  # 000-009 and 010-011 of each class


def test_an_empty_install_opens_on_the_add_form_without_tabs(settings, monkeypatch):
    at = open_page(monkeypatch, settings, "pages/dataset.py")
    assert not at.tabs  # no "Browse" tab drawn first, with nothing to browse
    assert at.file_uploader(key="ds_zip") and at.button(key="ds_add")
    assert "Add images" in [h.value for h in at.subheader]


def test_groups_are_estimated_and_applied_on_the_datasets_page(settings, monkeypatch, tmp_path):
    write_dataset(tmp_path / "src", per_class=12, ext=".png")
    Session = make_sessionmaker(settings.database_url)
    with Session.begin() as s:
        ingest(s, settings, tmp_path / "src", "numbered", user=LOCAL_USER)
    at = open_page(monkeypatch, settings, "pages/dataset.py")
    assert {m.label: m.value for m in at.metric}["Specimen groups"] == "none"
    # The gallery's size is one choice among three, its value shown once (no slider above its scale).
    assert not at.select_slider and at.segmented_control(key="ds_per_class").value == 8

    at.number_input(key="ds_block_size").set_value(4).run()
    at.button(key="ds_estimate").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    note = " ".join(i.value for i in at.info)
    assert "9 specimen groups estimated" in note and "approximation" in note and "consecutive" in note
    with Session() as s:
        assert set(s.scalars(select(Image.group))) == {None}  # nothing stored before it is applied

    at.button(key="ds_apply_groups").click().run()
    assert not at.exception and "now has 9 estimated specimen groups" in at.success[0].value
    assert {m.label: m.value for m in at.metric}["Specimen groups"] == "9"
    with Session() as s:
        stored = dict(s.execute(select(Image.original_name, Image.group)).tuples().all())
    assert len(set(stored.values())) == 9
    assert stored["CLL/000.png"] == stored["CLL/003.png"] != stored["CLL/004.png"]


# ---------------------------------------------------------------------------------------------
# The leak audit's verdict


def test_the_leak_audit_says_one_thing_in_plain_words():
    close = [audit.LeakPair("test/a", "train/b", 0.1), audit.LeakPair("test/c", "train/d", 0.2)]
    report = audit.AuditReport(
        n_train=204,
        n_test=52,
        exact=[],
        near=[],
        close=close,
        hash_threshold=10,
        feature_threshold=0.35,
        percentile=1.0,
        nn_ratio=1.02,
        warning=None,
    )
    verdict = report.verdict
    assert verdict.startswith("No copies found") and "2 test images" in verdict
    assert "about 0.5 expected by chance" in verdict and "nothing found" not in verdict.lower()
    assert not re.search(r"pHash|NN|distance|ratio|<=", verdict)  # those are the tooltip's (`summary`)
    assert "pHash" in report.summary
    # Stored with the run, and read back the same for a run stored before verdicts were.
    record = report.as_record()
    assert record.verdict == verdict
    older = {k: v for k, v in record.to_dict().items() if k not in ("verdict", "expected_close")}
    assert audit.record_verdict(LeakAudit.from_dict(older)) == verdict
    # Copies are always a leak, and so are many unusually close images; plain words both times.
    assert audit.leak_verdict(1, 2, 0, 0.5).startswith("Copies found")
    assert "near-identical" in audit.leak_verdict(0, 2, 0, 0.5)
    assert "same slides may be on both sides" in audit.leak_verdict(0, 0, 7, 0.5)


def test_a_near_copy_warning_names_no_hash_threshold():
    rng = torch.Generator().manual_seed(0)
    train = [torch.randint(0, 255, (32, 32, 3), generator=rng, dtype=torch.uint8).numpy() for _ in range(6)]
    copy = train[2].copy()
    copy[0, 0] ^= 1  # one pixel changed: not the same pixels, a near-identical image
    report = audit.audit_images(train, [copy])
    assert report.near and "nearly equal" in report.warning and "pHash" not in report.warning
    assert report.verdict.startswith("Copies found") and "near-identical" in report.verdict


# ---------------------------------------------------------------------------------------------
# Augmentation


def test_the_preview_keeps_the_image_proportions(settings, monkeypatch, tmp_path):
    write_dataset(tmp_path / "src", per_class=2, size=(417, 312), ext=".png")
    Session = make_sessionmaker(settings.database_url)
    with Session.begin() as s:
        ingest(s, settings, tmp_path / "src", "wide", user=LOCAL_USER)
    shown = []  # the sizes of the original and the augmented versions the page draws
    real_preview = augment.preview

    def recording_preview(image, *args):
        versions = real_preview(image, *args)
        shown[:] = [image.size] + [im.size for im, _ in versions]
        return versions

    monkeypatch.setattr(augment, "preview", recording_preview)
    at = open_page(monkeypatch, settings, "pages/augmentation.py")
    at.number_input(key="aug_size").set_value(64).run()
    assert not at.exception
    assert len(shown) == 9 and set(shown) == {(86, 64)}  # 417x312 with a 64 px shorter side, not 64x64
    assert "86×64" in " ".join(m.value for m in at.markdown)
    with Session() as s:
        first = views.dataset_detail(s, settings, "wide").images[0]
    assert views.preview_image(first, 224).size == (299, 224)


def test_the_preset_box_says_when_the_values_are_no_longer_the_preset(settings, monkeypatch):
    at = open_page(monkeypatch, settings, "pages/augmentation.py")
    box = at.selectbox(key="aug_preset")
    assert box.value == presets.PAPER_PRESET and "changed" not in " ".join(box.options)

    at.number_input(key="aug_rotate_probability").set_value(0.6).run()
    assert at.selectbox(key="aug_preset").options[0] == f"{presets.PAPER_PRESET} — changed"
    text = " ".join(m.value for m in at.markdown)
    assert "chance of rotating 0.4 → 0.6" in text and "save these values as a preset" in text

    at.text_input(key="aug_new_name").input("rotate more").run()
    at.button[[b.label for b in at.button].index("Save preset")].click().run()
    assert not at.exception
    box = at.selectbox(key="aug_preset")
    assert box.value == "rotate more" and not any("changed" in o for o in box.options)
    saved = at.dataframe[-1].value  # one row a preset, its operations in words (no column per setting)
    assert list(saved.columns) == ["preset", "operations", "saved", "saved by"]
    assert "rotate 60% of images" in saved["operations"][0]
    at.button[[b.label for b in at.button].index("Load preset")].click().run()  # loading it changes nothing
    assert at.number_input(key="aug_rotate_probability").value == 0.6
    assert not any("changed" in o for o in at.selectbox(key="aug_preset").options)


# ---------------------------------------------------------------------------------------------
# Home


def finished_run(Session, settings, grouped: bool, accuracy: float, colour: float | None) -> int:
    """A run recorded as succeeded with these results, without training it."""
    with Session.begin() as s:
        (run,) = runs.create_runs(
            s,
            settings,
            RunConfig(dataset="home", grouped=grouped, weights="none", image_size=32, epochs=1),
            user=LOCAL_USER,
        )
        run.status = RunStatus.succeeded
        yardstick = None if colour is None else Yardstick(colour, n_train=24, n_test=6)
        run.summary = RunSummary(test_accuracy=accuracy, colour_yardstick=yardstick).to_dict()
        s.flush()
        return run.id


def test_home_shows_the_best_grouped_result_beside_colour_alone(settings, monkeypatch, tmp_path):
    write_dataset(tmp_path / "src", per_class=10, ext=".png")
    Session = make_sessionmaker(settings.database_url)
    with Session.begin() as s:
        ingest(s, settings, tmp_path / "src", "home", user=LOCAL_USER)
    by_image = finished_run(Session, settings, grouped=False, accuracy=0.9, colour=0.5)
    at = open_page(monkeypatch, settings, "pages/home.py")
    text = " ".join(c.value for c in at.caption)
    assert "No finished run on a split grouped by specimen yet" in text
    assert f"run {by_image}) scored 90.0%" in text and "flatters" in text  # named, never called honest

    with Session.begin() as s:  # 5 groups of 2 per class, so that a grouped split can be made
        names = s.execute(select(Image.label, Image.original_name)).tuples().all()
        groups.apply_groups(s, "home", groups.estimate_groups(names, block_size=2).groups, user=LOCAL_USER)
    grouped = finished_run(Session, settings, grouped=True, accuracy=0.615, colour=0.788)
    at.run()
    assert not at.exception
    shown = {m.label: m.value for m in at.metric}
    assert shown[f"This run (run {grouped})"] == "61.5%" and shown["Colour alone, same split"] == "78.8%"
    text = " ".join(c.value for c in at.caption)
    assert "this run 61.5% on estimated specimens" in text  # the groups came from file numbers
    assert "colour alone on the same split: 78.8%" in text
    assert "grouped by specimen" in text and "stain" in text  # its protocol, and what colour alone means
    assert "90.0%" not in text  # the split by image is not the headline
    assert "cannot be said" in text  # no per-image record: no verdict either way


def test_home_says_a_gap_to_colour_alone_within_noise_is_within_noise(settings, monkeypatch, tmp_path):
    """16 of 20 test images right against colour alone's 13: 15 points, and within noise."""
    write_dataset(tmp_path / "src", per_class=10, ext=".png")
    Session = make_sessionmaker(settings.database_url)
    with Session.begin() as s:
        ingest(s, settings, tmp_path / "src", "home", user=LOCAL_USER)
        images = s.scalars(select(Image).order_by(Image.id)).all()
        for im in images:  # real specimen ids, as a manifest gives them: two images each
            im.group = f"specimen-{im.id // 2}"
        image_ids = [im.id for im in images][:20]
    run_id = finished_run(Session, settings, grouped=True, accuracy=0.8, colour=0.65)
    with Session.begin() as s:
        run = s.get(Run, run_id)
        run.summary = {
            **run.summary,
            "colour_yardstick": {
                "accuracy": 0.65,
                "n_train": 10,
                "n_test": 20,
                "correct": {str(i): k < 13 for k, i in enumerate(image_ids)},
            },
        }
        s.add_all(
            Prediction(
                run_id=run_id, image_id=i, true_label=0, predicted_label=0 if k < 16 else 1, probabilities=[0.6, 0.4]
            )
            for k, i in enumerate(image_ids)
        )
    at = open_page(monkeypatch, settings, "pages/home.py")
    text = " ".join(c.value for c in at.caption)
    assert "The network scores 15.0 points above colour alone on the same 20 test images: within noise" in text
    assert "uses more than the stain" not in text and "estimated specimens" not in text
    recent = at.dataframe[0].value  # recent runs come first
    assert list(recent.columns[:3]) == ["name", "status", "test accuracy (95% interval)"]
    assert recent["test accuracy (95% interval)"][0].startswith("80.0% (")


def test_home_says_whether_this_server_has_a_gpu(settings, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    estimate.machine_summary.cache_clear()
    try:
        at = open_page(monkeypatch, settings, "pages/home.py")
        machine = at.info[0].value
        assert machine.startswith("No GPU on this server: training runs on the CPU")
        assert "slower" in machine and "minutes" in machine and "hours" in machine

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H200")
        estimate.machine_summary.cache_clear()
        at.run()
        assert "GPU on this server: 1 × NVIDIA H200" in " ".join(c.value for c in at.caption)
        assert not any("No GPU" in i.value for i in at.info)
    finally:
        estimate.machine_summary.cache_clear()
