"""One CPU run end to end at a small image size: ingest -> split -> augment -> train -> evaluate."""

import pytest
from sqlalchemy import select

from core.access.accounts import LOCAL_USER
from core.evaluation.metrics import run_report
from core.inference.predict import load_predictor, predict_files
from core.jobs import execute, runs, views
from core.store.db import EpochMetric, Prediction, Run, RunStatus, SplitMember
from core.store.records import RunSummary
from core.store.runs import fold_siblings
from core.training.run_config import RunConfig
from tests.synthetic import ingest_synthetic, synthetic_image, train_runs

SMALL = dict(image_size=32, per_class=40, epochs=4, batch_size=16, lr=1e-3, weights="none", device="cpu")


@pytest.fixture
def dataset(tmp_path, settings, Session):
    return ingest_synthetic(tmp_path / "src", settings, Session, per_class=20)


def test_honest_run_records_every_epoch_and_learns(dataset, settings, Session, tmp_path):
    (run_id,) = train_runs(Session, settings, RunConfig(dataset=dataset, **SMALL))
    with Session() as s:
        run = s.get(Run, run_id)
        assert run.status == RunStatus.succeeded, run.error
        assert run.weights_used.startswith("none")
        assert run.device.startswith("cpu")
        epochs = s.scalars(select(EpochMetric).where(EpochMetric.run_id == run_id)).all()
        assert [e.epoch for e in epochs] == [1, 2, 3, 4]
        assert all(e.val_accuracy is not None and e.images_per_second > 0 for e in epochs)
        # Test predictions are exactly the split's untouched test images.
        test_ids = set(
            s.scalars(
                select(SplitMember.image_id).where(SplitMember.split_id == run.split_id, SplitMember.part == "test")
            )
        )
        preds = s.scalars(select(Prediction).where(Prediction.run_id == run_id)).all()
        assert {p.image_id for p in preds} == test_ids
        assert all(p.aug_index is None and abs(sum(p.probabilities) - 1) < 1e-3 for p in preds)
        report = run_report(s, run)
        assert report.accuracy >= 0.75, report.accuracy  # chance is 1/3
        assert "holdout 80/20" in report.protocol
        assert run.summary["n_train"] == 3 * SMALL["per_class"]
    # What the run keeps is its model file; its checkpoints went once it had succeeded.
    folder = settings.runs_dir / str(run_id)
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "train.log"]

    # The stored model predicts a new image of a class correctly.
    path = tmp_path / "new.tif"
    synthetic_image("FL", 999).save(path)
    with Session() as s:
        predictor = load_predictor(s, settings, run_id, device="cpu")
    (row,) = predict_files(predictor, [path])
    assert row["predicted"] == "FL"


def test_paper_leaky_run_tests_augmented_copies(dataset, settings, Session):
    (run_id,) = train_runs(Session, settings, RunConfig(dataset=dataset, split="paper-leaky", **{**SMALL, "epochs": 1}))
    with Session() as s:
        run = s.get(Run, run_id)
        assert run.status == RunStatus.succeeded, run.error
        preds = s.scalars(select(Prediction).where(Prediction.run_id == run_id)).all()
        # 20% of the 3 x 40 augmented copies, each naming its source image
        assert len(preds) == 24 and all(p.aug_index is not None for p in preds)
        assert "LEAKY" in run.summary["protocol"]
        # No untouched test images to score it on (a summary records only what is set).
        assert RunSummary.from_dict(run.summary).colour_yardstick is None


def test_kfold_makes_one_run_per_fold(dataset, settings, Session):
    config = RunConfig(dataset=dataset, split="kfold", folds=2, **{**SMALL, "epochs": 1, "per_class": 8})
    run_ids = train_runs(Session, settings, config)
    with Session() as s:
        folds = fold_siblings(s, s.get(Run, run_ids[0]))
        assert [r.fold for r in folds] == [0, 1]
        tested = [set(s.scalars(select(Prediction.image_id).where(Prediction.run_id == r.id))) for r in folds]
        assert not tested[0] & tested[1]
        assert len(tested[0] | tested[1]) == 60  # every image tested once
        # Each fold scores the colour-only yardstick on its own test images (the classes differ in colour).
        for run, images in zip(folds, tested):
            colour = RunSummary.from_dict(run.summary).colour_yardstick
            assert colour.n_test == len(images) and colour.accuracy >= 0.9
            assert {image for image, _ in colour.correct} == images  # each test image, right or wrong
        # Whether the folds differ is a test across their own test images, not a bare spread.
        spread = views.run_results(s, settings, folds[0].id).folds.spread
        assert spread.startswith("The 2 folds score ") and "permutation test of equal accuracy, p = " in spread


