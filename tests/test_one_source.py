"""Facts stated once: how long something takes in words (core/words.py), the paper's settings
(core/paper.py), where a piece of work is (core/progress.py)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from core import paper
from core.jobs import estimate, reproduce_report
from core.progress import Progress, seconds_left
from core.store.records import RunProgress
from core.training import presets
from core.training.run_config import RunConfig
from core.transforms.augment import AugmentParams
from core.words import duration_text

ROOT = Path(__file__).resolve().parents[1]


def test_durations_at_the_boundaries_short_and_long():
    short = {0: "0 s", 44.6: "45 s", 89.4: "89 s", 90: "2 min", 150: "2 min", 151: "3 min", 5399: "90 min"}
    short |= {5400: "1.5 h", 9000: "2.5 h", -3: "0 s", None: "–"}
    assert {s: duration_text(s) for s in short} == short
    long = {40: "40 s", 84: "84 s", 90: "2 minutes", 3599: "60 minutes", 5399: "90 minutes", 5400: "1.5 hours"}
    assert {s: duration_text(s, long=True) for s in long} == long


def test_the_paper_settings_are_read_from_one_place():
    p, config = paper.PAPER, RunConfig(dataset="d")
    assert not p.differences(config)  # RunConfig's defaults are the paper's
    assert AugmentParams() == AugmentParams(**dataclasses.asdict(p.augmentation))
    for name in (presets.PAPER_LEAKY, presets.PAPER_HONEST):
        assert not p.differences(RunConfig(dataset="d", **presets.training_preset(name)))
    # The report's paper column is read from the record it is given, not written again.
    other = dataclasses.replace(p, epochs=7, lr=3e-3, augmentation=paper.PaperAugmentation(rotate_probability=0.1))
    table = "\n".join(reproduce_report._settings_table(config, "imagenet (torchvision)", other))
    assert "| epochs | 25 | 7 |" in table and "Adam, lr 0.003" in table and "rotate 0.1/3/3" in table
    assert "| epochs | 25 | 25 |" in "\n".join(reproduce_report._settings_table(config, "imagenet"))
    assert reproduce_report._reduced(config, "imagenet", other) == ["epochs 25 (paper: 7)", "lr 0.0001 (paper: 0.003)"]
    assert not p.differences(estimate.paper_config()) and estimate.PAPER_CLASSES == len(p.classes)


def test_changing_the_paper_record_changes_every_reader():
    """In a fresh interpreter, PAPER is changed before anything reads it: RunConfig's defaults, the
    augmentation's, the network's head, the paper presets and the report's table all follow."""
    code = """
import dataclasses
from core import paper
paper.PAPER = dataclasses.replace(paper.PAPER, epochs=9, image_size=96, hidden=64, dropout=0.25,
                                  augmentation=paper.PaperAugmentation(zoom_probability=0.3))
from core.training import presets
from core.training.run_config import RunConfig
from core.transforms.augment import AugmentParams
from core.jobs import reproduce_report
import inspect
from core.training.model import PaperDenseNet
config = RunConfig(dataset="d")
assert (config.epochs, config.image_size) == (9, 96), config
assert AugmentParams().zoom_probability == 0.3 and config.augment_params.zoom_probability == 0.3
assert presets.training_preset(presets.PAPER_LEAKY)["epochs"] == 9
defaults = inspect.signature(PaperDenseNet).parameters
assert (defaults["hidden"].default, defaults["dropout"].default) == (64, 0.25)
table = "\\n".join(reproduce_report._settings_table(config, "imagenet"))
assert "| epochs | 9 | 9 |" in table and "| image size | 96x96 | 96x96 |" in table and "zoom 0.3/0.9" in table
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_a_run_and_a_slide_job_say_their_progress_as_the_one_record():
    training = RunProgress(stage="train", epoch=2, epochs=4, step=5, steps=10).progress(4)
    assert training == Progress(15, 40, "Epoch 2 of 4, step 5 of 10") and training.fraction == 0.375
    assert RunProgress(stage="train", epoch=2, step=5, steps=10).bar(4) == (0.375, "Epoch 2 of 4, step 5 of 10")
    preparing = RunProgress(stage="decode", done=3, total=8).progress(4)
    assert (preparing.fraction, preparing.words) == (0.0, "Preparing data: decode 3 of 8")
    assert RunProgress.from_dict({"stage": "train", "epoch": 1, "step": 2, "steps": 4, "unknown": 1}).bar(2)[0] == 0.25
    assert seconds_left(30.0, 10, 40) == 90.0 and seconds_left(30.0, 0, 40) is None and seconds_left(5, 1, None) is None
    assert Progress(10, 40, "10 of 40 tiles classified", 90.0).text() == "10 of 40 tiles classified · about 2 min left"


def test_home_and_train_estimate_the_paper_settings_with_the_one_estimate(Session):
    machine = estimate.MachineSummary((), 4)
    with Session() as s:
        home = estimate.paper_estimate(s, machine)
        train = estimate.time_estimate(s, RunConfig(dataset="-"), 3, machine)
    assert home == train and not home.measured
    # 3 classes x 1200 x 25 epochs at 2.2 images/s a core on 4 cores, plus 45 s outside training
    assert abs(home.minutes * 60 - (90_000 / 8.8 + 45)) < 1e-6
    words = duration_text(home.minutes * 60, long=True)
    assert words == "2.9 hours" and f"take roughly {words} here by reference speeds, not timed" in machine.sentence(
        home
    )
    assert machine.sentence() == machine.sentence(home)  # without a database: the same figure
    timed = dataclasses.replace(home, measured_runs=2)
    assert f"take about {words} here, as runs here went" in machine.sentence(timed)
    assert "not timed" not in machine.sentence(timed).split("the paper's settings")[1]
