"""The Train page for a first-time user: a quick preset sized for a machine without a GPU, a time
estimate before launching (measured here, or a labelled assumption), the run's own name and notes,
a form that keeps its values (and starts from the user's last run), plain words for augmentation,
and the preset it holds or was changed from. Driven by Streamlit's AppTest; no run is trained."""

from __future__ import annotations

import re
from datetime import datetime

import pytest
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

from core.access.accounts import LOCAL_USER
from core.config import Settings
from core.data.ingest import ingest
from core.jobs import estimate, views
from core.store.db import Dataset, Run, RunStatus
from core.store.engine import make_sessionmaker
from core.training import presets
from core.training.run_config import RunConfig
from tests.synthetic import write_dataset
from tests.test_pages import APP

CPU_ONLY = estimate.MachineSummary((), 2)
ONE_GPU = estimate.MachineSummary(("NVIDIA H200",), 16)


@pytest.fixture
def site(settings: Settings, tmp_path, monkeypatch) -> Settings:
    """A site with one small dataset 'synthetic', no worker started, and a machine without a GPU."""
    from core.jobs import worker

    write_dataset(tmp_path / "src", per_class=6)
    with make_sessionmaker(settings.database_url).begin() as s:
        ingest(s, settings, tmp_path / "src", "synthetic", user=LOCAL_USER)
    monkeypatch.setattr(worker, "ensure_worker", lambda settings: True)
    monkeypatch.setattr(estimate, "machine_summary", lambda: CPU_ONLY)
    monkeypatch.setenv("APP_HOME", str(settings.app_home))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    return settings


def train_page(at: AppTest | None = None) -> AppTest:
    """A new browser session on the Train page (or `at`'s session, back on it)."""
    if at is None:
        at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page("pages/train.py").run()
    assert not at.exception, at.exception
    return at


def texts(elements) -> str:
    return " ".join(e.value for e in elements)


def button(at: AppTest, label: str):
    return at.button[[b.label for b in at.button].index(label)]


def runs(settings: Settings) -> list[Run]:
    with make_sessionmaker(settings.database_url)() as s:
        return list(s.scalars(select(Run).order_by(Run.id)))


# ---------------------------------------------------------------------------------------------
# A first run on a CPU


def test_without_a_gpu_the_form_starts_with_the_quick_preset_and_a_labelled_rough_estimate(site):
    at = train_page()
    labels = [b.label for b in at.button if b.key and b.key.startswith("tr_preset_")]
    assert labels[0] == presets.QUICK_TRY and not re.search(r"\d", presets.QUICK_TRY)  # the estimate says how long
    assert (
        at.number_input(key="tr_image_size").value,
        at.number_input(key="tr_epochs").value,
        at.number_input(key="tr_per_class").value,
        at.number_input(key="tr_patience").value,
    ) == (64, 3, 200, 1)
    # The site's weights (ImageNet) cannot be had here (no internet, none under TORCH_HOME): the preset
    # proposes random initialisation and says why, so the first launch is not refused.
    assert site.default_weights == "imagenet" and at.radio(key="tr_weights").value == "none"
    assert "cannot be loaded on this server" in texts(at.info)
    assert presets.QUICK_TRY in texts(at.info) and "No GPU on this machine" in texts(at.info)
    assert f"holds the settings of the preset '{presets.QUICK_TRY}'" in texts(at.caption)
    info = texts(at.info)
    assert "No GPU found" in info and "(2 cores)" in info
    assert "rough figure from an assumption, not a measurement" in info and "minutes" in info
    at.button(key="tr_launch").click().run()  # the first click queues the run
    assert not at.exception and not at.error, [e.value for e in at.error]
    (run,) = runs(site)
    assert RunConfig.from_dict(run.config).weights == "none"


def test_with_a_gpu_the_paper_comes_first(site, monkeypatch):
    monkeypatch.setattr(estimate, "machine_summary", lambda: ONE_GPU)
    at = train_page()
    labels = [b.label for b in at.button if b.key and b.key.startswith("tr_preset_")]
    assert labels[0] == presets.PAPER_LEAKY and labels[-1] == presets.QUICK_TRY
    assert (at.number_input(key="tr_image_size").value, at.number_input(key="tr_epochs").value) == (224, 25)
    assert "GPU found: NVIDIA H200" in texts(at.info) and "on this machine's GPU yet" in texts(at.info)