def test_non_finite_loss_fails_the_run_with_the_reason(dataset, settings, Session):
    config = RunConfig(dataset=dataset, **{**SMALL, "epochs": 1, "lr": 1e12, "per_class": 8})
    with Session.begin() as s:
        (run,) = runs.create_runs(s, settings, config, user=LOCAL_USER)
    with pytest.raises(Exception):  # noqa: B017 (whatever it raises, the run must record the reason)
        execute.execute_run(Session, settings, run.id)
    with Session() as s:
        run = s.get(Run, run.id)
        assert run.status == RunStatus.failed
        assert "loss" in run.error.lower() or "nan" in run.error.lower()


# ---------------------------------------------------------------------------------------------
# Early stopping


class _Epochs:
    """A callback that notes each finished epoch and keeps its checkpoint."""

    def __init__(self):
        self.epochs, self.checkpoints = [], {}

    def on_step(self, epoch, step, steps):
        pass

    def on_epoch(self, epoch, metrics, checkpoint, is_best):
        self.epochs.append(epoch)
        self.checkpoints[epoch] = checkpoint

    def should_stop(self):
        return False


def _fit_tiny(patience: int, epochs: int = 5, resume=None):
    """A linear model on 8x8 noise at learning rate 0: its weights never change, so the validation
    loss never falls below epoch 1's."""
    import torch
    from torch import nn

    from core.training.loop import Data, fit

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (18, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.arange(18) % 3
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    keep = _Epochs()
    fitted = fit(
        model,
        Data(x[:12], y[:12], x[12:], y[12:]),
        epochs=epochs,
        batch_size=4,
        lr=0.0,
        seed=0,
        device=torch.device("cpu"),
        callback=keep,
        config={},
        compile=False,
        patience=patience,
        resume=resume,
    )
    return fitted, keep


def test_early_stopping_ends_training_once_the_validation_loss_stops_falling():
    fitted, keep = _fit_tiny(patience=2)
    assert keep.epochs == [1, 2, 3] and (fitted.epoch, fitted.stopped_early) == (3, True)
    fitted, keep = _fit_tiny(patience=0)  # off: every epoch
    assert keep.epochs == [1, 2, 3, 4, 5] and (fitted.epoch, fitted.stopped_early) == (5, False)
    # A run resumed after epoch 2 (one epoch without improvement) stops where it would have.
    _, before = _fit_tiny(patience=0, epochs=2)
    fitted, keep = _fit_tiny(patience=2, resume=before.checkpoints[2])
    assert keep.epochs == [3] and (fitted.epoch, fitted.stopped_early) == (3, True)


def test_a_run_records_that_it_stopped_early(dataset, settings, Session, monkeypatch):
    from core.store.records import RunProgress
    from core.training import loop

    losses = iter([0.9, 1.0, 1.1])  # validation loss rises after epoch 1
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: {"loss": next(losses), "accuracy": 0.5})
    config = RunConfig(dataset=dataset, **{**SMALL, "per_class": 4, "epochs": 3, "batch_size": 12, "patience": 1})
    (run_id,) = train_runs(Session, settings, config)
    with Session() as s:
        run = s.get(Run, run_id)
        assert run.status == RunStatus.succeeded, run.error
        assert [e.epoch for e in run.epochs] == [1, 2]
        summary = RunSummary.from_dict(run.summary)
        assert (summary.stopped_early, summary.stopped_at_epoch, summary.best_epoch) == (True, 2, 1)
        assert "Stopped early after epoch 2 of 3" in RunProgress.from_dict(run.progress).bar(3)[1]


def test_early_stopping_needs_a_validation_part():
    from core.errors import UserError

    with pytest.raises(UserError, match="--val-fraction above 0") as refused:
        RunConfig(dataset="d", patience=2, val_fraction=0.0)
    assert "a validation fraction above 0" in refused.value.for_page()  # in the Train form's words


def test_cli_train_records_a_name_and_notes(dataset, settings, Session, monkeypatch):
    from core.__main__ import main

    monkeypatch.setenv("APP_HOME", str(settings.app_home))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert main(
        [
            "train",
            "--dataset",
            dataset,
            "--weights",
            "none",
            "--background",
            "--no-worker",
            "--name",
            "first try",
            "--notes",
            "to compare with the paper",
            "--patience",
            "2",
        ]
    ) in (0, None)
    with Session() as s:
        (run,) = s.scalars(select(Run)).all()
        assert (run.name, run.notes, run.status) == ("first try", "to compare with the paper", RunStatus.queued)
        assert RunConfig.from_dict(run.config).patience == 2