def test_the_estimate_comes_from_runs_measured_here(site):
    Session = make_sessionmaker(site.database_url)
    with Session.begin() as s:  # a finished CPU run at 64 px: 12 images/s, 40 s outside training
        dataset = s.scalar(select(Dataset))
        s.add(
            Run(
                dataset_id=dataset.id,
                experiment="x",
                seed=0,
                status=RunStatus.succeeded,
                device="cpu (2 threads)",
                config=RunConfig(dataset="synthetic", image_size=64).to_dict(),
                summary={"images_per_second": 12.0},
                timings={"data_and_augment": 30.0, "train": 300.0},
                started_at=datetime(2026, 1, 1, 12, 0, 0),
                finished_at=datetime(2026, 1, 1, 12, 5, 40),
            )
        )
    at = train_page()
    info = texts(at.info)
    # 3 classes x 200 images x 3 epochs at 12 images/s = 150 s, plus 340 - 300 = 40 s: about 3 minutes
    assert "About 3 minutes on this machine (CPU): 600 training images × 3 epoch(s) at 12 images/s" in info
    assert "plus about 40 s per run" in info
    assert "as the last 1 run(s) at 64 px" in info and "assumption" not in info
    # At another image size nothing was measured: the rough figure again.
    at.number_input(key="tr_image_size").set_value(96).run()
    assert "rough figure from an assumption" in texts(at.info)


def test_quick_preset_fits_in_about_five_minutes_and_no_preset_name_quotes_a_figure(Session):
    config = RunConfig(dataset="d", **presets.training_preset(presets.QUICK_TRY))
    with Session() as s:
        rough = estimate.time_estimate(s, config, 3, CPU_ONLY)
    assert not rough.measured and 1 <= rough.minutes <= 6, rough
    assert (config.split, config.weights, config.patience) == ("holdout", "imagenet", 1)  # RunConfig's weights default
    for name in presets.TRAINING_PRESETS:
        assert not re.search(r"\d%", name), name
    assert "62.9% ± 9.3%" in presets.TRAINING_PRESET_HELP[presets.UNSEEN_SPECIMENS_CPU]  # with its source
    assert "docs/generalisation.md" in presets.TRAINING_PRESET_HELP[presets.UNSEEN_SPECIMENS_CPU]


# ---------------------------------------------------------------------------------------------
# Name, notes; the form's memory


def test_name_and_notes_reach_the_run_and_the_placeholder_is_the_automatic_name(site):
    at = train_page()
    at.radio(key="tr_weights").set_value("none").run()
    config = RunConfig(dataset="synthetic", **{**presets.training_preset(presets.QUICK_TRY), "weights": "none"})
    assert at.text_input(key="tr_name").placeholder == " · ".join(["synthetic", *views.setting_words(config)])
    at.text_input(key="tr_name").input("first try")
    at.text_area(key="tr_notes").input("to see the flow").run()
    at.button(key="tr_launch").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    (run,) = runs(site)
    assert (run.name, run.notes) == ("first try", "to see the flow")
    assert at.text_input(key="tr_name").value == ""  # the next run gets a name of its own


def test_the_form_keeps_its_values_across_pages_and_a_new_session_starts_from_the_last_run(site):
    at = train_page()
    at.radio(key="tr_weights").set_value("none")
    at.number_input(key="tr_epochs").set_value(2)
    at.number_input(key="tr_image_size").set_value(32).run()
    at.switch_page("pages/runs.py").run()
    at = train_page(at)  # back from another page: as left
    assert (at.number_input(key="tr_epochs").value, at.number_input(key="tr_image_size").value) == (2, 32)
    assert at.radio(key="tr_weights").value == "none"
    at.button(key="tr_launch").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    fresh = train_page()  # a reload: a new session, filled from the run this user launched last
    assert (fresh.number_input(key="tr_epochs").value, fresh.number_input(key="tr_image_size").value) == (2, 32)
    assert fresh.radio(key="tr_weights").value == "none"
    assert "settings of the last run you launched" in texts(fresh.info)


def test_settings_handed_over_fill_the_form_once_and_custom_augmentation_is_named_so(site):
    at = AppTest.from_file(APP, default_timeout=120).run()
    custom = {**RunConfig(dataset="x").augmentation, "rotate_probability": 0.1}
    at.session_state["train_prefill"] = RunConfig(
        dataset="synthetic", epochs=7, image_size=96, weights="none", augmentation=custom
    ).to_dict()
    at = train_page(at)
    assert (at.number_input(key="tr_epochs").value, at.number_input(key="tr_image_size").value) == (7, 96)
    box = at.selectbox(key="tr_aug_preset")
    assert box.value.startswith("Custom") and box.value != presets.PAPER_PRESET
    assert "rotate 10% of images" in texts(at.caption)
    at.number_input(key="tr_epochs").set_value(9).run()
    at.switch_page("pages/runs.py").run()
    at = train_page(at)
    assert at.number_input(key="tr_epochs").value == 9  # filled once, then the user's
    at.button(key="tr_launch").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    (run,) = runs(site)
    assert RunConfig.from_dict(run.config).augmentation == custom


# ---------------------------------------------------------------------------------------------
# Words


def test_augmentation_is_shown_in_plain_words_and_a_changed_preset_says_so(site):
    at = train_page()
    (table,) = at.dataframe
    shown = list(table.value["setting"])
    assert "Chance of rotating" in shown and "Chance of rotating by 90°" in shown
    assert not any("_" in s or "rotate90" in s for s in shown)
    assert "rotate 40% of images, up to 3° left or 3° right" in texts(at.caption)
    at.number_input(key="tr_epochs").set_value(4).run()
    caption = texts(at.caption)
    assert f"Changed from '{presets.QUICK_TRY}'" in caption and "epochs 3 → 4" in caption
    button(at, presets.PAPER_HONEST).click().run()
    assert f"holds the settings of the preset '{presets.PAPER_HONEST}'" in texts(at.caption)


def test_every_augmentation_setting_has_a_plain_label():
    assert set(presets.AUGMENT_LABELS) == set(RunConfig(dataset="x").augmentation)


def test_the_runs_page_opens_on_the_run_just_launched(site):
    at = train_page()
    at.radio(key="tr_weights").set_value("none").run()
    at.button(key="tr_launch").click().run()
    at.switch_page("pages/runs.py").run()
    first = runs(site)[-1].id
    assert at.selectbox(key="runs_selected").value == first
    at = train_page(at)
    at.number_input(key="tr_epochs").set_value(2).run()
    at.button(key="tr_launch").click().run()
    at.switch_page("pages/home.py").run()  # elsewhere first, then Runs from the sidebar
    at.switch_page("pages/runs.py").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="runs_selected").value == runs(site)[-1].id != first


def test_the_estimate_takes_the_median_speed_so_one_run_on_a_busy_machine_does_not_drag_it(site):
    Session = make_sessionmaker(site.database_url)
    with Session.begin() as s:  # three runs at 12 images/s, one at 2 (other work shared the cores)
        dataset = s.scalar(select(Dataset))
        for speed in (12.0, 12.0, 2.0, 12.0):
            s.add(
                Run(
                    dataset_id=dataset.id,
                    experiment="x",
                    seed=0,
                    status=RunStatus.succeeded,
                    device="cpu",
                    config=RunConfig(dataset="synthetic", image_size=64).to_dict(),
                    summary={"images_per_second": speed},
                    timings={"train": 300.0},
                    started_at=datetime(2026, 1, 1, 12, 0, 0),
                    finished_at=datetime(2026, 1, 1, 12, 5, 40),
                )
            )
    with Session() as s:
        config = RunConfig(dataset="synthetic", **presets.training_preset(presets.QUICK_TRY))
        figure = estimate.time_estimate(s, config, 3, CPU_ONLY)
    assert figure.images_per_second == 12.0 and figure.measured_runs == 4
